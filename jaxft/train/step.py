"""The jitted training and evaluation steps: gradients of the trainable tree alone, the base held fixed.

A batch is a dict of (A, B, ...) arrays: A micro-batches of B rows (gradient accumulation), with `tokens` and
what the task needs: for causal LM `targets`, `loss_mask`, `segment_ids`, `positions` (see `jaxft.data`),
for the other tasks their keys (`jaxft.tasks`). The loss is the task's sum over the whole accumulation window
divided by its count there (for causal LM the mean token cross-entropy over every target token), so
accumulating A micro-batches equals one batch of A*B rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxft.models.loss import token_loss  # (bench/ scripts import it from here)
from jaxft.tasks.causal_lm import loss as lm_loss  # the default: the causal LM loss of a micro-batch


def make_loss_fn(forward: Callable, loss: Callable = lm_loss) -> Callable:
    """forward(base, trainable, micro_batch, rng) -> out and loss(out, micro_batch) -> (sum, count) (a task's,
    `jaxft.tasks`; by default the token loss of `out` = logits); returns loss_sum(trainable, base, mb, rng)."""
    def loss_sum(trainable, base, mb, rng):
        return loss(forward(base, trainable, mb, rng), mb)
    return loss_sum


def init_state(trainable: dict, optimizer: optax.GradientTransformation, rng) -> dict:
    """The training state: everything a checkpoint holds besides the data-iterator position."""
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
            "rng": rng}


def make_train_step(forward: Callable, optimizer: optax.GradientTransformation,
                    penalty: Callable | None = None, loss: Callable = lm_loss,
                    extra: Callable | None = None) -> Callable:
    """Returns train_step(state, base, batch) -> (state, metrics), not yet jitted.

    loss(out, micro_batch) -> (sum, count) turns the forward's output into the loss (see `make_loss_fn`); the
    step minimizes the sum over the accumulation window divided by the count over it.

    penalty(trainable, base) -> scalar (e.g. L2-SP, `jaxft.peft.penalty`) is added to the mean token loss once
    per step; metrics["loss"] stays the token loss alone and metrics["penalty"] reports it.

    extra(out, micro_batch) -> {name: float32 array} (a task's `train_metrics`: a mixture of experts' router
    losses and expert load) adds those to the metrics, averaged over the micro-batches.
    """
    def loss_and_extra(trainable, base, mb, rng):
        out = forward(base, trainable, mb, rng)
        total, n = loss(out, mb)
        return total, (n, {} if extra is None else extra(out, mb))

    grad_fn = jax.value_and_grad(loss_and_extra, has_aux=True)

    def train_step(state, base, batch):
        rng, step_rng = jax.random.split(state["rng"])
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        rngs = jax.random.split(step_rng, n_micro)

        def micro(carry, xs):
            grads, loss_sum, count = carry
            mb, r = xs
            (loss, (n, more)), g = grad_fn(state["trainable"], base, mb, r)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), more

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        (grads, loss_sum, count), more = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, rngs))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        added = {}
        if penalty is not None:
            added["penalty"], penalty_grads = jax.value_and_grad(penalty)(state["trainable"], base)
            grads = jax.tree.map(jnp.add, grads, penalty_grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {"loss": loss_sum / denom, "target_tokens": count, "grad_norm": optax.tree.norm(grads), **added,
                   **jax.tree.map(lambda x: jnp.mean(x, axis=0), more)}
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    return train_step


def make_eval_step(forward: Callable, loss: Callable = lm_loss) -> Callable:
    """Returns eval_step(trainable, base, batch (B, T)) -> (loss sum, target count), not yet jitted."""
    loss_sum = make_loss_fn(forward, loss)

    def eval_step(trainable, base, batch):
        return loss_sum(trainable, base, batch, None)

    return eval_step
