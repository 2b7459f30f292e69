"""Clipping that works in one streaming pass, one tensor at a time.

Each limit is a factor (a 0-d tensor) computed from a norm, so a chunked update can compute the
norm once and scale every chunk by the same factor."""
import torch

from .state import working_dtype


def clip_factor(t: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor (at most 1) that scales `t` to an L2 norm of at most `max_norm`. The norm is
    taken in working precision without an upcast copy of `t`."""
    norm = torch.linalg.vector_norm(t, dtype=working_dtype(t))
    return (max_norm / (norm + 1e-12)).clamp(max=1.0)


def clip_to_norm(t: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale `t` down so its L2 norm is at most `max_norm` (no-op when already below)."""
    return t * clip_factor(t, max_norm)


def growth_factor(norm: torch.Tensor, prev_norm: torch.Tensor, gamma: float) -> torch.Tensor:
    """The factor that limits an update of L2 norm `norm` to gamma * prev_norm; 1 while
    `prev_norm` is 0 (before the first step)."""
    limit = gamma * prev_norm
    return torch.where((prev_norm > 0) & (norm > limit), limit / (norm + 1e-12), torch.ones_like(norm))


def limit_norm_growth(update: torch.Tensor, prev_norm: torch.Tensor, gamma: float):
    """Fira/APOLLO norm-growth limiter: ||u_t|| <= gamma * ||u_{t-1}||.

    `prev_norm` is a 0-d tensor, 0 before the first step (no limit then). Returns the limited
    update and its norm, to be kept for the next step."""
    norm = torch.linalg.vector_norm(update)
    scale = growth_factor(norm, prev_norm, gamma)
    return update * scale, norm * scale
