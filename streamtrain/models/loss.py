"""The next-token loss from final hidden states and an output head, optionally in chunks.

Shared by our LLaMA and the transformers adapter: `targets` are already shifted (targets[t] is
the token after inputs[t]), the mean is over every token. With `chunk` > 0 the tokens go through
the head `chunk` at a time, each chunk under activation checkpointing: its logits are recomputed
in backward, so at most one chunk of (chunk x vocab) logits, their fp32 upcast and their gradient
exist at any moment instead of the whole (tokens x vocab) spike.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def next_token_loss(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """Mean cross-entropy of logits = h @ weight^T (+ bias) against `targets`."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if chunk <= 0 or chunk >= h.shape[0]:
        return chunk_loss_sum(h, targets, weight, bias) / targets.numel()
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        total = total + checkpoint(chunk_loss_sum, h[sl], targets[sl], weight, bias, use_reentrant=False)
    return total / targets.numel()


def chunk_loss_sum(h, targets, weight, bias=None):
    logits = F.linear(h, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")
