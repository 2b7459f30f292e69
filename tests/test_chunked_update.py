"""Chunked updates (optim/chunks.py): the same bits as the whole-tensor update, with scratch
bounded by the chunk length instead of the tensor's size."""
import pytest
import torch

from streamtrain.memory.tracker import MemoryTracker
from streamtrain.optim import chunks
from streamtrain.optim.adam import adam_direction
from streamtrain.optim.projector import project_back
from streamtrain.optim.quant8 import BlockwiseState8bit
from streamtrain.rules.adamw import AdamW
from streamtrain.rules.adarank import AdaRankGrad
from streamtrain.rules.base import StepContext, apply_update, maybe_clip
from streamtrain.rules.galore import GaLore

SMALL_CHUNK = 768             # 3 blocks of 256: a 64 x 64 matrix spans 6 chunks, the last one short
SHAPES = [(64, 64), (67, 64)]  # 4288 elements end inside a block


def context(step, norm_growth=None, clip=None, stochastic=True):
    return StepContext(step=step, lr=1e-2, micro_index=0, accumulate=1, weight_decay=0.1,
                       clip_per_tensor=clip, norm_growth=norm_growth, stochastic_rounding=stochastic)


def train(rule, shape, dtype, chunk, monkeypatch, steps=3, setup=None, **ctx):
    """`steps` updates of one weight by `rule` with chunk length `chunk`; (weight, state)."""
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=gen).to(dtype)
    torch.manual_seed(1234)  # the streams stochastic rounding draws from (the states' own and the weight's)
    state = rule.init_state("w", param)
    if setup is not None:
        setup(state)
    with torch.no_grad():
        for step in range(steps):
            grad = (torch.randn(shape, generator=gen) * (step + 1)).to(dtype)
            rule.update(param, grad, state, context(step, **ctx))
    return param, state


def state_tensors(state):
    out = {"prev_update_norm": state["prev_update_norm"]}
    for key in ("exp_avg", "exp_avg_sq"):
        out.update({f"{key}.{k}": t for k, t in state[key].tensors().items()})
    return out


def assert_same_bits(a, b):
    param_a, state_a = a
    param_b, state_b = b
    assert torch.equal(param_a, param_b)
    for key, value in state_tensors(state_a).items():
        assert torch.equal(value, state_tensors(state_b)[key]), key


# -- state storages: range access -------------------------------------------------------------

def test_8bit_ranges_decode_and_encode_only_their_blocks():
    x = torch.randn(67, 64) * torch.logspace(-4, 2, 64)
    torch.manual_seed(1)  # seeds the state's rounding stream: chunk by chunk draws the whole tensor's noise
    whole = BlockwiseState8bit(x.shape)
    whole.write(x)
    torch.manual_seed(1)
    parts = BlockwiseState8bit(x.shape)
    flat = x.reshape(-1)
    for start, end in [(0, 768), (768, 4096), (4096, 4288)]:
        parts.write_range(start, flat[start:end])
    assert torch.equal(parts.codes, whole.codes) and torch.equal(parts.absmax, whole.absmax)
    assert torch.equal(whole.read_range(512, 1280), whole.read().reshape(-1)[512:1280])
    assert torch.equal(whole.read_range(4096, 4288), whole.read().reshape(-1)[4096:])
    with pytest.raises(ValueError, match="whole blocks"):
        whole.write_range(100, flat[100:356])
    with pytest.raises(ValueError, match="whole blocks"):
        whole.read_range(0, 300)


def test_chunk_length_must_be_a_multiple_of_the_block(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1000)
    with pytest.raises(ValueError, match="multiple of 256"):
        chunks.flat_chunks(4096)


# -- AdamW ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("states", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_growth", [None, 0.5])
def test_adamw_chunked_equals_whole_tensor_bit_for_bit(monkeypatch, shape, states, dtype, norm_growth):
    # bf16 weights round stochastically: on CPU the per-chunk noise draws, in order, are the
    # same stream as one draw over the whole tensor, so even those bits agree
    chunked = train(AdamW(states=states), shape, dtype, SMALL_CHUNK, monkeypatch, norm_growth=norm_growth, clip=30.0)
    whole = train(AdamW(states=states), shape, dtype, 2 ** 24, monkeypatch, norm_growth=norm_growth, clip=30.0)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", SMALL_CHUNK)
    assert len(chunks.flat_chunks(shape[0] * shape[1])) == 6
    assert_same_bits(chunked, whole)
    if norm_growth:  # the limiter bound on every step after the first: ||u_t|| = 0.5 ||u_{t-1}||
        first = train(AdamW(states=states), shape, dtype, SMALL_CHUNK, monkeypatch, steps=1,
                      norm_growth=norm_growth, clip=30.0)
        ratio = (chunked[1]["prev_update_norm"] / first[1]["prev_update_norm"]).item()
        assert ratio == pytest.approx(0.25, rel=1e-5)


def reference_adamw_update(param, grad, state, ctx, betas=(0.9, 0.999), eps=1e-8):
    """The whole-tensor AdamW update as it was before chunking (read, Adam, write, apply)."""
    g = maybe_clip(grad.float(), ctx)
    state["step"] += 1
    m, v = state["exp_avg"].read(), state["exp_avg_sq"].read()
    direction = adam_direction(g, m, v, state["step"], *betas, eps)
    state["exp_avg"].write(m)
    state["exp_avg_sq"].write(v)
    apply_update(param, direction, state, ctx)


@pytest.mark.parametrize("states", ["fp32", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_chunked_equals_the_whole_tensor_reference(monkeypatch, states, dtype):
    # the reference backend's ops, chunked; the fused kernels round differently (test_fused.py)
    monkeypatch.setenv("STREAMTRAIN_UPDATE_BACKEND", "reference")
    rule = AdamW(states=states)
    rule.update = lambda p, g, s, ctx: reference_adamw_update(p, g, s, ctx)
    reference = train(rule, (67, 64), dtype, SMALL_CHUNK, monkeypatch, clip=30.0)
    chunked = train(AdamW(states=states), (67, 64), dtype, SMALL_CHUNK, monkeypatch, clip=30.0)
    assert_same_bits(chunked, reference)


# -- GaLore -----------------------------------------------------------------------------------

def signed_permutation_basis(rows, rank, seed=0):
    """Orthonormal columns with one +-1 per column and at most one per row: P N and N P^T are
    then exact in fp32 whatever order a BLAS sums in, so chunked and whole updates can be
    compared bit for bit (with a general basis, MKL's GEMM rounds row subsets of a product
    differently from the full product)."""
    gen = torch.Generator().manual_seed(seed)
    rows_used = torch.randperm(rows, generator=gen)[:rank]
    basis = torch.zeros(rows, rank)
    signs = torch.randint(0, 2, (rank,), generator=gen) * 2 - 1
    basis[rows_used, torch.arange(rank)] = signs.float()
    return basis


def install_basis(basis):
    def setup(state):
        state["basis"].copy_(basis)
        state["refresh_step"] = 0  # with a large gap, no refresh replaces it
    return setup


@pytest.mark.parametrize("shape", [(50, 96), (100, 48)])  # left and right projection
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_growth", [None, 0.5])
def test_galore_row_chunks_equal_the_whole_update_bit_for_bit(monkeypatch, shape, dtype, norm_growth):
    side_rows = min(shape)
    setup = install_basis(signed_permutation_basis(side_rows, 8))
    chunked = train(GaLore(rank=8, gap=1000), shape, dtype, SMALL_CHUNK, monkeypatch, setup=setup,
                    norm_growth=norm_growth)
    whole = train(GaLore(rank=8, gap=1000), shape, dtype, 2 ** 24, monkeypatch, setup=setup,
                  norm_growth=norm_growth)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", SMALL_CHUNK)
    assert len(chunks.row_chunks(*shape)) == 7
    assert_same_bits(chunked, whole)


def test_galore_growth_limit_uses_the_norm_of_the_full_direction(monkeypatch):
    # ||P N|| = ||N|| for orthonormal P: the kept norm is that of the applied m x n update
    rule = GaLore(rank=8, gap=1000, scale=0.25)
    shape = (50, 96)
    param, state = train(rule, shape, torch.float32, SMALL_CHUNK, monkeypatch, steps=2,
                         setup=install_basis(torch.linalg.qr(torch.randn(50, 8)).Q), norm_growth=0.5)
    before = param.clone()
    grad = torch.randn(shape)
    m, v = state["exp_avg"].read().clone(), state["exp_avg_sq"].read().clone()
    low = adam_direction(state["basis"].T @ grad, m, v, state["step"] + 1)
    full = project_back(low, state["basis"], "left") * 0.25
    limit = 0.5 * state["prev_update_norm"]
    assert torch.linalg.vector_norm(full) > limit  # the limiter binds on this step
    rule.update(param, grad, state, context(2, norm_growth=0.5))
    expected = before * (1 - 1e-2 * 0.1) - 1e-2 * full * (limit / torch.linalg.vector_norm(full))
    torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["prev_update_norm"], limit, rtol=1e-5, atol=0)


@pytest.mark.parametrize("make_rule", [lambda: GaLore(rank=8, gap=2),
                                       lambda: AdaRankGrad(r_min=2, r_max=8, svd="exact", max_interval=2)])
@pytest.mark.parametrize("shape", [(50, 96), (100, 48)])
def test_galore_row_chunks_with_svd_bases_agree_to_matmul_rounding(monkeypatch, make_rule, shape):
    chunked, chunked_state = train(make_rule(), shape, torch.float32, SMALL_CHUNK, monkeypatch, steps=4)
    whole, whole_state = train(make_rule(), shape, torch.float32, 2 ** 24, monkeypatch, steps=4)
    assert chunked_state["refreshes"] == 2 and chunked_state["rank"] == whole_state["rank"]
    initial = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert (whole - initial).abs().max() > 1e-3  # the steps moved the weight
    # only the back-projection's GEMM may round differently: a few ulps of the weight at most
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


# -- scratch memory ---------------------------------------------------------------------------

def update_scratch_bytes(numel, chunk, monkeypatch, norm_growth=None):
    """Peak bytes of temporaries of one AdamW update (8-bit states, bf16 weight and gradient:
    every conversion the update can make) of a `numel`-element weight, by the reference ops
    (the fused kernel keeps none: test_fused.py)."""
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setenv("STREAMTRAIN_UPDATE_BACKEND", "reference")
    rule = AdamW(states="8bit")
    param = torch.randn(numel).to(torch.bfloat16)
    grad = torch.randn(numel).to(torch.bfloat16)
    state = rule.init_state("w", param)
    with torch.no_grad(), MemoryTracker() as tracker:
        tracker.label(param, "weights")
        tracker.label(grad, "gradients")
        tracker.label_state(state)
        rule.update(param, grad, state, context(0, norm_growth=norm_growth, clip=1.0))
    return tracker.max_by_category["temporaries"]


@pytest.mark.parametrize("norm_growth", [None, 1.01])
def test_chunked_adamw_scratch_is_bounded_by_the_chunk(monkeypatch, norm_growth):
    numel, chunk = 2 ** 22, 2 ** 18
    whole = update_scratch_bytes(numel, 2 ** 24, monkeypatch, norm_growth)
    chunked = update_scratch_bytes(numel, chunk, monkeypatch, norm_growth)
    half_size = update_scratch_bytes(numel // 2, chunk, monkeypatch, norm_growth)
    print(f"norm_growth={norm_growth}: whole {whole / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB, "
          f"half-size tensor chunked {half_size / 2**20:.1f} MiB")
    assert whole > 6 * numel * 4                     # several fp32 copies of the whole tensor
    assert chunked < 10 * chunk * 4 + numel // 32    # about ten chunk-sized fp32 temporaries
    assert chunked < whole / 10
    # what is left grows with the tensor only through 1/256-size block sums (growth limiter)
    assert chunked - half_size <= numel // 2 // 256 * 4
