"""The training recipe: build everything from a TrainConfig, then one readable loop.

`Trainer(config).run()` is what `python -m streamtrain.run` calls and what a library user calls.
"""
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .config import TrainConfig
from .data import TokenDataset, load_tokens, make_tokenizer
from .engine import Engine
from .hf import load_hf_weights, save_hf
from .methods import assign_rules
from .models.llama import build_model, perplexity
from .models.presets import get_config
from .optim.schedule import CosineSchedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def build_rules(model, config: TrainConfig) -> dict:
    return assign_rules(model, config.method, rank=config.rank, gap=config.galore_gap,
                        scale=config.galore_scale, states=config.states)


def build_engine(model, config: TrainConfig, **engine_options) -> Engine:
    schedule = CosineSchedule(config.lr, config.steps, config.warmup_steps, config.min_lr_ratio)
    return Engine(model, build_rules(model, config), schedule=schedule, accumulate=config.accumulate,
                  weight_decay=config.weight_decay, clip_per_tensor=config.clip_per_tensor,
                  norm_growth=config.norm_growth, stochastic_rounding=config.stochastic_rounding,
                  **engine_options)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config.validate()
        self.device = resolve_device(config.device)
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.model_config = get_config(config.model, **config.model_overrides)
        if config.seq_len > self.model_config.max_position_embeddings:
            raise ValueError(f"--seq-len {config.seq_len} exceeds {config.model}'s maximum "
                             f"{self.model_config.max_position_embeddings}; lower --seq-len")
        self.tokenizer = make_tokenizer(config.tokenizer)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but {config.model} "
                             f"only {self.model_config.vocab_size}; pick a preset with a larger vocab")
        tokens = load_tokens(config.data, self.tokenizer, config.max_data_bytes or None, config.text_field)
        self.dataset = TokenDataset(tokens, config.seq_len, seed=config.seed)
        self.model = build_model(self.model_config, self.device, DTYPES[config.dtype], seed=config.seed,
                                 activation_checkpointing=config.activation_checkpointing,
                                 loss_chunk_tokens=config.loss_chunk_tokens)
        if config.init_from:
            load_hf_weights(self.model, config.init_from)
        self.engine = build_engine(self.model, config).attach()
        self.position = 0        # training micro-batches consumed (the data position)
        self.history = []

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        tokens_per_step = c.batch_size * c.seq_len * c.accumulate
        bar = tqdm(total=c.steps, initial=self.engine.step, disable=not c.progress, desc="train", unit="step")
        mode = "a" if self.engine.step else "w"  # a resumed run appends to its own history
        with open(self.out / "metrics.jsonl", mode) as metrics:
            while self.engine.step < c.steps:
                started = time.perf_counter()
                report = None
                while report is None:  # the k micro-batches of one logical step
                    inputs, targets = self.dataset.train_batch(self.position, c.batch_size)
                    loss = self.model(inputs.to(self.device), targets.to(self.device))
                    report = self.engine.backward(loss)
                    self.position += 1
                record = {"step": report.step, "loss": report.loss, "lr": report.lr,
                          "grad_norm": report.grad_norm, "skipped": report.skipped,
                          "tokens": (report.step + 1) * tokens_per_step,
                          "tokens_per_s": tokens_per_step / (time.perf_counter() - started)}
                if self._evaluation_due(report.step):
                    record["val_loss"] = self.evaluate()
                metrics.write(json.dumps(record) + "\n")
                self.history.append(record)
                bar.set_postfix(loss=f"{report.loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                bar.update(1)
        bar.close()
        return self.finish()

    def _evaluation_due(self, step: int) -> bool:
        every, last = self.config.eval_every, step == self.config.steps - 1
        return last or (every > 0 and (step + 1) % every == 0)

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.train(False)
        losses = [self.model(x.to(self.device), y.to(self.device)).float().item()
                  for x, y in self.dataset.val_batches(self.config.batch_size, self.config.eval_batches)]
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def finish(self) -> dict:
        self.engine.detach()
        final = self.out / "final"
        save_hf(dict(self.model.named_parameters()), self.model_config, final)
        val_history = [r["val_loss"] for r in self.history if "val_loss" in r]
        summary = {"steps": self.engine.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                   "val_loss": val_history[-1] if val_history else None,
                   "first_val_loss": val_history[0] if val_history else None,
                   "val_perplexity": perplexity(val_history[-1]) if val_history else None,
                   "skipped_steps": self.engine.nonfinite_total, "weights": str(final)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def train(config: TrainConfig) -> dict:
    """Library entry point: train according to `config`, return the summary."""
    return Trainer(config).run()
