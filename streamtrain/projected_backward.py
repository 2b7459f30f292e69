"""Projected backward: a GaLore matrix's gradient computed in its subspace, never m x n.

A linear layer Y = X W^T (W: m x n, X: tokens x n) has the weight gradient G = dY^T X, which
costs tokens * m * n multiply-adds in backward, only for GaLore to project it at once:
R = G P (P: n x r, m >= n) or R = P^T G (P: m x r). Computed from the factors instead,

    R = dY^T (X P)        (right: tokens * r * (m + n) multiply-adds)
    R = (dY P)^T X        (left)

the weight-gradient GEMM shrinks by a factor r (m + n) / (m n): 0.34-0.5x at llama-60m's rank
128, 0.37x at 7B's rank 1024 on 4096 x 11008. The m x n gradient is never allocated.

How it plugs into the hooks without changing them: each GaLore matrix owned by a plain
nn.Linear gets a forward that runs `_FactoredLinear`, whose backward returns dX and the bias
gradient as usual but no weight gradient. It leaves the factors (X, dY) with the engine instead;
autograd still runs the weight's post-accumulate-grad hook (with p.grad None), and the engine
hands the rule a `LinearGradient` in place of the tensor. The rule projects it from the factors,
or materialises dY^T X where it needs the whole gradient (a refresh's SVD, a full-step sum);
the non-finite check reads its sum, sum(dY^T X) = dY.sum(1) . X.sum(1).

The step's report then carries the projected gradient's norm (a lower bound of the full one) for
these matrices, as with accumulation. Layers used twice in one backward keep both factor pairs
(concatenated: dY1^T X1 + dY2^T X2 = [dY1; dY2]^T [X1; X2]).
"""
import functools

import torch
import torch.nn.functional as F


class LinearGradient:
    """dW = dY^T X of a linear layer, kept as its factors (2-D: tokens x m and tokens x n)."""

    def __init__(self, inputs: list, output_grads: list):
        self.x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        self.dy = output_grads[0] if len(output_grads) == 1 else torch.cat(output_grads)
        self._device = self.dy.device

    @property
    def device(self) -> torch.device:
        return self._device

    def full(self) -> torch.Tensor:
        """The m x n gradient itself."""
        x, dy = self._take_factors()
        return dy.T @ x

    def project(self, basis: torch.Tensor, side: str) -> torch.Tensor:
        """projector.project(dY^T X, basis, side) without forming dY^T X."""
        x, dy = self._take_factors()
        basis = basis.to(dy.dtype)
        if side == "left":
            return (dy @ basis).T @ x
        return dy.T @ (x @ basis)

    def _take_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors, once: they are let go as the gradient is formed, so the update (or a
        refresh's SVD) runs without the layer's input and output gradient alive, as after
        autograd's own backward (at 8192 tokens they outweigh a 4096 x 11008 gradient 2.7x)."""
        if self.x is None:
            raise RuntimeError("a LinearGradient is used once (full() or project()); keep the result instead")
        x, dy, self.x, self.dy = self.x, self.dy, None, None
        return x, dy

    def sum(self, dtype=None) -> torch.Tensor:
        """sum(dY^T X) = sum over tokens t of (sum_i dY[t, i]) (sum_j X[t, j]): NaN or Inf in
        either factor shows here."""
        return torch.dot(self.dy.sum(1, dtype=dtype), self.x.sum(1, dtype=dtype))


def full_gradient(grad):
    """A gradient as an m x n tensor (a LinearGradient materialised; a tensor as it is)."""
    return grad.full() if isinstance(grad, LinearGradient) else grad


class FactorSink:
    """Where the projected backward leaves each matrix's factors until its hook takes them.

    A copy of the model (copy.deepcopy, pickle) gets a disabled sink: its layers compute ordinary
    gradients, since no engine hook of the copy's weights would take the factors."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.factors: dict[str, tuple[list, list]] = {}

    def __deepcopy__(self, memo):
        return FactorSink(enabled=False)

    def __reduce__(self):
        return FactorSink, (False,)

    def put(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        inputs, output_grads = self.factors.setdefault(name, ([], []))
        inputs.append(x)
        output_grads.append(dy)

    def take(self, name: str) -> LinearGradient | None:
        factors = self.factors.pop(name, None)
        return None if factors is None else LinearGradient(*factors)

    def clear(self) -> None:
        """Drop factors no hook took (a backward that failed part-way)."""
        self.factors.clear()


class _FactoredLinear(torch.autograd.Function):
    """F.linear whose backward leaves the weight gradient's factors in `sink` instead of
    computing it (the weight's hook still fires, with p.grad None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink, name):
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.name, ctx.has_bias = sink, name, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dy2d = dy.reshape(-1, dy.shape[-1])
        bias_grad = dy2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.sink.put(ctx.name, x.reshape(-1, x.shape[-1]), dy2d)
        return dx, None, bias_grad, None, None


def _projected_forward(module: torch.nn.Linear, sink: FactorSink, name: str, x: torch.Tensor) -> torch.Tensor:
    if (not (sink.enabled and torch.is_grad_enabled() and module.weight.requires_grad)
            or torch.is_autocast_enabled(x.device.type)):
        return F.linear(x, module.weight, module.bias)  # no backward to shape (or autocast's casts apply)
    return _FactoredLinear.apply(x, module.weight, module.bias, sink, name)


def eligible_linears(model: torch.nn.Module, names) -> dict[str, torch.nn.Linear]:
    """{weight name: module} for the weights in `names` owned by a plain nn.Linear and used by no
    other module (a tied weight's gradient has other sources the factors would miss)."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((module_name, param_name, module))
    found = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if type(module) is torch.nn.Linear and leaf == "weight" and len(owners[id(module.weight)]) == 1:
            found[name] = module
    return found


def install(modules: dict[str, torch.nn.Linear], sink: FactorSink) -> None:
    for name, module in modules.items():
        module.forward = functools.partial(_projected_forward, module, sink, name)


def uninstall(modules: dict[str, torch.nn.Linear]) -> None:
    for module in modules.values():
        module.__dict__.pop("forward", None)
