"""The LLaMA model: presets, HF names and files, chunked loss, checkpointing, GQA."""
import json

import pytest
import torch

from streamtrain.hf import load_hf_weights, read_hf, save_hf
from streamtrain.models.llama import build_model
from streamtrain.models.presets import PRESETS, get_config, parameter_count

from conftest import random_batches, tiny_config, tiny_model


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_without_allocating(name):
    model = build_model(get_config(name), device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == parameter_count(get_config(name))


def test_llama_7b_has_the_published_shape():
    c = get_config("llama-7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == \
        (4096, 11008, 32, 32, 32000)
    assert 6.7e9 < parameter_count(c) < 6.8e9


def test_parameter_names_follow_the_hf_layout():
    names = set(dict(tiny_model().named_parameters()))
    for expected in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert expected in names


def test_bad_overrides_are_refused():
    with pytest.raises(ValueError, match="unknown model override"):
        get_config("llama-9m", hiden_size=3)
    with pytest.raises(ValueError, match="divisible"):
        get_config("llama-9m", hidden_size=130)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("llama-8b")


@pytest.mark.parametrize("shard_bytes", [None, 40_000], ids=["single", "sharded"])
def test_hf_save_then_load_round_trips_every_weight(tmp_path, shard_bytes):
    model = tiny_model(seed=1)
    save_hf(dict(model.named_parameters()), model.config, tmp_path, max_shard_bytes=shard_bytes)
    if shard_bytes:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    other = tiny_model(seed=2)
    load_hf_weights(other, tmp_path)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2


def test_loading_weights_of_another_shape_names_the_tensor(tmp_path):
    save_hf(dict(tiny_model().named_parameters()), tiny_config(), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_hf_weights(tiny_model(hidden_size=32), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="cannot read weights"):
        read_hf(tmp_path)


def loss_and_grads(model, x, y):
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_and_activation_checkpointing_give_the_same_loss_and_gradients():
    x, y = random_batches(1, batch=3, seq=20)[0]
    plain = tiny_model()
    loss, grads = loss_and_grads(plain, x, y)
    for variant in (dict(loss_chunk_tokens=7), dict(activation_checkpointing=True)):
        model = build_model(tiny_config(), seed=0, **variant)
        loss_v, grads_v = loss_and_grads(model, x, y)
        assert torch.allclose(loss, loss_v, atol=1e-6)
        for name in grads:
            assert torch.allclose(grads[name], grads_v[name], atol=1e-6), (variant, name)


def test_grouped_query_attention_has_fewer_kv_weights_and_trains():
    model = tiny_model(num_key_value_heads=2)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    x, y = random_batches(1)[0]
    model(x, y).backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_attention_is_causal():
    model = tiny_model()
    x = random_batches(1, batch=1, seq=12)[0][0]
    changed = x.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :8], model(changed)[0, :8], atol=1e-6)
        assert not torch.allclose(model(x)[0, 8:], model(changed)[0, 8:])


def test_sequence_longer_than_the_model_is_refused():
    model = tiny_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
