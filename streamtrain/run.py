"""`python -m streamtrain.run`: plan, then train, on the built-in corpus by default.

A thin layer: flags parse into a TrainConfig (streamtrain/config.py), which goes to the same
`train` function a library user calls. User errors print one line and exit with status 2.
"""
import argparse
import sys

from .config import ConfigError, add_config_arguments, config_from_args
from .models.presets import describe_presets

EPILOG = """examples:
  python -m streamtrain.run                                  # small preset, built-in corpus
  python -m streamtrain.run --model list                     # list presets
  python -m streamtrain.run --method galore --rank 64 --accumulate 4 --steps 500
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
        from .train import train  # torch-heavy import after the arguments are known to be sane
        summary = train(config)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"done: {summary['steps']} steps, val loss {summary['initial_val_loss']:.4f} -> "
          f"{summary['val_loss']:.4f} (perplexity {summary['val_perplexity']:.2f}); weights in {summary['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
