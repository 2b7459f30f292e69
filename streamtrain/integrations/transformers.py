"""Per-layer training inside Hugging Face's Trainer, with gradient accumulation.

    from streamtrain.integrations.transformers import streamtrain_optimizer
    optimizer = streamtrain_optimizer(model, args, method="galore", rank=128, states="8bit")
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()

The optimizer is the engine's torch.optim face (streamtrain/optimizer.py): the engine is built
from the TrainingArguments (learning_rate, weight_decay, gradient_accumulation_steps) and updates
each parameter inside backward, once per accumulated step, exactly as with its own loop. Trainer
creates its LR scheduler on it as usual (args.lr_scheduler_type, warmup), and its checkpoints
save and restore the engine's full state through optimizer.state_dict().

What does not carry over, and is said at once instead of silently doing nothing:
- args.max_grad_norm clips gradients that no longer exist when Trainer calls it (the hooks have
  consumed them): a warning says so; pass clip_per_tensor= or norm_growth= here instead (the
  engine applies them inside the hooks) and set max_grad_norm=0 to silence it.
- activation (gradient) checkpointing must be non-reentrant (activation_checkpointing_kwargs=
  {"use_reentrant": False}); reentrant checkpointing fires a parameter's hook twice in one backward.
- fp16 mixed precision (a GradScaler unscales gradients in optimizer.step, after the hooks) is
  refused; bf16 works.
"""
import warnings

from ..engine import Engine
from ..methods import assign_rules


def streamtrain_optimizer(model, args, method: str = "galore", *, clip_per_tensor: float | None = None,
                          norm_growth: float | None = None, **rule_options):
    """The engine for `model` under TrainingArguments `args`, as an optimizer for
    Trainer(optimizers=(optimizer, None)). `rule_options` go to streamtrain.assign_rules (rank,
    gap, scale, states, ...)."""
    check_arguments(args, clip_per_tensor, norm_growth)
    rules = assign_rules(model, method, **rule_options)
    engine = Engine(model, rules, lr=args.learning_rate, weight_decay=args.weight_decay,
                    accumulate=args.gradient_accumulation_steps, clip_per_tensor=clip_per_tensor,
                    norm_growth=norm_growth).attach()
    return engine.as_optimizer()


def check_arguments(args, clip_per_tensor, norm_growth) -> None:
    if getattr(args, "fp16", False):
        raise ValueError("fp16=True: its GradScaler unscales gradients in optimizer.step, after the per-layer "
                         "hooks have used them; train with bf16=True or in fp32")
    # transformers 5 names it activation_checkpointing (gradient_checkpointing is its old alias)
    checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    kwargs = (getattr(args, "activation_checkpointing_kwargs", None)
              or getattr(args, "gradient_checkpointing_kwargs", None) or {})
    if checkpointing and kwargs.get("use_reentrant", True):
        raise ValueError("activation (gradient) checkpointing needs its kwargs {'use_reentrant': False}: "
                         "reentrant checkpointing fires each parameter's hook twice in one backward")
    if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
        warnings.warn(f"max_grad_norm={args.max_grad_norm} does nothing with per-layer updates: the gradients are "
                      "consumed inside backward, before Trainer clips them. Pass clip_per_tensor= (each tensor's "
                      "norm) or norm_growth= (e.g. 1.01) to streamtrain_optimizer instead, and set max_grad_norm=0 "
                      "to silence this", stacklevel=3)
