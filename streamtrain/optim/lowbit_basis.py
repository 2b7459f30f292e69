"""GaLore bases stored in INT8 or INT4 (as Q-GaLore), dequantized for each projection.

A basis P (rows x r, orthonormal columns) is stored column by column: the transposed basis
(r x rows), flattened, in groups of `group` consecutive elements of one column (gcd(group, rows):
a group never spans two columns), symmetric codes with one fp32 scale per group: INT8 codes in
[-127, 127], one byte each; INT4 codes in [-7, 7], two per byte (low nibble first, stored + 8).
Per element: INT8 1 + 4/group bytes, INT4 0.5 + 4/group, instead of bf16's 2 (LLaMA-7B at rank
1024: 1.88 GB of bf16 bases become 0.95 GB or 0.48 GB).

Rounding is to the nearest code. A basis is recomputed at a refresh, never accumulated, so there
is no drift for rounding bias to build up (unlike weights, which need stochastic rounding). The
dequantized basis is no longer exactly orthonormal: projections carry the quantization error
(nearest rounding: an error of std step / sqrt(12), the step a group's absmax / 7 for INT4, 4%
of it; / 127 for INT8), which the quality comparison measures (streamtrain/bench/quality.py:
INT8 weights + INT4 bases within 0.4% of bf16 on byte-small).

GaLore asks a basis for: shape, dtype (of what read() returns), read() -> the dense (rows x r)
basis, write(value) (the whole basis), tensors() / load_tensors() (checkpoints). A dense basis is
a plain tensor (rules/galore.py: active_basis, store_basis).
"""
import math

import torch

from .int8_weights import dequantize_groups, quantize_groups

PROJECTOR_PRECISIONS = ("dense", "int8", "int4")
PROJECTOR_BITS = {"int8": 8, "int4": 4}
QMAX = {8: 127, 4: 7}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 bytes holding int8 codes in [-7, 7] two per byte (an odd count is padded with 0)."""
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The int8 codes pack_int4 packed (the first `numel`)."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:numel]
    return nibbles.to(torch.int8) - 8


class LowBitBasis:
    """A GaLore basis of `shape` (rows x columns) stored in `bits` (8 or 4) with group-wise scales."""

    def __init__(self, rows: int, columns: int, bits: int, group: int = 256, dtype=torch.bfloat16, device=None):
        if bits not in QMAX:
            raise ValueError(f"a low-bit basis has 8 or 4 bits, got {bits}")
        self.shape, self.bits, self.dtype = torch.Size((rows, columns)), bits, dtype
        self.group = math.gcd(group, rows)
        numel = rows * columns
        self.codes = torch.zeros(numel if bits == 8 else (numel + 1) // 2,
                                 dtype=torch.int8 if bits == 8 else torch.uint8, device=device)
        self.scales = torch.zeros(numel // self.group, dtype=torch.float32, device=device)

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def read(self) -> torch.Tensor:
        """The dense basis (rows x columns) in `dtype` (a transposed view of the decoded columns)."""
        rows, columns = self.shape
        codes = self.codes if self.bits == 8 else unpack_int4(self.codes, rows * columns)
        return dequantize_groups(codes, self.scales, self.group, self.dtype).view(columns, rows).T

    def write(self, value: torch.Tensor) -> None:
        """Store a whole basis (rows x columns), nearest codes."""
        if value.shape != self.shape:
            raise ValueError(f"a {self.precision} basis of shape {tuple(self.shape)} cannot store a tensor of "
                             f"shape {tuple(value.shape)}; write the whole basis")
        codes, scales = quantize_groups(value.detach().T.reshape(-1), self.group, qmax=QMAX[self.bits])
        self.codes.copy_(codes if self.bits == 8 else pack_int4(codes))
        self.scales.copy_(scales)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, own in self.tensors().items():
            if tensors[key].shape != own.shape or tensors[key].dtype != own.dtype:
                raise ValueError(f"{self.precision} basis '{key}' is {own.dtype} {tuple(own.shape)} but the loaded "
                                 f"tensor is {tensors[key].dtype} {tuple(tensors[key].shape)}; resume with the "
                                 "same --rank and --projector-precision")
            own.copy_(tensors[key])


def make_basis(rows: int, columns: int, precision: str, group: int, dtype, device):
    """A zero basis: a dense tensor in `dtype`, or a LowBitBasis ('int8', 'int4')."""
    if precision == "dense":
        return torch.zeros(rows, columns, dtype=dtype, device=device)
    if precision not in PROJECTOR_BITS:
        raise ValueError(f"unknown projector precision {precision!r}; choose dense, int8 or int4")
    return LowBitBasis(rows, columns, PROJECTOR_BITS[precision], group, dtype, device)
