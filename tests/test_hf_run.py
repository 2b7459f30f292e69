"""`--model PATH` end to end: fine-tuning a local HF folder, pretraining from a config, exports
transformers and peft load, exact resume and its refusals, and the memory planner on fake tensors."""
import json

import pytest
import torch

from tiny_hf import batches, hf_model, save_folder, tiny_config
from streamtrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from streamtrain.config import TrainConfig
from streamtrain.engine import Engine
from streamtrain.memory.planner import plan_config, simulate
from streamtrain.methods import assign_rules
from streamtrain.models.hf_causal import HFCausalLM
from streamtrain.models.hf_config import architecture_identity
from streamtrain.run import main
from streamtrain.train import Trainer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def run_config(tmp_path, model, **values):
    defaults = dict(model=str(model), steps=2, batch_size=2, seq_len=16, rank=4, galore_gap=1, eval_every=0,
                    eval_batches=1, max_data_bytes=20_000, out=str(tmp_path / "run"), progress=False, device="cpu")
    return TrainConfig(**{**defaults, **values})


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits if hasattr(model, "generation_config") else model.eval()(ids)


def test_lora_fine_tunes_a_local_folder_and_exports_what_transformers_and_peft_load(tmp_path, capsys):
    base = save_folder(tmp_path / "qwen2", "qwen2")
    trainer = Trainer(run_config(tmp_path, base, method="lora"))
    summary = trainer.run()
    out = capsys.readouterr().out
    assert "weights from" in out and "adamw on 28 tensors, 28 matrices (100.0% of trainable" in out
    # rank 4 x (in + out) per wrapped layer: q, o 32+32; k, v 32+16; gate, up, down 32+64; 2 layers
    assert summary["rules"] == [{"rule": "adamw", "tensors": 28, "matrices": 28, "parameters": 4096, "share": 1.0}]
    final = tmp_path / "run" / "final"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    ids = batches(1, seq=16, seed=5)[0][0]
    ours = logits(trainer.model, ids)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True)
    assert (logits(merged, ids) - ours).abs().max().item() < 1e-5
    adapter = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True), str(tmp_path / "run" / "adapter"))
    assert (logits(adapter, ids) - ours).abs().max().item() < 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.decode(tokenizer.encode("naïve")) == "naïve"


def test_pretraining_from_a_config_only_folder_exports_the_byte_tokenizer(tmp_path, capsys):
    folder = save_folder(tmp_path / "gpt2", "gpt2", weights=False, tokenizer=False)
    trainer = Trainer(run_config(tmp_path, folder, method="galore", activation_checkpointing=True, loss_chunk_tokens=8))
    trainer.run()
    captured = capsys.readouterr()
    assert "random init (pretraining)" in captured.out and "galore on 8 tensors, 8 matrices" in captured.out
    assert "byte tokenizer" in captured.err
    final = tmp_path / "run" / "final"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True)
    ids = batches(1, seq=16, seed=5)[0][0]
    assert (logits(reloaded, ids) - logits(trainer.model, ids)).abs().max().item() == 0.0
    assert reloaded.get_input_embeddings().weight is reloaded.get_output_embeddings().weight
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    assert tokenizer.encode("é", add_special_tokens=False) == list("é".encode())
    # the folder's architecture changed since: resuming the run is refused, naming what changed
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    with pytest.raises(CheckpointError, match="n_inner: checkpoint None, this run 64"):
        Trainer(run_config(tmp_path, folder, method="galore", activation_checkpointing=True, loss_chunk_tokens=8,
                           resume="auto", steps=3, reschedule=True))


def test_resume_of_an_hf_model_equals_the_uninterrupted_run(tmp_path):
    def engine_for(model):
        return Engine(model, assign_rules(model, "galore", rank=4, gap=2), lr=1e-2, accumulate=2).attach()
    data = batches(8)
    straight = HFCausalLM(hf_model("gpt2"))
    engine = engine_for(straight)
    identity = {"model": architecture_identity(straight.config)}
    for i, (x, y) in enumerate(data):
        engine.backward(straight(x, y))
        if i == 3:
            path = save_checkpoint(tmp_path, engine, position=4, identity=identity)
    resumed = HFCausalLM(hf_model("gpt2", seed=1))
    engine = engine_for(resumed)
    load_checkpoint(path, engine, identity=identity)
    for x, y in data[4:]:
        engine.backward(resumed(x, y))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError):
        load_checkpoint(path, engine_for(HFCausalLM(hf_model("gpt2"))),
                        identity={"model": architecture_identity(tiny_config("gpt2", layers=3))})


def test_dry_run_of_a_tiny_hf_folder_with_a_budget_plans_and_trains_nothing(tmp_path, capsys):
    folder = save_folder(tmp_path / "llama3", "llama3")
    assert main(["--model", str(folder), "--method", "galore", "--rank", "4", "--batch-size", "2", "--seq-len", "32",
                 "--dry-run", "--budget", "50MB", "--device", "cpu", "--out", str(tmp_path / "plan")]) == 0
    assert "dry run: fits" in capsys.readouterr().out
    plan = json.loads((tmp_path / "plan" / "memory.json").read_text())["plan"]
    phases = {r["phase"] for r in plan["timeline"]}
    assert {"forward block 1", "forward loss", "hook model.layers.0.self_attn.q_proj.weight"} <= phases
    assert plan["search"]["best"]["max_batch_size"] >= 2 and not (tmp_path / "plan" / "final").exists()


def test_the_plan_of_an_hf_model_matches_its_tracked_real_run_and_extrapolates_exactly(tmp_path):
    shallow = save_folder(tmp_path / "gpt2-2", "gpt2", weights=False, tokenizer=False)
    config = TrainConfig(model=str(shallow), rank=4, batch_size=2, seq_len=16, accumulate=2, method="galore", device="cpu")
    planned = simulate(config, steps=1)["peak"]["total"]
    measured = simulate(config, steps=1, fake=False)["peak"]["total"]  # the same step on real CPU tensors
    assert abs(planned / measured - 1) < 0.02, (planned, measured)
    deep = save_folder(tmp_path / "gpt2-5", "gpt2", weights=False, tokenizer=False, layers=5)
    config = TrainConfig(model=str(deep), rank=4, batch_size=2, seq_len=16, method="galore", device="cpu",
                         activation_checkpointing=True)
    extrapolated, full = plan_config(config), plan_config(config, full_depth=True)
    assert "extrapolated" in extrapolated["simulated"]["method"]
    assert abs(extrapolated["tensor_peak"] - full["tensor_peak"]) <= 8  # float rounding of the line fit
    assert extrapolated["peak"]["phase"].replace("top", "4") == full["peak"]["phase"]


def test_a_7b_shaped_hf_llama_config_plans_on_fake_tensors(tmp_path):
    transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, max_position_embeddings=4096).save_pretrained(str(tmp_path))
    config = TrainConfig(model=str(tmp_path), method="galore", rank=1024, dtype="bfloat16", states="8bit",
                         batch_size=1, seq_len=2048, activation_checkpointing=True, loss_chunk_tokens=1024,
                         device="cuda", budget="24GB")
    plan = plan_config(config, budget=24 * 10**9)
    weights = next(c["bytes"] for c in plan["categories"] if c["label"] == "weights")
    assert weights == 2 * 6_738_415_616 + 512  # every parameter in bf16, plus two fp32 rotary tables
    assert plan["fits"] and 20e9 < plan["total"] < 23e9  # streamtrain's own llama-7b plans 21.60 GB


def test_the_tokenizer_follows_the_model_folder_and_must_fit_its_vocabulary(tmp_path):
    from streamtrain.hf import save_tokenizer_files
    from streamtrain.models.hf_config import load_auto_config
    from streamtrain.recipe import build_tokenizer
    folder = save_folder(tmp_path / "qwen2", "qwen2")
    tokenizer = build_tokenizer(run_config(tmp_path, folder), load_auto_config(folder))
    assert tokenizer.vocab_size == 257 and tokenizer.eos_id == 256  # the folder's tokenizer.json
    small = load_auto_config(folder, {"vocab_size": 200})
    with pytest.raises(ValueError, match="257 tokens but .*vocabulary only 200"):
        build_tokenizer(run_config(tmp_path, folder), small)
    (folder / "tokenizer.json").unlink()  # weights without a tokenizer: the run cannot guess it
    with pytest.raises(ValueError, match="has weights but no tokenizer.json; pass .* --tokenizer"):
        build_tokenizer(run_config(tmp_path, folder), load_auto_config(folder))
    # a --tokenizer file is exported as the final folder's tokenizer.json
    save_folder(tmp_path / "donor", "gpt2", weights=False)
    (tmp_path / "final").mkdir()
    save_tokenizer_files(tmp_path / "final", str(tmp_path / "donor" / "tokenizer.json"), str(folder))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "final"), local_files_only=True)
    assert loaded.decode(loaded.encode("ok ✓", add_special_tokens=False)) == "ok ✓"
