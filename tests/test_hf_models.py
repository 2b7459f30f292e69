"""Any transformers causal LM through the engine: the adapter's loss is the model's own, per-layer
AdamW equals torch.optim.AdamW, rules land on the linear layers inside the blocks, exports reload
in transformers and peft with the same logits."""
import copy
import re

import pytest
import torch
from torch import nn

from tiny_hf import ARCHS, VOCAB, batches, hf_loss, hf_model, save_folder, tiny_config
from streamtrain.engine import Engine
from streamtrain.hf import save_hf, save_tokenizer_files
from streamtrain.methods import assign_rules
from streamtrain.models.hf_causal import HFCausalLM, build_hf_model
from streamtrain.models.hf_config import ModelConfigError, load_auto_config
from streamtrain.models.lora import apply_lora, base_state_dict, merged_state_dict, save_peft_adapter
from streamtrain.rules import GaLore

transformers = pytest.importorskip("transformers")  # the [test] extra installs it: CI never skips

LOW_RANK = {  # the linear layers inside the blocks, by architecture
    "llama3": r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "mistral": r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "qwen2": r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "gpt2": r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight",
    "neox": r"gpt_neox\.layers\.\d\.(attention\.query_key_value|attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)\.weight",
}
MATRICES = {"llama3": 14, "mistral": 14, "qwen2": 14, "gpt2": 8, "neox": 8}
DECAYED_FULL_RANK = {"llama3": set(), "mistral": {"lm_head.weight"}, "qwen2": {"lm_head.weight"},
                     "gpt2": set(), "neox": {"lm_head.weight"}}  # untied heads; tied ones are embeddings


def torch_adamw(reference: nn.Module, lr: float, weight_decay: float):
    """torch.optim.AdamW with norms, biases and embeddings undecayed (the engine's default groups)."""
    embeddings = {id(m.weight) for m in reference.modules() if isinstance(m, nn.Embedding)}
    undecayed = [p for p in reference.parameters() if p.dim() < 2 or id(p) in embeddings]
    decayed = [p for p in reference.parameters() if all(p is not q for q in undecayed)]
    return torch.optim.AdamW([{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}], lr=lr,
                             weight_decay=weight_decay)


def max_relative_diff(model, reference, dims=(1, 2)) -> float:
    """The largest ||ours - theirs|| / ||theirs|| over the parameters with these dimensions."""
    theirs = dict(reference.named_parameters())
    return max(((p - theirs[n]).norm() / theirs[n].norm()).item() for n, p in model.named_parameters()
               if p.dim() in dims)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_adamw_equals_torch_adamw_on_the_same_hf_model(arch):
    model = HFCausalLM(hf_model(arch))
    reference = copy.deepcopy(model.hf)
    start = copy.deepcopy(model.hf)
    engine = Engine(model, assign_rules(model, "adamw"), lr=1e-2, weight_decay=0.1).attach()
    opt = torch_adamw(reference, lr=1e-2, weight_decay=0.1)
    for i, (x, y) in enumerate(batches(3)):
        loss, reference_loss = model(x, y), hf_loss(reference, x, y)
        if i == 0:  # the adapter's loss (final hidden states through the head) is the model's own
            assert abs(loss.item() - reference_loss.item()) < 1e-6
        engine.backward(loss)
        reference_loss.backward()
        opt.step()
        opt.zero_grad()
    assert max_relative_diff(model, reference, dims=(2,)) < 1e-5  # measured <= 3e-7
    # Vectors: the key part of an attention bias has a (near-)zero gradient (softmax ignores a
    # shift shared by all keys), rounding noise that Adam normalises: measured <= 3.2e-4 (GPT-NeoX).
    # A norm or bias decayed by mistake would be off by lr x wd x 3 steps = 3e-3.
    assert max_relative_diff(model, reference, dims=(1,)) < 1e-3
    assert max_relative_diff(model, start) > 1e-3  # the weights did move


@pytest.mark.parametrize("arch", ARCHS)
def test_galore_governs_exactly_the_linear_layers_inside_the_blocks(arch):
    model = HFCausalLM(hf_model(arch))
    rules = assign_rules(model, "galore", rank=4, gap=1)
    galore = {n for n, r in rules.items() if isinstance(r, GaLore)}
    assert galore == {n for n in rules if re.fullmatch(LOW_RANK[arch], n)}
    assert len(galore) == MATRICES[arch]
    decayed = {n for n, r in rules.items() if n not in galore and r.weight_decay is None}
    assert decayed == DECAYED_FULL_RANK[arch]
    params = dict(model.named_parameters())
    undecayed = {n for n, r in rules.items() if r.weight_decay == 0.0}
    assert all(params[n].dim() < 2 or "emb" in n or n.startswith("transformer.w") for n in undecayed)
    assert len(galore) + len(decayed) + len(undecayed) == len(params)
    if arch in ("llama3", "gpt2"):  # tied head: one parameter, governed once, as an embedding
        assert "lm_head.weight" not in rules and model.hf.get_output_embeddings().weight is model.hf.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_model_exports_a_folder_transformers_loads_with_identical_logits(arch, tmp_path):
    model = HFCausalLM(hf_model(arch))
    engine = Engine(model, assign_rules(model, "galore", rank=4, gap=1), lr=1e-2).attach()
    for x, y in batches(2):
        engine.backward(model(x, y))
    save_hf(base_state_dict(model), model.config, tmp_path)
    save_tokenizer_files(tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = batches(1, seq=16, seed=7)[0][0]
    with torch.no_grad():
        assert (reloaded.eval()(input_ids=x).logits - model.eval()(x)).abs().max().item() == 0.0
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tokenizer.decode(tokenizer.encode("näive ✓", add_special_tokens=False)) == "näive ✓"


@pytest.mark.parametrize("arch", ["llama3", "gpt2"])
def test_chunked_loss_and_activation_checkpointing_give_the_same_loss_and_gradients(arch):
    x, y = batches(1, batch=3, seq=10)[0]
    plain = HFCausalLM(hf_model(arch))
    loss = plain(x, y)
    loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for variant in (dict(loss_chunk_tokens=7), dict(activation_checkpointing=True)):
        model = build_hf_model(None, tiny_config(arch), weights=False, **variant)
        model.load_state_dict(plain.state_dict())
        variant_loss = model(x, y)
        variant_loss.backward()
        assert abs(variant_loss.item() - loss.item()) < 1e-6, variant
        for name, p in model.named_parameters():
            assert torch.allclose(p.grad, grads[name], atol=1e-6), (variant, name)
        model.zero_grad(set_to_none=True)
        # through the engine every hook fires once per backward (it refuses a second call)
        Engine(model, assign_rules(model, "adamw"), lr=1e-3).attach().backward(model(x, y))


def test_lora_adapter_on_qwen2_loads_in_peft_with_matching_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = save_folder(tmp_path / "base", "qwen2")
    model = build_hf_model(base, load_auto_config(base), weights=True)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.{m}.lora_{ab}" for i in range(2) for ab in "AB"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    engine = Engine(model, assign_rules(model, "lora"), lr=1e-2).attach()
    for x, y in batches(3):
        engine.backward(model(x, y))
    save_peft_adapter(model, tmp_path / "adapter", str(base))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True).eval()
    x = batches(1, seq=16, seed=3)[0][0]
    with torch.no_grad():
        ours, base_logits = model.eval()(x), hf_base(input_ids=x).logits
        peft_model = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
        assert (peft_model(input_ids=x).logits - ours).abs().max().item() < 1e-5
        assert (base_logits - ours).abs().max().item() > 1e-4  # the adapter matters


def test_lora_on_gpt2_conv1d_exports_a_fan_in_fan_out_adapter_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = save_folder(tmp_path / "base", "gpt2")
    model = build_hf_model(base, load_auto_config(base), weights=True)
    paths = apply_lora(model, "all-linear", rank=4, alpha=8.0)
    assert len(paths) == 8
    engine = Engine(model, assign_rules(model, "lora"), lr=1e-2).attach()
    for x, y in batches(3):
        engine.backward(model(x, y))
    save_peft_adapter(model, tmp_path / "adapter", str(base))
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True), str(tmp_path / "adapter"))
    x = batches(1, seq=16, seed=3)[0][0]
    with torch.no_grad():
        ours = model.eval()(x)
        assert (peft_model.eval()(input_ids=x).logits - ours).abs().max().item() < 1e-5
        merged = transformers.AutoModelForCausalLM.from_config(model.config)
        merged.load_state_dict(merged_state_dict(model), strict=False)
        assert (merged.eval()(input_ids=x).logits - ours).abs().max().item() < 1e-5


def test_relora_wraps_hf_linears_and_keeps_training():
    model = HFCausalLM(hf_model("gpt2"))
    rules = assign_rules(model, "relora", rank=2, relora=dict(warm_start_steps=1, cycle=1, restart_warmup=0))
    engine = Engine(model, rules, lr=1e-2).attach()
    for x, y in batches(3):
        engine.backward(model(x, y))
    adapters = [n for n in engine.params if n.endswith("lora_A")]
    assert len(adapters) == 8 and engine.params["transformer.wte.weight"].requires_grad


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder = save_folder(tmp_path / "m", "qwen2")
    config = load_auto_config(folder)
    config.intermediate_size = 48
    with pytest.raises(ModelConfigError, match="do not match config.json"):
        build_hf_model(folder, config, weights=True)


def test_pickled_weights_are_refused_with_the_way_out(tmp_path):
    folder = save_folder(tmp_path / "m", "gpt2", weights=False)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelConfigError, match="pytorch_model.bin .*safetensors only"):
        build_hf_model(folder, load_auto_config(folder), weights=True)


def test_a_missing_transformers_names_the_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ModelConfigError, match=r"pip install -e '\.\[hf\]'"):
        load_auto_config("anything")


def test_logit_transforms_after_the_head_are_refused(tmp_path):
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config.save_pretrained(str(tmp_path))
    with pytest.raises(ModelConfigError, match="final_logit_softcapping"):
        load_auto_config(tmp_path)


@pytest.mark.parametrize("method", ["adamw", "galore", "adarankgrad", "lora", "relora"])
def test_every_method_trains_gpt2_in_bf16_with_8bit_states_and_accumulation(method):
    """GPT-2 is the awkward case: Conv1D layers (transposed weights), a tied head, fused q/k/v."""
    from streamtrain.config import TrainConfig
    from streamtrain.recipe import build_engine, prepare_model, sync_structure
    config = TrainConfig(method=method, rank=4, galore_gap=1, states="8bit", dtype="bfloat16", accumulate=2,
                         lr=1e-2, steps=4, relora_warm_start=1, relora_cycle=1, r_min=2)
    model = HFCausalLM(hf_model("gpt2").to(torch.bfloat16))
    prepare_model(model, config)
    engine = build_engine(model, config)
    engine.attach()
    sync_structure(engine)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in batches(6):
        report = engine.backward(model(x, y))
    assert report.step == 2 and not report.skipped and report.loss == report.loss
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("c_attn" in n for n in moved) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    if method in ("lora", "relora"):
        assert sum(n.endswith("lora_A") for n, _ in model.named_parameters()) == 8


def test_int8_weights_on_qwen2_train_and_export_bf16_weights_and_biases_that_transformers_loads(tmp_path):
    from streamtrain.config import TrainConfig
    from streamtrain.models.int8 import int8_layers
    from streamtrain.train import Trainer
    save_folder(tmp_path / "qwen2", "qwen2")
    trainer = Trainer(TrainConfig(model=str(tmp_path / "qwen2"), dtype="int8", method="galore", rank=4, steps=2,
                                  batch_size=2, seq_len=16, max_data_bytes=20_000, eval_batches=1, eval_every=0,
                                  progress=False, save_every=0, out=str(tmp_path / "run")))
    assert len(int8_layers(trainer.model)) == 2 * 7  # every linear inside the blocks, q/k/v with their biases
    trainer.run()
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "run" / "final"), local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = batches(1, seq=16, seed=7)[0][0]
    with torch.no_grad():
        ours, theirs = trainer.model.eval()(x).float(), reloaded.eval()(input_ids=x).logits.float()
    assert (ours - theirs).abs().max().item() < 0.05  # bf16 matmuls of the same bf16 weights, different kernels


def test_int8_weights_refuse_gpt2_conv1d_in_one_line(tmp_path, capsys):
    from streamtrain.run import main
    save_folder(tmp_path / "gpt2", "gpt2")
    code = main(["--model", str(tmp_path / "gpt2"), "--dtype", "int8", "--steps", "1", "--seq-len", "16",
                 "--max-data-bytes", "20000", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: --dtype int8: transformer.h.0.attn.c_attn is a Conv1D"), err
