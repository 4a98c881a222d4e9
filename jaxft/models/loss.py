"""The token cross-entropy, the one implementation every loss over token (or class) logits uses.

`token_loss` takes logits; `chunked_cross_entropy` takes the final hidden states and the head's weight instead:
a scan over chunks of `chunk` token rows computes each chunk's (chunk, V) float32 logits and their
`token_loss`, keeping only the running sum; the scan's body is rematerialized, so the backward pass recomputes a
chunk's logits when it needs their gradient. Memory holds one chunk's logits instead of (B, T, V).

With `capacity`, the rows that carry a target (loss mask) are gathered first into a static `capacity` rows, so
only they pay for the head (in SFT, the prompt's tokens do not); a batch with more targets than `capacity`
takes the path over every row instead (both are compiled; the choice is made at run time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.models.layers import einsum


class LossError(ValueError):
    """A loss setting that cannot run."""


def token_loss(logits, targets, mask):
    """logits (..., V), targets (...) int, mask (...) -> (sum of the cross-entropies weighted by mask, sum of
    mask), float32 scalars. Positions off the mask count nothing, even where their logits are not finite (an
    all-padding row) or their target is no class (-100)."""
    mask = mask.astype(jnp.float32)
    on = mask != 0
    # Off the mask the logits are replaced before the log-sum-exp: a NaN there would reach the gradient otherwise.
    logits = jnp.where(on[..., None], logits.astype(jnp.float32), 0.0)
    picked = jnp.take_along_axis(logits, jnp.where(on, targets, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(on, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0) * mask), jnp.sum(mask)


def chunked_cross_entropy(hidden, head, targets, mask, *, tied: bool = False, chunk: int = 1024,
                          capacity: int | None = None):
    """hidden (B, T, D), head (D, V) or with `tied` the (V, D) embedding table, targets (B, T) int, mask (B, T)
    -> (sum of the masked token cross-entropies, number of masked tokens), both float32 scalars: the same as
    `token_loss` of the logits hidden @ head, without holding them.

    chunk: token rows per step (capped at B*T, or at capacity; rows are padded up to a multiple of it).
    capacity: gather at most this many masked rows before the head (None: every row goes through the head).
    """
    if chunk <= 0:
        raise LossError(f"train.loss_chunk must be positive, got {chunk}")
    if capacity is not None and capacity <= 0:
        raise LossError(f"loss capacity must be positive or None, got {capacity}")
    d = hidden.shape[-1]
    if head.shape[1 if tied else 0] != d:
        raise LossError(f"loss head: expected {'(V, D)' if tied else '(D, V)'} with D={d}, got {head.shape}")
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    m = mask.reshape(-1).astype(jnp.float32)
    count = jnp.sum(m)
    if capacity is None or capacity >= h.shape[0]:
        return _chunked_sum(h, head, t, m, tied, chunk), count
    (rows,) = jnp.nonzero(m, size=capacity, fill_value=0)
    kept = (jnp.arange(capacity) < count).astype(jnp.float32)  # fill rows (row 0 again) count for nothing
    gathered = lambda: _chunked_sum(h[rows], head, t[rows], kept * m[rows], tied, chunk)
    every_row = lambda: _chunked_sum(h, head, t, m, tied, chunk)
    return jax.lax.cond(count > capacity, every_row, gathered), count


def _chunked_sum(h, head, t, m, tied: bool, chunk: int):
    """h (R, D), t (R,), m (R,) float -> sum over rows of m * cross-entropy, one chunk of rows at a time."""
    chunk = min(chunk, h.shape[0])
    pad = -h.shape[0] % chunk
    if pad:  # rows of weight 0, so that the chunks tile the rows
        h, t, m = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))
    n = h.shape[0] // chunk
    xs = (h.reshape(n, chunk, -1), t.reshape(n, chunk), m.reshape(n, chunk))

    @jax.checkpoint  # the backward pass recomputes the chunk's logits instead of keeping n of them
    def step(total, x):
        hc, tc, mc = x
        logits = einsum("rd,vd->rv", hc, head) if tied else einsum("rd,dv->rv", hc, head)  # (chunk, V) f32
        return total + token_loss(logits, tc, mc)[0], None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return total
