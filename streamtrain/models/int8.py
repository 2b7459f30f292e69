"""Linear layers with INT8 weights (`--dtype int8`): codes and scales, dequantized on the fly.

`Int8Linear` stores its (out x in) weight as int8 codes with one fp32 scale per group of
`group_size` elements of a row (optim/int8_weights.py: the format, the stochastic rounding, the
protocol rules write through). Forward and backward dequantize the weight to the compute dtype
(bf16) for their matmul and drop it, so one layer's dense copy exists at a time, never a model's;
backward saves only its input. Decoding and encoding go SCRATCH_ELEMENTS at a time, so their fp32
scratch is a few 16 MB pieces, not the matrix (nor a rule's 64 MB chunk).

The trainable parameter. Autograd needs a floating-point leaf of the weight's shape to deliver
the (out x in) gradient to, and the engine a parameter to hook: `weight` is a *gradient handle*,
a bf16 zero expanded to (out, in) (strides 0: two bytes of memory), that carries
`weight_storage` (this layer). The custom autograd function returns dL/dW as the handle's
gradient, the engine's post-accumulate-grad hook fires on it as for any weight, and the rule's
update goes through the storage (flat_weight / weight_rows). The handle's value means nothing
and is never read.

State dict. `weight_codes` (int8, out x in), `weight_scales` (fp32, numel / group) and the
rounding generator's state (`_extra_state`: nn.Module's hook for non-tensor state) are the
layer's state; the handle is left out. So checkpoints save and restore exactly what is stored,
bit for bit, and a resumed run draws the rounding noise the uninterrupted run would have.
`dequantized_state_dict` gives the HF export (weights in the compute dtype, HF names).

Rounding streams. Each layer's generator is seeded from (the run's seed, the layer's path), so
runs seeded alike and data-parallel replicas draw the same noise without touching the global RNG.

Groups never straddle rows: a layer whose row length is not a multiple of the group size uses
gcd(group size, row length) (the group size is a power of two, so this is the largest power of
two dividing both; LLaMA-7B's 4096 and 11008 take 256 and 128 whole).
"""
import math
import zlib

import torch
from torch import nn

from ..optim.int8_weights import (check_group_range, dequantize_groups, masked, quantize_groups,
                                  weight_storage)
from .structure import block_linear_paths, is_conv1d

GROUP_SIZES = (32, 64, 128, 256, 512, 1024)
# Elements a layer decodes or encodes at a time: its own scratch (the fp32 values, the rounding
# noise, the codes before they are stored) stays a few of these (16 MB each in fp32) whatever
# range a rule hands it (a rule's chunk is up to 2^24 elements). A multiple of every group size.
SCRATCH_ELEMENTS = 2 ** 22


class QuantizeError(ValueError):
    pass


def gradient_handle(shape, dtype: torch.dtype, device, storage=None) -> nn.Parameter:
    """A trainable parameter of `shape` holding one element (strides 0), linked to `storage`."""
    handle = nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape))
    handle.weight_storage = storage
    return handle


def effective_group(group_size: int, row_length: int) -> int:
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"--quant-group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    return math.gcd(group_size, row_length)


class Int8LinearFunction(torch.autograd.Function):
    """y = x W^T with W dequantized from (codes, scales); dL/dW goes to the handle."""

    @staticmethod
    def forward(ctx, x, handle, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return x @ layer.dequantized(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ layer.dequantized(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            rows = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (rows.T @ x.reshape(-1, x.shape[-1])).to(layer.weight.dtype)
        return grad_x, grad_w, None


class Int8Linear(nn.Linear):
    """nn.Linear whose weight is stored as INT8 codes with group-wise scales (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 256,
                 dtype: torch.dtype = torch.bfloat16, device=None, rounding_seed: int = 0):
        nn.Module.__init__(self)  # not nn.Linear's: no dense weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.group_size = effective_group(group_size, in_features)
        self.rounding_seed = rounding_seed
        self._generator = None
        self.weight = gradient_handle((out_features, in_features), dtype, device, self)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        groups = out_features * in_features // self.group_size
        self.register_buffer("weight_scales", torch.zeros(groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, rounding_seed: int = 0) -> "Int8Linear":
        """An Int8Linear holding `linear`'s weight (nearest codes; on meta: shapes only) and its bias."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, False, group_size, w.dtype, w.device, rounding_seed)
        layer.bias = linear.bias
        if not w.is_meta:
            layer.store(w.detach())
        return layer

    def forward(self, x):
        y = Int8LinearFunction.apply(x, self.weight, self)
        return y if self.bias is None else y + self.bias

    # -- the weight-storage protocol (optim/int8_weights.py) ------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.weight_codes.shape

    def read_range(self, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened weight in fp32 (whole groups)."""
        g = self.group_size
        check_group_range(start, end, self.weight_codes.numel(), g)
        return dequantize_groups(self.weight_codes.view(-1)[start:end], self.weight_scales[start // g:end // g], g)

    def write_range(self, start: int, value: torch.Tensor, stochastic: bool = True,
                    found_inf: torch.Tensor | None = None) -> None:
        """Store fp32 `value` as elements [start, start + numel): new scales, stochastic (or
        nearest) codes; with `found_inf` at 1 the range keeps its codes and scales."""
        g, end = self.group_size, start + value.numel()
        check_group_range(start, end, self.weight_codes.numel(), g)
        flat = value.reshape(-1)
        for first, last in pieces(value.numel()):  # the noise of consecutive pieces is one stream
            noise = torch.rand(last - first, generator=self.generator, device=value.device) if stochastic else None
            codes, scales = quantize_groups(flat[first:last], g, noise)
            at, to = start + first, start + last
            old_codes, old_scales = self.weight_codes.view(-1)[at:to], self.weight_scales[at // g:to // g]
            old_codes.copy_(masked(codes, old_codes, found_inf))
            old_scales.copy_(masked(scales, old_scales, found_inf))

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantize a dense (out x in) weight into the codes, round to nearest (initialisation)."""
        flat = weight.reshape(-1)
        for start, end in pieces(flat.numel()):
            self.write_range(start, flat[start:end].to(self.weight_codes.device, torch.float32), stochastic=False)

    def dequantized(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The (out x in) weight in `dtype`, built a chunk at a time (on `device`, default the codes')."""
        device = device or self.weight_codes.device
        out = torch.empty(self.weight_codes.shape, dtype=dtype, device=device)
        flat = out.view(-1)
        for start, end in pieces(flat.numel()):
            flat[start:end] = self.read_range(start, end).to(device)
        return out

    @property
    def generator(self) -> torch.Generator:
        """The layer's rounding stream, on the codes' device, seeded from `rounding_seed` at first use."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.weight_codes.device).manual_seed(self.rounding_seed)
        return self._generator

    # -- state dict: codes, scales, rounding state; never the handle -----------------------------
    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        del destination[prefix + "weight"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")

    # -- moving between devices and dtypes ---------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Module.to / cuda / to_empty: codes and scales move (the scales stay fp32: they pass as
        their int32 bits), the handle is made anew from a moved zero (never expanded into a dense
        tensor); a rounding stream on another device starts again from its seed."""
        handle, scales = self.weight, self.weight_scales
        self._parameters["weight"] = None
        self._buffers["weight_scales"] = scales.view(torch.int32)
        super()._apply(fn, recurse)
        self._buffers["weight_scales"] = self._buffers["weight_scales"].view(torch.float32)
        zero = fn(torch.zeros((), dtype=handle.dtype, device=handle.device))
        self._parameters["weight"] = gradient_handle(handle.shape, zero.dtype, zero.device, self)
        self.weight.requires_grad_(handle.requires_grad)
        if self._generator is not None and self._generator.device != self.weight_codes.device:
            self._generator = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 groups of {self.group_size}")


def pieces(numel: int) -> list[tuple[int, int]]:
    """[(start, end)] covering range(numel) in order, SCRATCH_ELEMENTS at a time."""
    return [(start, min(start + SCRATCH_ELEMENTS, numel)) for start in range(0, numel, SCRATCH_ELEMENTS)]


# -- a model's INT8 layers -------------------------------------------------------------------------
def layer_seed(seed: int, path: str) -> int:
    """The rounding seed of the layer at `path`: a function of the run's seed and the path only."""
    return zlib.crc32(f"{seed}:{path}".encode())


def quantize_linears(model: nn.Module, group_size: int = 256, seed: int = 0, paths=None) -> list[str]:
    """Replace the linear layers inside the transformer blocks (or `paths`) by Int8Linear layers
    holding their weights (on meta: shapes only). Returns the paths replaced."""
    paths = block_linear_paths(model) if paths is None else paths
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = getattr(parent, leaf)
        if is_conv1d(layer) or not isinstance(layer, nn.Linear):
            raise QuantizeError(f"--dtype int8: {path} is a {type(layer).__name__}; INT8 weights replace nn.Linear "
                                "layers only (use --dtype bfloat16 for this model)")
        setattr(parent, leaf, Int8Linear.from_linear(layer, group_size, layer_seed(seed, path)))
    return list(paths)


def int8_layers(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, Int8Linear)]


@torch.no_grad()
def set_weight(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value: a copy for an ordinary parameter, nearest codes for an INT8 layer's handle."""
    storage = weight_storage(param)
    if storage is None:
        param.copy_(value)
    else:
        storage.store(value)


STORED_KEYS = ("weight_codes", "weight_scales", "_extra_state")  # an INT8 layer's state-dict entries for its weight


def dequantized_state_dict(model: nn.Module, state: dict) -> dict:
    """`state` (the model's state dict, HF names) with every INT8 layer's codes, scales and
    rounding state replaced by `<path>.weight` in the compute dtype, dequantized on the CPU (an
    export never holds a dense model on the device)."""
    layers = dict(int8_layers(model))
    out = {}
    for name, tensor in state.items():
        path, _, key = name.rpartition(".")
        if path not in layers or key not in STORED_KEYS:
            out[name] = tensor  # (an INT8 layer's bias stays as it is)
        elif key == "weight_codes":
            out[f"{path}.weight"] = layers[path].dequantized(layers[path].weight.dtype, device="cpu")
    return out


def quantized_state_dict(model: nn.Module, state: dict) -> dict:
    """`state` without the rounding streams: codes and scales as stored, the rest as it is."""
    layers = dict(int8_layers(model))
    return {name: t for name, t in state.items() if not (name.rpartition(".")[0] in layers
                                                          and name.endswith("._extra_state"))}


def save_int8_export(model: nn.Module, out_dir) -> None:
    """The quantized form beside an HF export: `model.int8.safetensors` (every tensor of the
    model's state dict, the INT8 layers as `<path>.weight_codes` / `<path>.weight_scales`) and
    `quantization.json` saying how to decode them."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    layers = int8_layers(model)
    state = quantized_state_dict(model, model.state_dict())
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(Path(out_dir, "model.int8.safetensors")),
              metadata={"format": "pt"})
    about = {"format": "streamtrain-int8", "layers": {path: {"group_size": m.group_size} for path, m in layers},
             "decode": "weight = (codes.view(-1, group_size).float() * scales[:, None]).view(out_features, in_features)"}
    Path(out_dir, "quantization.json").write_text(json.dumps(about, indent=2))
