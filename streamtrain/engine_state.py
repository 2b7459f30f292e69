"""The engine's state as plain data: what `Engine.state_dict()` holds and how it goes back in.

A rule's per-parameter state is a dict of python scalars, tensors, None (an empty accumulation
buffer) and storages (optim/state.py, optim/quant8.py). In a state dict a storage becomes
{"storage": <class name>, "tensors": {<sub>: tensor}} with, when it rounds stochastically, its
generator's state as the tensor 'rng'; everything else is itself. Loading copies into the live
tensors and storages in place, so references the rules hold stay valid.

Every refusal is a one-line ValueError naming what differs and how to fix it.
"""
import json

import torch


class StateMismatch(ValueError):
    pass


# -- export ----------------------------------------------------------------------------------------
def export(value):
    """One state entry as plain data (tensors by reference)."""
    if is_storage(value):
        return {"storage": type(value).__name__, "tensors": storage_tensors(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def storage_tensors(storage) -> dict:
    """A storage's tensors plus, when it rounds stochastically, its generator's state ('rng')."""
    parts = dict(storage.tensors())
    if getattr(storage, "generator", None) is not None:
        parts["rng"] = storage.generator.get_state()
    return parts


def is_storage(value) -> bool:
    return hasattr(value, "tensors") and hasattr(value, "load_tensors")


# -- checks ----------------------------------------------------------------------------------------
def rule_config(rule) -> dict:
    """A rule's settings as saved: its own config() and its parameter group's lr_scale and decay."""
    return {**rule.config(), "lr_scale": rule.lr_scale, "weight_decay": rule.weight_decay}


def check_rules(saved: list[dict], groups: list[tuple]) -> None:
    """The saved rules are this engine's rules: same methods, same settings."""
    current = [rule_config(rule) for rule, _ in groups]
    if sorted(map(key, (r["config"] for r in saved))) == sorted(map(key, current)):
        return
    saved_names = sorted(r["config"]["name"] for r in saved)
    current_names = sorted(c["name"] for c in current)
    if saved_names != current_names:
        detail = f"rules: saved {'+'.join(saved_names)}, this run {'+'.join(current_names)}"
    else:  # the same rules in the same order (the model's parameter order): name the first that differs
        pairs = zip((r["config"] for r in saved), current)
        saved_config, current_config = next((a, b) for a, b in pairs if key(a) != key(as_json(b)))
        detail = f"{current_config['name']} {difference(saved_config, as_json(current_config))}"
    raise StateMismatch(f"the saved state was trained with another method ({detail}); use the same "
                        "--method/--rank/--states settings")


def in_order(saved: list[dict], groups: list[tuple]) -> list[dict]:
    """The saved rule entries in the order of this engine's rule groups (matched by config)."""
    by_config = {}
    for entry in saved:
        by_config.setdefault(key(entry["config"]), []).append(entry)
    return [by_config[key(rule_config(rule))].pop(0) for rule, _ in groups]


def check_parameters(state: dict, groups: list[tuple], live_names: set) -> None:
    """Same trainable parameters, each governed by the same rule as when saved."""
    saved_names = set(state["states"])
    if saved_names != live_names:
        missing, unexpected = sorted(live_names - saved_names), sorted(saved_names - live_names)
        raise StateMismatch(f"the saved state does not match this model's trainable parameters: missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}; check --model/--method")
    saved = {n: r["config"] for r in state["rules"] for n in r["parameters"]}
    for rule, names in groups:
        for name in names:
            if saved.get(name) != as_json(rule_config(rule)):
                raise StateMismatch(f"the saved state updates {name} with another rule "
                                    f"({difference(saved.get(name), as_json(rule_config(rule)))}); check --method")


# -- load ------------------------------------------------------------------------------------------
def load_into(name: str, state: dict, entries: dict) -> None:
    """Restore one parameter's state in place (tensors and storages keep their identity)."""
    if set(entries) != set(state):
        raise StateMismatch(f"the saved state of {name} has keys {sorted(entries)}, this run's rule makes "
                            f"{sorted(state)}; check --method")
    for key_, saved in entries.items():
        current, where = state[key_], f"{name}/{key_}"
        if isinstance(current, torch.Tensor):
            if not isinstance(saved, torch.Tensor):
                raise StateMismatch(f"the saved {where} is not a tensor; check --method")
            copy_checked(where, current, saved)
        elif is_storage(current):
            if not isinstance(saved, dict) or saved.get("storage") != type(current).__name__:
                kind = saved.get("storage") if isinstance(saved, dict) else type(saved).__name__
                raise StateMismatch(f"the saved {where} is stored as {kind}, here as "
                                    f"{type(current).__name__}; check --states")
            load_storage(current, saved["tensors"])
        elif isinstance(saved, (dict, torch.Tensor)):
            raise StateMismatch(f"the saved {where} is a {type(saved).__name__}, here a "
                                f"{type(current).__name__}; check --method")
        else:
            state[key_] = tuple(saved) if isinstance(current, tuple) else saved


def load_storage(storage, parts: dict) -> None:
    parts = dict(parts)
    rng = parts.pop("rng", None)
    if rng is not None and getattr(storage, "generator", None) is not None:
        storage.generator.set_state(rng.cpu())
    device = next(iter(storage.tensors().values())).device
    storage.load_tensors({sub: t.to(device) for sub, t in parts.items()})


def copy_checked(where: str, target: torch.Tensor, source: torch.Tensor) -> None:
    if target.shape != source.shape or target.dtype != source.dtype:
        raise StateMismatch(f"the saved {where} is {source.dtype} {tuple(source.shape)}, here "
                            f"{target.dtype} {tuple(target.shape)}; check --model/--dtype/--rank")
    with torch.no_grad():
        target.copy_(source)


# -- small helpers ---------------------------------------------------------------------------------
def key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def as_json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def difference(saved, current, saved_as: str = "saved") -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        return ", ".join(f"{k}: {saved_as} {saved.get(k)!r}, this run {current.get(k)!r}" for k in keys)
    return f"{saved_as} {saved!r}, this run {current!r}"
