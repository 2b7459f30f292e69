"""The Adam update, written once as a function over plain fp32 tensors.

Mirrors torch.optim.AdamW's single-tensor path operation for operation, so the engine's AdamW
matches it to rounding error. `exp_avg` and `exp_avg_sq` are updated in place (they are the
fp32 working copies the state storage hands out); the returned direction is what the caller
scales by the learning rate.
"""
import math

import torch


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps) for 1-based `step`."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg / bias_correction1) / denom


def decoupled_weight_decay(weight: torch.Tensor, lr: float, weight_decay: float) -> None:
    """AdamW's decay, W <- W (1 - lr wd), applied before the update like torch.optim.AdamW."""
    if weight_decay:
        weight.mul_(1 - lr * weight_decay)
