"""The training recipe: build everything from a TrainConfig, then one readable loop.

`Trainer(config).run()` is what `python -m streamtrain.run` calls and what a library user calls.
"""
import contextlib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .atomic import atomic_folder, tensor_bytes
from .distributed.context import device_of, from_environment
from .distributed.reducer import BucketReducer
from .distributed.replicas import check_replicas
from .distributed import fsdp
from .distributed.sharded_checkpoint import locate_sharded, restore_sharded, save_sharded
from .checkpoint import NonFiniteCheckpoint, latest_checkpoint, locate_intact, restore, save_checkpoint, step_of
from .config import TrainConfig
from .data import TokenDataset, data_identity, data_summary, load_corpus, tokenizer_identity
from .engine import NonFiniteError, unique
from .hf import copy_generation_config, is_model_folder, save_hf, save_tokenizer_files, unique_tensors
from .logbook import Logbook, plan_lines
from .optim.backend import describe_backend
from .memory.planner import check_offload, plan_before_training
from .memory.profiler import BudgetExceeded, RunProfiler
from .memory.report import build_report, dry_run, write_report
from .memory.units import parse_bytes
from .models.hf_config import architecture_identity
from .models.int8 import dequantized_state_dict, save_int8_export
from .models.llama import perplexity
from .models.lora import base_state_dict, has_lora, merged_state_dict, save_peft_adapter
from .recipe import (build_engine, build_run_model, build_tokenizer, describe_model, model_config_of, prepare_model,
                     resolve_device, rules_line, sync_structure, tokenizer_path)
from .resume import adopt_derived, check_same_run, resolved, schedule_changes
from .runfolder import RunLock, check_run_folder, clear_run, default_out

RUN_CONFIG = "run_config.json"  # the run's resolved settings (never config.json: an HF folder's is the model's)

class Trainer:
    def __init__(self, config: TrainConfig):
        config = config.validate()
        # a sharded plan simulates its ranks in a fake process group: rank 0 plans before the real one exists
        early_plan = plan_before_training(config) if sharded_launch(config) and os.environ["RANK"] == "0" else None
        # under torchrun: this rank's process group and GPU; else the single-process context
        self.dist = from_environment(resolve_device(config.device).type)
        self.sharded = self.dist.distributed and config.parallel == "fsdp"  # FSDP2 (distributed/fsdp.py)
        self.out = Path(config.out) if config.out else default_out(config.resume)
        self.lock = RunLock(self.out)
        if self.dist.is_main:
            self.lock.check_free()  # refuse now, before any work, if another process trains here
        self.resume_from = self._locate_resume(config)
        check_run_folder(self.out, resuming=self.resume_from is not None, overwrite=config.overwrite)
        if self.resume_from is not None:  # settings derived from --steps stay as the checkpoint's run had them
            config = adopt_derived(config, self.resume_from[1][0]["metadata"]["config"]).validate()
        self.config = config
        self.device = device_of(self.dist, resolve_device(config.device).type)
        check_offload(config, self.device.type)
        torch.manual_seed(config.seed)
        self.model_config = model_config_of(config)  # a preset, or a model folder's config.json
        self.tokenizer = build_tokenizer(config, self.model_config)  # --tokenizer, the folder's, or bytes
        # with --budget: refuses before anything real is allocated
        self.plan = fsdp.shared_from_rank0(early_plan) if self.sharded else plan_before_training(config)
        corpus = load_corpus(config.data, self.tokenizer, config.max_data_bytes or None, config.text_field,
                             token_dtype=config.token_dtype, vocab_size=self.model_config.vocab_size)
        self.dataset = TokenDataset(corpus.tokens, config.seq_len, seed=config.seed)
        self.data_summary = data_summary(corpus, self.dataset, config.steps, config.batch_size * self.dist.world_size,
                                         config.accumulate)
        self.data_identity = {"data": data_identity(config.data, self.tokenizer, config.max_data_bytes or None,
                                                    config.text_field, config.token_dtype),
                              "tokenizer": tokenizer_identity(self.tokenizer)}
        self.schedule_history = self._schedule_history()
        # sharded: built in host RAM, then fully_shard moves one block at a time to the device and keeps the shard
        home = torch.device("cpu") if self.sharded else self.device
        self.model = build_run_model(config, home, self.model_config, weights=True)
        self.say(describe_model(config, self.model))
        prepare_model(self.model, config)
        self.engine = self._build_engine()
        sync_structure(self.engine)
        self.rule_summary, line = rules_line(self.engine)  # which rule governs what share of the model
        self.say(line)
        self.position = 0        # training micro-batches consumed (the data position)
        self.history = []
        self.stop_signal = None  # set by SIGINT/SIGTERM (or request_stop): checkpoint, then stop
        self.last_checkpoint = None
        if self.resume_from is not None:
            self.resume()
        self.profiler = RunProfiler(self.model, self.engine, self.device,
                                    parse_bytes(config.budget) if config.budget else None)
        self._barrier()  # every rank has checked the folder before rank 0 writes into it

    # -- data parallelism -----------------------------------------------------------------------
    def _build_engine(self):
        """The engine, attached: on this rank's shards under --parallel fsdp, else on the whole model
        (with the hooks' all-reduce under torchrun)."""
        if self.sharded:
            return fsdp.build_sharded_engine(self.model, self.config, self.schedule_history, self.device, self.dist)
        return build_engine(self.model, self.config, self.schedule_history, reducer=self._reducer()).attach()

    def _reducer(self):
        """The engine's all-reduce inside its hooks under torchrun (None: one process)."""
        if not self.dist.distributed:
            return None
        return BucketReducer(self.dist.group, self.dist.world_size)

    def _barrier(self) -> None:
        if self.dist.distributed:
            torch.distributed.barrier(group=self.dist.group)

    def _everyone(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop signal may reach the ranks at
        different steps: they must stop at the same one)."""
        if not self.dist.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.dist.group)
        return bool(value.item())

    def say(self, *lines: str) -> None:
        """Print on the rank that speaks for the run (rank 0); stdout: stderr is for errors."""
        if self.dist.is_main:
            print("\n".join(lines), flush=True)

    def _locate_resume(self, config: TrainConfig):
        """(folder, verified contents) of the checkpoint to continue, or None for a fresh start."""
        if not config.resume:
            return None
        if config.resume == "auto" and latest_checkpoint(self.out) is None:
            print(f"--resume auto: no checkpoint in {self.out}; starting fresh", file=sys.stderr)
            return None
        # a run folder resumes from its newest intact checkpoint, a step folder from itself or not at all
        where = self.out if config.resume == "auto" else config.resume
        return locate_sharded(where) if self.sharded else locate_intact(where)

    def _schedule_history(self) -> dict:
        """The run's schedule: its first --steps and every [step, --steps] change made on a resume
        (--reschedule); a changed --steps without it is refused."""
        if self.resume_from is None:
            return {"steps": self.config.steps, "changes": []}
        record = self.resume_from[1][0]
        saved = record["metadata"]
        check_same_run(self.config, saved["config"], self.data_identity, saved.get("run_identity", {}),
                       self.dist.world_size, saved.get("world_size", 1))
        history = saved.get("schedule") or {"steps": saved["config"]["steps"], "changes": []}
        changes = schedule_changes(self.config, saved["config"], history["changes"], record["step"],
                                   self.config.reschedule)
        return {"steps": history["steps"], "changes": changes}

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.dist.is_main:
            self.lock.acquire()
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict:
        c = self.config
        if self.dist.is_main:
            self._prepare_folder()
        self._barrier()
        # every rank runs the loop; rank 0 alone logs (the others' metrics go nowhere)
        logbook = Logbook(c, self.out, self.engine.step, self.profiler) if self.dist.is_main else SilentLogbook()
        metrics_path = self.out / "metrics.jsonl" if self.dist.is_main else Path(os.devnull)
        mode = "a" if self.engine.step else "w"  # a resumed run appends to its own history
        try:
            if self.engine.step == 0:
                self.initial_val_loss = self.evaluate()  # the baseline every later val loss is read against
            with open(metrics_path, mode) as metrics, stop_signals_caught(self), self.profiler.tracking():
                self._train_steps(metrics, logbook)
        except BudgetExceeded as e:  # at a step boundary: weights and states are whole, save them
            checkpoint = self.save_checkpoint()
            report = self.write_memory_report()
            raise RunStopped(f"{e}; memory report in {report}; checkpoint saved to {checkpoint}", exit_code=1) from None
        except NonFiniteError as e:  # skipped steps leave weights whole unless they went non-finite themselves
            raise RunStopped(f"{e}; {self.save_if_finite()}", exit_code=3) from None
        except NonFiniteCheckpoint as e:  # a periodic save found non-finite weights: nothing to keep from here
            raise RunStopped(f"the model went non-finite by step {self.engine.step} ({e}); the last finite "
                             f"checkpoint is {latest_checkpoint(self.out) or 'none'}; lower --lr or enable "
                             "--clip-per-tensor / --norm-growth", exit_code=3) from None
        except torch.OutOfMemoryError as e:  # mid-step: weights may be half updated, keep the last checkpoint
            raise self.out_of_memory(e) from None
        finally:
            logbook.close()
        return self.finish()

    def _prepare_folder(self) -> None:
        """Rank 0: the folder, what the run is and will do, the run config; the metrics a resumed
        run continues are trimmed to its checkpoint."""
        c = self.config
        if c.overwrite and self.resume_from is None:
            removed = clear_run(self.out)
            if removed:
                print(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {self.out}", file=sys.stderr)
        kind = "sharded (FSDP2)" if self.sharded else "data-parallel"
        ranks = f" ({self.dist.world_size} {kind} ranks)" if self.dist.distributed else ""
        self.say(f"run folder: {self.out}{ranks}",
                 *plan_lines(self.plan, c), f"updates: {describe_backend()}", *self.data_summary)
        if self.resume_from is not None:
            trim_metrics(self.out / "metrics.jsonl", self.engine.step)
        # the run's own config, under a name no HF tool reads (an HF folder's config.json is the model's)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / RUN_CONFIG).write_text(json.dumps(resolved(c).to_dict(), indent=2))

    def _train_steps(self, metrics, logbook) -> None:
        c = self.config
        tokens_per_step = c.batch_size * c.seq_len * c.accumulate * self.dist.world_size
        while self.engine.step < c.steps:
            started = time.perf_counter()
            report = None
            while report is None:  # the k micro-batches of one logical step (this rank's rows of each)
                inputs, targets = self.dataset.train_batch(self.position, c.batch_size, self.dist.rank,
                                                           self.dist.world_size)
                loss = self.model(inputs.to(self.device), targets.to(self.device))
                report = self.engine.backward(loss)
                self.position += 1
            record = {"step": report.step, "loss": report.loss, "lr": report.lr,
                      "grad_norm": report.grad_norm, "skipped": report.skipped,
                      "nonfinite_total": report.nonfinite_total,
                      **({"partial": list(report.partial)} if report.partial else {}),
                      "tokens": (report.step + 1) * tokens_per_step,
                      "tokens_per_s": tokens_per_step / (time.perf_counter() - started)}
            if self._evaluation_due(report.step):
                record["val_loss"] = self.evaluate()
            record.update(self._rank_record())
            record.update(self._traffic_record())
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()  # a killed run keeps the metrics of the steps it finished
            self.history.append(record)
            self.profiler.after_step()
            logbook.step(record)
            self._at_step_boundary()

    def _at_step_boundary(self) -> None:
        """Periodic checkpoints, and the stop a signal asked for (after its checkpoint)."""
        every, check = self.config.save_every, self.config.check_replicas
        if self.dist.distributed and check and self.engine.step % check == 0:
            check_replicas(self.model, self.dist.group, self.engine.step)
        periodic = every and self.engine.step % every == 0
        stopping = self._everyone(self.stop_signal is not None)
        if stopping and self.stop_signal is None:  # another rank got the signal: stop at the same step
            self.stop_signal = signal.SIGTERM
        # no periodic save during a streak of skipped steps: it would rotate out the last good checkpoint
        if stopping or (periodic and self.engine.nonfinite_in_row == 0):
            self.save_checkpoint()
        if stopping and self.engine.step < self.config.steps:  # else finish normally
            name = signal.Signals(self.stop_signal).name
            raise RunStopped(f"stopped by {name} after step {self.engine.step}; checkpoint saved to "
                             f"{self.last_checkpoint}; continue with --resume auto", exit_code=128 + self.stop_signal)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop at the next step boundary, after saving a checkpoint (what SIGINT/SIGTERM do)."""
        self.stop_signal = signum

    def _rank_record(self) -> dict:
        """Adaptive-rank rules: the mean rank every step, every matrix's rank when any changed."""
        ranks = {}
        for rule in unique(self.engine.rules.values()):
            ranks.update(rule.ranks(self.engine))
        if not ranks:
            return {}
        record = {"mean_rank": sum(ranks.values()) / len(ranks)}
        if ranks != getattr(self, "_logged_ranks", None):
            record["ranks"] = self._logged_ranks = ranks
        return record

    def _traffic_record(self) -> dict:
        """Data parallelism: the bytes this step all-reduced, and what all-reducing every full
        gradient would have moved (GaLore sends r x n projections)."""
        if self.engine.reducer is None:
            return {}
        sent, full = self.engine.reducer.reset_counters()
        return {"comm_bytes": sent, "comm_bytes_full_gradients": full}

    def _evaluation_due(self, step: int) -> bool:
        every, last = self.config.eval_every, step == self.config.steps - 1
        return last or (every > 0 and (step + 1) % every == 0)

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean loss over --eval-batches global validation batches (under data parallelism
        each rank takes its rows of each, and the means are averaged: every rank gets the number
        one process with the global batch gets)."""
        was_training = self.model.training
        self.model.train(False)
        rank, world, size = self.dist.rank, self.dist.world_size, self.config.batch_size
        losses = [self.model(x[rank * size:(rank + 1) * size].to(self.device),
                             y[rank * size:(rank + 1) * size].to(self.device)).float()
                  for x, y in self.dataset.val_batches(size * world, self.config.eval_batches)]
        self.model.train(was_training)
        mean = torch.stack(losses).mean()
        if self.engine.reducer is not None:
            mean = self.engine.reducer.mean(mean, counted=False)
        elif self.sharded:
            mean = fsdp.mean_over_ranks(mean, self.dist.group)
        return mean.item()

    # -- checkpoints and faults -----------------------------------------------------------------
    def identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed (the rules are checked too)."""
        return {"model": architecture_identity(self.model_config), "dtype": self.config.dtype}

    def save_checkpoint(self) -> Path:
        initial = getattr(self, "initial_val_loss", None)
        if initial is not None and not math.isfinite(initial):  # a checkpoint holds no NaN (its schema refuses them)
            initial = None
        metadata = {"config": resolved(self.config).to_dict(), "initial_val_loss": initial,
                    "run_identity": self.data_identity, "schedule": self.schedule_history,
                    "world_size": self.dist.world_size}
        folder = self.out / "checkpoints" / f"step-{self.engine.step:06d}"
        if self.sharded:  # every rank writes its shards
            folder = save_sharded(self.out, self.engine, position=self.position, identity=self.identity(),
                                  metadata=metadata, keep=self.config.keep_checkpoints)
        elif self.dist.is_main:  # replicas are identical: one of them writes
            folder = save_checkpoint(self.out, self.engine, position=self.position, identity=self.identity(),
                                     metadata=metadata, keep=self.config.keep_checkpoints)
        self._barrier()
        self.last_checkpoint = folder
        return folder

    def save_if_finite(self) -> str:
        """Save a checkpoint unless the weights or states went non-finite; says what was kept."""
        try:
            return f"checkpoint saved to {self.save_checkpoint()}"
        except NonFiniteCheckpoint as e:
            return (f"not saved ({e}); the last finite checkpoint is {latest_checkpoint(self.out) or 'none'}; "
                    "lower --lr or enable --clip-per-tensor / --norm-growth")

    def resume(self) -> None:
        """Continue from the checkpoint _locate_resume found (verified, of the same run)."""
        path, loaded = self.resume_from
        if self.sharded:
            record = restore_sharded(path, self.engine, loaded[0], identity=self.identity(),
                                     max_position=self.max_position())
        else:
            record = restore(path, self.engine, *loaded, identity=self.identity(), max_position=self.max_position())
        self.position = record["position"]
        if record["metadata"].get("initial_val_loss") is not None:
            self.initial_val_loss = record["metadata"]["initial_val_loss"]
        self.last_checkpoint = path

    def max_position(self) -> int:
        """The largest data position a run of --steps can reach (a checkpoint beyond it is not ours)."""
        return self.config.steps * self.config.accumulate * max(1, len(self.dataset.train_windows))

    def out_of_memory(self, error: Exception) -> "RunStopped":
        """Write what is known about memory and say where the last (intact) checkpoint is; the
        step in flight is not saved, as some of its weights may already have moved."""
        self.out.mkdir(parents=True, exist_ok=True)
        report = self.out / "memory-report.txt"
        lines = [f"out of memory in step {self.engine.step}, micro-batch {self.engine.micro_index}", str(error)]
        if self.device.type == "cuda":
            lines.append(torch.cuda.memory_summary(self.device))
        report.write_text("\n".join(lines) + "\n")
        self.write_memory_report()
        last = latest_checkpoint(self.out)
        first_line = (str(error).splitlines() or [""])[0]
        return RunStopped(f"out of memory in step {self.engine.step} ({first_line}); memory report in {report}; "
                          f"last checkpoint: {last or 'none'} (intact); lower --batch-size or enable "
                          "--activation-checkpointing", exit_code=1)

    def write_memory_report(self) -> Path:
        """memory.json/.md/.png in --out: the plan next to what this run measured."""
        return write_report(self.out, build_report("run", self.config, self.plan, self.profiler.measured()))[1]

    def finish(self) -> dict:
        val_history = [r["val_loss"] for r in self.history if "val_loss" in r]
        if val_history and not math.isfinite(val_history[-1]):
            raise RunStopped(f"the final validation loss is {val_history[-1]}: the model is not usable and no final "
                             f"weights were written; {self.save_if_finite()}", exit_code=3)
        if self.last_checkpoint is None or step_of(self.last_checkpoint) != self.engine.step:
            try:
                self.save_checkpoint()
            except NonFiniteCheckpoint as e:
                raise RunStopped(f"the model went non-finite ({e}); no final weights were written; the last "
                                 f"finite checkpoint is {latest_checkpoint(self.out) or 'none'}", exit_code=3) from None
        self.engine.detach()
        final = self.out / "final"
        gathered = fsdp.full_weights(self.model) if self.sharded else None  # every rank sends its shards
        if not self.dist.is_main:  # rank 0 exports (and speaks) for everyone
            self._barrier()
            return {"steps": self.engine.step, "weights": str(final), "rank": self.dist.rank, "quiet": True}
        # an HF folder (weights with LoRA adapters merged in, config.json, tokenizer) that transformers
        # loads, replacing an older final/ only once written whole
        weights = merged_state_dict(self.model) if has_lora(self.model) else gathered or base_state_dict(self.model)
        weights = dequantized_state_dict(self.model, weights)  # INT8 layers: bf16 weights under HF names
        fix = "free some space, then finish with --resume auto (the last step's checkpoint is saved)"
        folder = self.config.model if is_model_folder(self.config.model) else None
        with atomic_folder(final, tensor_bytes(unique_tensors(weights).values()), "the final weights", fix) as tmp:
            save_hf(weights, self.model_config, tmp)
            copy_generation_config(folder, tmp)
            save_tokenizer_files(tmp, tokenizer_path(self.config), folder)
            if self.config.export_int8:
                save_int8_export(self.model, tmp)
        if self.config.method == "lora":  # LoRA also exports its adapters for peft
            adapter_bytes = tensor_bytes(p for p in self.model.parameters() if p.requires_grad)
            with atomic_folder(self.out / "adapter", adapter_bytes, "the LoRA adapter", fix) as tmp:
                save_peft_adapter(self.model, tmp, self.config.init_from or folder)
        summary = {"steps": self.engine.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                   "val_loss": val_history[-1] if val_history else None,
                   "initial_val_loss": getattr(self, "initial_val_loss", None),
                   "val_perplexity": perplexity(val_history[-1]) if val_history else None,
                   "skipped_steps": self.engine.nonfinite_total,
                   "partial_steps": sum(1 for r in self.history if r.get("partial")), "weights": str(final),
                   "rules": self.rule_summary}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.write_memory_report()
        self._barrier()
        return summary


def sharded_launch(config: TrainConfig) -> bool:
    """A torchrun launch of a --parallel fsdp run."""
    return config.parallel == "fsdp" and "RANK" in os.environ and "WORLD_SIZE" in os.environ


class SilentLogbook:
    """What ranks other than 0 log: nothing."""

    def step(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RunStopped(RuntimeError):
    """The run stopped early on purpose (signal, non-finite steps, out of memory); the message is
    one line for the user and `exit_code` is the CLI's exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_signals_caught(trainer: Trainer):
    """While training, SIGINT and SIGTERM ask for a stop at the next step boundary (after a
    checkpoint); a second signal stops at once. Signal handlers exist only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.request_stop(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of steps at or after `step` (written after the checkpoint a run resumes
    from), so the resumed run's records follow on without duplicates."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig) -> dict:
    """Library entry point: train according to `config`, return the summary (with --dry-run:
    plan, write the memory report, and return without training)."""
    if config.dry_run:
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 plans for everyone
            return {"dry_run": True, "fits": True, "quiet": True}
        return dry_run(config.validate())
    try:
        return Trainer(config).run()
    finally:
        if torch.distributed.is_initialized():
            # FSDP2's modules and device mesh hold the group in reference cycles: freed only by a collection.
            # Left to interpreter exit, gloo's I/O thread could outlive its group ("terminate called
            # without an active exception", SIGABRT after a finished run; seen 1 in 2 under load)
            gc.collect()
            torch.distributed.destroy_process_group()
