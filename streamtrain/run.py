"""`python -m streamtrain.run` (= `streamtrain train`): plan, then train, on the built-in corpus by default.

A thin layer: flags (over a --recipe and a --config file) parse into a TrainConfig
(streamtrain/config.py), which goes to the same `train` function a library user calls. Exit
status: 0 done (or a dry run that fits); 1 a dry run that does not fit, or out of memory (the last
checkpoint kept); 2 a user error, printed as one line; 3 non-finite steps in a row (after a
checkpoint); 128+signal a run stopped by SIGINT/SIGTERM (after a checkpoint; --resume auto continues).
"""
import argparse
import sys

from .config import ConfigError, add_config_arguments, config_from_args
from .models.presets import describe_presets

PROGRAM = "python -m streamtrain.run"
EPILOG = """examples:
  {prog}                                  # small preset, built-in corpus
  {prog} --model list                     # list presets
  {prog} --recipe list                    # list named recipes
  {prog} --method galore --rank 64 --accumulate 4 --steps 500
  {prog} --out runs/x --save-every 100 --resume auto   # continue runs/x if stopped
  {prog} --config runs/x/run_config.json --out runs/y  # replay runs/x into runs/y
  {prog} --recipe llama-7b-24gb --dry-run              # the 7B plan for one 24 GB GPU
"""
DRY_RUN_DOES_NOT_FIT = 1
PLAN = ("Plan memory only (a dry run: nothing allocated, nothing trained): exit 0 when the run fits\n"
        "its --budget, 1 when it does not, with the whole command that fits.")


def parser(prog: str = PROGRAM) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=PLAN if prog.endswith(" plan") else __doc__.splitlines()[0],
                                epilog=EPILOG.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return p


def main(argv=None, prog: str = PROGRAM, dry_run: bool = False) -> int:
    """Train (or, with dry_run, only plan) as the command line says; returns the exit status."""
    args = parser(prog).parse_args(argv)
    if listing := list_request(args):
        print(listing)
        return 0
    if dry_run:
        args.dry_run = True
    try:
        config = config_from_args(args)
        from .train import RunStopped, train  # torch-heavy import after the arguments are known to be sane
        try:
            summary = train(config)
        except RunStopped as e:  # a signal, non-finite steps or out of memory: the message says what was kept
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not summary.get("quiet"):  # (ranks other than 0 of a torchrun launch)
        print(done_line(summary))
    return DRY_RUN_DOES_NOT_FIT if summary.get("dry_run") and not summary["fits"] else 0


def list_request(args) -> str | None:
    """The table `--model list` or `--recipe list` asks for, else None."""
    if getattr(args, "model", None) == "list":
        return describe_presets()
    if getattr(args, "recipe", None) == "list":
        from .recipes import describe_recipes
        return describe_recipes()
    return None


def done_line(summary: dict) -> str:
    if summary.get("dry_run"):
        return summary["message"]
    line = f"done: {summary['steps']} steps"
    if summary.get("val_loss") is not None:  # None when a resumed run had no step left to take
        start = summary.get("initial_val_loss")
        line += (f", val loss {'' if start is None else f'{start:.4f} -> '}{summary['val_loss']:.4f} "
                 f"(perplexity {summary['val_perplexity']:.2f})")
    return f"{line}; weights in {summary['weights']}"


if __name__ == "__main__":
    sys.exit(main())
