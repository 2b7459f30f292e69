"""`python -m streamtrain.bench`: the flags, the run, the files it writes."""
import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .measure import worker_main
from .presets import PRESETS
from .report import to_markdown
from .rows import BASELINE, describe, discover_rows
from .runner import WORKER_TIMEOUT_S, benchmark

DESCRIPTION = "Speed, memory and quality of every update path, side by side, as ratios."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamtrain.bench", description=DESCRIPTION)
    p.add_argument("--preset", default="quick", choices=PRESETS,
                   help="quick (a smoke check, about a minute), full (the published CPU table), gpu (a GPU lease)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="device for every row (default: cuda for --preset gpu, else cpu)")
    p.add_argument("--baseline", default=BASELINE, help=f"row the ratios are taken against ({BASELINE})")
    p.add_argument("--only", default=None, help="comma-separated row names to run (see --list)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per worker (default: the preset's; 0: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds over all rows (default: the preset's)")
    p.add_argument("--worker-timeout", type=float, default=WORKER_TIMEOUT_S,
                   help="seconds one worker process may run before its row is marked failed (default: %(default)s)")
    p.add_argument("--no-svd", dest="svd", action="store_false", help="leave out the SVD comparison")
    p.add_argument("--no-hooks", dest="hooks", action="store_false", help="leave out the hook-overhead section")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="leave out the low-bit quality section (bf16 vs INT8 weights vs INT8 + INT4 projectors)")
    p.add_argument("--parallel-ranks", type=int, default=None,
                   help="ranks of the data-parallel section (default: the preset's, 2 for full, 0 (left out) "
                        "for quick and gpu); each run launches them with torchrun")
    p.add_argument("--out", default=None, help="output path without suffix (default: profiles/bench-DEVICE "
                                               "for --preset full, runs/bench-PRESET-DEVICE otherwise)")
    p.add_argument("--note", default=None,
                   help="a line for the report's header (e.g. what else ran on the machine meanwhile)")
    p.add_argument("--list", action="store_true", help="list the rows this installation can run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    if args.list:
        rows, skipped = discover_rows(device)
        print("\n".join([f"{r.name}: {r.note or describe(asdict(r))}" for r in rows]
                        + [f"skipped: {line}" for line in skipped]))
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    try:
        report = run(args, device)
        if args.note:
            report["note"] = args.note
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or (f"profiles/bench-{device}" if args.preset == "full" else f"runs/bench-{args.preset}-{device}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    Path(f"{out}.md").write_text(markdown)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


def run(args, device: str) -> dict:
    chosen = {k: v for k, v in (("threads", args.threads), ("repeats", args.repeats),
                                ("parallel_ranks", args.parallel_ranks)) if v is not None}
    if chosen.get("threads", 0) < 0 or chosen.get("repeats", 1) < 1 or args.worker_timeout <= 0:
        raise ValueError("--threads must be >= 0, --repeats >= 1 and --worker-timeout > 0")
    if chosen.get("parallel_ranks") == 1 or chosen.get("parallel_ranks", 0) < 0:
        raise ValueError("--parallel-ranks must be 0 (leave the section out) or at least 2")
    preset = replace(PRESETS[args.preset], **chosen)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    return benchmark(preset, device, only, args.baseline, args.svd, args.hooks, args.preset,
                     log=lambda s: print(s, file=sys.stderr, flush=True), worker_timeout_s=args.worker_timeout,
                     quality=args.quality)
