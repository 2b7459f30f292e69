"""The engine inside your own training loop: GaLore on the matrices, AdamW elsewhere,
4 micro-batches per logical step, a cosine schedule. Runs in about a minute on a laptop CPU.

    python examples/custom_loop.py
"""
from streamtrain import CosineSchedule, Engine, assign_rules, build_model, get_config
from streamtrain.data import TokenDataset, load_tokens

model = build_model(get_config("byte-tiny"), seed=0)
data = TokenDataset(load_tokens("builtin", max_bytes=2_000_000), seq_len=128, seed=0)
steps, accumulate = 100, 4
engine = Engine(model, assign_rules(model, "galore", rank=32, gap=50),
                schedule=CosineSchedule(3e-3, total=steps, warmup=10), accumulate=accumulate).attach()

position = 0
while engine.step < steps:
    inputs, targets = data.train_batch(position, batch_size=8)
    position += 1
    report = engine.backward(model(inputs, targets))  # the update happens inside backward
    if report is not None and report.step % 10 == 0:
        print(f"step {report.step:3d}  loss {report.loss:.3f}  lr {report.lr:.2e}  grad norm {report.grad_norm:.2f}")
engine.detach()
