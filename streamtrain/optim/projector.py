"""GaLore's projector: an orthonormal basis of the gradient's dominant subspace.

The basis P has orthonormal columns and sits on the gradient's smaller side:
  right (m >= n): P = V[:, :r]   (n x r), project R = G P     (m x r), back R P^T
  left  (m <  n): P = U[:, :r]   (m x r), project R = P^T G   (r x n), back P R
so Adam's moments are m x r or r x n, never m x n. A square matrix (every LLaMA attention
projection) projects from the right: galore-torch's convention ('std' projection type), so our
GaLore is the published method on every shape, not a different one on square matrices.
"""
import torch

from .state import working


def projection_side(shape) -> str:
    m, n = shape
    return "right" if m >= n else "left"


def projected_shape(shape, rank: int, side: str):
    m, n = shape
    return (rank, n) if side == "left" else (m, rank)


def stable_svd(matrix: torch.Tensor, retries: int = 3):
    """torch.linalg.svd(full_matrices=False) in working precision. When LAPACK / cuSOLVER fails
    to converge (ill-conditioned gradients), retry on the matrix plus a small seeded Gaussian
    jitter (1e-6, then 1e-4, then 1e-2 of its RMS value) instead of crashing the run: the
    dominant subspace of a slightly perturbed gradient is as good a projector."""
    a = working(matrix)
    generator = None
    for attempt in range(retries + 1):
        jittered = a
        if attempt > 0:
            generator = generator or torch.Generator(device=a.device).manual_seed(0)
            noise = torch.randn(a.shape, generator=generator, dtype=a.dtype, device=a.device)
            jittered = a + noise.mul_(a.square().mean().sqrt() * 1e-6 * 100 ** (attempt - 1))
        try:
            return torch.linalg.svd(jittered, full_matrices=False)
        except torch.linalg.LinAlgError:
            if attempt == retries:
                raise


def svd_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` singular vectors on `side`, from an fp32 SVD (full_matrices=False)."""
    U, S, Vh = stable_svd(grad)
    return U[:, :rank] if side == "left" else Vh[:rank, :].T


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    if not isinstance(grad, torch.Tensor):  # a projected_backward.LinearGradient: from its factors
        return grad.project(basis, side)
    basis = basis.to(grad.dtype)
    return basis.T @ grad if side == "left" else grad @ basis


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    basis = basis.to(low_rank.dtype)
    return basis @ low_rank if side == "left" else low_rank @ basis.T


def project_back_rows(low_rank: torch.Tensor, basis: torch.Tensor, side: str, first: int, end: int) -> torch.Tensor:
    """Rows [first, end) of project_back(low_rank, basis, side), computed from those rows alone
    (left: P[rows] R, right: R[rows] P^T), so a large weight can be updated a few rows at a time
    without its full m x n direction. Equal to the full product up to the matmul's rounding (a
    BLAS may sum a row subset in another order)."""
    if side == "left":
        return project_back(low_rank, basis[first:end], side)
    return project_back(low_rank[first:end], basis, side)


def add_projected_back_rows_(weight_rows: torch.Tensor, low_rank: torch.Tensor, basis: torch.Tensor, side: str,
                             first: int, end: int, alpha: float, beta: float = 1.0) -> None:
    """weight_rows <- beta * weight_rows + alpha * project_back_rows(low_rank, basis, side, first,
    end), in place and in one GEMM (addmm_): the back-projection, its scale, the decay and the
    add make one pass over the rows instead of four, with no m x n product in memory. Equal to
    the separate ops up to the GEMM's rounding (it adds alpha * P N to beta * W in one sum)."""
    basis = basis.to(low_rank.dtype)
    if side == "left":
        left, right = basis[first:end], low_rank
    else:
        left, right = low_rank[first:end], basis.T
    weight_rows.addmm_(left, right, beta=beta, alpha=alpha)


def low_rank_view(tensor: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The active part of a projected tensor allocated at a larger capacity: its first `rank`
    rows (left: r x n) or columns (right: m x r). A view, so a rank change never reallocates."""
    return tensor[:rank] if side == "left" else tensor[:, :rank]


# -- randomized SVD and adaptive rank (AdaRankGrad) ---------------------------------------------

SVD_METHODS = ("exact", "randomized")


def randomized_svd(matrix: torch.Tensor, k: int, oversample: int = 8, power_iters: int = 2,
                   generator: torch.Generator | None = None):
    """Approximate top-k SVD (U: m x k, S: k, Vh: k x n) by a randomized range finder
    (Halko, Martinsson & Tropp, 2011): sketch Y = A Omega with a Gaussian Omega of k + oversample
    columns, sharpen it with power iterations (A A^T)^q Y, re-orthonormalising by QR after every
    product so the small singular directions are not lost to rounding, then take the exact SVD of
    the small matrix Q^T A. Cost O(mn(k+p)(2q+2)) instead of O(mn min(m, n))."""
    a = working(matrix)
    m, n = a.shape
    sketch = k + oversample
    if sketch >= min(m, n):  # no saving possible: the sketch would span the whole space
        U, S, Vh = stable_svd(a)
        return U[:, :k], S[:k], Vh[:k]
    omega = torch.randn(n, sketch, generator=generator, dtype=a.dtype, device=a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u_small, S, Vh = stable_svd(q.T @ a)
    return (q @ u_small[:, :k]), S[:k], Vh[:k]


def basis_and_spectrum(grad: torch.Tensor, rank: int, side: str, svd: str = "exact",
                       oversample: int = 8, power_iters: int = 2, generator=None):
    """The top-`rank` basis on `side` (as svd_basis) and the top-`rank` singular values, from an
    exact fp32 SVD or the randomized one."""
    if svd == "exact":
        U, S, Vh = stable_svd(grad)
    elif svd == "randomized":
        U, S, Vh = randomized_svd(grad, rank, oversample, power_iters, generator)
    else:
        raise ValueError(f"unknown svd method {svd!r}; choose one of {SVD_METHODS}")
    basis = U[:, :rank] if side == "left" else Vh[:rank, :].T
    return basis, S[:rank]


def randomized_basis(grad: torch.Tensor, rank: int, side: str, oversample: int = 8,
                     power_iters: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """svd_basis computed with the randomized SVD: orthonormal columns (m x r or n x r) on `side`."""
    return basis_and_spectrum(grad, rank, side, "randomized", oversample, power_iters, generator)[0]


def energy_rank(singular_values: torch.Tensor, eta: float, r_min: int, r_max: int,
                total_energy=None) -> int:
    """The smallest r whose top-r subspace keeps a fraction `eta` of the energy, clamped to
    [r_min, r_max]. Energy is sum(s^2) over the leading values; the total defaults to the sum
    over the given values, but pass ||G||_F^2 when only part of the spectrum is known (a
    randomized sketch): it is exact, so a truncated spectrum can never look complete."""
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"energy fraction eta must be in (0, 1], got {eta}")
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    kept = singular_values.double().square().cumsum(0)
    total = kept[-1] if total_energy is None else torch.as_tensor(total_energy, dtype=torch.float64,
                                                                   device=kept.device)
    needed = int(torch.searchsorted(kept, (eta * total).reshape(1)).item()) + 1
    return max(r_min, min(needed, r_max))


def basis_rotation(new_basis: torch.Tensor, old_basis: torch.Tensor) -> torch.Tensor:
    """R = Q_new^T Q_old (r_new x r_old): coordinates in the old basis -> the new one."""
    return working(new_basis).T @ working(old_basis).to(working(new_basis).dtype)


def transfer_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rotation: torch.Tensor,
                     side: str):
    """Adam's moments re-expressed in a new basis (r_old -> r_new coordinates).

    First moment: linear, m_new = R m_old (left) or m_old R^T (right); exact for the part of the
    old subspace the new one keeps. Second moment: v_new = (R o R) v_old, the diagonal of
    R diag(v_old) R^T, i.e. the exact transfer if the old coordinates are uncorrelated. Unlike
    R v_old (AdaRankGrad's rule) it is never negative; it is exact when the new basis is a signed
    permutation of the old one (what a recomputed SVD of the same subspace returns) and keeps
    sum(v) under any rotation within the span."""
    squared = rotation.square()
    if side == "left":
        return rotation @ exp_avg, squared @ exp_avg_sq
    return exp_avg @ rotation.T, exp_avg_sq @ squared.T
