"""HF Trainer drives the engine: GaLore with gradient accumulation 2 inside transformers.Trainer
gives the weights of our own loop on the same batches; its checkpoints resume the engine
exactly; max_grad_norm is said to do nothing; reentrant checkpointing and fp16 are refused."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from streamtrain.engine import Engine  # noqa: E402
from streamtrain.integrations.transformers import streamtrain_optimizer  # noqa: E402
from streamtrain.methods import assign_rules  # noqa: E402

SEQ, BATCH, GA = 16, 2, 2
RULES = dict(rank=4, gap=2)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).float()


def samples(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 128, (n, SEQ), generator=gen)]


class InOrderTrainer(transformers.Trainer):
    """Batches in dataset order, so our own loop can see the very same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def arguments(out, **overrides):
    values = dict(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
                  learning_rate=3e-3, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                  max_steps=3, save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return transformers.TrainingArguments(**{**values, **overrides})


def hf_trainer(model, args, data):
    optimizer = streamtrain_optimizer(model, args, "galore", **RULES)
    return InOrderTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)), optimizer


def own_loop(model, data, steps):
    engine = Engine(model, assign_rules(model, "galore", **RULES), lr=3e-3, accumulate=GA).attach()
    batches = [data[i:i + BATCH] for i in range(0, steps * GA * BATCH, BATCH)]
    for batch in batches:
        ids = torch.stack([s["input_ids"] for s in batch])
        engine.backward(model(input_ids=ids, labels=ids).loss)
    return engine


def max_relative_difference(a, b) -> float:
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def test_hf_trainer_with_accumulation_equals_our_own_loop(tmp_path):
    data = samples(12)
    ours, theirs = tiny_llama(), tiny_llama()
    trainer, optimizer = hf_trainer(theirs, arguments(tmp_path), data)
    trainer.train()
    engine = own_loop(ours, data, steps=3)
    assert optimizer.engine.step == engine.step == 3
    assert max_relative_difference(theirs, tiny_llama()) > 1e-3   # it trained
    # HF normalises the loss by the tokens of both micro-batches, we average then halve: at most
    # rounding (measured: bit-identical)
    assert max_relative_difference(theirs, ours) < 1e-6
    galore = [n for n, rule in optimizer.engine.rules.items() if rule.name == "galore"]
    assert len(galore) == 14 and all(optimizer.engine.states[n]["refreshes"] == 2 for n in galore)


def test_hf_checkpoints_resume_the_engine_exactly(tmp_path):
    data = samples(16)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    whole = tiny_llama()
    hf_trainer(whole, arguments(tmp_path / "whole", **args), data)[0].train()
    first = tiny_llama()
    hf_trainer(first, arguments(tmp_path / "parts", **args), data)[0].train()
    resumed = tiny_llama(seed=1)  # other weights: the checkpoint must bring them back
    trainer, optimizer = hf_trainer(resumed, arguments(tmp_path / "parts", **args), data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    assert optimizer.engine.step == 4
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), whole.parameters()))


def test_a_shorter_last_accumulation_of_an_epoch_still_updates(tmp_path):
    data = samples(6)  # 3 micro-batches per epoch: one step of 2, then one of 1
    model = tiny_llama()
    before = copy.deepcopy(model)
    trainer, optimizer = hf_trainer(model, arguments(tmp_path, max_steps=-1, num_train_epochs=1), data)
    trainer.train()
    assert optimizer.engine.step == 2 and optimizer.engine.micro_index == 0
    assert (model.lm_head.weight - before.lm_head.weight).norm() > 0


def test_max_grad_norm_warns_and_reentrant_checkpointing_and_fp16_are_refused(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 does nothing with per-layer updates"):
        streamtrain_optimizer(tiny_llama(), arguments(tmp_path, max_grad_norm=1.0), "galore", **RULES)
    with pytest.raises(ValueError, match="use_reentrant"):
        streamtrain_optimizer(tiny_llama(), arguments(tmp_path, activation_checkpointing=True), "galore", **RULES)
    args = arguments(tmp_path)
    args.fp16 = True  # (TrainingArguments itself refuses fp16 on a CPU)
    with pytest.raises(ValueError, match="fp16"):
        streamtrain_optimizer(tiny_llama(), args, "galore", **RULES)
