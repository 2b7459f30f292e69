"""Clipping that works in one streaming pass, one tensor at a time."""
import torch


def clip_to_norm(t: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale `t` down so its L2 norm is at most `max_norm` (no-op when already below)."""
    norm = torch.linalg.vector_norm(t)
    return t * (max_norm / (norm + 1e-12)).clamp(max=1.0)


def limit_norm_growth(update: torch.Tensor, prev_norm: torch.Tensor, gamma: float):
    """Fira/APOLLO norm-growth limiter: ||u_t|| <= gamma * ||u_{t-1}||.

    `prev_norm` is a 0-d tensor, 0 before the first step (no limit then). Returns the limited
    update and its norm, to be kept for the next step."""
    norm = torch.linalg.vector_norm(update)
    limit = gamma * prev_norm
    scale = torch.where((prev_norm > 0) & (norm > limit), limit / (norm + 1e-12), torch.ones_like(norm))
    return update * scale, norm * scale
