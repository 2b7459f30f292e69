"""Adam through PyTorch's fused AdamW kernel (torch._fused_adamw_), the engine's fast path.

The kernel reads the gradient, the weight and both moments once and writes the three updated
tensors; the reference update (optim/adam.py, then rules/base.update_weight) makes about ten
passes over memory. It exists on CPU and CUDA, for fp32 and fp64, and does torch.optim.AdamW's
math in one loop:
    W <- W (1 - lr wd)                            decoupled decay, before the move
    m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2
    W <- W - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
eps sits outside the bias correction, as in adam_direction. The moments come out bit for bit as
adam_direction leaves them (on CPU); the weight rounds differently in the last line (lr / bc1
times m / denom, where the reference divides m by bc1 first), one fp32 ulp on a few percent of
the elements.

The step `t` is a float tensor on the weight's device that the kernel reads itself (no host
sync on CUDA). `found_inf`, an optional 0-d float tensor: at 1.0 the kernel leaves every tensor
as it is; `advance_step_` then keeps the count too. So an update of a step found bad on the
device is a no-op without the host ever looking.

The kernel walks raw memory: every tensor must be contiguous (a strided view would be written
in the wrong places) and all of one dtype and device; `fusable` checks that.
"""
import torch


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel can update these tensors in place."""
    first = tensors[0]
    return (first.dtype in (torch.float32, torch.float64)
            and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous()
                    for t in tensors))


_STEP_TENSORS: dict = {}  # (step, device) -> the 0-d tensor: most parameters share a step count


def step_tensor(step: int, device) -> torch.Tensor:
    """The kernel's step counter: a float32 0-d tensor on `device` (the kernel only reads it, so
    one tensor per step and device serves every parameter; making one per update cost as much as
    a small parameter's whole update). Shared: clone it before changing it (advance_step_)."""
    if torch._guards.detect_fake_mode() is not None:  # the planner: a fake tensor of this mode, not cached
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    key = (step, torch.device(device))
    tensor = _STEP_TENSORS.get(key)
    if tensor is None:
        tensor = torch.tensor(float(step), dtype=torch.float32, device=device)
        if len(_STEP_TENSORS) > 64:
            _STEP_TENSORS.clear()
        _STEP_TENSORS[key] = tensor
    return tensor


def advance_step_(step: torch.Tensor, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """step += 1, or += 0 when found_inf is 1 (a skipped step does not count)."""
    return step.add_(1) if found_inf is None else step.add_(1 - found_inf.to(step.device, step.dtype))


def fused_adamw_(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0, found_inf: torch.Tensor | None = None) -> None:
    """One AdamW update of `weight` and both moments in place, for the 1-based `step` (which the
    caller has already advanced). `grad` is read only."""
    torch._fused_adamw_([weight], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=lr,
                        beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
                        amsgrad=False, maximize=False, found_inf=found_inf)


def fused_adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         step: torch.Tensor, *, betas: tuple[float, float], eps: float,
                         found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """adam_direction through the kernel: it moves a zero 'weight' with lr = -1 and no decay,
    which leaves the direction m_hat / (sqrt(v_hat) + eps) in it (zeros when found_inf is 1)."""
    direction = torch.zeros_like(grad)
    fused_adamw_(direction, grad, exp_avg, exp_avg_sq, step, lr=-1.0, betas=betas, eps=eps,
                 found_inf=found_inf)
    return direction
