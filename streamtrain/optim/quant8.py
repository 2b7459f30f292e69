"""Block-wise 8-bit storage for optimizer states, in plain PyTorch (CPU and CUDA alike).

A tensor is cut into blocks of 256 elements. Each block keeps its absolute maximum (fp32) and, per
element, one byte: the index of the nearest value of `x / absmax` in a fixed table of 256 codes.
The table is bitsandbytes' dynamic ("tree") map: its codes are spread over seven decades
(1e-6 .. 1), denser near 1, so small entries of a block survive next to a large one. That matters
for Adam's moments, whose entries span many orders of magnitude. The first moment uses the signed
map, the second moment (never negative) the unsigned one, which spends all 256 codes on [0, 1].

Rounding. States are written with stochastic rounding between the two codes around `x / absmax`
(up with probability proportional to the distance from the lower code), so the stored value is
unbiased. Round-to-nearest is biased where codes are sparse: after a gradient spike the second
moment of a block's small entries sits in the coarse low decades, and with nearest rounding it
drifted 22% below an fp64 reference over 1500 steps (tests/test_state.py); stochastic rounding
stays within 0.1%. The states' draws come from optim/noise.py (a hash of a per-write seed and the
element's index). `quantize_blockwise(..., noise=None)` is the deterministic nearest-code
quantizer (exact, tested against an argmin oracle).

Cost per element: 1 byte plus 4/256 bytes of scale, about 25.4% of fp32.
"""
import torch

from .noise import element_indices, hashed_uniform, new_seed
from .rounding import rounding_generator

BLOCK_SIZE = 256
MAX_EXPONENT_BITS = 7  # the number of decades the map spans
_CODE_MAPS: dict = {}  # (signed, device) -> code map, shared by every state on that device


def dynamic_code_map(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 codes of bitsandbytes' dynamic map (create_dynamic_map, 8 bits).

    Decade i (i = 0..6) covers [0.1, 1] * 10^(i-6) with 2^i codes per sign (signed) or 2^(i+1)
    codes (unsigned), each the midpoint of an equal split of the decade; 0 and 1 complete the map.
    """
    values = [0.0, 1.0]
    for i in range(MAX_EXPONENT_BITS):
        count = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        decade = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - (MAX_EXPONENT_BITS - 1))).tolist()
        values += decade
        if signed:
            values += [-v for v in decade]
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


def code_map(signed: bool, device=None) -> torch.Tensor:
    """The cached code map on `device` (built once per process and device)."""
    key = (signed, torch.device(device if device is not None else "cpu"))
    if key not in _CODE_MAPS:
        _CODE_MAPS[key] = dynamic_code_map(signed).to(key[1])
    return _CODE_MAPS[key]


def nearest_code_boundaries(code: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 decision boundaries between neighbouring codes, for bucketize.

    Boundary k is the largest fp32 value that is not nearer to code k+1 than to code k: the exact
    midpoint when fp32 can hold it, else the fp32 just below it. So bucketize(right=False) gives
    the nearest code of every fp32 input exactly, and an exact tie goes to the lower code (the
    same choice as argmin over distances, which takes the first minimum)."""
    code64 = code.double()
    midpoints = (code64[:-1] + code64[1:]) / 2  # exact in fp64: both codes are fp32
    boundaries = midpoints.float()
    rounded_up = boundaries.double() > midpoints
    below = torch.nextafter(boundaries, torch.full_like(boundaries, -torch.inf))
    return torch.where(rounded_up, below, boundaries)


# -- nearest code by table lookup (the compiled update's encoder) ---------------------------------
# bucketize over 255 boundaries is a binary search: eight dependent, data-dependent loads per
# element. The same answer comes from one lookup: cut the fp32 line into cells by the sign, the
# exponent and the top LOOKUP_MANTISSA_BITS mantissa bits of the value's bit pattern. A cell is an
# interval of values, too narrow to hold two boundaries, so its nearest code is its lower end's
# code, plus one above the boundary inside it (if any). A boundary inside a cell shares the
# cell's high bits, so comparing the 15 low bits decides; one int32 entry per cell holds the
# base code (high half) and those 15 bits (low half). The table is built by bucketize itself.
LOOKUP_MANTISSA_BITS = 8            # cells <= 0.4% of their value wide; boundaries >= 0.7% apart
LOOKUP_EXPONENTS = (103, 127)       # [2^-24, 2): smaller magnitudes share one cell (all boundaries
                                    # exceed 1.6e-7), larger ones (and inf) share the top cell
LOW_BITS = 23 - LOOKUP_MANTISSA_BITS
LOW_MASK = (1 << LOW_BITS) - 1      # also the threshold of a cell without a boundary: never exceeded
_LOOKUP_TABLES: dict = {}           # (signed, device) -> int32 table


def _cell_count() -> int:
    low, high = LOOKUP_EXPONENTS
    return (high - low + 1) << LOOKUP_MANTISSA_BITS


def _cell_magnitudes() -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest fp32 magnitude of every cell (the first and last cells reach
    down to 0 and up to inf)."""
    first_key = LOOKUP_EXPONENTS[0] << LOOKUP_MANTISSA_BITS
    keys = torch.arange(_cell_count(), dtype=torch.int64) + first_key
    low_bits, high_bits = keys << LOW_BITS, ((keys + 1) << LOW_BITS) - 1
    low_bits[0], high_bits[-1] = 0, 0x7F800000  # +0.0 and +inf
    return low_bits.to(torch.int32).view(torch.float32), high_bits.to(torch.int32).view(torch.float32)


def code_lookup_table(signed: bool, device=None) -> torch.Tensor:
    """int32 entries, positive cells then negative ones: base code << 16 | threshold, where the
    threshold is the boundary's low 15 bits in the cell's order (see _order_in_cell)."""
    key = (signed, torch.device(device if device is not None else "cpu"))
    if key not in _LOOKUP_TABLES:
        boundaries = nearest_code_boundaries(dynamic_code_map(signed))
        low, high = _cell_magnitudes()
        lowest = torch.cat([low, -high])    # each cell's smallest value (negative cells: -largest magnitude)
        highest = torch.cat([high, -low])
        base = torch.bucketize(lowest, boundaries, out_int32=True)
        top = torch.bucketize(highest, boundaries, out_int32=True)
        assert int((top - base).max()) <= 1, "a lookup cell holds two code boundaries; raise LOOKUP_MANTISSA_BITS"
        inside = _order_in_cell(boundaries[base.clamp(max=254).long()].view(torch.int32))
        threshold = torch.where(top > base, inside, LOW_MASK)
        _LOOKUP_TABLES[key] = ((base << 16) | threshold).to(key[1])
    return _LOOKUP_TABLES[key]


def _order_in_cell(bits: torch.Tensor) -> torch.Tensor:
    """The low 15 bits of fp32 patterns, flipped for negative values, so that within one cell a
    larger value has a larger result."""
    return (bits & LOW_MASK) ^ ((bits >> 31) & LOW_MASK)


def nearest_code_by_lookup(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """int32 index of the code nearest to each element of fp32 `x` (x / absmax of its block):
    bit for bit what bucketize over nearest_code_boundaries gives, NaN included (code 255)."""
    bits = x.view(torch.int32)
    first_key = LOOKUP_EXPONENTS[0] << LOOKUP_MANTISSA_BITS
    cell = ((bits & 0x7FFFFFFF) >> LOW_BITS) - first_key
    cell = cell.clamp(0, _cell_count() - 1) + (bits < 0).int() * _cell_count()
    entry = table[cell.long()]
    index = (entry >> 16) + (_order_in_cell(bits) > (entry & 0xFFFF)).int()
    return torch.where(torch.isnan(x), 255, index)


def num_blocks(numel: int) -> int:
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def _as_blocks(flat: torch.Tensor) -> torch.Tensor:
    """(num_blocks, 256) view of a flat tensor; the last block is zero-padded (a copy) when the
    length is not a multiple of 256."""
    padding = num_blocks(flat.numel()) * BLOCK_SIZE - flat.numel()
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.view(-1, BLOCK_SIZE)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes: uint8 of x.numel(), absmax: fp32 of num_blocks). Without `noise`, codes[i] is the
    index of the code nearest to x[i] / absmax of its block; with `noise` (uniform [0, 1), one per
    element) it is rounded stochastically between the two codes around it. `code` must hold 256
    sorted fp32 values."""
    if code.numel() != 256:
        raise ValueError(f"the code map holds {code.numel()} values, uint8 codes need 256; pass code_map(signed)")
    blocks = _as_blocks(x.detach().reshape(-1).float())
    absmax = blocks.abs().amax(dim=1)
    # an all-zero block divides by 1 instead of 0; its codes all point at the code 0.0
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (blocks / scale[:, None]).view(-1)[:x.numel()]
    if noise is None:
        indices = torch.bucketize(normalized, nearest_code_boundaries(code), out_int32=True)
    else:
        indices = stochastic_code_indices(normalized, code, noise.reshape(-1))
    return indices.to(torch.uint8), absmax


def stochastic_from_nearest(normalized: torch.Tensor, nearest: torch.Tensor, code: torch.Tensor,
                            noise: torch.Tensor) -> torch.Tensor:
    """stochastic_code_indices from the nearest code's index (the compiled kernel's lookup): the
    code below a value is its nearest code when that is not above it, else the one before. Same
    indices bit for bit (the same fraction, compared with the same noise)."""
    below = torch.where(code[nearest.clamp(0, code.numel() - 1)] > normalized, nearest - 1, nearest)
    below = below.clamp(0, code.numel() - 2)
    low = code[below]
    fraction = ((normalized - low) / (code[below + 1] - low)).clamp(0, 1)
    return below + (noise < fraction).int()


def stochastic_code_indices(normalized: torch.Tensor, code: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Index of the code below each value, plus 1 with probability (value - below) / (above - below):
    unbiased, E[code[index]] = value, for values inside the map's range (beyond its ends: the end)."""
    below = torch.bucketize(normalized, code, right=True, out_int32=True).sub_(1).clamp_(0, code.numel() - 2)
    low = code[below]
    fraction = normalized - low
    fraction.div_(code[below + 1].sub_(low)).clamp_(0, 1)  # in place: the scratch stays a few chunks
    del low
    return below.add_(noise < fraction)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape) -> torch.Tensor:
    """The fp32 tensor of `shape` that `quantize_blockwise` encoded as (codes, absmax)."""
    numel = codes.numel()
    # int32 indices: a quarter of int64's temporary; index_select gathers the same values as
    # advanced indexing (code[indices]), several times faster on CPU
    values = _as_blocks(code.index_select(0, codes.int()))
    return (values * absmax[:, None]).view(-1)[:numel].view(shape)


class BlockwiseState8bit:
    """An optimizer state stored as block-wise 8-bit codes; same interface as state.DenseState.
    Writes round stochastically (from the state's own generator) unless `stochastic` is off."""

    def __init__(self, shape, signed: bool = True, device=None, stochastic: bool = True):
        self.shape = torch.Size(shape)
        self.signed = signed
        self.stochastic = stochastic
        numel = self.shape.numel()
        # absmax 0 marks a block as all zero, whatever its codes say
        self.codes = torch.zeros(numel, dtype=torch.uint8, device=device)
        self.absmax = torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)
        self.generator = rounding_generator(self.codes.device) if stochastic else None
        self._seed = None  # the current write's rounding seed (noise_seed)

    @property
    def precision(self) -> str:
        return "8bit"

    @property
    def code(self) -> torch.Tensor:
        return code_map(self.signed, self.codes.device)

    def read(self) -> torch.Tensor:
        """The whole state in fp32, dequantized chunk by chunk (the scratch stays chunk-sized)."""
        from .chunks import flat_chunks  # chunks.py builds on this module
        out = torch.empty(self.shape, dtype=torch.float32, device=self.codes.device)
        flat = out.view(-1)
        for start, end in flat_chunks(self.codes.numel()):
            flat[start:end] = self.read_range(start, end)
        return out

    def write(self, value: torch.Tensor) -> None:
        if value.shape != self.shape:
            raise ValueError(f"8-bit state of shape {tuple(self.shape)} cannot store a tensor of "
                             f"shape {tuple(value.shape)}; write a tensor of the state's shape")
        from .chunks import flat_chunks
        flat = value.reshape(-1)
        for start, end in flat_chunks(self.codes.numel()):
            self.write_range(start, flat[start:end])

    def read_range(self, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened state in fp32; only their blocks are decoded."""
        self._check_range(start, end)
        blocks = slice(start // BLOCK_SIZE, num_blocks(end))
        return dequantize_blockwise(self.codes[start:end], self.absmax[blocks], self.code, (end - start,))

    def write_range(self, start: int, value: torch.Tensor, found_inf: torch.Tensor | None = None) -> None:
        """Store `value` as elements [start, start + numel) of the flattened state. The range must
        cover whole blocks (or end where the state ends): each block's scale is its own absmax.
        `found_inf` (optional 0-d tensor): at 1.0 the range keeps its old codes, selected on the
        device (re-encoding decoded values would not give the old codes back bit for bit)."""
        end = start + value.numel()
        self._check_range(start, end)
        codes, absmax = quantize_blockwise(value, self.code, self.noise(start, value.numel()))
        if found_inf is not None:
            bad = found_inf.to(codes.device) > 0
            codes = torch.where(bad, self.codes[start:end], codes)
            absmax = torch.where(bad, self.absmax[start // BLOCK_SIZE:num_blocks(end)], absmax)
        self.codes[start:end].copy_(codes)
        self.absmax[start // BLOCK_SIZE:num_blocks(end)].copy_(absmax)

    def noise(self, start: int, numel: int) -> torch.Tensor | None:
        """Uniform [0, 1) draws for elements [start, start + numel) (None: round to nearest): a
        function of the write's seed and the element's index (optim/noise.py)."""
        seed = self.noise_seed(start)
        if seed is None:
            return None
        return hashed_uniform(seed, element_indices(start, (numel,), self.codes.device))

    def noise_seed(self, start: int) -> torch.Tensor | None:
        """The rounding seed of a write reaching element `start`: a new one from the state's own
        stream when the write begins at element 0 (an update walks the state from 0, whole or
        chunk by chunk), else the current write's, so chunked and whole writes draw alike."""
        if not self.stochastic:
            return None
        if start == 0 or self._seed is None:
            self._seed = new_seed(self.generator, self.codes.device)
        return self._seed

    def _check_range(self, start: int, end: int) -> None:
        numel = self.codes.numel()
        if not 0 <= start < end <= numel or start % BLOCK_SIZE or (end % BLOCK_SIZE and end != numel):
            raise ValueError(f"8-bit state range [{start}, {end}) of {numel} elements must cover whole "
                             f"blocks of {BLOCK_SIZE}; start and end on multiples of {BLOCK_SIZE} (or at the end)")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "absmax": self.absmax}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, own in self.tensors().items():
            if tensors[key].shape != own.shape:
                raise ValueError(f"8-bit state '{key}' has shape {tuple(own.shape)} but the loaded "
                                 f"tensor has {tuple(tensors[key].shape)}; load a checkpoint of the same model")
            own.copy_(tensors[key])
