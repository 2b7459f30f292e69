"""Data parallelism on torch.distributed, with the engine reducing inside its own hooks.

context.py   the process group from torchrun's environment (nccl on CUDA, gloo on CPU), one
             device per local rank, who prints and writes
reducer.py   bucketed asynchronous all-reduce of step gradients inside the hooks
replicas.py  a cheap fingerprint of the weights, compared across ranks (--check-replicas)

The model is never wrapped in DistributedDataParallel: its reducer reads .grad after backward, by
which time the engine's hooks have consumed and freed it (the replicas silently diverge), and its
flat buckets would hold a whole model's gradients, undoing per-layer release.
"""
from .context import DistContext, local_context, from_environment

__all__ = ["DistContext", "local_context", "from_environment"]
