"""Chunked updates: the ranges that large optimizer updates walk, so their scratch is bounded.

An update of a large tensor (the 131M-element lm_head of LLaMA-7B) done in one piece holds
several full-size fp32 temporaries at once: dequantized moments, Adam's intermediates, the fp32
weight copy, the rounding noise. Walking the tensor in chunks of at most CHUNK_ELEMENTS elements
bounds them by a constant instead. Adam, weight decay and rounding are elementwise, so a chunked
update does per element exactly the operations of the whole-tensor one: the results are
bit-identical on CPU.

Flat chunks start at multiples of BLOCK_SIZE (the 8-bit states' block), so every chunk covers
whole quantization blocks and only the last one may end inside a block.
"""
import torch

from .quant8 import BLOCK_SIZE

CHUNK_ELEMENTS = 2 ** 24  # 64 MB of fp32 per temporary; a multiple of BLOCK_SIZE


def chunk_elements() -> int:
    """The chunk length in elements (read at call time, so tests can shrink it)."""
    if CHUNK_ELEMENTS < BLOCK_SIZE or CHUNK_ELEMENTS % BLOCK_SIZE:
        raise ValueError(f"CHUNK_ELEMENTS must be a positive multiple of {BLOCK_SIZE}, got {CHUNK_ELEMENTS}")
    return CHUNK_ELEMENTS


def flat_chunks(numel: int) -> list[tuple[int, int]]:
    """[(start, end)] covering range(numel) in order, each at most chunk_elements() long."""
    step = chunk_elements()
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def row_chunks(rows: int, columns: int) -> list[tuple[int, int]]:
    """[(first row, end row)] covering a rows x columns matrix in order, each at most
    chunk_elements() elements (but at least one row)."""
    step = max(1, chunk_elements() // max(columns, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as one flat view sharing its storage (writes through to `t`)."""
    if not t.is_contiguous():
        raise ValueError(f"a chunked update needs a contiguous tensor, got strides {t.stride()}; "
                         "make the parameter contiguous before training")
    return t.view(-1)


def block_square_sums(flat_chunk: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each BLOCK_SIZE block of a flat chunk that starts on a block boundary
    (the last block may be short).

    A norm summed from these per-block sums is the same number however the tensor was chunked:
    each block is reduced on its own, and the sums of all blocks are reduced in one tensor. (A
    norm combined from per-chunk norms would depend on the chunking through rounding.)"""
    whole = flat_chunk.numel() // BLOCK_SIZE * BLOCK_SIZE
    sums = flat_chunk[:whole].view(-1, BLOCK_SIZE).square().sum(dim=1)
    if whole < flat_chunk.numel():
        sums = torch.cat([sums, flat_chunk[whole:].square().sum().reshape(1)])
    return sums
