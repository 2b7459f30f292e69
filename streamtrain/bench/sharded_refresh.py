"""GaLore's two sharded refreshes side by side: gather-on-owner vs the distributed range finder.

    python -m streamtrain.bench.sharded_refresh [--ranks 2] [--repeats 5] [--out profiles/fsdp-refresh.md]

Spawns `--ranks` gloo processes on this machine (one thread each). Each holds its shard of a random
fp32 gradient G (m x n, sharded on the dimension GaLore does not project, as shard_model places
it) and computes the new basis with distributed/sharded_refresh.sharded_basis, once per method
and shape, `--repeats` times; the table gives the median wall time of the slowest rank, the bytes
each rank sent (the refresh's own counter: payload bytes, what NCCL or gloo would move) and the
largest deviation of the two methods' bases from one process's (the projector P P^T, which does
not depend on the basis' signs). One refresh uses the matrix's owner: in a step where many matrices
refresh, gather spreads owners round robin, so its time is paid once per matrix on one rank while
the sketch costs every rank every matrix; the table reports the one-matrix latency.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..distributed.fsdp import ShardGroup
from ..distributed.sharded_refresh import REFRESH_METHODS, my_slice, sharded_basis
from ..optim.projector import projection_side
from ..rules.galore import GaLore

# (m, n, rank): a right projection (m >= n, sharded by rows) and a left one (m < n, by columns), at
# low and high rank; LLaMA-7B's MLP is 4096 x 11008 (the same aspect at 1/8 scale: 512 x 1376)
SHAPES = [(1376, 512, 32), (1376, 512, 128), (1376, 512, 256), (512, 1376, 32), (512, 1376, 128),
          (512, 1376, 256), (2048, 2048, 64), (2048, 2048, 512)]


def refresh_once(group: ShardGroup, rule: GaLore, shape, rank: int, method: str, grad: torch.Tensor):
    """(seconds, bytes sent, basis) of one sharded refresh of `grad` (the whole matrix, same on every rank)."""
    side = projection_side(shape)
    dim = 0 if side == "right" else 1
    local = grad[my_slice(group, shape[0])] if dim == 0 else grad[:, my_slice(group, shape[1])]
    state = {"rank": rank, "side": side, "index": 0, "refreshes": 0,
             "basis": torch.zeros(shape[0] if side == "left" else shape[1], rank)}
    group.refresh, group.bytes_sent = method, 0
    dist.barrier()
    started = time.perf_counter()
    basis = sharded_basis(group, rule, state, local.contiguous(), dim)
    elapsed = torch.tensor([time.perf_counter() - started])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
    return elapsed.item(), group.bytes_sent, basis


def projector_gap(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """max |P P^T - Q Q^T| (sign- and rotation-free)."""
    return (basis @ basis.T - reference @ reference.T).abs().max().item()


def worker(process: int, world: int, store: str, repeats: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=process, world_size=world)
    group = ShardGroup()
    rows = []
    for m, n, rank in SHAPES:
        rule = GaLore(rank=rank, svd="randomized")
        grad = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n + rank))
        reference = rule.new_basis({"rank": rank, "side": projection_side((m, n)), "index": 0, "refreshes": 0},
                                   grad)
        row = {"shape": (m, n), "rank": rank, "side": projection_side((m, n))}
        for method in REFRESH_METHODS:
            runs = [refresh_once(group, rule, (m, n), rank, method, grad) for _ in range(repeats)]
            row[method] = {"seconds": statistics.median(r[0] for r in runs), "bytes": runs[0][1],
                           "gap": projector_gap(runs[0][2], reference)}
        rows.append(row)
    if process == 0:
        results["rows"] = rows
    dist.destroy_process_group()


def to_markdown(rows: list[dict], world: int, repeats: int) -> str:
    lines = [f"# Sharded GaLore refresh: gather-on-owner vs distributed range finder ({world} gloo ranks, CPU)", "",
             f"Median of {repeats} refreshes, wall time of the slowest rank; bytes = what one rank sent "
             "(the owner's share for gather: the other ranks send their shards, the owner the basis). "
             "Gap = max |P P^T - P1 P1^T| against one process's basis of the whole matrix.", "",
             "| matrix | side | rank | gather ms | sketch ms | gather bytes | sketch bytes | sketch/gather bytes "
             "| gap gather | gap sketch |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g, s = r["gather"], r["sketch"]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['side']} | {r['rank']} | {1e3 * g['seconds']:.1f} | "
                     f"{1e3 * s['seconds']:.1f} | {g['bytes']:,} | {s['bytes']:,} | {s['bytes'] / g['bytes']:.2f} | "
                     f"{g['gap']:.1e} | {s['gap']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args.ranks, os.path.join(folder, "store"), args.repeats, results), nprocs=args.ranks)
        table = to_markdown(results["rows"], args.ranks, args.repeats)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
