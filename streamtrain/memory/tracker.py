"""Live tensor bytes by category, over the phases of a training step.

`MemoryTracker` is a TorchDispatchMode: every aten op passes through it, and each output whose
storage it has not seen yet is a new allocation. A weakref finalizer on the storage tells it when
the bytes are freed, so views and in-place results are never counted twice and the totals are the
bytes really held at each moment. The same code runs on real tensors (CPU or CUDA) and on fake
tensors (`FakeTensorMode`, where storages have sizes but no data): that is how the planner
measures a run before it exists.

Categories. A new allocation is filed by the phase it happens in: forward blocks make
`activations` (so does the recomputation of a checkpointed block in backward, which runs with grad
enabled), the final norm + lm_head + cross-entropy make `loss`, everything else is `temporaries`.
`watch(model, engine)` then re-files what it can name: parameters are `weights`, every gradient
that reaches a parameter (tensor hook) and every accumulation buffer is `gradients`, rule state
is `optimizer_states` except GaLore's basis (`projectors`). Accumulation buffers an engine keeps
in host RAM (--offload-accumulation) are `host`: counted apart (host_total, host_peak), never in
the device total. On CUDA (device_type='cuda') any CPU tensor is `host` too.

Phases: 'forward embed' (embedding and block 0), 'forward block i' (a forward hook on block i-1
of the model's block list, `model.blocks`: our LLaMA's decoder layers or a transformers model's,
found by the adapter), 'forward loss' (after the last block: final norm, head, cross-entropy),
'backward' (from a hook on the model's output), then for each parameter 'hook <name>' (engine
listener) and 'backward after <name>'; 'idle' after a step ends. Each phase records its peak and
the bytes by category at that peak. A checkpointed block recomputed in backward fires its forward
hook again; that is not a forward phase and is ignored.
"""
import weakref

import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..rules.base import local_part
from .fsdp_storage import follow_fsdp_storage

CATEGORIES = ("weights", "gradients", "optimizer_states", "projectors", "activations", "loss", "temporaries")
HOST = "host"  # kept in host RAM on purpose (offloaded accumulation buffers): counted apart, not device bytes
SVD = torch.ops.aten._linalg_svd.default
DEVICE = torch.ops.prim.device.default


class MemoryTracker(TorchDispatchMode):
    def __init__(self, round_to: int = 1, timeline_steps: int = 2, device_type: str | None = None):
        """round_to: also keep a total with every allocation rounded up to this many bytes (the
        CUDA caching allocator rounds to 512). timeline_steps: logical steps whose per-phase
        timeline is kept (later steps keep only their peak). device_type: the device whose bytes
        are counted; tensors elsewhere are host (None: count every tensor, as the planner does)."""
        super().__init__()
        self.round_to = round_to
        self.device_type = device_type
        self.host_total = 0
        self.host_peak = 0
        self.timeline_steps = timeline_steps
        self._live: dict[int, list] = {}     # id(storage) -> [bytes, category]
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.rounded_total = 0
        self.max_by_category = dict.fromkeys(CATEGORIES, 0)
        self.step = 0
        self.peak = snapshot(self, "start")
        self.step_peaks: list[dict] = []     # one per logical step: its peak and what made it
        self.timeline: list[dict] = []       # one record per phase of the first steps
        self._step_peak = snapshot(self, "start")
        self._model = None
        self._engine = None
        self._handles = []
        self.set_phase("idle")

    # -- allocation bookkeeping ----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is DEVICE:  # asked of fake tensors at every autograd step: answer without dispatching
            return args[0].device
        out = func(*args, **(kwargs or {}))
        if func is SVD:  # its cuSOLVER workspace is invisible here; the planner adds it for CUDA
            self._note_svd(tuple(args[0].shape[-2:]))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, None)
        return out

    def _see(self, t: torch.Tensor, category: str | None) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse)
            return
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None:
            if category is not None and entry[1] != category:
                self._move(entry, category)
            return
        size = storage.nbytes()
        if self.device_type is not None and storage.device.type != self.device_type:
            category = HOST
        category = category or self._new_category()
        self._live[key] = [size, category]
        finalizer = weakref.finalize(storage, self._free, key)
        finalizer.atexit = False
        self._add(size, category)

    def _note_svd(self, shape: tuple) -> None:
        """Remember the largest matrix decomposed in this phase (GaLore's subspace refreshes)."""
        known = self._phase.get("svd")
        if known is None or shape[0] * shape[1] > known[0] * known[1]:
            self._phase["svd"] = list(shape)

    def _new_category(self) -> str:
        kind = self._phase["kind"]
        if kind == "forward" or (kind == "backward" and torch.is_grad_enabled()):
            return "activations"
        return "loss" if kind == "loss" else "temporaries"

    def _add(self, size: int, category: str) -> None:
        if category == HOST:
            self.host_total += size
            self.host_peak = max(self.host_peak, self.host_total)
            return
        self.total += size
        self.rounded_total += -(-size // self.round_to) * self.round_to
        self.by_category[category] += size
        self.max_by_category[category] = max(self.max_by_category[category], self.by_category[category])
        phase = self._phase
        if self.total > phase["peak"]:
            phase["peak"] = self.total
            phase["at_peak"] = nonzero(self.by_category)
            if self.total > self._step_peak["total"]:
                self._step_peak = snapshot(self, phase["phase"], phase["micro"])
                if self.total > self.peak["total"]:
                    self.peak = self._step_peak

    def _free(self, key: int) -> None:
        self._remove(*self._live.pop(key))

    def _remove(self, size: int, category: str) -> None:
        if category == HOST:
            self.host_total -= size
            return
        self.total -= size
        self.rounded_total -= -(-size // self.round_to) * self.round_to
        self.by_category[category] -= size

    def _move(self, entry: list, category: str) -> None:
        size, old = entry
        entry[1] = category
        self._remove(size, old)
        self._add(size, category)  # back to the same total when both are device categories

    def label(self, t: torch.Tensor, category: str) -> None:
        """File `t`'s storage under `category` (counting it now if it was made before tracking); of
        a DTensor (an FSDP2 shard), its local tensor."""
        if category not in CATEGORIES + (HOST,):
            raise ValueError(f"unknown memory category {category!r}; choose one of {CATEGORIES + (HOST,)}")
        self._see(local_part(t), category)

    def resized(self, t: torch.Tensor, category: str) -> None:
        """`t`'s storage was resized in place (FSDP2 frees and re-allocates a gathered block's
        storages that way, unseen by dispatch; memory/fsdp_storage.py): count its new size."""
        storage = t.untyped_storage()
        entry = self._live.get(id(storage))
        if entry is None:
            self._see(t, category)
            return
        self._remove(*entry)
        entry[:] = [storage.nbytes(), category]
        self._add(*entry)

    def label_state(self, state: dict) -> None:
        """Rule state: accumulation buffers are gradients (host when the engine offloads them), the
        basis a projector, the rest states."""
        buffers = HOST if getattr(self._engine, "buffer_device", None) is not None else "gradients"
        for key, value in state.items():
            category = ("projectors" if key == "basis" else
                        buffers if key.endswith("grad_acc") else "optimizer_states")
            tensors = value.tensors().values() if hasattr(value, "tensors") else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self.label(t, category)

    # -- phases --------------------------------------------------------------------------------
    def set_phase(self, name: str) -> None:
        kind = name.split(" ")[0]
        if name.startswith("forward"):
            kind = "loss" if name == "forward loss" else "forward"
        micro = self._engine.micro_index if self._engine is not None else 0
        self._phase = {"step": self.step, "micro": micro, "phase": name, "kind": kind,
                       "peak": self.total, "at_peak": nonzero(self.by_category)}
        if self.step < self.timeline_steps:
            self.timeline.append(self._phase)

    @property
    def phase(self) -> str:
        return self._phase["phase"]

    def end_step(self) -> dict:
        """Close a logical step: keep its peak, start the next one."""
        self.step_peaks.append({"step": self.step, **self._step_peak})
        self.step += 1
        self._step_peak = snapshot(self, "idle")
        self.set_phase("idle")
        return self.step_peaks[-1]

    # -- wiring to a model and an engine -------------------------------------------------------
    def watch(self, model: torch.nn.Module, engine=None) -> "MemoryTracker":
        """Label the model's tensors and the engine's states, and follow their events: forward
        blocks (forward hooks on `model.blocks`), the start of backward (a hook on the model's output), each gradient
        arriving at a parameter, each engine hook, each step end."""
        self._model = model
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            self._handles.append(Undo(follow_fsdp_storage(self)))
        for p in model.parameters():
            self.label(p, "weights")
        for b in model.buffers():
            self.label(b, "weights")
        blocks = list(getattr(model, "blocks", None) or [])
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_hook(self._block_done(i, len(blocks))))
        self._handles.append(model.register_forward_pre_hook(lambda *_: self.set_phase("forward embed")))
        self._handles.append(model.register_forward_hook(self._after_forward))
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._gradient_arrives))
                self._handles.append(p.register_post_accumulate_grad_hook(self._gradient_kept))
        if engine is not None:
            self._engine = engine
            engine.listeners.append(self)
            for state in engine.states.values():
                self.label_state(state)
        return self

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._engine is not None and self in self._engine.listeners:
            self._engine.listeners.remove(self)

    def _block_done(self, i: int, count: int):
        def hook(module, inputs, output):
            if self._phase["kind"] == "forward":  # not a checkpointed block's recomputation in backward
                self.set_phase("forward loss" if i == count - 1 else f"forward block {i + 1}")
        return hook

    def _after_forward(self, module, inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._backward_starts)

    def _backward_starts(self, grad):
        self.set_phase("backward")

    def _gradient_arrives(self, grad):
        if grad is not None:  # (None: a projected-backward matrix, whose gradient stays in factors)
            self.label(grad, "gradients")

    def _gradient_kept(self, param):
        if param.grad is not None:  # a plain optimizer loop keeps it; the engine has taken it
            self.label(param.grad, "gradients")

    # engine listener protocol
    def on_hook(self, engine, name, when):
        if when == "before":
            self.set_phase(f"hook {name}")
        else:
            self.label_state(engine.states[name])
            self.set_phase(f"backward after {name}")

    def on_step_end(self, engine, report):
        for p in self._model.parameters() if self._model is not None else ():
            self.label(p, "weights")  # rules that change the model (ReLoRA's merges) add parameters
        for state in engine.states.values():
            self.label_state(state)
        self.end_step()

    # -- results -------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"peak": self.peak, "max_by_category": dict(self.max_by_category), "host_peak": self.host_peak,
                "step_peaks": self.step_peaks, "timeline": compact_timeline(self.timeline)}


class Undo:
    """A function that undoes something, with a removable handle's `remove()`."""

    def __init__(self, undo):
        self.remove = undo


def nonzero(by_category: dict) -> dict:
    return {c: b for c, b in by_category.items() if b}


def snapshot(tracker: MemoryTracker, phase: str, micro: int = 0) -> dict:
    return {"total": tracker.total, "rounded_total": tracker.rounded_total, "phase": phase,
            "step": tracker.step, "micro": micro, "by_category": nonzero(tracker.by_category)}


def compact_timeline(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("step", "micro", "phase", "peak", "at_peak", "svd") if k in r} for r in records]
