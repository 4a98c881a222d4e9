"""Context parallelism: self-attention over a sequence split across the mesh axes of the logical axis `seq`.

Each device holds T / C consecutive rows of q, k and v's sequence axis (C: the size of the `context` axis that
rules.seq names). The key/value blocks travel around a ring (`jax.lax.ppermute`, C - 1 hops) while every device
folds each block into its queries with an online softmax; the backward pass (a custom VJP) sends the blocks
around once more, each with its key/value gradient accumulating on the way, and recomputes the scores. Within a
device, scores are computed block_q x block_k at a time. Per device this holds O(T / C) activations and
block_q x block_k scores per head, never the whole K/V nor T x T / C scores: the reason for a ring over an
all-gather of k/v (figures in bench/context_parallel.py).

A (query block, key block) pair in which no query sees any key is skipped (`lax.cond`). Under a causal mask,
with the sequence in order, device i then computes about (i + 1/2) / C of its pairs and the last device sets
the pace; laid out zig-zag (`zigzag`, passed as `slots`), every device computes about the same number.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxft.parallel.rules import Layout, ShardingError

NEG_INF = -1e30  # as jaxft.models.layers: finite, so a row that sees no key (padding) averages values, not NaN


def context_attention(q, k, v, layout: Layout, segment_ids=None, positions=None, window=0, *, slots=None,
                      causal=True, scale: float | None = None, block_q: int = 512, block_k: int = 512):
    """Self-attention with the sequence split over the mesh axes that `layout`'s rules.seq names.

    q (B, T, N, H), k/v (B, T, K, H) with N a multiple of K (grouped-query) -> (B, T, N, H) in q's dtype.
    segment_ids (B, T) int: 0 is padding, equal ids see each other (packed examples), a negative key id is
    seen by every non-padding query; None: one example per row. positions (B, T) int: within an example, for
    `window` (a query sees keys less than `window` positions back; 0: no window; int or traced scalar); None:
    0..T-1. slots (B, T) int: where each position sits in the sequence, for causality; None: 0..T-1 (pass
    `zigzag(T, C)`'s order to balance causal work, see there). The mask is `jaxft.models.layers.attention_mask`'s.
    Key blocks that no query of a device sees are skipped, so a row that sees no key at all (padding) holds an
    average of some values, not of all.
    Rows are split as rules.batch says and heads as rules.heads / rules.kv_heads (which must split alike).
    block_q / block_k: queries / keys scored at once within a device (capped at T / C; must divide it): the
    scores held are (B, N, block_q, block_k) float32.
    Raises ShardingError when the context axes do not divide T, or a block does not divide T / C.
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
    blocks = (min(block_q, t // size), min(block_k, t // size))
    for name, given, block in (("block_q", block_q, blocks[0]), ("block_k", block_k, blocks[1])):
        if (t // size) % block:
            raise ShardingError(f"context attention: {name}={given} does not divide the {t // size} positions "
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
    if slots is None:
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    meta = tuple(jnp.broadcast_to(x, (b, t)).astype(jnp.int32) for x in (segment_ids, positions, slots))
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    ring = partial(_ring_attention, axes, size, causal, scale, blocks)
    fn = jax.shard_map(ring, mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec, (row_spec,) * 3, P()),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, meta, jnp.asarray(window, jnp.int32))


def context_size(layout: Layout | None) -> int:
    """C: the number of devices `layout`'s rules.seq splits a sequence over (1 without a layout)."""
    if layout is None:
        return 1
    return math.prod(layout.mesh.shape[a] for a in _axes(layout.spec(("batch", "seq", "heads", "head_dim"))[1]))


def zigzag(t: int, size: int) -> np.ndarray:
    """(T,) int: the order of slots that balances causal attention over `size` devices (zig-zag layout).

    The sequence is cut into 2 * size chunks and device i holds chunks i and 2 size - 1 - i: each device then
    has the same number of (query, key) pairs below the diagonal. To use it, lay every per-token array out as
    x[:, order] (tokens, positions, segment ids, labels) and pass `slots=order`; outputs come back in the same
    order (x[:, argsort(order)] undoes it). Requires 2 * size to divide T; block_q must divide T / (2 size),
    or a query block straddles both chunks and sees nearly every key.
    """
    if t % (2 * size):
        raise ShardingError(f"zig-zag layout: 2 * mesh.context = {2 * size} does not divide the sequence length {t}")
    chunks = np.arange(t).reshape(2 * size, t // (2 * size))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * size - 1 - i]]) for i in range(size)])


def _axes(part) -> tuple[str, ...]:
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def _block_mask(q_seg, q_pos, q_slot, k_seg, k_pos, k_slot, window, causal):
    """(B, Tq, Tk) bool for a block of queries (B, Tq) and a block of keys (B, Tk).

    jaxft.models.layers.attention_mask's rule (this package sits below jaxft.models, so it cannot import it;
    tests/test_context_parallel.py holds the two equal).
    """
    shared = ((k_seg[:, None, :] < 0) & (q_seg[:, :, None] != 0)) | (q_seg[:, :, None] < 0)
    mask = ((q_seg[:, :, None] == k_seg[:, None, :]) | shared) & (k_seg[:, None, :] != 0)
    if causal:
        mask &= k_slot[:, None, :] <= q_slot[:, :, None]
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    return mask & ((window <= 0) | (dist < window))


class _Ring:
    """The local view of one device: its queries cut into blocks, the mask rule, and the ring."""

    def __init__(self, axes, size, causal, scale, blocks, meta, window):
        self.axes, self.size, self.causal, self.scale = axes, size, causal, scale
        self.block_q, self.block_k = blocks
        self.q_meta, self.window = self.cut(meta, self.block_q), window

    @staticmethod
    def cut(xs, block):
        """Arrays (B, T', ...) -> (T' / block, B, block, ...): blocks on a leading axis, for a scan."""
        return tuple(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]).swapaxes(0, 1) for x in xs)

    @staticmethod
    def join(xs, shape):
        """The inverse of `cut`, to `shape`."""
        return tuple(x.swapaxes(0, 1).reshape(shape) for x in xs)

    def rotate(self, *xs):
        """Each array to the next device of the ring (device i's block moves to i + 1)."""
        if not self.axes:
            return xs
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return tuple(jax.lax.ppermute(x, self.axes, perm) for x in xs)

    def scores(self, qb, kb, q_meta, k_meta):
        """Scaled, masked scores (B, K, G, block_q, block_k) float32 of one query block (B, block_q, K, G, H)
        against one key block (B, block_k, K, H), and the mask (B, 1, 1, block_q, block_k)."""
        mask = _block_mask(*q_meta, *k_meta, self.window, self.causal)[:, None, None]
        s = jnp.einsum("btkgh,bskh->bkgts", qb, kb.astype(jnp.float32)) * self.scale
        return jnp.where(mask, s, NEG_INF), mask

    def visible(self, q_meta, k_meta):
        """Whether any query of the block sees any key of the other: blocks that do not are skipped (for a row
        that sees some key, a masked block adds exp(NEG_INF - max) = 0; only a row that sees none, padding,
        would have averaged it in)."""
        return _block_mask(*q_meta, *k_meta, self.window, self.causal).any()


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring_attention(axes, size, causal, scale, blocks, q, k, v, meta, window):
    return _forward(axes, size, causal, scale, blocks, q, k, v, meta, window)[0]


def _forward(axes, size, causal, scale, blocks, q, k, v, meta, window):
    """meta: (segment ids, positions, slots) of the local queries, each (B, T/C); blocks: (block_q, block_k)."""
    b, t, n, h = q.shape
    kh, g = k.shape[2], n // k.shape[2]
    ring = _Ring(axes, size, causal, scale, blocks, meta, window)
    (q5,) = ring.cut((q.reshape(b, t, kh, g, h).astype(jnp.float32),), ring.block_q)

    def fold_pair(acc, qb, q_meta, kb, vb, k_meta):  # one key block into one query block's online softmax
        def update(acc):
            o, m, l = acc
            s, _ = ring.scores(qb, kb, q_meta, k_meta)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            o = o * corr[..., None] + jnp.einsum("bkgts,bskh->bkgth", p, vb.astype(jnp.float32))
            return o, m_new, l * corr + p.sum(-1)

        return jax.lax.cond(ring.visible(q_meta, k_meta), update, lambda acc: acc, acc)

    def fold_key_block(acc, key_block):  # into every query block
        kb, vb, *k_meta = key_block
        return jax.lax.scan(lambda _, x: (None, fold_pair(x[0], x[1], x[2], kb, vb, k_meta)), None,
                            (acc, q5, ring.q_meta))[1], None

    # Checkpointed: inside a rematerialized layer scan, JAX otherwise linearized these loops and kept every
    # block pair's scores for the backward pass (tests/test_memory_remat.py; 115 GiB a chip for the 8B QLoRA
    # step at 32k tokens over mesh.context=2). The custom VJP's backward recomputes them anyway.
    @jax.checkpoint
    def fold(acc, ring_block):  # a ring block, key block by key block
        return jax.lax.scan(fold_key_block, acc, ring.cut(ring_block, ring.block_k))[0]

    def body(carry, _):  # the next block is sent while this one is folded in
        acc, ring_block = carry
        return (fold(acc, ring_block), ring.rotate(*ring_block)), None

    nq = t // ring.block_q
    acc = (jnp.zeros((nq, b, kh, g, ring.block_q, h), jnp.float32),
           jnp.full((nq, b, kh, g, ring.block_q), NEG_INF, jnp.float32), jnp.zeros((nq, b, kh, g, ring.block_q)))
    (acc, ring_block), _ = jax.lax.scan(body, (acc, (k, v, *meta)), None, length=size - 1)
    o, m, l = fold(acc, ring_block)
    out = (o / l[..., None]).transpose(1, 0, 4, 2, 3, 5).reshape(b, t, n, h).astype(q.dtype)
    return out, (q, k, v, meta, window, out, m, l)


def _forward_rule(axes, size, causal, scale, blocks, q, k, v, meta, window):
    return _forward(axes, size, causal, scale, blocks, q, k, v, meta, window)


def _backward(axes, size, causal, scale, blocks, res, d_out):
    q, k, v, meta, window, out, m, l = res
    b, t, n, h = q.shape
    kh, g = k.shape[2], n // k.shape[2]
    ring = _Ring(axes, size, causal, scale, blocks, meta, window)
    q5, do5 = ring.cut(tuple(x.reshape(b, t, kh, g, h).astype(jnp.float32) for x in (q, d_out)), ring.block_q)
    (o5,) = ring.cut((out.reshape(b, t, kh, g, h).astype(jnp.float32),), ring.block_q)
    # D_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax's backward term, per query and head: (nq, B, K, G, block_q).
    delta = jnp.einsum("qbtkgh,qbtkgh->qbkgt", do5, o5)

    def grads_pair(dkv, qb, dob, m, l, delta, q_meta, dq, kb, vb, k_meta):  # one query block x one key block
        def compute(dkv, dq):
            s, mask = ring.scores(qb, kb, q_meta, k_meta)
            p = jnp.exp(s - m[..., None]) / l[..., None]
            dv = jnp.einsum("bkgts,btkgh->bskh", p, dob)
            dp = jnp.einsum("btkgh,bskh->bkgts", dob, vb.astype(jnp.float32))
            ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0) * ring.scale  # masked scores get no gradient
            dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, kb.astype(jnp.float32))
            return (dkv[0] + jnp.einsum("bkgts,btkgh->bskh", ds, qb), dkv[1] + dv), dq

        return jax.lax.cond(ring.visible(q_meta, k_meta), compute, lambda dkv, dq: (dkv, dq), dkv, dq)

    def grads_key_block(dq, key_block):  # its share of every query block's dq, and its own dk / dv
        kb, vb, *k_meta = key_block
        zeros = jnp.zeros(kb.shape, jnp.float32)
        dkv, dq = jax.lax.scan(lambda dkv, x: grads_pair(dkv, *x, kb, vb, k_meta), (zeros, zeros),
                               (q5, do5, m, l, delta, ring.q_meta, dq))
        return dq, dkv

    def grads(dq, ring_block):  # a ring block: dq accumulated, its dk / dv (B, T/C, K, H)
        dq, (dk, dv) = jax.lax.scan(grads_key_block, dq, ring.cut(ring_block, ring.block_k))
        return (dq,) + ring.join((dk, dv), k.shape)

    def body(carry, _):  # k/v and their masks go on to the next device with the gradients gathered so far
        dq, ring_block, dk, dv = carry
        dq, dk_b, dv_b = grads(dq, ring_block)
        ring_block, (dk, dv) = ring.rotate(*ring_block), ring.rotate(dk + dk_b, dv + dv_b)
        return (dq, ring_block, dk, dv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    carry = (jnp.zeros(q5.shape, jnp.float32), (k, v, *meta), zeros, zeros)
    (dq, ring_block, dk, dv), _ = jax.lax.scan(body, carry, None, length=size - 1)
    dq, dk_b, dv_b = grads(dq, ring_block)
    dk, dv = ring.rotate(dk + dk_b, dv + dv_b)  # the last hop brings each block's gradient home
    (dq,) = ring.join((dq,), q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_forward_rule, _backward)
