"""The training recipe end to end on the built-in corpus."""
import json

import pytest

from streamtrain.config import TrainConfig
from streamtrain.train import train


def small_run(tmp_path, **overrides):
    values = dict(model="byte-tiny", steps=200, batch_size=8, seq_len=64, lr=3e-3, eval_every=100,
                  eval_batches=8, max_data_bytes=1_000_000, out=str(tmp_path), progress=False)
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_two_hundred_steps_lower_validation_loss_clearly(tmp_path, method):
    summary = train(small_run(tmp_path, method=method, rank=32, galore_gap=50))
    # a uniform byte model scores ln(256) = 5.55; the corpus is learnable well below that
    assert summary["initial_val_loss"] > 5.0
    assert summary["val_loss"] < 0.6 * summary["initial_val_loss"], summary
    assert summary["val_loss"] < 3.0
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(200))
    assert (tmp_path / "final" / "model.safetensors").is_file()
