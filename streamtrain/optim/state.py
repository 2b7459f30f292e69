"""Storage for one optimizer state tensor; its precision is chosen when it is created.

Rules read a state as an fp32 working tensor, update it, and write it back. For fp32 storage the
working tensor *is* the storage (read returns it, write is a no-op), so full precision costs no
copy. bf16 storage rounds on write. The 8-bit block-wise storage lives in `quant8.py` and has
the same three methods.
"""
import torch

PRECISIONS = ("fp32", "bf16", "8bit")
SMALL_TENSOR_NUMEL = 4096  # tensors below this stay fp32 whatever the requested precision


class DenseState:
    """A state kept as one dense tensor in fp32 or bf16."""

    def __init__(self, shape, dtype=torch.float32, device=None):
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def precision(self) -> str:
        return "fp32" if self.data.dtype == torch.float32 else "bf16"

    def read(self) -> torch.Tensor:
        return self.data if self.data.dtype == torch.float32 else self.data.float()

    def write(self, value: torch.Tensor) -> None:
        if value is not self.data:
            self.data.copy_(value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.data.copy_(tensors["data"])


def make_state(shape, precision: str = "fp32", signed: bool = True, device=None):
    """A zero state of `shape` stored at `precision` (fp32, bf16 or 8bit).

    `signed` tells the 8-bit storage which code map to use (signed for Adam's first moment,
    unsigned for the second)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown state precision {precision!r}; choose one of {PRECISIONS}")
    numel = 1
    for s in shape:
        numel *= s
    if precision == "fp32" or numel < SMALL_TENSOR_NUMEL:
        return DenseState(shape, torch.float32, device)
    if precision == "bf16":
        return DenseState(shape, torch.bfloat16, device)
    from .quant8 import BlockwiseState8bit
    return BlockwiseState8bit(shape, signed=signed, device=device)
