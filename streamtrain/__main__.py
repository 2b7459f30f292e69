"""`python -m streamtrain COMMAND`: the same commands as the `streamtrain` executable (cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m streamtrain"))
