"""Context parallelism: self-attention over a sequence split across the mesh axes of the logical axis `seq`.

Each device holds T / C consecutive positions of q, k and v (C: the size of the `context` mesh axis that
rules.seq names). The key/value blocks travel around a ring (`jax.lax.ppermute`, C - 1 hops) while every device
folds each block into its queries with an online softmax; the backward pass (a custom VJP) sends the blocks
around once more, each with its key/value gradient accumulating on the way, and recomputes the scores. Within a
device, keys are scored `block_k` at a time. Per device this holds O(T / C) activations and (T / C) x block_k
scores per head, never the whole K/V nor T x T / C scores: the reason for a ring over an all-gather of k/v
(figures in bench/context_parallel.py).

Blocks are in sequence order (device i holds positions [i T/C, (i+1) T/C)); under a causal mask the devices
still compute every block (masked ones included), so the work is balanced but about half of it is masked out.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft.parallel.rules import Layout, ShardingError

NEG_INF = -1e30  # as jaxft.models.layers: a fully masked row (padding) averages all values instead of NaN


def context_attention(q, k, v, layout: Layout, segment_ids=None, positions=None, window=0, *, causal=True,
                      scale: float | None = None, block_k: int = 512):
    """Self-attention with the sequence split over the mesh axes that `layout`'s rules.seq names.

    q (B, T, N, H), k/v (B, T, K, H) with N a multiple of K (grouped-query) -> (B, T, N, H) in q's dtype.
    segment_ids (B, T) int: 0 is padding, equal ids see each other (packed examples), a negative key id is
    seen by every non-padding query; None: one example per row. positions (B, T) int: within an example, for
    `window` (a query sees keys less than `window` positions back; 0: no window; int or traced scalar); None:
    0..T-1. Causality is by slot 0..T-1. The same mask as `jaxft.models.layers.attention_mask`.
    Rows are split as rules.batch says and heads as rules.heads / rules.kv_heads (which must split alike).
    block_k: keys scored at once within a device's block (capped at T / C; must divide it): the scores held
    are (B, N, T / C, block_k) float32.
    Raises ShardingError when the context axes do not divide T, or block_k does not divide T / C.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ShardingError(f"context attention: q {q.shape} and k/v {k.shape} / {v.shape} must be (B, T, N, H) "
                            "and (B, T, K, H) with N a multiple of K")
    axes = _axes(layout.spec(("batch", "seq", "heads", "head_dim"))[1])
    size = math.prod(layout.mesh.shape[a] for a in axes)
    if t % size:
        sizes = " * ".join(f"mesh.{a}={layout.mesh.shape[a]}" for a in axes)
        raise ShardingError(f"{sizes} does not divide the sequence length {t} (rules.seq splits it over "
                            f"{', '.join(axes)})")
    block = min(block_k, t // size)
    if (t // size) % block:
        raise ShardingError(f"context attention: block_k={block_k} does not divide the {t // size} positions "
                            f"each device holds (T={t} over {size} devices)")
    q_spec = layout.spec(("batch", "seq", "heads", "head_dim"), q.shape, "context attention q")
    kv_spec = layout.spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, "context attention k/v")
    if q_spec[2] != kv_spec[2]:  # a device's query heads must read the key/value heads it holds
        raise ShardingError(f"context attention: rules.heads ({q_spec[2]}) and rules.kv_heads ({kv_spec[2]}) "
                            "must split heads over the same mesh axes")
    row_spec = P(*q_spec[:2])
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    ring = partial(_ring_attention, axes, size, causal, scale, block)
    fn = jax.shard_map(ring, mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, P()),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
              jnp.asarray(window, jnp.int32))


def _axes(part) -> tuple[str, ...]:
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def _block_mask(q_seg, q_pos, q_idx, k_seg, k_pos, k_idx, window, causal):
    """(B, Tq, Tk) bool for one query block and one key block; *_idx (Tq,) / (Tk,) are slots in the sequence.

    jaxft.models.layers.attention_mask's rule (this package sits below jaxft.models, so it cannot import it;
    tests/test_context_parallel.py holds the two equal).
    """
    shared = (k_seg[:, None, :] < 0) & (q_seg[:, :, None] != 0)
    mask = ((q_seg[:, :, None] == k_seg[:, None, :]) | shared) & (k_seg[:, None, :] != 0)
    if causal:
        mask &= k_idx[None, None, :] <= q_idx[None, :, None]
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    return mask & ((window <= 0) | (dist < window))


class _Ring:
    """The local view of one device: its query block and how to reach the key/value blocks of the others."""

    def __init__(self, axes, size, causal, scale, q, seg, pos, window):
        b, t, n, h = q.shape
        self.axes, self.size, self.causal, self.scale, self.window = axes, size, causal, scale, window
        self.me = jax.lax.axis_index(axes) if axes else 0
        self.seg, self.pos = seg, pos
        self.q_idx = self.me * t + jnp.arange(t)
        self.shape = (b, t, n, h)

    def rotate(self, *xs):
        """Each array to the next device of the ring (device i's block moves to i + 1)."""
        if not self.axes:
            return xs
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return tuple(jax.lax.ppermute(x, self.axes, perm) for x in xs)

    def sub_blocks(self, blocks, step, block):
        """The key sub-blocks of the ring block held at `step`: [(k, v, segments, positions, slots)] stacked on
        a leading axis of T / C / block (for a scan), each k/v (B, block, K, H)."""
        t = self.shape[1]
        src = (self.me - step) % self.size  # the device whose block arrived after `step` hops
        idx = src * t + jnp.arange(t)
        return tuple(x.reshape(x.shape[0], t // block, block, *x.shape[2:]).swapaxes(0, 1) for x in blocks) + (
            idx.reshape(t // block, block),)

    def scores(self, q5, kb, segb, posb, k_idx):
        """Scaled scores (B, K, G, Tq, Tk) float32 of the queries against one key block, and the mask."""
        mask = _block_mask(self.seg, self.pos, self.q_idx, segb, posb, k_idx, self.window,
                           self.causal)[:, None, None]
        s = jnp.einsum("btkgh,bskh->bkgts", q5, kb.astype(jnp.float32)) * self.scale
        return jnp.where(mask, s, NEG_INF), mask


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring_attention(axes, size, causal, scale, block, q, k, v, seg, pos, window):
    return _forward(axes, size, causal, scale, block, q, k, v, seg, pos, window)[0]


def _forward(axes, size, causal, scale, block, q, k, v, seg, pos, window):
    b, t, n, h = q.shape
    kh = k.shape[2]
    ring = _Ring(axes, size, causal, scale, q, seg, pos, window)
    q5 = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)

    def fold_one(acc, sub):  # one key/value sub-block into the online softmax
        o, m, l = acc
        kb, vb, segb, posb, k_idx = sub
        s, _ = ring.scores(q5, kb, segb, posb, k_idx)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        o = o * corr[..., None] + jnp.einsum("bkgts,bskh->bkgth", p, vb.astype(jnp.float32))
        return (o, m_new, l * corr + p.sum(-1)), None

    def fold(acc, blocks, step):  # the ring block held at `step`, sub-block by sub-block
        return jax.lax.scan(fold_one, acc, ring.sub_blocks(blocks, step, block))[0]

    def body(carry, step):  # the next block is sent while this one is folded in
        acc, blocks = carry
        return (fold(acc, blocks, step), ring.rotate(*blocks)), None

    acc = (jnp.zeros((b, kh, n // kh, t, h), jnp.float32), jnp.full((b, kh, n // kh, t), NEG_INF, jnp.float32),
           jnp.zeros((b, kh, n // kh, t), jnp.float32))
    blocks = (k, v, seg, pos)
    (acc, blocks), _ = jax.lax.scan(body, (acc, blocks), jnp.arange(size - 1))
    o, m, l = fold(acc, blocks, size - 1)
    out = (o / l[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
    return out, (q, k, v, seg, pos, window, out, m, l)


def _forward_rule(axes, size, causal, scale, block, q, k, v, seg, pos, window):
    return _forward(axes, size, causal, scale, block, q, k, v, seg, pos, window)


def _backward(axes, size, causal, scale, block, res, d_out):
    q, k, v, seg, pos, window, out, m, l = res
    b, t, n, h = q.shape
    kh = k.shape[2]
    ring = _Ring(axes, size, causal, scale, q, seg, pos, window)
    q5 = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)
    do5 = d_out.reshape(b, t, kh, n // kh, h).astype(jnp.float32)
    # D_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax's backward term, per query and head: (B, K, G, T).
    delta = jnp.einsum("btkgh,btkgh->bkgt", do5, out.reshape(do5.shape).astype(jnp.float32))

    def grads_one(dq, sub):  # one sub-block's share of dq, and its own dk / dv
        kb, vb, segb, posb, k_idx = sub
        s, mask = ring.scores(q5, kb, segb, posb, k_idx)
        p = jnp.exp(s - m[..., None]) / l[..., None]
        dv = jnp.einsum("bkgts,btkgh->bskh", p, do5)
        dp = jnp.einsum("btkgh,bskh->bkgts", do5, vb.astype(jnp.float32))
        ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0) * scale  # masked scores get no gradient
        dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, kb.astype(jnp.float32))
        return dq, (jnp.einsum("bkgts,btkgh->bskh", ds, q5), dv)

    def grads(dq, blocks, step):  # the ring block held at `step`: dq accumulated, dk / dv (B, T/C, K, H)
        dq, (dk, dv) = jax.lax.scan(grads_one, dq, ring.sub_blocks(blocks, step, block))
        return (dq,) + tuple(x.swapaxes(0, 1).reshape(k.shape) for x in (dk, dv))

    def body(carry, step):  # k/v/segments go on to the next device with the gradients gathered so far
        dq, blocks, dk, dv = carry
        dq, dk_b, dv_b = grads(dq, blocks, step)
        blocks, (dk, dv) = ring.rotate(*blocks), ring.rotate(dk + dk_b, dv + dv_b)
        return (dq, blocks, dk, dv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    carry = (jnp.zeros(q5.shape, jnp.float32), (k, v, seg, pos), zeros, zeros)
    (dq, blocks, dk, dv), _ = jax.lax.scan(body, carry, jnp.arange(size - 1))
    dq, dk_b, dv_b = grads(dq, blocks, size - 1)
    dk, dv = ring.rotate(dk + dk_b, dv + dv_b)  # the last hop brings each block's gradient home
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


_ring_attention.defvjp(_forward_rule, _backward)
