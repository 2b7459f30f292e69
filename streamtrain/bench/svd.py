"""Randomized vs exact SVD basis of one gradient-like matrix: time and captured energy."""
import math
import time

import torch

from .presets import Preset


def run_svd_comparison(preset: Preset, device: str) -> dict:
    """Exact vs randomized SVD basis of one m x n fp32 matrix at rank r, with the share of the
    matrix's energy (squared Frobenius norm) each basis captures."""
    from ..optim.projector import projection_side, randomized_basis, svd_basis
    (m, n), r = preset.svd_shape, preset.svd_rank
    gen = torch.Generator().manual_seed(0)
    # a gradient-like spectrum: mixing factors with power-law weights (1 / i), then fp32 noise
    weights = 1.0 / torch.arange(1, m + 1, dtype=torch.float32)
    left = torch.randn(m, m, generator=gen) * weights
    matrix = (left @ torch.randn(m, n, generator=gen) / math.sqrt(m * n)).to(device)
    matrix += 1e-3 * matrix.std() * torch.randn(m, n, generator=gen).to(device)
    side = projection_side(matrix.shape)
    total = float(matrix.square().sum())
    result = {"shape": [m, n], "rank": r, "side": side, "matrix": "power-law 1/i mixture plus 0.1% noise"}
    for name, basis_fn in (("exact", svd_basis), ("randomized", randomized_basis)):
        if torch.device(device).type == "cuda":  # library handles and kernels load on the first call
            basis_fn(matrix, r, side)
        synchronize(device)
        started = time.perf_counter()
        basis = basis_fn(matrix, r, side)
        synchronize(device)
        elapsed = time.perf_counter() - started
        projected = basis.T @ matrix if side == "left" else matrix @ basis
        result[name] = {"seconds": elapsed, "energy_captured": float(projected.square().sum()) / total}
    return result


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
