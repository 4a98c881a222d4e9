"""The grouped matmul of the MoE experts: rows sorted by group (expert), each times its own group's weight, with
the group's LoRA factors applied in the same pass.

  grouped_matmul(x (M, in), w (G, in, out), group_sizes (G,), lora=(a (G, in, R), b (G, R, out), s)) -> (M, out)
  float32: row m of group g (rows sum(group_sizes[:g]) .. sum(group_sizes[:g+1]) - 1) = x[m] @ w[g]
  (+ s * (x[m] @ a[g] in x's dtype) @ b[g]); rows past the last group give zeros.

Two implementations behind one seam, chosen by backend (`impl_for`):
  ragged_dot  `jax.lax.ragged_dot`: XLA's grouped GEMM on GPU and TPU (LoRA: two more ragged products of rank
              R). On CPU, JAX lowers it to a dense product over a masked (G, M, in) copy of x: G times the FLOPs.
  tiled       a loop over tiles of `block` consecutive rows inside one group: the ceil(size / block) tiles of a
              group own its rows in order, its last (or only) tile ends at the group's last row and reads rows
              before it (or past it) that it computes and drops. Each tile is one (block, in) x (in, out) product
              plus, with LoRA, its two rank-R products, so a LoRA projection is one loop, not three. Tiles run:
              sum over groups of ceil(size / block) <= ceil(M / block) + G, so at most (1 + G * block / M)
              times the FLOPs of the grouped product (about half that excess on average).
              Its backward pass is written out (`custom_vjp`): one loop gives dx (against the transposed
              weights, made once per call) and the LoRA factors' gradients; a second one dw, which XLA drops
              when w is frozen (a quantized w always is: no dw). A quantized w is dequantized one group at a time,
              once per group (a group's tiles are consecutive), so the dense (G, in, out) copy never exists.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant import as_dense

IMPLS = ("ragged_dot", "tiled")
BLOCK = 128  # rows per tile: bench/moe_grouped.py compares 64, 128 and 256 (bench/README.md)


def impl_for(backend: str) -> str:
    """The grouped-matmul implementation for a JAX backend name: XLA's grouped GEMM where it has one."""
    return "tiled" if backend == "cpu" else "ragged_dot"


def grouped_matmul(x, w, group_sizes, impl: str = "ragged_dot", block: int = BLOCK, lora=None):
    """x (M, in) sorted by group, w (G, in, out) dense or a `jaxft.quant.QuantizedWeight` (leading G),
    group_sizes (G,) int32 -> (M, out) float32 (see the module docstring). lora: None or (a (G, in, R),
    b (G, R, out), scale (a Python float)). Matmuls in x's dtype (w, a and b are cast to it), accumulated in
    float32; the LoRA hidden x @ a is rounded to x's dtype before the product with b."""
    if impl == "ragged_dot":
        dot = partial(jax.lax.ragged_dot, group_sizes=group_sizes, preferred_element_type=jnp.float32)
        y = dot(x, as_dense(w, x.dtype))
        if lora is not None:
            a, b, scale = lora
            y = y + scale * dot(dot(x, a.astype(x.dtype)).astype(x.dtype), b.astype(x.dtype))
        return y
    if impl != "tiled":
        raise ValueError(f"grouped matmul implementation {impl!r}: expected one of {', '.join(IMPLS)}")
    block = min(block, -(-x.shape[0] // 8) * 8)
    a, b, scale = (None, None, 0.0) if lora is None else lora
    return _tiled(block, float(scale), x, w, a, b, group_sizes.astype(jnp.int32))


def _schedule(group_sizes, m: int, block: int):
    """The tiles, as arrays over T = ceil(M / block) + G slots of which the first `n` are used: tile t of group
    group[t] reads rows start[t] .. start[t] + block - 1 (0 <= start <= M - block: x has at least block rows)
    and owns rows lo[t] .. hi[t] - 1, its part of the group's rows. Returns (n, group, start, lo, hi)."""
    n_groups = group_sizes.shape[0]
    n_slots = -(-m // block) + n_groups
    ends = jnp.cumsum(group_sizes)
    count = -(-group_sizes // block)  # 0 for an empty group
    tile_end = jnp.cumsum(count)
    t = jnp.arange(n_slots, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), n_groups - 1).astype(jnp.int32)
    lo = ends[group] - group_sizes[group] + (t - tile_end[group] + count[group]) * block
    hi = jnp.minimum(lo + block, ends[group])
    return tile_end[-1], group, jnp.clip(hi - block, 0, m - block), lo, hi


def _view(a):
    """a with 16-bit floats viewed as uint16 (a bitcast), for slicing inside the loop: XLA's CPU compiler slices
    bf16 by converting the whole array to float32 before the loop and each slice back inside it, which costs
    more than the tile's matmul. `_unview` undoes it on the slice."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if jnp.dtype(a.dtype).itemsize == 2 else a


def _unview(a, dtype):
    """A slice of `_view(v)` back in v's dtype."""
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def _rows(view, start, block: int, dtype, axis: int = 0):
    """block rows (or columns, axis 1) from start of `_view(v)`, v of `dtype`."""
    return _unview(jax.lax.dynamic_slice_in_dim(view, start, block, axis), dtype)


def _group(view, g, of, dtype):
    """view[g] of `_view(v)`, v of dtype `of`, cast to dtype."""
    return _unview(jax.lax.dynamic_index_in_dim(view, g, keepdims=False), of).astype(dtype)


def _dequantized(w, g, dtype, transpose: bool):
    """Group g of a QuantizedWeight, dense (in, out), or (out, in) with transpose."""
    wg = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, keepdims=False), w).dequantize(dtype)
    return wg.T if transpose else wg


def _tile_loop(block, m: int, group_sizes, body, init):
    """Runs body(tile, carry) over the tiles in use of m (>= block) rows, tile = (group, start, owned-row mask
    (block,)), from init."""
    n, group, start, lo, hi = _schedule(group_sizes, m, block)

    def step(t, carry):
        rows = start[t] + jnp.arange(block)
        return body((group[t], start[t], (rows >= lo[t]) & (rows < hi[t])), carry)

    return jax.lax.fori_loop(0, n, step, init)


def _weights(w, dtype, transpose: bool):
    """getter(g, cache) -> (w[g] as dtype, (in, out) or transposed, cache'), and the cache's initial value.
    Dense: sliced from a `_view` of w (transposed once here). Quantized: dequantized when the group changes."""
    if not hasattr(w, "dequantize"):
        view = _view(jnp.swapaxes(w, -1, -2) if transpose else w)
        return (lambda g, cache: (_group(view, g, w.dtype, dtype), cache)), ()
    shape = (w.shape[-1], w.shape[-2]) if transpose else w.shape[-2:]

    def get(g, cache):
        cached_g, cached = cache
        wg = jax.lax.cond(g == cached_g, lambda: cached, lambda: _dequantized(w, g, dtype, transpose))
        return wg, (g, wg)

    return get, (jnp.int32(-1), jnp.zeros(shape, dtype))


def _padded(x, block):
    """x with zero rows appended up to block rows (tiles read block rows)."""
    return jnp.pad(x, ((0, max(block - x.shape[0], 0)), (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tiled(block, scale, x, w, a, b, group_sizes):
    dtype, m = x.dtype, x.shape[0]
    xv = _view(_padded(x, block))
    weight, cache = _weights(w, dtype, transpose=False)
    av, bv = (None, None) if a is None else (_view(a), _view(b))

    def body(tile, carry):
        y, cache = carry
        g, start, own = tile
        xt = _rows(xv, start, block, dtype)
        wg, cache = weight(g, cache)
        yt = jnp.dot(xt, wg, preferred_element_type=jnp.float32)
        if a is not None:
            h = jnp.dot(xt, _group(av, g, a.dtype, dtype), preferred_element_type=jnp.float32).astype(dtype)
            yt = yt + scale * jnp.dot(h, _group(bv, g, b.dtype, dtype), preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(y, start, block)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(own[:, None], yt, old), start, 0), cache

    y = jnp.zeros((max(m, block), w.shape[-1]), jnp.float32)
    return _tile_loop(block, y.shape[0], group_sizes, body, (y, cache))[0][:m]


def _tiled_fwd(block, scale, x, w, a, b, group_sizes):
    return _tiled(block, scale, x, w, a, b, group_sizes), (x, w, a, b, group_sizes)


def _tiled_bwd(block, scale, saved, dy):
    """dx = dy w[g]^T (+ (s dy b[g]^T) a[g]^T), da[g] = x^T (s dy b[g]^T), db[g] = (x a[g])^T (s dy), dw[g] =
    x^T dy over the rows of group g, each operand in the forward pass's dtype (s dy rounded as a whole)."""
    x, w, a, b, group_sizes = saved
    dtype, m = x.dtype, x.shape[0]
    xp = _padded(x, block)
    xv, xtv = _view(xp), _view(xp.T)  # x^T (in, M): the factors' gradients as untransposed matmuls
    dyp = _padded(dy, block)
    dyv = _view(dyp.astype(dtype))
    weight_t, cache = _weights(w, dtype, transpose=True)
    lora = a is not None
    if lora:
        dsv = _view((scale * dyp).astype(dtype))
        av, bv = _view(a), _view(b)
        atv, btv = _view(jnp.swapaxes(a, -1, -2)), _view(jnp.swapaxes(b, -1, -2))

    def body(tile, carry):
        dx, da, db, cache = carry
        g, start, own = tile
        wt, cache = weight_t(g, cache)
        dxt = jnp.dot(_rows(dyv, start, block, dtype), wt, preferred_element_type=jnp.float32)
        if lora:
            ds = _rows(dsv, start, block, dtype)
            dh = jnp.dot(ds, _group(btv, g, b.dtype, dtype), preferred_element_type=jnp.float32)
            dh = jnp.where(own[:, None], dh, 0.0).astype(dtype)  # (block, R), other rows dropped
            dxt = dxt + jnp.dot(dh, _group(atv, g, a.dtype, dtype), preferred_element_type=jnp.float32)
            xt_t = _rows(xtv, start, block, dtype, axis=1)  # (in, block)
            ht = jnp.dot(_group(atv, g, a.dtype, dtype), xt_t, preferred_element_type=jnp.float32)
            ht = jnp.where(own[None, :], ht, 0.0).astype(dtype)  # (R, block): x a[g] transposed
            da = da.at[g].add(jnp.dot(xt_t, dh, preferred_element_type=jnp.float32))
            db = db.at[g].add(jnp.dot(ht, ds, preferred_element_type=jnp.float32))
        old = jax.lax.dynamic_slice_in_dim(dx, start, block)
        return jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(own[:, None], dxt, old), start, 0), da, db, cache

    zeros = lambda v: None if v is None else jnp.zeros(v.shape, jnp.float32)
    init = (jnp.zeros(xp.shape, jnp.float32), zeros(a), zeros(b), cache)
    dx, da, db, _ = _tile_loop(block, xp.shape[0], group_sizes, body, init)
    da, db = (None, None) if not lora else (da.astype(a.dtype), db.astype(b.dtype))
    no_sizes = np.zeros(group_sizes.shape, jax.dtypes.float0)
    dx = dx[:m].astype(dtype)
    if hasattr(w, "dequantize"):  # frozen 4-bit codes and scales: no gradient (zeros of each leaf's kind)
        dw = jax.tree.map(lambda v: np.zeros(v.shape, jax.dtypes.float0) if not jnp.issubdtype(v.dtype, jnp.floating)
                          else jnp.zeros_like(v), w)
        return dx, dw, da, db, no_sizes

    def dw_body(tile, dw):  # a loop of its own, which XLA drops where w is frozen (LoRA)
        g, start, own = tile
        xt_t = jnp.where(own[None, :], _rows(xtv, start, block, dtype, axis=1), 0).astype(dtype)
        return dw.at[g].add(jnp.dot(xt_t, _rows(dyv, start, block, dtype), preferred_element_type=jnp.float32))

    dw = _tile_loop(block, xp.shape[0], group_sizes, dw_body, jnp.zeros(w.shape, jnp.float32))
    return dx, dw.astype(w.dtype), da, db, no_sizes


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
