"""The token cross-entropy, the one implementation every loss over token (or class) logits uses.

`token_loss` takes logits; `chunked_cross_entropy` takes the final hidden states and the head's weight instead:
a scan over chunks of `chunk` token rows computes each chunk's (chunk, V) float32 logits and their
`token_loss`, keeping only the running sum; the scan's body is rematerialized, so the backward pass recomputes a
chunk's logits when it needs their gradient. Memory holds one chunk's logits instead of (B, T, V).

The rows that carry a target (loss mask) go first, so the chunks after them, rows without a target only, are
skipped (a `lax.cond`, forward and backward): in SFT the prompt's tokens do not pay for the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.models.layers import einsum


class LossError(ValueError):
    """A loss setting that cannot run."""


def token_loss(logits, targets, mask):
    """logits (..., V), targets (...) int, mask (...) -> (sum of the cross-entropies weighted by mask, sum of
    mask), float32 scalars. Positions off the mask count nothing in the sum, even where their logits are not
    finite (an all-padding row) or their target is no class (-100). (Guarding their gradient too would cost a
    second (..., V) buffer.)"""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    on = mask != 0
    picked = jnp.take_along_axis(logits, jnp.where(on, targets, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(on, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0) * mask), jnp.sum(mask)


def chunked_cross_entropy(hidden, head, targets, mask, *, tied: bool = False, chunk: int = 1024):
    """hidden (B, T, D), head (D, V) or with `tied` the (V, D) embedding table, targets (B, T) int, mask (B, T)
    -> (sum of the masked token cross-entropies, number of masked tokens), both float32 scalars: the same as
    `token_loss` of the logits hidden @ head, without holding them. chunk: token rows per step (capped at B*T;
    the rows are padded up to a multiple of it)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise LossError(f"train.loss_chunk must be a positive integer, got {chunk!r}")
    d = hidden.shape[-1]
    if head.shape[1 if tied else 0] != d:
        raise LossError(f"loss head: expected {'(V, D)' if tied else '(D, V)'} with D={d}, got {head.shape}")
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    m = mask.reshape(-1).astype(jnp.float32)
    order = jnp.argsort(m == 0, stable=True)  # the rows with a target first, in their order
    h, t, m = h[order], t[order], m[order]
    with_target = jnp.sum(m != 0)
    chunk = min(chunk, h.shape[0])
    pad = -h.shape[0] % chunk
    if pad:  # rows of weight 0, so that the chunks tile the rows
        h, t, m = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))
    n = h.shape[0] // chunk
    xs = (jnp.arange(n) * chunk, h.reshape(n, chunk, d), t.reshape(n, chunk), m.reshape(n, chunk))

    def chunk_loss(hc, tc, mc):
        logits = einsum("rd,vd->rv", hc, head) if tied else einsum("rd,dv->rv", hc, head)  # (chunk, V) f32
        return token_loss(logits, tc, mc)[0]

    @jax.checkpoint  # the backward pass recomputes the chunk's logits instead of keeping n of them
    def step(total, x):
        start, hc, tc, mc = x
        skip = lambda *_: jnp.zeros((), jnp.float32)
        return total + jax.lax.cond(start < with_target, chunk_loss, skip, hc, tc, mc), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(m)
