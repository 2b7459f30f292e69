"""Named recipes: whole run settings under one name, so a headline plan is one flag, not seven.

One table of plain data (field name -> value, the names of TrainConfig's fields). `--recipe NAME`
sets these values; a `--config` file and flags on the command line override them. The LLaMA-7B
recipes are the plans of profiles/README.md (GaLore, 8-bit states, bf16 weights, activation
checkpointing, chunked loss, exact accumulation to 131,072 tokens per step) for one 24 GB GPU.
"""

# every 7B recipe: the settings that make a 6.74B-parameter model fit 24 GB
LLAMA_7B_24GB = {"model": "llama-7b", "method": "galore", "states": "8bit", "dtype": "bfloat16",
                 "activation_checkpointing": True, "loss_chunk_tokens": 1024, "budget": "24GB", "device": "cuda"}

RECIPES: dict[str, dict] = {
    # rank 1024, 16 x 256 tokens per micro-batch, the 7.53 GB of accumulation sums in host RAM: 22.56 GB
    "llama-7b-24gb": {**LLAMA_7B_24GB, "rank": 1024, "seq_len": 256, "batch_size": 16, "accumulate": 32,
                      "offload_accumulation": True},
    # the same at 2 x 2048 tokens per micro-batch: 22.56 GB
    "llama-7b-24gb-seq2048": {**LLAMA_7B_24GB, "rank": 1024, "seq_len": 2048, "batch_size": 2, "accumulate": 32,
                              "offload_accumulation": True},
    # no host RAM for the sums: rank 512 at 8 x 256 tokens per micro-batch: 23.35 GB
    "llama-7b-24gb-on-gpu": {**LLAMA_7B_24GB, "rank": 512, "seq_len": 256, "batch_size": 8, "accumulate": 64},
}


class RecipeError(ValueError):
    pass


def recipe_values(name: str) -> dict:
    """The settings of recipe `name` (a copy); a one-line error for an unknown name."""
    if name not in RECIPES:
        raise RecipeError(f"--recipe: unknown recipe {name!r}; choose one of {', '.join(RECIPES)} "
                          "('--recipe list' prints them)")
    return dict(RECIPES[name])


def describe_recipes() -> str:
    """One line per recipe: its name and its settings as flags."""
    from .config import flag_pairs
    return "\n".join(f"{name:<24} {' '.join(flag_pairs(values))}" for name, values in RECIPES.items())
