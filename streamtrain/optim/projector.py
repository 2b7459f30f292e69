"""GaLore's projector: an orthonormal basis of the gradient's dominant subspace.

The basis P has orthonormal columns and sits on the gradient's smaller side:
  left  (m <= n): P = U[:, :r]   (m x r), project R = P^T G   (r x n), back P R
  right (m >  n): P = V[:, :r]   (n x r), project R = G P     (m x r), back R P^T
so Adam's moments are r x n or m x r, never m x n.
"""
import torch

from .state import working


def projection_side(shape) -> str:
    m, n = shape
    return "left" if m <= n else "right"


def projected_shape(shape, rank: int, side: str):
    m, n = shape
    return (rank, n) if side == "left" else (m, rank)


def svd_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` singular vectors on `side`, from an fp32 SVD (full_matrices=False)."""
    U, S, Vh = torch.linalg.svd(working(grad), full_matrices=False)
    return U[:, :rank] if side == "left" else Vh[:rank, :].T


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    basis = basis.to(grad.dtype)
    return basis.T @ grad if side == "left" else grad @ basis


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    basis = basis.to(low_rank.dtype)
    return basis @ low_rank if side == "left" else low_rank @ basis.T
