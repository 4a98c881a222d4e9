"""One attention function, several implementations behind it (`impl`):

  xla      the plain arithmetic: a materialized (B, T, S) mask and softmax (`layers.attention_mask` + einsum);
           the reference every other implementation is tested against.
  chunked  pure-JAX blockwise attention with an online softmax and a recomputing backward pass
           (`jaxft.models.blockwise`): memory grows with T x block, not T x S. Runs everywhere.
  splash   the Pallas TPU splash-attention kernel (causal / sliding-window masks, segment ids, grouped-query
           heads); on a CPU only in Pallas interpret mode (`interpret=True`, for tests).
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` on GPUs: causal and sliding-window masks and
           grouped-query heads, no segment ids.
  auto     splash on TPU, cudnn on GPU, otherwise chunked from AUTO_CHUNKED_KEYS keys on and xla below.

Every family attends through `attention` alone, with the mask given in pieces (segment ids, positions, slots,
window, causality), T5's bias and prefix tuning's keys as arguments; the run's choice (`attention.*` keys)
reaches it on the layout (`jaxft.parallel.Layout.attention`, a `jaxft.backend.Attention`).

With the sequence split over devices (a layout whose rules.seq names mesh axes of C > 1 devices: `mesh.context`),
self-attention runs as ring attention (`jaxft.parallel.context`, its own blockwise arithmetic, whatever `impl`);
what the ring cannot take (a bias, prefix keys, cache slots, queries and keys of different segments or lengths)
runs the chosen implementation on keys XLA gathers, said once in the log.

What a kernel cannot express falls back to `chunked` (said once in the log): an additive bias (T5), prefix
keys (prefix tuning), explicit cache slots (decoding), a traced window, shared soft-prompt keys (splash) and
padding-only segments (cudnn). Packed segments with cudnn are refused: its masks cannot keep examples apart.

The kernels compute causality and windows over slots 0..T-1; positions must advance with the slot inside
every segment (true of every batch jaxft's data pipeline builds), which is why explicit slots fall back.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxft.backend import ATTENTION_IMPLS as IMPLS
from jaxft.backend import Attention
from jaxft.models.blockwise import flash_attention
from jaxft.models.layers import NEG_INF, attention_mask
from jaxft.parallel.context import context_attention, context_size

# What segment ids may hold: 'padding' (0) and one example per row; 'packed' examples (distinct positive ids);
# 'shared' adds negative ids every non-padding query sees (a soft prompt before packed examples).
SEGMENT_KINDS = ("padding", "packed", "shared")
AUTO_CHUNKED_KEYS = 2048
SPLASH_BLOCK = 128  # splash's blocks are multiples of the TPU's 128 lanes
FAR = 1 << 30  # prefix keys sit at slot -FAR and position +FAR: before every query, inside every window

log = logging.getLogger(__name__)
_reported: set = set()


class AttentionError(ValueError):
    """A setting of attention that cannot run (wrong backend, a block size that does not divide)."""


def attention(q, k, v, *, q_segments=None, k_segments=None, q_positions=None, k_positions=None, q_index=None,
              k_index=None, window=0, causal: bool = True, bias=None, prefix=None, scale: float | None = None,
              segment_kind: str = "shared", layout=None, impl: str | None = None, block_q: int | None = None,
              block_k: int | None = None, interpret: bool | None = None, backend: str | None = None):
    """q (B, T, N, H), k/v (B, S, K, H) -> (B, T, N, H) in q's dtype; N a multiple of K (grouped-query).

    q_segments / k_segments (B, T) / (B, S) int: 0 is padding (sees and is seen by nothing), equal ids see each
    other, a negative key id is seen by every non-padding query and a negative query id sees every
    non-padding key (`segment_kind` says which of these occur); None: one example per row.
    q_positions / k_positions (B, T) / (B, S): positions within an example, for `window` (a query sees keys
    less than `window` positions back; 0: no window; an int or a traced scalar).
    q_index / k_index (B, T) / (B, S): slots in the sequence or KV cache, for `causal`; None: 0..T-1 / 0..S-1.
    bias (N, T, S) or (B, N, T, S): added to the scaled scores (T5); with a prefix its last axis may be P + S
    (the prefix's columns first). prefix (pk, pv), each (B, P, K, H): keys and values every non-padding query
    sees, outside causality and windows (prefix tuning).
    scale: of the scores, default 1/sqrt(H). block_q / block_k: of chunked and splash (capped at T / S; must
    divide them). interpret: run splash in Pallas interpret mode and cudnn's call through XLA (tests on CPUs).
    backend: the platform the call is compiled for ('cpu', 'gpu', 'tpu'), default `jax.default_backend()`;
    an ahead-of-time compile for a TPU topology from a CPU host passes 'tpu'.
    layout: a `jaxft.parallel.Layout` whose `attention` gives impl, the blocks, interpret and backend where
    they are not passed (without one, `jaxft.backend.Attention()`'s defaults: impl auto).
    Rows that see no key (padding queries) hold an implementation-defined average of values.
    """
    given = getattr(layout, "attention", None) or Attention()
    impl = given.impl if impl is None else impl
    block_q = given.block_q if block_q is None else block_q
    block_k = given.block_k if block_k is None else block_k
    interpret = given.interpret if interpret is None else interpret
    backend = given.backend if backend is None else backend
    b, t, n, h = q.shape
    s = k.shape[1]
    if impl not in IMPLS:
        raise AttentionError(f"attention.impl={impl!r} is not one of {', '.join(IMPLS)}")
    if segment_kind not in SEGMENT_KINDS:
        raise AttentionError(f"attention segment_kind={segment_kind!r} is not one of {', '.join(SEGMENT_KINDS)}")
    if n % k.shape[2]:
        raise AttentionError(f"attention: {n} query heads are not a multiple of {k.shape[2]} key/value heads")
    chosen, impl = impl, _choose(impl, s, interpret, backend or jax.default_backend())
    block_q, block_k = min(block_q, t), min(block_k, s)
    if chosen in ("chunked", "splash"):
        for name, block, length in (("block_q", block_q, t), ("block_k", block_k, s)):
            if length % block:
                raise AttentionError(f"attention.{name}={block} does not divide the sequence length {length}")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    ring = context_size(layout)
    if ring > 1:
        cannot_ring = [why for why, present in (
            ("an additive bias", bias is not None), ("prefix keys", prefix is not None),
            ("explicit cache slots", q_index is not None or k_index is not None),
            ("cross-attention", s != t or q_segments is not k_segments or q_positions is not k_positions))
            if present]
        if not cannot_ring:
            part = t // ring if t % ring == 0 else t  # (context_attention refuses a split that does not divide)
            return context_attention(q, k, v, layout, q_segments, q_positions, window, causal=causal, scale=scale,
                                     block_q=_divisor(part, min(block_q, part)),
                                     block_k=_divisor(part, min(block_k, part)))
        _report(f"context parallelism (mesh.context) cannot take {', '.join(cannot_ring)}: attention.impl="
                f"{chosen} over gathered keys")

    segments = q_segments is not None or k_segments is not None
    static_window = isinstance(window, (int, np.integer))
    cannot = [why for why, present in (
        ("an additive bias", bias is not None), ("prefix keys", prefix is not None),
        ("explicit cache slots", q_index is not None or k_index is not None),
        ("a traced window", not static_window),
        ("shared soft-prompt segments", segments and segment_kind == "shared"),
        ("padding-only segment ids", impl == "cudnn" and segments and segment_kind == "padding"),
        ("a window without causality", impl == "cudnn" and static_window and not causal and window > 0))
        if present]
    if impl == "cudnn" and segments and segment_kind == "packed" and not cannot:
        if chosen == "cudnn":
            raise AttentionError("attention.impl=cudnn cannot keep packed examples apart (segment ids); use "
                                 "attention.impl=chunked or splash")
        cannot.append("packed segment ids")  # auto: the portable kernel instead of a refusal
    if impl == "splash" and not cannot and (block_q % SPLASH_BLOCK or block_k % SPLASH_BLOCK):  # its lanes
        if chosen == "splash":
            raise AttentionError(f"attention.impl=splash: blocks of {block_q} x {block_k} tokens (attention.block_q"
                                 f" x block_k, capped at the sequence) are not multiples of {SPLASH_BLOCK}")
        cannot.append(f"sequences shorter than {SPLASH_BLOCK} tokens")
    if impl in ("splash", "cudnn") and cannot:
        _report(f"attention.impl={impl} cannot express {', '.join(cannot)}: using chunked")
        impl = "chunked"
    if impl == "splash":
        segs = () if q_segments is None and k_segments is None else tuple(
            jnp.ones((b, length), jnp.int32) if x is None else x.astype(jnp.int32)
            for x, length in ((q_segments, t), (k_segments, s)))
        splash = functools.partial(_splash, window=int(window), causal=causal, scale=scale, block_q=block_q,
                                   block_k=block_k, interpret=interpret)
        return _on_shards(splash, layout, q, k, v, segs)
    if impl == "cudnn":
        return _cudnn(q, k, v, int(window), causal, scale, interpret)

    if impl == "chunked" and chosen != "chunked":  # the caller's blocks were not for chunked: the nearest that fit
        block_q, block_k = _divisor(t, block_q), _divisor(s, block_k)
    q_meta, k_meta = _meta(b, t, q_segments, q_positions, q_index), _meta(b, s, k_segments, k_positions, k_index)
    if prefix is not None:
        k, v, k_meta = _with_prefix(k, v, k_meta, prefix, block_k if impl == "chunked" else 1)
    window = jnp.asarray(window, jnp.int32)
    g = n // k.shape[2]
    if bias is not None:  # -> (1 | B, K, G, T, keys) float32, zeros where the prefix has no bias and for padding
        given = bias.shape[-1]
        bias = jnp.broadcast_to(bias, (bias.shape[0] if bias.ndim == 4 else 1, n, t, given)).astype(jnp.float32)
        bias = bias.reshape(bias.shape[0], k.shape[2], g, t, given)
        zeros = jnp.zeros((*bias.shape[:4], k.shape[1] - given), jnp.float32)
        bias = jnp.concatenate([bias[..., :given - s], zeros, bias[..., given - s:]], -1)
    if impl == "xla":
        return _xla(q, k, v, attention_mask(*q_meta, *k_meta, window, causal), bias, scale)
    out = flash_attention(q.reshape(b, t, k.shape[2], g, h), k, v, bias, q_meta, k_meta, window, causal=causal,
                          scale=scale, block_q=block_q, block_k=block_k)
    return out.reshape(b, t, n, h)


def prefix_of(hooks, p: dict, k, v, q_segments):
    """The keys and values a fine-tuning method puts before a layer's own (prefix tuning: (pk, pv), each
    (B, P, K, H)), or None: the method's `attention_kv` hook asked with none of the layer's keys, so that no
    (B, T, S) mask is built. `attention` lets every non-padding query see them, as the hook's mask does."""
    pk, pv, _ = hooks.attention_kv(p, k[:, :0], v[:, :0], jnp.zeros((*q_segments.shape, 0), bool), q_segments)
    return (pk, pv) if pk.shape[1] else None


def _choose(impl: str, s: int, interpret: bool, backend: str) -> str:
    if impl == "auto":
        return {"tpu": "splash", "gpu": "cudnn"}.get(backend, "chunked" if s >= AUTO_CHUNKED_KEYS else "xla")
    if impl == "splash" and backend != "tpu" and not interpret:
        raise AttentionError(f"attention.impl=splash needs a TPU (the backend is {backend}); on other "
                             "backends only in Pallas interpret mode (interpret=True), for tests")
    if impl == "cudnn" and backend != "gpu" and not interpret:
        raise AttentionError(f"attention.impl=cudnn needs an NVIDIA GPU (the backend is {backend})")
    return impl


def _divisor(length: int, block: int) -> int:
    return max(d for d in range(1, block + 1) if length % d == 0)


def _report(message: str):
    if message not in _reported:
        _reported.add(message)
        log.warning(message)


def _meta(b: int, length: int, segments, positions, index):
    """(segment ids, positions, slots), each (B, length) int32, with the defaults filled in."""
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    index = slots if index is None else jnp.broadcast_to(index, (b, length)).astype(jnp.int32)
    positions = index if positions is None else positions.astype(jnp.int32)
    segments = jnp.ones((b, length), jnp.int32) if segments is None else segments.astype(jnp.int32)
    return segments, positions, index


def _with_prefix(k, v, k_meta, prefix, multiple: int):
    """The P prefix keys put first as shared keys (segment -1) before every slot and inside every window,
    then segment-0 keys (seen by nobody) up to a multiple of `multiple` keys, for the blocks of `chunked`."""
    pk, pv = prefix
    b, p = pk.shape[:2]
    pad = -p % multiple
    seg = jnp.concatenate([jnp.full((b, p), -1, jnp.int32), jnp.zeros((b, pad), jnp.int32)], 1)
    meta = (seg, jnp.full((b, p + pad), FAR, jnp.int32), jnp.full((b, p + pad), -FAR, jnp.int32))
    zeros = jnp.zeros((b, pad, *k.shape[2:]), k.dtype)
    k = jnp.concatenate([pk.astype(k.dtype), zeros, k], 1)
    v = jnp.concatenate([pv.astype(v.dtype), zeros, v], 1)
    return k, v, tuple(jnp.concatenate([m, x], 1) for m, x in zip(meta, k_meta))


def _xla(q, k, v, mask, bias, scale):
    """The plain attention: q (B, T, N, H), k/v (B, S, K, H), mask (B, T, S),
    bias (1 | B, K, G, T, S) float32 or None."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h) if scale == 1.0 / math.sqrt(h) else scores * scale
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, s: int, g: int, window: int, causal: bool, block_q: int, block_k: int,
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas TPU: imported when used
    if window > 0:  # attention_mask's window: q - k < window, i.e. at most window - 1 slots back
        mask = sa.LocalMask((t, s), (window - 1, 0 if causal else None), offset=0)
    else:
        mask = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    sizes = sa.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k, block_q_dkv=block_q,
                          block_kv_dkv=block_k, block_kv_dkv_compute=block_k, block_q_dq=block_q,
                          block_kv_dq=block_k)
    with jax.ensure_compile_time_eval():  # the kernel's mask tables: concrete arrays, not a trace's (cached)
        return sa.make_splash_mqa_single_device(sa.MultiHeadMask([mask] * g), block_sizes=sizes,
                                                interpret=interpret)


def _on_shards(fn, layout, q, k, v, segments: tuple):
    """fn(q, k, v, segments) on each device's rows and heads of `layout`'s mesh (`jax.shard_map`): XLA cannot
    partition a Pallas (Mosaic) kernel itself. Without a layout, fn(q, k, v, segments)."""
    if layout is None:
        return fn(q, k, v, segments)
    q_spec = layout.spec(("batch", "seq", "heads", "head_dim"), q.shape, "attention q")
    kv_spec = layout.spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, "attention k/v")
    seg_specs = (P(*q_spec[:2]), P(*kv_spec[:2]))[:len(segments)]
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_specs), out_specs=q_spec,
                         check_vma=False)(q, k, v, segments)


def _splash(q, k, v, segments, *, window, causal, scale, block_q, block_k, interpret):
    """Splash attention, one kernel call per example and key/value head (its grouped-query form, 'mqa');
    segments: () or the (query, key) segment ids."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    kernel = _splash_kernel(t, s, g, window, causal, block_q, block_k, interpret)
    # the kernel does not scale; (B, T, N, H) -> (B, K, G, T, H) and k/v -> (B, K, S, H)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if not segments:
        per_head = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1))
        out = jax.vmap(per_head)(qs, ks, vs)
    else:
        q_seg, k_seg = segments
        per_head = jax.vmap(lambda q1, k1, v1, seg: kernel(q1, k1, v1, segment_ids=seg), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(qs, ks, vs, sa.SegmentIds(q_seg, k_seg))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _cudnn(q, k, v, window, causal, scale, interpret):
    """cuDNN's fused attention; `interpret` runs the same call through XLA (the argument mapping, on CPUs)."""
    local = (window - 1, 0) if window > 0 else None
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, local_window_size=local,
                                       implementation="xla" if interpret else "cudnn")
    return out.astype(q.dtype)
