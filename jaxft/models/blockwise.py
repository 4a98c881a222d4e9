"""Blockwise attention in pure JAX (FlashAttention-2's algorithm, written with `lax.map` and `lax.scan`).

The forward pass walks over query blocks and, inside each, over key blocks with an online softmax; it keeps
only the output and the per-row log-sum-exp. Under causality, a block whose keys all come after its queries'
slots is skipped (`lax.cond`), which halves the work of causal self-attention. The backward pass (a custom
VJP) recomputes each block's scores twice, once per query block for dq (and the bias gradient) and once per
key block for dk and dv. No array holds more than (B, N, block_q, block_k) scores, so memory grows with
T x block, not T x S (the bias gradient, when there is a bias, is as large as the bias).

The mask of each block is `jaxft.models.layers.attention_mask` of the block's segment ids, positions and
slots, so every case the plain attention expresses (packing, causality over cache slots, windows, shared
soft-prompt keys) is expressed the same way here. Masked scores are the same finite NEG_INF: a row that sees
no key at all (padding) gets the plain softmax's uniform average over every key.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.layers import NEG_INF, attention_mask

F32 = jnp.float32


def flash_attention(q, k, v, bias, q_meta, k_meta, window, *, causal: bool, scale: float, block_q: int,
                    block_k: int):
    """q (B, T, K, G, H), k/v (B, S, K, H), bias (1 | B, K, G, T, S) float32 or None,
    q_meta / k_meta: (segment ids, positions, slots), each (B, T) / (B, S) int32; window: int32 scalar
    (0: none) -> (B, T, K, G, H) in q's dtype. block_q must divide T and block_k must divide S."""
    return _flash(q, k, v, bias, q_meta, k_meta, window, causal, scale, block_q, block_k)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _scores(qb, kb, bias, qm, km, window, causal, scale):
    """Scaled, biased and masked scores of one block: (B, K, G, bq, bk) float32."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=F32) * scale
    if bias is not None:
        s = s + bias
    mask = attention_mask(*qm, *km, window, causal)  # (B, bq, bk)
    return jnp.where(mask[:, None, None], s, NEG_INF)


def _bias_block(bias, i, bq, j, bk):
    return None if bias is None else _slice(_slice(bias, i * bq, bq, 3), j * bk, bk, 4)


def _skip(causal, q_slots, k_slots, j, bk, update, carry, x):
    """update(carry, x) -> (carry, y), or (carry, zeros like y) where causality hides key block j (of the
    (B, S) k_slots) from every query slot of q_slots (B, bq): its first key comes after the last query in every
    row. A skipped block would add exactly nothing to a row that sees some key, as every key a row sees sits at
    or before its own slot: the block's scores are NEG_INF below a maximum that key sets."""
    if not causal:
        return update(carry, x)
    hidden = jnp.all(_slice(k_slots, j * bk, bk, 1).min(1) > q_slots.max(1))
    nothing = lambda c: (c, jax.tree.map(jnp.zeros_like, jax.eval_shape(update, c, x)[1]))
    return jax.lax.cond(hidden, nothing, lambda c: update(c, x), carry)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, bias, q_meta, k_meta, window, causal, scale, bq, bk):
    return _forward(q, k, v, bias, q_meta, k_meta, window, causal, scale, bq, bk)[0]


def _forward(q, k, v, bias, q_meta, k_meta, window, causal, scale, bq, bk):
    b, t, n_kv, g, h = q.shape
    s_len = k.shape[1]

    def query_block(i):
        qb = _slice(q, i * bq, bq, 1)
        qm = tuple(_slice(m, i * bq, bq, 1) for m in q_meta)

        def update(carry, j):
            m, l, acc = carry
            kb, vb = _slice(k, j * bk, bk, 1), _slice(v, j * bk, bk, 1)
            km = tuple(_slice(x, j * bk, bk, 1) for x in k_meta)
            s = _scores(qb, kb, _bias_block(bias, i, bq, j, bk), qm, km, window, causal, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), vb,
                                                     preferred_element_type=F32)
            return m_new, l * corr + p.sum(-1), acc

        def key_block(carry, j):
            return _skip(causal, qm[2], k_meta[2], j, bk, lambda c, j: (update(c, j), None), carry, j)

        init = (jnp.full((b, n_kv, g, bq), NEG_INF, F32), jnp.zeros((b, n_kv, g, bq), F32),
                jnp.zeros((b, n_kv, g, bq, h), F32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(s_len // bk))
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    # query_block checkpointed: inside a rematerialized layer scan, JAX otherwise linearized these loops and kept
    # every block pair's scores for the backward pass (tests/test_memory_remat.py), which recomputes them anyway.
    # (nq, B, K, G, bq, H), (nq, B, K, G, bq)
    out, lse = jax.lax.map(jax.checkpoint(query_block), jnp.arange(t // bq))
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, n_kv, g, h)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, n_kv, g, t)
    return out, (q, k, v, bias, q_meta, k_meta, window, out, lse)


def _backward(causal, scale, bq, bk, res, do):
    q, k, v, bias, q_meta, k_meta, window, out, lse = res
    b, t, n_kv, g, h = q.shape
    s_len = k.shape[1]
    nq, nk = t // bq, s_len // bk
    # D = rowsum(dO * O), FlashAttention-2's correction term: (B, K, G, T)
    delta = jnp.einsum("btkgh,btkgh->bkgt", do.astype(F32), out.astype(F32))
    do = do.astype(q.dtype)

    def rows(i):
        return (_slice(q, i * bq, bq, 1), _slice(do, i * bq, bq, 1), tuple(_slice(m, i * bq, bq, 1) for m in q_meta),
                _slice(lse, i * bq, bq, 3), _slice(delta, i * bq, bq, 3))

    def cols(j):
        return _slice(k, j * bk, bk, 1), _slice(v, j * bk, bk, 1), tuple(_slice(x, j * bk, bk, 1) for x in k_meta)

    def grads_of_scores(i, j, qb, dob, qm, lse_b, delta_b, kb, vb, km):
        s = _scores(qb, kb, _bias_block(bias, i, bq, j, bk), qm, km, window, causal, scale)
        p = jnp.exp(s - lse_b[..., None])
        dp = jnp.einsum("bqkgh,bskh->bkgqs", dob, vb, preferred_element_type=F32)
        return p, p * (dp - delta_b[..., None])

    def dq_block(i):
        qb, dob, qm, lse_b, delta_b = rows(i)

        def step(dq, j):
            kb, vb, km = cols(j)
            _, ds = grads_of_scores(i, j, qb, dob, qm, lse_b, delta_b, kb, vb, km)
            dq = dq + jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k.dtype), kb, preferred_element_type=F32)
            return dq, (None if bias is None else ds)

        dq, ds = jax.lax.scan(lambda dq, j: _skip(causal, qm[2], k_meta[2], j, bk, step, dq, j),
                              jnp.zeros(qb.shape, F32), jnp.arange(nk))
        return dq * scale, ds

    dq, ds = jax.lax.map(dq_block, jnp.arange(nq))  # (nq, B, bq, K, G, H), (nq, nk, B, K, G, bq, bk)
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(q.shape).astype(q.dtype)
    dbias = None
    if bias is not None:
        dbias = ds.transpose(2, 3, 4, 0, 5, 1, 6).reshape(b, n_kv, g, t, s_len)
        dbias = dbias.sum(0, keepdims=True) if bias.shape[0] == 1 else dbias

    def dkv_block(j):
        kb, vb, km = cols(j)

        def update(carry, i):
            dk, dv = carry
            qb, dob, qm, lse_b, delta_b = rows(i)
            p, ds = grads_of_scores(i, j, qb, dob, qm, lse_b, delta_b, kb, vb, km)
            dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do.dtype), dob, preferred_element_type=F32)
            dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q.dtype), qb, preferred_element_type=F32)
            return dk, dv

        def step(carry, i):
            return _skip(causal, _slice(q_meta[2], i * bq, bq, 1), km[2], 0, bk,
                         lambda c, i: (update(c, i), None), carry, i)

        zero = jnp.zeros(kb.shape, F32)
        (dk, dv), _ = jax.lax.scan(step, (zero, zero), jnp.arange(nq))
        return dk * scale, dv

    dk, dv = jax.lax.map(dkv_block, jnp.arange(nk))  # (nk, B, bk, K, H) each
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape).astype(k.dtype)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape).astype(v.dtype)
    no_grad = partial(jax.tree.map, lambda x: np.zeros(x.shape, jax.dtypes.float0))
    return dq, dk, dv, dbias, no_grad(q_meta), no_grad(k_meta), no_grad(window)


_flash.defvjp(_forward, _backward)
