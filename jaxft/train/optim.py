"""AdamW with warmup and a decay schedule, and gradient clipping (optax), built from `config.train`."""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "linear", "constant")


def schedule(lr: float, steps: int, warmup: int, kind: str) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine / linear decay to 0, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule: {kind!r} is not one of {', '.join(SCHEDULES)}")
    warmup = min(warmup, steps)
    decay_steps = max(steps - warmup, 1)
    after = {"cosine": optax.cosine_decay_schedule(lr, decay_steps),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps),
             "constant": optax.constant_schedule(lr)}[kind]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for the trainable tree, and its learning-rate schedule (for logging). train_cfg's
    learning_rate is filled in by `jaxft.config.load` (the method's default unless set)."""
    if train_cfg.learning_rate is None:
        raise ValueError("train.learning_rate: None; load the config with jaxft.config.load (which fills in the "
                         "method's default) or set it")
    lr = schedule(train_cfg.learning_rate, train_cfg.steps, train_cfg.warmup_steps, train_cfg.schedule)
    parts = []
    if train_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.max_grad_norm))
    parts.append(optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay))
    return optax.chain(*parts), lr
