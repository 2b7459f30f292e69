"""`streamtrain COMMAND` (and `python -m streamtrain COMMAND`): one entry point, three commands.

- `train`: plan, then train; the same as `python -m streamtrain.run`, which keeps working.
- `plan`: the dry run (`train --dry-run`): exit 0 when the run fits its budget, 1 when it does not.
- `generate`: sample text from a trained `final/` folder.

Each command owns its flags (`streamtrain train --help`); this module only dispatches.
"""
import sys

USAGE = """usage: {prog} COMMAND [flags]     ({prog} COMMAND --help lists its flags)

commands:
  train      plan, then train (the same as python -m streamtrain.run)
  plan       plan memory only, allocate nothing: exit 0 if the run fits its --budget, 1 if not
  generate   sample text from a trained model folder (a run's <out>/final)

examples:
  {prog} train --model byte-small --budget 4GB
  {prog} plan --recipe llama-7b-24gb
  {prog} generate runs/x/final --prompt "def main(" --temperature 0.8 --top-k 40
"""
COMMANDS = ("train", "plan", "generate")


def main(argv=None, prog: str = "streamtrain") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(prog=prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("train", "plan"):
        from . import run
        return run.main(rest, prog=f"{prog} {command}", dry_run=command == "plan")
    if command == "generate":
        from . import generate
        return generate.main(rest, prog=f"{prog} generate")
    hint = f"put a command first: {prog} train {' '.join(argv)}" if command.startswith("-") else \
        f"choose one of {', '.join(COMMANDS)}"
    print(f"error: unknown command {command!r}; {hint}", file=sys.stderr)
    return 2


def console_script() -> None:
    """The `streamtrain` executable (pyproject's [project.scripts])."""
    sys.exit(main())
