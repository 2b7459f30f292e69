"""INT8 weights (--dtype int8): the group-wise format against an oracle, unbiased stochastic
rounding through the weight-storage protocol, the layer's forward and backward against a dense
linear, and a model with INT8 block linears that trains, exports and keeps bf16 elsewhere."""
import math

import pytest
import torch

from streamtrain.models import int8 as int8_module
from streamtrain.models.int8 import Int8Linear, int8_layers, quantize_linears
from streamtrain.models.llama import build_model
from streamtrain.models.presets import get_config
from streamtrain.optim.int8_weights import (QMAX, WeightRange, dequantize_groups, flat_weight, quantize_groups,
                                            weight_rows)
from streamtrain.rules.base import StepContext, update_weight

GROUP = 64


def reference_codes(values: torch.Tensor, group: int, noise: torch.Tensor | None):
    """The format written out element by element in float64: scale = absmax / 127 per group,
    code = floor(v / scale) + (u < fraction), or the nearest code without noise."""
    v = values.double().view(-1, group)
    scales = v.abs().amax(dim=1) / QMAX
    codes = torch.empty_like(v)
    for g in range(v.shape[0]):
        for i in range(group):
            x = v[g, i].item() / scales[g].item() if scales[g] > 0 else 0.0
            if noise is None:
                codes[g, i] = round(x)
            else:
                low = math.floor(x)
                codes[g, i] = low + (noise.view(-1, group)[g, i].item() < x - low)
    return codes.clamp(-QMAX, QMAX).view(-1), scales


def test_nearest_codes_decode_within_half_a_step_of_every_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * GROUP, generator=g) * 10 ** (torch.rand(16, generator=g) * 6 - 3).repeat_interleave(GROUP)
    x[:GROUP] = 0.0  # an all-zero group: scale 0, decodes to zeros
    codes, scales = quantize_groups(x, GROUP)
    ref_codes, ref_scales = reference_codes(x, GROUP, None)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert torch.allclose(scales.double(), ref_scales, rtol=1e-6)
    # fp32 division can land an exact .5 tie on the other side: at most one code apart, rarely
    assert (codes.double() - ref_codes).abs().max() <= 1 and (codes.double() != ref_codes).sum() <= 2
    error = (dequantize_groups(codes, scales, GROUP) - x).abs().view(-1, GROUP)
    bound = scales[:, None] * (0.5 + 1e-5)
    assert bool((error <= bound).all()) and bool((dequantize_groups(codes, scales, GROUP)[:GROUP] == 0).all())
    # the group's largest element is (up to fp32 rounding) exact: it defines the scale
    assert bool((codes.view(-1, GROUP).abs().amax(dim=1)[1:] == QMAX).all())


def test_stochastic_codes_equal_the_reference_given_the_same_draws():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8 * GROUP, generator=g)
    noise = torch.rand(x.numel(), generator=g)
    codes, scales = quantize_groups(x, GROUP, noise)
    ref_codes, _ = reference_codes(x, GROUP, noise)
    # equal except where fp32 and fp64 put a draw on different sides of the fraction (none here)
    assert int((codes.double() != ref_codes).sum()) == 0
    below = torch.floor(x.view(-1, GROUP) / scales[:, None]).view(-1)
    assert bool(((codes.float() == below) | (codes.float() == below + 1) | (codes.abs() == QMAX)).all())


def test_stochastic_rounding_is_unbiased():
    """Each value's mean over many independent writes lands on it (Hoeffding, as the bf16 test);
    round-to-nearest stays a quarter step or more off for the values built to show it."""
    g = torch.Generator().manual_seed(0)
    n, draws = 8 * GROUP, 4000
    x = torch.randn(n, generator=g).clamp_(-2.9, 2.9)
    x.view(-1, GROUP)[:, 0] = 3.0  # every group's absmax: the scale is 3 / 127 in every draw
    step = 3.0 / QMAX
    x[1:GROUP // 2] = (torch.arange(1, GROUP // 2) - 60 + 0.3) * step  # 0.3 of a step past a code
    codes, scales = quantize_groups(x.expand(draws, n).reshape(-1), GROUP, torch.rand(draws * n, generator=g))
    decoded = dequantize_groups(codes, scales, GROUP).view(draws, n)
    bias_in_steps = (decoded.mean(dim=0) - x).abs() / step
    t = math.sqrt(math.log(2 * n / 1e-6) / (2 * draws))  # all n within t, failure odds 1e-6
    nearest = dequantize_groups(*quantize_groups(x, GROUP), GROUP)
    nearest_bias = ((nearest - x).abs() / step)[1:GROUP // 2].min().item()
    print(f"\nworst |mean - x| = {bias_in_steps.max().item():.4f} INT8 steps (bound {t:.4f}); "
          f"round-to-nearest: {nearest_bias:.4f}")
    assert bias_in_steps.max().item() < t < nearest_bias
    assert abs(((decoded.mean(dim=0) - x) / step).mean().item()) < 5 * 0.5 / math.sqrt(n * draws)


def small_layer(out_features=8, in_features=2 * GROUP, seed=0) -> tuple[Int8Linear, torch.Tensor]:
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))
    return Int8Linear.from_linear(dense, GROUP, rounding_seed=seed), dense.weight.detach().clone()


def test_small_updates_follow_fp32_through_the_protocol_and_stall_with_nearest_codes():
    # 500 updates of -2e-3 on weights at 1.0 in groups whose absmax is a fixed 3.0 (step 3 / 127 =
    # 0.024): each update is 1/12 of a step, so round-to-nearest never moves, stochastic rounding
    # follows fp32 (the absmax element gets no update: it keeps each group's scale)
    start = torch.ones(64, 2 * GROUP)
    start[:, ::GROUP] = 3.0
    direction = (start != 3.0).float().view(-1)
    values = {}
    for stochastic in (True, False):
        layer, _ = small_layer(out_features=64)
        layer.store(start)
        ctx = StepContext(step=0, lr=2e-3, micro_index=0, accumulate=1, stochastic_rounding=stochastic)
        for _ in range(500):
            update_weight(flat_weight(layer.weight), direction, ctx)
        values[stochastic] = layer.dequantized(torch.float32)[start != 3.0]
    nearest_start = round(QMAX / 3) * 3 / QMAX
    target = nearest_start - 500 * 2e-3
    mean, spread = values[True].mean().item(), values[True].std().item()
    print(f"\nafter 500 x -2e-3: fp32 {target:.4f}, stochastic mean {mean:.4f} spread {spread:.4f}, "
          f"nearest {values[False][0].item():.4f}")
    assert torch.allclose(values[False], torch.tensor(nearest_start), atol=1e-6)
    assert abs(mean - target) < 0.002
    # one run's spread: sqrt(500 p (1 - p)) steps, p = 1/12: about 6 steps (0.15); at least not 0
    assert 0.05 < spread < 0.25


def test_a_write_in_pieces_draws_the_noise_of_one_whole_write(monkeypatch):
    whole, _ = small_layer(out_features=32, seed=3)
    pieces, _ = small_layer(out_features=32, seed=3)
    monkeypatch.setattr(int8_module, "SCRATCH_ELEMENTS", 2 * GROUP)  # the layer's own scratch pieces
    new = torch.randn(whole.weight.numel(), generator=torch.Generator().manual_seed(9))
    flat_weight(whole.weight).write(new)
    rows = whole.weight.shape[1]
    for first in range(0, 32, 4):  # a rule's row chunks (GaLore's back-projection)
        weight_rows(pieces.weight, first, first + 4).write(new[first * rows:(first + 4) * rows])
    assert torch.equal(whole.weight_codes, pieces.weight_codes)
    assert torch.equal(whole.weight_scales, pieces.weight_scales)


def test_a_step_found_bad_keeps_codes_and_scales_bit_for_bit():
    layer, _ = small_layer()
    codes, scales = layer.weight_codes.clone(), layer.weight_scales.clone()
    flat_weight(layer.weight).write(torch.full((layer.weight.numel(),), float("nan")), found_inf=torch.ones(()))
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scales, scales)


def test_a_range_must_cover_whole_groups_and_slices_only_flat():
    layer, _ = small_layer()
    with pytest.raises(ValueError, match="whole groups"):
        layer.read_range(1, GROUP)
    with pytest.raises(TypeError, match="flat"):
        weight_rows(layer.weight, 0, 2)[0:1]
    assert isinstance(flat_weight(layer.weight)[GROUP:3 * GROUP], WeightRange)


def test_forward_and_backward_equal_a_dense_linear_on_the_dequantized_weight():
    layer, _ = small_layer()
    dense_weight = layer.dequantized(torch.float32).requires_grad_()
    x = torch.randn(3, 5, 2 * GROUP, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer.weight.data = layer.weight.data.float()  # compute in fp32 for an exact comparison
    y = layer(x)
    y_ref = x_ref @ dense_weight.T
    assert torch.allclose(y, y_ref, atol=1e-5)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y_ref.backward(upstream)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert layer.weight.grad.shape == layer.weight.shape
    assert torch.allclose(layer.weight.grad, dense_weight.grad, atol=1e-4)
    # the trainable handle is one element of memory; the weight lives in codes and scales
    assert layer.weight.untyped_storage().nbytes() == 4
    assert layer.weight_codes.dtype == torch.int8 and layer.weight_scales.numel() == layer.weight.numel() // GROUP


def test_an_int8_model_keeps_embeddings_norms_and_head_bf16_and_stores_linears_in_about_a_byte():
    config = get_config("byte-tiny")
    model = build_model(config, "meta", torch.bfloat16)
    paths = quantize_linears(model, 256, seed=0)
    model.to_empty(device="cpu").reset_parameters(0)
    assert len(paths) == 7 * config.num_hidden_layers and len(int8_layers(model)) == len(paths)
    dense = [n for n, p in model.named_parameters() if getattr(p, "weight_storage", None) is None]
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters())
    assert all(("embed" in n or "norm" in n or "lm_head" in n) for n in dense), dense
    stored = sum(b.numel() * b.element_size() for _, m in int8_layers(model) for b in m.buffers())
    elements = sum(m.weight.numel() for _, m in int8_layers(model))
    # a byte per element + an fp32 scale per group; 128-wide rows take groups of 128, down_proj's
    # 352-wide rows groups of gcd(256, 352) = 32
    assert {m.group_size for _, m in int8_layers(model)} == {128, 32}
    assert stored == sum(m.weight.numel() * (1 + 4 / m.group_size) for _, m in int8_layers(model))
    assert 1.03 < stored / elements < 1.06
    # the init is the dense init quantized: std 0.02 within a few percent
    std = torch.cat([m.dequantized(torch.float32).view(-1) for _, m in int8_layers(model)]).std().item()
    assert 0.019 < std < 0.021


def test_training_exports_bf16_weights_and_the_quantized_form_that_decode_to_the_trained_layers(tmp_path):
    from safetensors.torch import load_file

    from streamtrain.hf import load_hf_weights
    from streamtrain.train import Trainer
    from test_checkpoint import small_config

    trainer = Trainer(small_config(tmp_path, dtype="int8", steps=2, export_int8=True))
    trainer.run()
    layers = dict(int8_layers(trainer.model))
    exported = load_file(tmp_path / "final" / "model.safetensors")
    quantized = load_file(tmp_path / "final" / "model.int8.safetensors")
    assert set(exported) == {n for n, _ in trainer.model.named_parameters()}
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    for path, layer in layers.items():
        assert torch.equal(exported[f"{path}.weight"], layer.dequantized(torch.bfloat16))
        assert torch.equal(quantized[f"{path}.weight_codes"], layer.weight_codes)
        assert torch.equal(quantized[f"{path}.weight_scales"], layer.weight_scales)
    # the bf16 export loads into a dense model that computes what the INT8 model computes
    dense = build_model(trainer.model_config, "cpu", torch.bfloat16)
    load_hf_weights(dense, tmp_path / "final")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(dense(ids).float(), trainer.model(ids).float(), atol=2e-2)


def train_int8_layer(rule, chunk, monkeypatch, steps=3):
    """`steps` updates by `rule` of a 64 x 64 INT8 layer with update chunks of `chunk` elements."""
    from streamtrain.optim import chunks
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", chunk)
    layer, _ = small_layer(out_features=64, in_features=64)
    torch.manual_seed(1234)  # the states' own rounding streams
    state = rule.init_state("w", layer.weight)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        grad = torch.randn(64, 64, generator=gen).bfloat16()
        ctx = StepContext(step=step, lr=1e-2, micro_index=0, accumulate=1, weight_decay=0.1)
        rule.update(layer.weight, grad, state, ctx)
    return layer


@pytest.mark.parametrize("rule", ["adamw-8bit", "adamw-fp32", "galore"])
def test_chunked_updates_of_an_int8_weight_write_the_codes_of_the_whole_update(monkeypatch, rule):
    # 768-element chunks: a 4096-element weight in 6 flat chunks (AdamW) or 6 row chunks (GaLore's
    # back-projection); each chunk draws its rounding noise in order from the layer's stream
    from streamtrain.rules.adamw import AdamW
    from streamtrain.rules.galore import GaLore
    make = {"adamw-8bit": lambda: AdamW(states="8bit"), "adamw-fp32": lambda: AdamW(),
            "galore": lambda: GaLore(rank=8, gap=1000, svd="exact")}[rule]
    chunked, whole = train_int8_layer(make(), 768, monkeypatch), train_int8_layer(make(), 2 ** 24, monkeypatch)
    start, _ = small_layer(out_features=64, in_features=64)
    assert not torch.equal(chunked.weight_codes, start.weight_codes)  # it moved
    assert torch.equal(chunked.weight_codes, whole.weight_codes)
    assert torch.equal(chunked.weight_scales, whole.weight_scales)
