"""What a CUDA device costs beyond the tensors, and what it reports it used.

Fake tensors see every tensor a run allocates, but not what the device adds around them:
  - the CUDA context (driver, runtime, loaded kernels): ~0.3-0.5 GiB per process, outside the
    caching allocator (nvidia-smi shows it; torch.cuda.memory_reserved does not);
  - cuBLAS/cuBLASLt workspaces (allocated through the caching allocator since PyTorch 2.x);
  - the cuSOLVER workspace of an SVD (GaLore's subspace refresh): a working copy of the matrix
    plus LAPACK-style scratch, allocated inside the kernel where no dispatch mode sees it;
  - allocator rounding: every block is a multiple of 512 bytes;
  - fragmentation: freed blocks that cannot be reused for a larger request. Persistent tensors
    (weights, states) are allocated once and do not fragment; the transient ones do.
The planner adds these as explicit lines, so a reader can disagree with any one of them.
"""
import os

import torch

GiB = 2**30
MiB = 2**20
CUDA_CONTEXT_BYTES = int(0.4 * GiB)
CUBLAS_WORKSPACE_BYTES = 32 * MiB + 32 * MiB  # cuBLAS (":4096:8") + cuBLASLt, Hopper defaults (the largest)
ALLOCATOR_BLOCK = 512
FRAGMENTATION_SHARE = 0.10                   # of the transient bytes at the peak
TRANSIENT = ("gradients", "activations", "loss", "temporaries")


def svd_workspace_bytes(shape) -> int:
    """cuSOLVER scratch for an fp32 SVD of an (m, n) matrix: a copy of it (gesvd overwrites its
    input) plus about min(m, n)^2 of work space."""
    m, n = shape
    return 4 * (m * n + min(m, n) ** 2)


def overhead_lines(target: str, peak: dict, svd_extra: int | None = None) -> list[dict]:
    """The device's own costs at the tensor peak `peak` (a tracker snapshot), one line each.
    svd_extra: how far cuSOLVER's workspace lifts the peak (None: the run does no SVD)."""
    if target != "cuda":
        return []
    transient = sum(peak["by_category"].get(c, 0) for c in TRANSIENT)
    lines = [
        line("CUDA context", CUDA_CONTEXT_BYTES, "driver, runtime and kernels; outside the allocator, ~0.3-0.5 GiB"),
        line("cuBLAS/cuBLASLt workspaces", CUBLAS_WORKSPACE_BYTES, "2 x 32 MiB (Hopper defaults; 8-16 MiB elsewhere)"),
    ]
    if svd_extra is not None:
        lines.append(line("cuSOLVER SVD workspace", svd_extra, "what the largest subspace refresh's scratch "
                          "(fp32 copy + min(m,n)^2) adds above the peak"))
    lines += [
        line("allocator rounding", peak["rounded_total"] - peak["total"], f"blocks are multiples of {ALLOCATOR_BLOCK} bytes"),
        line("fragmentation headroom", int(FRAGMENTATION_SHARE * transient),
             f"{FRAGMENTATION_SHARE:.0%} of the transient tensors at the peak"),
    ]
    return lines


def communication_lines(world_size: int, weight_bytes: int) -> list[dict]:
    """Data parallelism's own memory on each rank: the hooks' step gradients held in buckets
    until their all-reduce is launched, and the flat buffers in flight (distributed/reducer.py
    keeps at most two buckets alive); a small model's buckets hold its whole gradient at most
    (fp32: up to twice the bytes of bf16 weights), twice."""
    if world_size <= 1:
        return []
    from ..distributed.reducer import BUCKET_BYTES
    size = min(4 * BUCKET_BYTES, 4 * weight_bytes)
    return [line("all-reduce buckets", size, f"{world_size} data-parallel ranks: 2 buckets of up to "
                 f"{BUCKET_BYTES // MiB} MiB in flight, each held twice (step gradients and the flat buffer)")]


def line(label: str, size: int, note: str) -> dict:
    return {"label": label, "bytes": int(size), "note": note}


# -- measuring a real CUDA run -------------------------------------------------------------------
def cap_allocator(budget: int, device: torch.device, context_bytes: int) -> float:
    """Cap the caching allocator so allocator + context stay within `budget`; returns the fraction."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = (budget - context_bytes) / total
    if not 0 < fraction <= 1:
        raise ValueError(f"a budget of {budget} bytes leaves nothing for the allocator on a device of "
                         f"{total} bytes after the CUDA context; raise --budget")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def process_bytes_nvml(device: torch.device) -> int | None:
    """This process's memory on `device` as the driver counts it (NVML), or None when NVML (the
    nvidia-ml-py package) or the process entry is unavailable (e.g. inside some containers)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except Exception:  # no library, no driver, no permission: the allocator figures still stand
        return None
    return None


def context_bytes(device: torch.device) -> int:
    """The CUDA context's size: NVML's figure for the process minus what the allocator reserved,
    measured right after initialisation; the planner's estimate when NVML cannot tell."""
    torch.cuda.init()
    nvml = process_bytes_nvml(device)
    if nvml is None:
        return CUDA_CONTEXT_BYTES
    return max(0, nvml - torch.cuda.memory_reserved(device))


def cuda_step_measurement(device: torch.device) -> dict:
    """The allocator's peaks since the last call, and NVML's figure for the process; resets the peaks."""
    stats = {"allocated_peak": torch.cuda.max_memory_allocated(device),
             "reserved_peak": torch.cuda.max_memory_reserved(device),
             "nvml_process": process_bytes_nvml(device)}
    torch.cuda.reset_peak_memory_stats(device)
    return stats
