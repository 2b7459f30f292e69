"""`python -m streamtrain.data tokenize INPUT OUTPUT.bin`: text into a token .bin and its sidecar."""
import argparse
import sys
from pathlib import Path

from .corpus import tokenize_to_file
from .errors import DataError
from .tokenfile import sidecar_path
from .tokenizer import make_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamtrain.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tokenize = commands.add_parser("tokenize", help="tokenize text into a .bin and its .bin.json sidecar")
    tokenize.add_argument("input", help="a text file, folder, .jsonl file or 'builtin'")
    tokenize.add_argument("output", help="the .bin to write; its sidecar is OUTPUT.json")
    tokenize.add_argument("--tokenizer", help="tokenizer.json (default: UTF-8 bytes)")
    tokenize.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    args = parser.parse_args(argv)
    try:
        meta = tokenize_to_file(args.input, args.output, make_tokenizer(args.tokenizer), args.text_field)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {meta['tokens']:,} {meta['dtype']} tokens ({meta['documents']:,} documents) to "
          f"{args.output} and {sidecar_path(Path(args.output))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
