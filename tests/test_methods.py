"""Which rule governs which parameter: decided by structure (linear layers inside the blocks),
norms, biases and embeddings undecayed, overridable by --low-rank-targets, never a silent no-op."""
import pytest
from torch import nn

from conftest import tiny_model
from streamtrain.config import TrainConfig
from streamtrain.methods import assign_rules, format_rule_summary, rule_summary
from streamtrain.recipe import build_rules, lora_targets
from streamtrain.rules import GaLore


def governed(rules, kind):
    return sorted(n for n, r in rules.items() if isinstance(r, kind))


def test_galore_governs_the_block_matrices_and_the_rest_is_grouped_by_decay():
    model = tiny_model()
    rules = assign_rules(model, "galore", rank=4)
    assert len(governed(rules, GaLore)) == 14 and all(".layers." in n for n in governed(rules, GaLore))
    undecayed = sorted(n for n, r in rules.items() if r.weight_decay == 0.0)
    assert undecayed == sorted(["model.embed_tokens.weight", "model.norm.weight"] +
                               [f"model.layers.{i}.{norm}.weight" for i in range(2)
                                for norm in ("input_layernorm", "post_attention_layernorm")])
    full_rank_decayed = [n for n, r in rules.items() if not isinstance(r, GaLore) and r.weight_decay is None]
    assert full_rank_decayed == ["lm_head.weight"]


def test_a_tied_head_is_one_embedding_parameter_governed_once():
    model = tiny_model(tie_word_embeddings=True)
    rules = assign_rules(model, "galore", rank=4)
    assert "lm_head.weight" not in rules and rules["model.embed_tokens.weight"].weight_decay == 0.0


class Net(nn.Module):
    """A user's own model: blocks in a ModuleList, a linear stem and head outside them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.stack = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)) for _ in range(3))
        self.head = nn.Linear(16, 4)


def test_structure_finds_the_blocks_of_any_module_and_targets_override_it():
    rules = assign_rules(Net(), "galore", rank=2)
    assert governed(rules, GaLore) == [f"stack.{i}.0.weight" for i in range(3)]
    rules = assign_rules(Net(), "galore", rank=2, targets=["head", r"stack\.0\.0"])
    assert governed(rules, GaLore) == ["head.weight", "stack.0.0.weight"]
    with pytest.raises(ValueError, match="'qkv' matches no nn.Linear or Conv1D layer"):
        assign_rules(Net(), "galore", targets=["qkv"])


def test_a_low_rank_method_that_governs_nothing_is_an_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="--method galore governs no trainable matrix.*--low-rank-targets"):
        assign_rules(model, "galore")
    assert len(assign_rules(model, "adamw")) == 3  # AdamW needs no matrix


def test_the_summary_counts_matrices_and_shares():
    model = tiny_model()
    rows = rule_summary(model, assign_rules(model, "galore", rank=4))
    by_rule = {r["rule"]: r for r in rows}
    total = sum(p.numel() for p in model.parameters())
    assert by_rule["galore"]["matrices"] == 14 and by_rule["adamw"]["matrices"] == 1
    assert by_rule["adamw (no weight decay)"] == {"rule": "adamw (no weight decay)", "tensors": 6, "matrices": 1,
                                                   "parameters": 256 * 64 + 5 * 64,
                                                   "share": round((256 * 64 + 5 * 64) / total, 4)}
    assert sum(r["parameters"] for r in rows) == total
    assert format_rule_summary(rows).startswith("rules: ")


def test_low_rank_targets_flag_reaches_the_rules_and_lora():
    model = tiny_model()
    config = TrainConfig(model="byte-tiny", method="galore", low_rank_targets="q_proj,v_proj", rank=4)
    assert len(governed(build_rules(model, config), GaLore)) == 4
    assert lora_targets(TrainConfig(method="lora", low_rank_targets="q_proj")) == ["q_proj"]
    with pytest.raises(ValueError, match="pass one"):
        lora_targets(TrainConfig(method="lora", low_rank_targets="q_proj", lora_targets="v_proj"))

