"""Storage for one optimizer state tensor; its precision is chosen when it is created.

Rules read a state as an fp32 working tensor, update it, and write it back. For fp32 storage the
working tensor *is* the storage (read returns it, write is a no-op), so full precision costs no
copy. bf16 storage rounds stochastically on write: with round-to-nearest, Adam's second moment
(decayed by beta2 = 0.999 per step, less than half a bf16 ulp) would never shrink after a spike,
and every later step would be too small. The 8-bit block-wise storage lives in `quant8.py` and has
the same methods.

Large updates work chunk by chunk (optim/chunks.py) through range access on the flattened state:
read_range(start, end) -> fp32 tensor of end - start elements, write_range(start, value).
"""
import torch

from .rounding import rounding_generator, stochastic_round_to_bf16

PRECISIONS = ("fp32", "bf16", "8bit")
SMALL_TENSOR_NUMEL = 4096  # tensors below this stay fp32 whatever the requested precision


def working(t: torch.Tensor) -> torch.Tensor:
    """`t` in working precision: fp32, or fp64 when it already is (fp64 runs exist for tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def working_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype `working(t)` would have, without making the copy."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


class DenseState:
    """A state kept as one dense tensor in fp32 or bf16 (bf16: with its own rounding generator)."""

    def __init__(self, shape, dtype=torch.float32, device=None):
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.flat = self.data.view(-1)
        self.generator = rounding_generator(self.data.device) if dtype == torch.bfloat16 else None
        # fp32/fp64: read_range hands out views of the storage, so an in-place update is stored
        self.updates_in_place = dtype in (torch.float32, torch.float64)

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}[self.data.dtype]

    def read(self) -> torch.Tensor:
        return working(self.data)

    def write(self, value: torch.Tensor) -> None:
        if value is not self.data:
            self.data.copy_(self._rounded(value))

    def read_range(self, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened state in working precision: a view of the
        storage for fp32 (updating it in place updates the state), a copy for bf16."""
        flat = self.flat
        return working(flat if start == 0 and end == flat.numel() else flat[start:end])

    def write_range(self, start: int, value: torch.Tensor) -> None:
        target = self.flat[start:start + value.numel()]
        if not self._is_view_of(value, target):  # a view read_range handed out is already stored
            target.copy_(self._rounded(value.reshape(-1)))

    def _is_view_of(self, value: torch.Tensor, target: torch.Tensor) -> bool:
        # (not Tensor.is_set_to: it has no fake-tensor kernel, so the planner would allocate real
        # zeros for it, 56% of a 7B simulation's time)
        return (value._base is self.data and value.storage_offset() == target.storage_offset()
                and value.shape == target.shape)

    def _rounded(self, value: torch.Tensor) -> torch.Tensor:
        """`value` as it is stored: bf16 by stochastic rounding, fp32/fp64 as is."""
        if self.data.dtype == torch.bfloat16 and value.dtype != torch.bfloat16:
            return stochastic_round_to_bf16(value, self.generator)
        return value

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.data.copy_(tensors["data"])


def make_state(shape, precision: str = "fp32", signed: bool = True, device=None, param_dtype=None):
    """A zero state of `shape` stored at `precision` (fp32, bf16 or 8bit).

    `signed` tells the 8-bit storage which code map to use (signed for Adam's first moment,
    unsigned for the second). An fp64 parameter gets fp64 'fp32' states (exactness tests)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown state precision {precision!r}; choose one of {PRECISIONS}")
    numel = 1
    for s in shape:
        numel *= s
    if param_dtype == torch.float64:
        return DenseState(shape, torch.float64, device)
    if precision == "fp32" or numel < SMALL_TENSOR_NUMEL:
        return DenseState(shape, torch.float32, device)
    if precision == "bf16":
        return DenseState(shape, torch.bfloat16, device)
    from .quant8 import BlockwiseState8bit
    return BlockwiseState8bit(shape, signed=signed, device=device)
