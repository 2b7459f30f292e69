"""Tiny random transformers models saved as local HF folders (nothing is downloaded).

Each architecture exercises what sets it apart: Llama-3 (GQA, llama3 rope scaling, rope_theta
5e5, tied embeddings), Mistral (sliding window), Qwen2 (q/k/v biases), GPT-2 (Conv1D, learned
positions, tied head), GPT-NeoX (fused query_key_value, partial rotary, untied head).
"""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402

from streamtrain.hf import byte_tokenizer_json  # noqa: E402

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_config(arch: str, layers: int = 2):
    if arch == "llama3":
        return transformers.LlamaConfig(num_hidden_layers=layers, num_key_value_heads=2, tie_word_embeddings=True,
                                        rope_scaling=dict(LLAMA3_ROPE), rope_theta=5e5, **SMALL, **COMMON)
    if arch == "mistral":
        return transformers.MistralConfig(num_hidden_layers=layers, num_key_value_heads=2, sliding_window=6,
                                          **SMALL, **COMMON)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=layers, num_key_value_heads=2, **SMALL, **COMMON)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **COMMON)
    if arch == "neox":
        return transformers.GPTNeoXConfig(num_hidden_layers=layers, hidden_dropout=0.0, attention_dropout=0.0,
                                          **SMALL, **COMMON)
    raise ValueError(arch)


ARCHS = ("llama3", "mistral", "qwen2", "gpt2", "neox")


def hf_model(arch: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(arch, layers)).float()


def save_folder(path, arch: str, seed: int = 0, weights: bool = True, tokenizer: bool = True, layers: int = 2):
    """A local model folder: config.json (+ weights, + a byte-level tokenizer with an EOS token)."""
    model = hf_model(arch, seed, layers)
    if weights:
        model.save_pretrained(str(path))
    else:
        model.config.save_pretrained(str(path))
    if tokenizer:
        write_tokenizer(path)
    return path


def write_tokenizer(path) -> None:
    spec = byte_tokenizer_json()
    spec["added_tokens"] = [{"id": 256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}))


def batches(n: int, batch: int = 2, seq: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (batch, seq), generator=gen),
             torch.randint(0, VOCAB, (batch, seq), generator=gen)) for _ in range(n)]


def hf_loss(model, x, y):
    """The reference loss: transformers' own forward, cross-entropy on its logits."""
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
