"""INT8 weights: group-wise codes, and the weight-storage protocol the update rules write through.

Format. A weight of `numel` elements (row-major) is stored as int8 codes, one per element, and one
fp32 scale per group of `group` consecutive elements: value = code * scale, code in [-127, 127],
scale = absmax(group) / 127 (an all-zero group has scale 0). Groups never straddle rows (the
group divides the row length, models/int8.py), so a range of whole rows is a range of whole groups.
Cost: 1 byte plus 4/group bytes per element (256: 1.016 bytes, half of bf16).

Writes round stochastically. An update computes the new values in fp32 and writes them back:
each group's scale is taken again from the new values' absmax, and each value goes to one of
the two codes around value / scale, the upper one with probability equal to the fractional part,
so E[code] * scale = value: unbiased. Round-to-nearest would drop every change smaller than half
a step (scale / 2 ~ 3e-4 for a 4096-wide matrix initialised with std 0.02: far above lr x an
Adam step late in training), so training would stall. The uniform draws come from the weight's
own generator, consumed in order, so an update done chunk by chunk draws exactly the noise of
the whole-tensor update on CPU (on CUDA: same distribution). The largest element of a group maps
to +-127 up to one fp32 rounding of value / scale; the clamp to 127 is the only bias (< 1e-6 of
a step).

The protocol. An INT8 layer's trainable parameter is a gradient handle (models/int8.py): it
receives the (out x in) gradient and carries `weight_storage`, an object with
    shape, read_range(start, end) -> fp32, write_range(start, fp32 value, stochastic, found_inf)
over the flattened weight. Update rules never touch the handle's data: `flat_weight(param)` and
`weight_rows(param, first, end)` give a plain view for an ordinary weight and a `WeightRange` for
a stored one, and the last stage of every update (rules/base.update_weight, rounding.write_weight)
reads and writes a WeightRange like a bf16 view: a chunk in fp32, then back with rounding.
"""
import torch

from .chunks import flat_view

QMAX = 127  # symmetric codes: -127 .. 127 (-128 unused, so a sign flip never overflows)


def quantize_groups(values: torch.Tensor, group: int, noise: torch.Tensor | None = None,
                    qmax: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes: int8 of values.numel(), scales: fp32 of numel / group) of fp32 `values`, codes in
    [-qmax, qmax] (INT4 projectors: 7). Without `noise`: the nearest code; with `noise` (uniform
    [0, 1), one per element): the code below value / scale, plus one when the noise falls under
    the fractional part."""
    blocks = values.detach().reshape(-1, group).float()
    scales = blocks.abs().amax(dim=1).div_(qmax)
    scaled = blocks / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    if noise is None:
        codes = scaled.round_()
    else:
        codes = scaled.floor()
        fraction = scaled.sub_(codes)  # in place: the scratch stays a few chunk-sized temporaries
        codes.add_(noise.reshape(codes.shape) < fraction)
    return codes.clamp_(-qmax, qmax).to(torch.int8).reshape(-1), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat tensor `quantize_groups` encoded, computed in fp32 and returned in `dtype`."""
    values = codes.reshape(-1, group).float().mul_(scales[:, None])
    return values.reshape(-1).to(dtype)


def check_group_range(start: int, end: int, numel: int, group: int) -> None:
    if not 0 <= start < end <= numel or start % group or end % group:
        raise ValueError(f"INT8 weight range [{start}, {end}) of {numel} elements must cover whole groups of "
                         f"{group}: start and end on multiples of {group}")


def masked(new: torch.Tensor, old: torch.Tensor, found_inf: torch.Tensor | None) -> torch.Tensor:
    """`new`, or `old` where the step was found bad (selected on the device: re-encoding the decoded
    old values would not give the old codes back bit for bit)."""
    if found_inf is None:
        return new
    return torch.where(found_inf.to(new.device) > 0, old, new)


# -- what rules see ------------------------------------------------------------------------------
def weight_storage(param: torch.Tensor):
    """The storage behind a gradient handle (an INT8 layer's parameter), else None."""
    return getattr(param, "weight_storage", None)


class WeightRange:
    """Elements [start, end) of a stored weight, shaped `shape`: what a rule passes where an
    ordinary weight passes a view. `dtype` is the storage's (int8), so code that tests for fp32
    weights treats it as a low-precision weight: read an fp32 copy, update it, write it back."""

    dtype = torch.int8

    def __init__(self, storage, start: int, end: int, shape):
        self.storage, self.start, self.end, self.shape = storage, start, end, torch.Size(shape)

    def __getitem__(self, part: slice) -> "WeightRange":
        """A flat sub-range (AdamW's chunks): weight[start:end] of a one-dimensional range."""
        if len(self.shape) != 1 or not isinstance(part, slice) or part.step not in (None, 1):
            raise TypeError("a WeightRange slices only as flat[start:end]")
        first, last, _ = part.indices(self.end - self.start)
        return WeightRange(self.storage, self.start + first, self.start + last, (last - first,))

    def numel(self) -> int:
        return self.end - self.start

    def read(self) -> torch.Tensor:
        return self.storage.read_range(self.start, self.end).view(self.shape)

    def write(self, value: torch.Tensor, stochastic: bool = True, found_inf: torch.Tensor | None = None) -> None:
        self.storage.write_range(self.start, value.reshape(-1), stochastic, found_inf)


def flat_weight(param: torch.Tensor):
    """The whole weight as one flat range: a view of an ordinary parameter, a WeightRange of a
    stored one."""
    storage = weight_storage(param)
    if storage is None:
        return flat_view(param)
    return WeightRange(storage, 0, param.numel(), (param.numel(),))


def weight_rows(param: torch.Tensor, first: int, end: int):
    """Rows [first, end) of a matrix: param[first:end], or the WeightRange of those rows."""
    storage = weight_storage(param)
    if storage is None:
        return param[first:end]
    columns = param.shape[1]
    return WeightRange(storage, first * columns, end * columns, (end - first, columns))
