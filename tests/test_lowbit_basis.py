"""GaLore bases in INT8 or INT4 (--projector-precision): packing, the decode error against the
format's bound, the bytes, and GaLore projecting with the decoded basis."""
import pytest
import torch

from streamtrain.config import ConfigError, TrainConfig
from streamtrain.optim.lowbit_basis import LowBitBasis, make_basis, pack_int4, unpack_int4
from streamtrain.optim.projector import svd_basis
from streamtrain.rules.base import StepContext
from streamtrain.rules.galore import GaLore, active_basis


def orthonormal(rows, columns, seed=0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)))
    return q


def test_int4_packing_round_trips_every_code_two_per_byte():
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(3)[:-1]  # 44 codes: an odd count, padded
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2
    assert torch.equal(unpack_int4(packed, codes.numel()), codes)


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_a_stored_basis_decodes_within_half_a_step_per_group_and_costs_its_bits(bits, qmax):
    rows, columns, group = 512, 32, 128
    basis = orthonormal(rows, columns)
    stored = LowBitBasis(rows, columns, bits, group, dtype=torch.float32)
    stored.write(basis)
    decoded = stored.read()
    assert decoded.shape == (rows, columns)
    # groups run down a column: each column's absmax over 128 rows sets that group's step
    steps = basis.T.reshape(-1, group).abs().amax(dim=1) / qmax
    error = (decoded - basis).T.reshape(-1, group).abs()
    assert bool((error <= steps[:, None] * (0.5 + 1e-5)).all())
    assert bool((error.amax(dim=1) > 0.2 * steps).all())  # really quantized, not a dense copy
    nbytes = sum(t.numel() * t.element_size() for t in stored.tensors().values())
    assert nbytes == rows * columns * (bits / 8 + 4 / group)
    # the decoded columns stay nearly orthonormal: the projection's error is the format's
    gram_error = (decoded.T @ decoded - torch.eye(columns)).abs().max().item()
    assert gram_error < {8: 0.01, 4: 0.2}[bits], gram_error


def test_a_basis_write_of_the_wrong_shape_is_refused_in_one_line():
    stored = make_basis(64, 8, "int4", 256, torch.bfloat16, "cpu")
    assert stored.group == 64  # a group never spans two columns
    with pytest.raises(ValueError, match="write the whole basis"):
        stored.write(torch.zeros(64, 4))


def test_galore_projects_with_the_decoded_basis_of_its_low_bit_storage():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 64))
    grad = torch.randn(96, 64)
    ctx = StepContext(step=0, lr=1e-3, micro_index=0, accumulate=1)
    updates = {}
    for precision in ("dense", "int8", "int4"):
        rule = GaLore(rank=8, gap=10, svd="exact", projector=precision, projector_group=64)
        w = torch.nn.Parameter(weight.detach().clone())
        state = rule.init_state("w", w)
        rule.update(w, grad.clone(), state, ctx)
        assert (precision == "dense") == isinstance(state["basis"], torch.Tensor)
        updates[precision] = w.detach() - weight.detach()
        if precision != "dense":
            decoded = active_basis(state)
            exact = svd_basis(grad, 8, state["side"])
            assert torch.allclose(decoded, state["basis"].read())
            assert not torch.equal(decoded, exact) and torch.allclose(decoded.abs(), exact.abs(), atol=0.1)
    # the first step's update is Adam's sign-like direction projected back: the low-bit bases move
    # the weight along nearly the same directions
    for precision, tolerance in (("int8", 0.01), ("int4", 0.1)):
        cosine = torch.nn.functional.cosine_similarity(updates[precision].view(1, -1), updates["dense"].view(1, -1))
        print(f"\n{precision} bases: cosine to the dense update {cosine.item():.4f}")
        assert cosine.item() > 1 - tolerance, (precision, cosine.item())


def test_low_bit_projectors_need_a_projecting_method():
    with pytest.raises(ConfigError, match="--projector-precision"):
        TrainConfig(method="adamw", projector_precision="int4").validate()
    with pytest.raises(ConfigError, match="--dtype int8"):
        TrainConfig(method="lora", dtype="int8").validate()
