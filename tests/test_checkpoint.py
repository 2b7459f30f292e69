"""Checkpoints: a run stopped at step s and resumed equals the uninterrupted run bit for bit
(losses, weights, every rule's state, RNG), for every method and state precision, with
accumulation; the files are what the format says; retention, refusals and the ReLoRA structure
hook."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from streamtrain import checkpoint as ckpt
from streamtrain.config import TrainConfig
from streamtrain.engine import Engine
from streamtrain.methods import METHODS, assign_rules
from streamtrain.models.llama import build_model
from streamtrain.models.presets import get_config
from streamtrain.train import RunStopped, Trainer

SMALL_MODEL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
STEPS, STOP = 6, 3


def small_config(out, **overrides) -> TrainConfig:
    values = dict(model="byte-tiny", model_overrides=SMALL_MODEL, steps=STEPS, batch_size=2, seq_len=16,
                  accumulate=2, lr=3e-3, rank=8, galore_gap=2, max_data_bytes=20_000, eval_every=0,
                  eval_batches=1, save_every=0, progress=False, out=str(out))
    return TrainConfig(**{**values, **overrides})


class StopAt:
    """Engine listener: ask the trainer to stop (as SIGINT would) once `step` steps are done."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_end(self, engine, report):
        if engine.step == self.step:
            self.trainer.request_stop()


def snapshot(engine) -> tuple[dict, dict]:
    """(every tensor: weights, state tensors, storages, RNG; the JSON record's states and clock)."""
    tensors, record = ckpt.capture(engine, 0, {}, {})
    tensors.update({f"model/{k}": v.clone() for k, v in engine.model.state_dict().items()})
    scalars = {k: record[k] for k in ("step", "nonfinite_total", "nonfinite_in_row", "states", "rng")}
    return tensors, scalars


def assert_identical(a, b):
    tensors_a, scalars_a = a
    tensors_b, scalars_b = b
    assert scalars_a == scalars_b
    assert tensors_a.keys() == tensors_b.keys()
    different = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
    assert not different, different[:5]


# every method with fp32 states; 8-bit and bf16 states; bf16 weights (stochastic rounding draws
# from the global RNG, so this case also needs the RNG state restored); INT8 weights (codes, scales
# and each layer's rounding stream) with dense and INT4 GaLore bases
CASES = ([(m, "fp32", "float32", "dense") for m in METHODS]
         + [("adamw", "8bit", "float32", "dense"), ("galore", "8bit", "float32", "dense"),
            ("adamw", "bf16", "float32", "dense"), ("galore", "fp32", "bfloat16", "dense"),
            ("adamw", "8bit", "int8", "dense"), ("galore", "8bit", "int8", "int4"),
            ("adarankgrad", "fp32", "int8", "int8")])


@pytest.mark.parametrize("method,states,dtype,projector", CASES)
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, method, states, dtype, projector):
    settings = dict(method=method, states=states, dtype=dtype, projector_precision=projector)
    reference = Trainer(small_config(tmp_path / "reference", **settings))
    reference.run()

    out = tmp_path / "stopped"
    first = Trainer(small_config(out, **settings))
    first.engine.listeners.append(StopAt(first, STOP))
    with pytest.raises(RunStopped, match=f"after step {STOP}"):
        first.run()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [f"step-{STOP:06d}"]

    second = Trainer(small_config(out, resume="auto", **settings))
    assert second.engine.step == STOP and second.position == STOP * 2
    second.run()

    losses = [r["loss"] for r in reference.history]
    assert [r["loss"] for r in first.history + second.history] == losses
    assert [r["grad_norm"] for r in second.history] == [r["grad_norm"] for r in reference.history[STOP:]]
    assert_identical(snapshot(second.engine), snapshot(reference.engine))
    # the run folder tells one story: each step's record once, the final val loss of the reference
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert [r["loss"] for r in records] == losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] == reference.history[-1]["val_loss"]
    assert summary["initial_val_loss"] == reference.initial_val_loss


def test_checkpoint_files_hold_every_state_by_parameter_name(tmp_path):
    trainer = Trainer(small_config(tmp_path, method="galore", states="8bit", steps=3))
    trainer.run()
    folder = tmp_path / "checkpoints" / "step-000003"
    record = json.loads((folder / "checkpoint.json").read_text())
    assert (record["format"], record["version"], record["step"], record["position"]) == (ckpt.FORMAT, 2, 3, 6)
    assert record["lr"] == trainer.engine.lr_at(3)
    assert {r["config"]["name"] for r in record["rules"]} == {"adamw", "galore"}

    q = "model.layers.0.self_attn.q_proj.weight"
    galore_state = trainer.engine.states[q]
    assert record["states"][q]["rank"] == 8 and record["states"][q]["refresh_step"] == 2
    assert record["states"][q]["step"] == galore_state["step"] == 3
    assert record["states"][q]["grad_acc"] is None  # accumulation buffers are empty at a boundary

    states = load_file(str(folder / "state.safetensors"))
    assert torch.equal(states[f"{q}/basis"], galore_state["basis"])
    assert torch.equal(states[f"{q}/exp_avg/data"], galore_state["exp_avg"].data)  # 8 x 64: small, fp32
    embed = "model.embed_tokens.weight"                                            # 256 x 64: 8-bit
    assert record["states"][embed]["exp_avg"] == {"storage": "BlockwiseState8bit", "tensors": ["absmax", "codes", "rng"]}
    assert torch.equal(states[f"{embed}/exp_avg/codes"], trainer.engine.states[embed]["exp_avg"].codes)
    assert torch.equal(states[f"{embed}/exp_avg_sq/absmax"], trainer.engine.states[embed]["exp_avg_sq"].absmax)
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == trainer.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())


def test_keeps_the_newest_checkpoints_and_no_temporaries(tmp_path):
    Trainer(small_config(tmp_path, steps=5, accumulate=1, save_every=1, keep_checkpoints=2)).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    trainer = Trainer(small_config(tmp_path, steps=2, accumulate=1))
    trainer.run()
    first = ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-000002")
    with torch.no_grad():
        trainer.model.lm_head.weight.add_(1.0)
    trainer.save_checkpoint()
    record, weights, _ = ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-000002")
    assert torch.equal(weights["lm_head.weight"], first[1]["lm_head.weight"] + 1.0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]


def test_resume_auto_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    trainer = Trainer(small_config(tmp_path, resume="auto"))
    assert "no checkpoint" in capsys.readouterr().err
    assert trainer.engine.step == 0 and trainer.position == 0


def test_resume_path_may_be_a_step_folder_or_a_run_folder(tmp_path):
    Trainer(small_config(tmp_path, steps=4, accumulate=1, save_every=2)).run()
    assert ckpt.resolve(tmp_path) == tmp_path / "checkpoints" / "step-000004"
    assert ckpt.resolve(tmp_path / "checkpoints" / "step-000002").name == "step-000002"
    resumed = Trainer(small_config(tmp_path / "other", steps=4, accumulate=1,
                                   resume=str(tmp_path / "checkpoints" / "step-000002")))
    assert resumed.engine.step == 2 and resumed.position == 2
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        ckpt.resolve(tmp_path / "nothing-here")


@pytest.mark.parametrize("change,message", [
    (dict(method="adamw"), "--method: the checkpoint's run used 'galore', this run 'adamw'"),
    (dict(rank=4), "--rank: the checkpoint's run used 8, this run 4"),
    (dict(states="8bit"), "--states: the checkpoint's run used 'fp32', this run '8bit'"),
    (dict(model_overrides={**SMALL_MODEL, "hidden_size": 32}), "model hidden_size: checkpoint 64, this run 32"),
    (dict(dtype="bfloat16"), "dtype"),
])
def test_a_checkpoint_of_another_model_or_method_is_refused(tmp_path, change, message):
    Trainer(small_config(tmp_path, method="galore", steps=1, accumulate=1)).run()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(message)) as error:
        Trainer(small_config(tmp_path, **{**dict(method="galore", steps=1, accumulate=1, resume="auto"), **change}))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage,message", [
    ("truncate_state", "truncated or corrupt"),
    ("truncate_model", "truncated or corrupt"),
    ("garble_header", "corrupt"),
    ("garble_json", "corrupt"),
    ("delete_json", "no checkpoint at"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, damage, message):
    Trainer(small_config(tmp_path, steps=1, accumulate=1)).run()
    folder = tmp_path / "checkpoints" / "step-000001"
    if damage.startswith("truncate"):
        file = folder / ("state.safetensors" if damage == "truncate_state" else "model.safetensors")
        file.write_bytes(file.read_bytes()[:-100])
    elif damage == "garble_header":
        file = folder / "model.safetensors"
        data = bytearray(file.read_bytes())
        data[8:40] = b"#" * 32  # same size, broken JSON header
        file.write_bytes(bytes(data))
    elif damage == "garble_json":
        (folder / "checkpoint.json").write_text('{"format": "streamtrain-checkpoint", "vers')
    else:
        (folder / "checkpoint.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=message) as error:
        Trainer(small_config(tmp_path, steps=2, accumulate=1, resume=str(folder)))
    assert "\n" not in str(error.value)


# -- ReLoRA changes the model's structure: the sync hook re-wraps before weights are loaded --------
def relora_engine(seed=0):
    model = build_model(get_config("byte-tiny", **SMALL_MODEL), seed=seed)
    rules = assign_rules(model, "relora", rank=4, relora=dict(warm_start_steps=2, cycle=2, restart_warmup=1))
    return model, Engine(model, rules, accumulate=2).attach()


def test_relora_resumes_after_its_wrap_and_restarts_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(14)]

    def steps(model, engine, micro_batches):
        for tokens in micro_batches:
            engine.backward(model(tokens[:, :-1], tokens[:, 1:]))

    model, engine = relora_engine()
    steps(model, engine, batches[:6])                 # 3 steps: warm start, wrap at 2, one adapter step
    saved = ckpt.save_checkpoint(tmp_path, engine)
    steps(model, engine, batches[6:])                 # restarts (merges) at the end of steps 4 and 6
    model2, engine2 = relora_engine()
    assert not any("lora_A" in n for n in engine2.states)
    ckpt.load_checkpoint(saved, engine2)
    assert any("lora_A" in n for n in engine2.states)   # the hook rebuilt the adapters
    steps(model2, engine2, batches[6:])
    assert_identical(snapshot(engine2), snapshot(engine))
