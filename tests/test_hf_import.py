"""streamtrain's own LLaMA reading an HF LLaMA folder: the same logits as transformers'
LlamaForCausalLM, or a one-line refusal naming the key -- never a silent difference."""
import json

import pytest
import torch

import tiny_hf  # noqa: F401 (offline transformers)
from streamtrain.data.tokenizer import ByteTokenizer
from streamtrain.hf import byte_tokenizer_json, check_init_from, load_hf_weights, save_hf
from streamtrain.models.hf_config import ModelConfigError, config_from_hf
from streamtrain.models.llama import build_model
from streamtrain.models.presets import get_config

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "rope_theta 5e5": dict(rope_theta=5e5),
    "llama3 scaling": dict(rope_theta=5e5, rope_scaling=dict(LLAMA3)),
    "linear scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "gqa, head_dim 32, tied": dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}


def hf_folder(tmp_path, **overrides):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, **overrides})).eval()
    model.save_pretrained(str(tmp_path))
    return model


def our_logits(path, ids):
    model = build_model(config_from_hf(path), seed=None)
    load_hf_weights(model, path)
    with torch.no_grad():
        return model.eval()(ids)


IDS = torch.randint(0, 200, (2, 100), generator=torch.Generator().manual_seed(0))  # past the original 16 positions


@pytest.mark.parametrize("case", list(CASES))
def test_our_llama_gives_transformers_logits(tmp_path, case):
    theirs = hf_folder(tmp_path, **CASES[case])
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
    # measured 0.0 (bit-identical on CPU); before, rope_theta 5e5 read as 1e4 was off by 4.2e-3
    assert (our_logits(tmp_path, IDS) - expected).abs().max().item() < 1e-5


def test_legacy_top_level_rope_keys_read_the_same(tmp_path):
    """transformers 4 wrote rope_theta and rope_scaling (with 'type') at the top level."""
    theirs = hf_folder(tmp_path, rope_theta=5e5, rope_scaling=dict(LLAMA3))
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}}))
    with torch.no_grad():
        assert (our_logits(tmp_path, IDS) - theirs(input_ids=IDS).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}}, "rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"model_type": "mistral", "sliding_window": 32}, "sliding_window"),
    ({"model_type": "qwen2"}, "model_type"),
])
def test_what_our_llama_does_not_implement_is_refused_naming_the_key(tmp_path, change, key):
    hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelConfigError) as error:
        config_from_hf(tmp_path)
    message = str(error.value)
    assert key in message and f"--model {tmp_path}" in message and "\n" not in message


def test_init_from_a_folder_of_another_shape_points_to_model_path(tmp_path):
    hf_folder(tmp_path, rope_theta=5e5)
    with pytest.raises(ValueError, match=f"differs from the preset in .*rope_theta.*--model {tmp_path}"):
        check_init_from(tmp_path, get_config("llama-9m", **SHAPE))
    check_init_from(tmp_path, get_config("llama-9m", **SHAPE, rope_theta=5e5))  # the same architecture: fine


def test_our_tied_llama_exports_what_transformers_loads_with_identical_logits(tmp_path):
    config = get_config("llama-9m", **SHAPE, tie_word_embeddings=True, rope_theta=5e5, rope_scaling=dict(LLAMA3))
    model = build_model(config, seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_hf(model.state_dict(), config, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - model.eval()(IDS)).abs().max().item() < 1e-5


def test_the_byte_tokenizer_export_encodes_and_decodes_like_the_byte_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "héllo wörld\n\t✓ Ā  end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == ByteTokenizer().encode(text).tolist()
    assert tokenizer.decode(ids) == text and len(tokenizer) == 256
