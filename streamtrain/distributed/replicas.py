"""Replicas must stay identical: a cheap fingerprint of the weights, compared across ranks.

The fingerprint is, per parameter, the sum of its elements and of their squares in fp64 (two
numbers per tensor: one small all-gather). Replicas that drifted by one rounding step in one
element differ in it. `--check-replicas K` compares it every K steps and stops with one line
naming the first parameter that differs.
"""
import torch
import torch.distributed as dist


class ReplicaDivergence(RuntimeError):
    pass


def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """(parameters, 2) fp64: each parameter's sum and sum of squares."""
    rows = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
            for p in model.parameters()]
    return torch.stack(rows).cpu()


def check_replicas(model: torch.nn.Module, group, step: int) -> None:
    """Raise ReplicaDivergence (one line) when any rank's weights differ from rank 0's."""
    mine = fingerprint(model)
    if dist.get_backend(group) == "nccl":  # nccl moves CUDA tensors only
        mine = mine.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    names = [n for n, _ in model.named_parameters()]
    gathered = [g.cpu() for g in gathered]
    for rank, theirs in enumerate(gathered[1:], start=1):
        different = (theirs != gathered[0]).any(dim=1).nonzero().flatten()
        if different.numel():
            raise ReplicaDivergence(f"after step {step} rank {rank}'s weights differ from rank 0's, first in "
                                    f"{names[int(different[0])]} ({different.numel()} parameters differ); the "
                                    "replicas diverged: report this with the command that ran")
