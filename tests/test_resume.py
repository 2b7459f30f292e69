"""A resume continues the same run or is refused: every setting that defines the data stream or
the math is compared with the checkpoint's, naming the flag and both values; --steps changes only
with --reschedule, which continues the learning rate without a jump; settings derived from
--steps stay as the checkpoint's run resolved them."""
import math

import pytest

from streamtrain.checkpoint import CheckpointError
from streamtrain.train import Trainer

from test_checkpoint import small_config


def first_run(out, **settings):
    Trainer(small_config(out, **{"steps": 4, "accumulate": 1, "save_every": 2, **settings})).run()


def resume(out, **settings):
    return Trainer(small_config(out, **{"steps": 4, "accumulate": 1, "resume": "auto", **settings}))


@pytest.mark.parametrize("change,flag,values", [
    (dict(batch_size=4), "--batch-size", "used 2 x 1 rank(s), this run 4 x 1"),
    (dict(seq_len=8), "--seq-len", "used 16, this run 8"),
    (dict(accumulate=2), "--accumulate", "used 1, this run 2"),
    (dict(seed=1), "--seed", "used 0, this run 1"),
    (dict(max_data_bytes=30_000), "--max-data-bytes", "used 20000, this run 30000"),
    (dict(lr=1e-3), "--lr", "used 0.003, this run 0.001"),
    (dict(weight_decay=0.1), "--weight-decay", "used 0.0, this run 0.1"),
])
def test_a_resume_that_changes_the_stream_or_the_math_is_refused_naming_the_flag(tmp_path, change, flag, values):
    first_run(tmp_path)
    with pytest.raises(CheckpointError) as error:
        resume(tmp_path, **change)
    message = str(error.value)
    assert message.startswith(f"{flag}: the checkpoint's run ") and values in message and "\n" not in message


@pytest.mark.parametrize("change,flag", [
    (dict(lora_alpha=8.0), "--lora-alpha"),
    (dict(rslora=True), "--rslora"),
    (dict(lora_dropout=0.1), "--lora-dropout"),
])
def test_lora_settings_are_part_of_the_math(tmp_path, change, flag):
    first_run(tmp_path, method="lora")
    with pytest.raises(CheckpointError, match=f"^{flag}: the checkpoint's run used"):
        resume(tmp_path, method="lora", **change)


def test_other_data_is_refused_even_under_the_same_flag(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("the same data, then not the same data. " * 1000)
    first_run(tmp_path / "run", data=str(data))
    data.write_text("the SAME data, then not the SAME data. " * 1000)  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"^--data: this run.s data differs from the checkpoint.s \(fingerprint: "):
        resume(tmp_path / "run", data=str(data))


def test_another_tokenizer_is_refused(tmp_path):
    from test_data import word_tokenizer
    data = tmp_path / "words.txt"
    data.write_text("hello world " * 2000)
    first = word_tokenizer(tmp_path / "a.json")
    first_run(tmp_path / "run", data=str(data), tokenizer=str(first))
    second = word_tokenizer(tmp_path / "b.json", words=("hello", "world", "there", "</s>"))
    with pytest.raises(CheckpointError, match="^--tokenizer: this run's tokenizer differs"):
        resume(tmp_path / "run", data=str(data), tokenizer=str(second))


def test_steps_below_the_checkpoint_or_changed_without_reschedule_are_refused(tmp_path):
    first_run(tmp_path)
    with pytest.raises(CheckpointError, match="--steps 3 is below the checkpoint's step 4"):
        resume(tmp_path, steps=3)
    with pytest.raises(CheckpointError, match="schedule ends at step 4, this run asks for 8; pass --steps 4, or add "
                                              "--reschedule"):
        resume(tmp_path, steps=8)


def test_reschedule_continues_the_learning_rate_without_a_jump(tmp_path):
    first_run(tmp_path / "run", steps=8, save_every=4)  # (the first run's own --steps is 8 here)
    stopped_lr = Trainer(small_config(tmp_path / "run", steps=8, accumulate=1, resume=str(
        tmp_path / "run" / "checkpoints" / "step-000004"))).engine.lr_at(4)
    resumed = Trainer(small_config(tmp_path / "run", steps=16, accumulate=1, reschedule=True, resume=str(
        tmp_path / "run" / "checkpoints" / "step-000004")))
    lrs = [resumed.engine.lr_at(s) for s in range(4, 17)]
    floor = 3e-3 * 0.1
    assert lrs[0] == pytest.approx(stopped_lr)              # no jump at the resumed step
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))          # then a cosine down ...
    assert lrs[-1] == pytest.approx(floor) and lrs[-2] > floor  # ... to the floor at the new --steps
    resumed.run()
    again = Trainer(small_config(tmp_path / "run", steps=16, accumulate=1, resume="auto"))
    assert again.engine.step == 16 and again.engine.lr_at(10) == pytest.approx(lrs[6])  # recorded, rebuilt


def test_relora_defaults_from_steps_stay_as_resolved_so_reschedule_does_not_blame_the_method(tmp_path):
    first_run(tmp_path, method="relora", steps=8, save_every=4)
    resumed = Trainer(small_config(tmp_path, method="relora", steps=12, accumulate=1, resume="auto",
                                   reschedule=True))
    relora = next(r for r in resumed.engine.rules.values() if r.name == "relora")
    assert (relora.warm_start_steps, relora.cycle) == (2, 2)  # a quarter of the first run's 8 steps
    assert resumed.config.warmup == 0 and math.isfinite(resumed.engine.lr_at(9))
