"""The divergence guard: stops a run whose loss or parameters are no longer numbers, or that has collapsed.

Non-finite loss or trainable parameters always stop the run (nothing that follows can be used). With
`guard.enabled`, so does a collapse: the gradient norm exactly 0 for `guard.patience` steps in a row (a run
pushed into a flat region, e.g. by a far too high learning rate, learns nothing more), or the training loss
above `guard.loss_factor` times the loss of the run's first step for `guard.patience` steps in a row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a scalar bool array)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


class Guard:
    """Watches (loss, gradient norm, parameters finite) step by step; `check` says why to stop, or None."""

    def __init__(self, guard_config, first_loss: float | None = None):
        self.enabled = bool(guard_config.enabled)
        self.patience = int(guard_config.patience)
        self.factor = float(guard_config.loss_factor)
        self.first_loss = first_loss  # the loss of step 1 (of the run, before any resume)
        self.zero_grad = self.high_loss = 0

    def check(self, step: int, loss: float, grad_norm: float, params_finite: bool) -> str | None:
        if not math.isfinite(loss):
            return f"step {step}: the loss is {loss}"
        if not params_finite:
            return f"step {step}: the trainable parameters hold NaN or Inf after the update"
        if self.first_loss is None:
            self.first_loss = loss
        if not self.enabled:
            return None
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0.0 else 0
        high = self.factor > 0 and loss > self.factor * self.first_loss
        self.high_loss = self.high_loss + 1 if high else 0
        if self.patience and self.zero_grad >= self.patience:
            return (f"step {step}: the gradient norm has been exactly 0 for {self.zero_grad} steps (the run has "
                    f"collapsed; loss {loss:.4f})")
        if self.patience and self.high_loss >= self.patience:
            return (f"step {step}: the loss has been above {self.factor:g} x the first step's "
                    f"({self.first_loss:.4f}) for {self.high_loss} steps (now {loss:.4f})")
        return None
