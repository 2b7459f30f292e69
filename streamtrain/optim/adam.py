"""The Adam update, written once as a function over plain fp32 tensors.

Mirrors torch.optim.AdamW's single-tensor path operation for operation, so the engine's AdamW
matches it to rounding error. `exp_avg` and `exp_avg_sq` are updated in place (they are the
fp32 working copies the state storage hands out); the returned direction is what the caller
scales by the learning rate.

`found_inf` (an optional 0-d tensor on the device, the engine's running non-finite flag of the
step): at 1 the moments keep their values and the direction is 0, selected on the device, so a
step found bad is a no-op without a host synchronisation per parameter. At 0 the results are the
unmasked ones bit for bit.
"""
import math

import torch


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps) for 1-based `step`."""
    if found_inf is not None:
        return masked_adam_direction(grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, found_inf > 0)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return bias_corrected(exp_avg, exp_avg_sq, step, beta1, beta2, eps)


def masked_adam_direction(grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, keep) -> torch.Tensor:
    """adam_direction on new tensors; the moments take them unless `keep` (0-d bool) is set."""
    new_avg = exp_avg.lerp(grad, 1 - beta1)
    new_avg_sq = (exp_avg_sq * beta2).addcmul_(grad, grad, value=1 - beta2)
    direction = bias_corrected(new_avg, new_avg_sq, step, beta1, beta2, eps)
    exp_avg.copy_(torch.where(keep, exp_avg, new_avg))
    exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, new_avg_sq))
    return torch.where(keep, 0.0, direction)


def bias_corrected(exp_avg, exp_avg_sq, step: int, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg / bias_correction1) / denom


def decoupled_weight_decay(weight: torch.Tensor, lr: float, weight_decay: float,
                           found_inf: torch.Tensor | None = None) -> None:
    """AdamW's decay, W <- W (1 - lr wd), applied before the update like torch.optim.AdamW
    (not at all when `found_inf` is set)."""
    if not weight_decay:
        return
    if found_inf is None:
        weight.mul_(1 - lr * weight_decay)
    else:
        weight.mul_(torch.where(found_inf > 0, 1.0, 1 - lr * weight_decay).to(weight.dtype))
