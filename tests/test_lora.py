"""LoRA: exact equality with the base at init, gradients to both factors from the first step,
training through the engine's hooks, merge/unmerge, and the peft / HF export layouts."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from streamtrain.engine import Engine
from streamtrain.methods import assign_rules
from streamtrain.models.llama import build_model
from streamtrain.models.lora import (LoRALinear, apply_lora, base_state_dict, lora_modules, merge_lora,
                                     merged_state_dict, save_peft_adapter, unmerge_lora)
from streamtrain.rules.adamw import AdamW

from conftest import random_batches, tiny_config, tiny_model

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def lora_run(steps=4, lr=1e-2, init="split", **lora):
    """A tiny model with adapters on every linear layer, trained `steps` steps by the engine."""
    model = tiny_model()
    apply_lora(model, lora.pop("targets", "all-linear"), **{"rank": 4, "alpha": 8.0, "init": init, **lora})
    engine = Engine(model, assign_rules(model, "lora"), lr=lr).attach()
    for x, y in random_batches(steps):
        engine.backward(model(x, y))
    return model, engine


@pytest.mark.parametrize("init", ["split", "standard"])
def test_outputs_equal_base_exactly_at_init(init):
    base = tiny_model()
    model = tiny_model()
    apply_lora(model, "all-linear", rank=4, alpha=8.0, dropout=0.1, init=init)  # dropout active (train mode)
    assert len(lora_modules(model)) == 2 * 7
    assert torch.equal(model(IDS), base(IDS))
    x, y = random_batches(1)[0]
    assert torch.equal(model(x, y), base(x, y))


class RecordingAdamW(AdamW):
    """AdamW that remembers the norm of every step gradient it is handed."""

    def __init__(self):
        super().__init__()
        self.grad_norms = {}

    def update(self, param, grad, state, ctx):
        self.grad_norms[ctx.step, state["name"]] = float(grad.norm())
        return super().update(param, grad, state, ctx)

    def init_state(self, name, param):
        return {**super().init_state(name, param), "name": name}


def first_step_grad_norms(init):
    model = tiny_model()
    apply_lora(model, "all-linear", rank=4, alpha=8.0, init=init)
    rule = RecordingAdamW()
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine = Engine(model, {n: rule for n, p in model.named_parameters() if p.requires_grad}, lr=1e-3).attach()
    x, y = random_batches(1)[0]
    engine.backward(model(x, y))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, frozen_before[name])
    return {name: norm for (step, name), norm in rule.grad_norms.items() if step == 0}


def test_both_factors_get_gradients_on_the_first_step():
    norms = first_step_grad_norms("split")
    assert len(norms) == 2 * 2 * 7  # only the adapters are trainable: A and B of 14 layers
    assert min(norms.values()) > 1e-6
    # the contrast that motivates "split": peft's init (B = 0) gives A exactly no gradient
    standard = first_step_grad_norms("standard")
    assert all(v == 0.0 for n, v in standard.items() if n.endswith("lora_A"))
    assert all(v > 1e-6 for n, v in standard.items() if n.endswith("lora_B"))


def test_initialisation_is_pefts_kaiming_for_the_standard_half():
    linear = nn.Linear(48, 24, bias=False)
    split = LoRALinear(linear, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(3))
    expected_a = torch.empty(4, 48)
    nn.init.kaiming_uniform_(expected_a, a=math.sqrt(5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(split.lora_A[:2], expected_a[:2]) and not split.lora_A[2:].any()
    assert not split.lora_B[:, :2].any() and split.lora_B[:, 2:].abs().max() <= 1 / math.sqrt(48)
    assert split.lora_B[:, 2:].abs().min() > 0
    assert torch.equal(split.lora_B @ split.lora_A, torch.zeros(24, 48))
    standard = LoRALinear(linear, rank=4, alpha=8.0, init="standard", generator=torch.Generator().manual_seed(3))
    assert torch.equal(standard.lora_A, expected_a) and not standard.lora_B.any()
    assert standard.scale == 2.0
    assert LoRALinear(linear, rank=4, alpha=8.0, rslora=True).scale == 4.0
    assert not linear.weight.requires_grad and standard.weight is linear.weight


def test_adapters_train_like_torch_adamw():
    model = tiny_model()
    apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8.0)
    reference = copy.deepcopy(model)
    engine = Engine(model, assign_rules(model, "lora", betas=(0.9, 0.95)), lr=3e-3).attach()
    opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=3e-3,
                            betas=(0.9, 0.95), weight_decay=0.0)
    for x, y in random_batches(4):
        engine.backward(model(x, y))
        reference(x, y).backward()
        opt.step()
        opt.zero_grad()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(engine.params) and len(trained) == 2 * 2 * 2
    ref = dict(reference.named_parameters())
    for name, p in trained.items():
        assert ((p - ref[name]).norm() / ref[name].norm()).item() < 1e-6, name
    untouched = dict(tiny_model().named_parameters())
    assert all(torch.equal(p, untouched[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_merged_outputs_equal_unmerged_after_training():
    model, _ = lora_run()
    model.eval()
    base = tiny_model().eval()
    unmerged = model(IDS)
    assert (unmerged - base(IDS)).abs().max() > 1e-3  # training changed the outputs
    merge_lora(model)
    merged = model(IDS)
    assert (merged - unmerged).abs().max().item() < 1e-5
    unmerge_lora(model)
    assert (model(IDS) - unmerged).abs().max().item() < 1e-5
    # the HF-named merged state reproduces the model in a plain (adapter-free) Llama
    state = merged_state_dict(model)
    plain = build_model(tiny_config(), seed=None)
    assert sorted(state) == sorted(plain.state_dict())
    plain.load_state_dict(state)
    assert (plain.eval()(IDS) - unmerged).abs().max().item() < 1e-5


def test_targets_by_name_regex_and_refusals():
    model = tiny_model()
    paths = apply_lora(model, [r"model\.layers\.0\.mlp\..*", "self_attn.o_proj"], rank=2)
    assert paths == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
                     "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.o_proj"]
    assert "model.layers.0.self_attn.o_proj.weight" in dict(model.named_parameters())  # HF name kept
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_lora(tiny_model(), ["qkv_proj"])
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(tiny_model(), ["lm_head"])
    with pytest.raises(ValueError, match="rank >= 2"):
        apply_lora(tiny_model(), "all-linear", rank=1)
    apply_lora(tiny_model(), "all-linear", rank=1, init="standard")


def test_peft_adapter_file_reproduces_the_merged_weights(tmp_path):
    model, _ = lora_run(targets=["q_proj", "v_proj"], rslora=True)
    save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert len(tensors) == 2 * 2 * 2
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["bias"]) == (4, 8.0, True, "none")
    assert config["target_modules"] == ["q_proj", "v_proj"]
    # peft's arithmetic on the file: W + (alpha / sqrt(r)) * B @ A equals our merged weights
    scale = config["lora_alpha"] / math.sqrt(config["r"])
    base, merged = base_state_dict(model), merged_state_dict(model)
    for path in ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        a = tensors[f"base_model.model.{path}.lora_A.weight"]
        b = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert a.shape == (4, 64) and b.shape == (64, 4)
        rebuilt = base[f"{path}.weight"] + scale * b @ a
        assert (rebuilt - merged[f"{path}.weight"]).abs().max().item() < 1e-6
        assert (rebuilt - base[f"{path}.weight"]).abs().max().item() > 1e-4


def test_peft_export_lists_paths_when_leaf_names_overreach(tmp_path):
    model = tiny_model()
    apply_lora(model, [r"model\.layers\.0\.self_attn\.q_proj"], rank=2)
    save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    model.lm_head.weight.requires_grad_(True)  # trained full-rank: an adapter file cannot carry it
    with pytest.raises(ValueError, match="outside the adapters"):
        save_peft_adapter(model, tmp_path)


def test_peft_loads_the_exported_adapter_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed")
    config = tiny_config()
    model = build_model(config, seed=0)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    engine = Engine(model, assign_rules(model, "lora"), lr=1e-2).attach()
    for x, y in random_batches(3):
        engine.backward(model(x, y))
    save_peft_adapter(model, tmp_path)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=False, attention_bias=False)
    hf = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(base, strict=False)
    assert not unexpected and all("rotary" in n or "inv_freq" in n for n in missing)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
        ours = model.eval()(IDS)
    assert (theirs - ours).abs().max().item() < 1e-4
