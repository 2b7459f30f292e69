"""`python -m streamtrain.run`: plan, then train, on the built-in corpus by default.

A thin layer: flags parse into a TrainConfig (streamtrain/config.py), which goes to the same
`train` function a library user calls. User errors print one line and exit with status 2; a run
stopped by SIGINT/SIGTERM saves a checkpoint and exits 128+signal; non-finite steps in a row exit 3
(after a checkpoint), out of memory exits 1 (the last checkpoint kept). `--resume auto` continues.
"""
import argparse
import sys

from .config import ConfigError, add_config_arguments, config_from_args
from .models.presets import describe_presets

EPILOG = """examples:
  python -m streamtrain.run                                  # small preset, built-in corpus
  python -m streamtrain.run --model list                     # list presets
  python -m streamtrain.run --method galore --rank 64 --accumulate 4 --steps 500
  python -m streamtrain.run --out runs/x --save-every 100 --resume auto   # continue runs/x if stopped
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamtrain.run", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.model == "list":
        print(describe_presets())
        return 0
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
    print(done_line(summary))
    return 0


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
