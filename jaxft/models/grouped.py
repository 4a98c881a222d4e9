"""The grouped matmul of the MoE experts: rows sorted by group (expert), each times its own group's weight, with
the group's LoRA factors applied in the same pass.

  grouped_matmul(x (M, in), w (G, in, out), group_sizes (G,), lora=(a (G, in, R), b (G, R, out), s)) -> (M, out)
  float32: row m of group g (rows sum(group_sizes[:g]) .. sum(group_sizes[:g+1]) - 1) = x[m] @ w[g]
  (+ s * (x[m] @ a[g] in x's dtype) @ b[g]); rows past the last group give zeros.

Two implementations behind one seam, chosen by backend (`impl_for`):
  ragged_dot  `jax.lax.ragged_dot`: XLA's grouped GEMM on GPU and TPU (LoRA: two more ragged products of rank
              R). On CPU, JAX lowers it to a dense product over a masked (G, M, in) copy of x: G times the FLOPs.
  tiled       a loop over tiles of `block` consecutive rows, each for one group: the ceil(size / block) tiles of a
              group own its rows in order, a full block each but the last, which owns the rest and still reads
              `block` rows, ending at the group's end (rows of other groups, computed and dropped). Each tile is one (block, in) x (in, out) product
              plus, with LoRA, its two rank-R products, so a LoRA projection is one loop, not three. Tiles run:
              sum over groups of ceil(size / block) <= ceil(M / block) + G, so at most (1 + G * block / M)
              times the FLOPs of the grouped product (about half that excess on average).
              Its backward pass is written out (`custom_vjp`), transposed (dx^T = w[g] dy^T) so that no weight
              is transposed: one loop gives dx and the LoRA factors' gradients, a second one dw, which XLA drops
              when w is frozen (a quantized w always is: no dw). A quantized w is dequantized one group at a
              time, once per group (a group's tiles are consecutive), so the dense (G, in, out) copy never exists.
              XLA:CPU specifics it is written around (bench/moe_grouped.py measures them): bf16 operands are
              sliced through a uint16 view (`_view`), and every matmul takes untransposed operands.
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
    block = max(8, min(block, -(-x.shape[0] // 8) * 8))  # at most the rows rounded up to 8 (no rows: 8)
    a, b, scale = (None, None, 0.0) if lora is None else lora
    return _tiled(block, float(scale), x, w, a, b, group_sizes.astype(jnp.int32))


def _schedule(group_sizes, m: int, block: int):
    """Group g's tiles: ceil(size / block) of them, tile j (0-based) reading rows start .. start + block - 1
    (0 <= start <= m - block: x has at least block rows) and owning rows lo .. hi - 1 of the group's.
    Returns count (G,) and tile(g, j) -> (start, lo, hi)."""
    ends = jnp.cumsum(group_sizes)

    def tile(g, j):
        lo = ends[g] - group_sizes[g] + j * block
        hi = jnp.minimum(lo + block, ends[g])
        return jnp.clip(hi - block, 0, m - block), lo, hi

    return -(-group_sizes // block), tile


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


def _tile_loop(block, m: int, group_sizes, operands, body, init):
    """Runs body(tile, ops, carry) over the tiles of m (>= block) rows from init, group by group: ops =
    operands(g) (the group's weights, sliced or dequantized once per group), tile = (g, start, owned-row mask
    (block,))."""
    count, tile = _schedule(group_sizes, m, block)

    def group(g, carry):
        ops = operands(g)

        def step(j, carry):
            start, lo, hi = tile(g, j)
            rows = start + jnp.arange(block)
            return body((g, start, (rows >= lo) & (rows < hi)), ops, carry)

        return jax.lax.fori_loop(0, count[g], step, carry)

    return jax.lax.fori_loop(0, group_sizes.shape[0], group, init)


def _operands(dtype, w, a=None, b=None):
    """operands(g) -> (w[g], a[g], b[g]) as dtype (a and b None without LoRA): dense ones sliced from a `_view`,
    a quantized w dequantized."""
    if hasattr(w, "dequantize"):
        get_w = lambda g: jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, g, keepdims=False),
                                       w).dequantize(dtype)
    else:
        view = _view(w)
        get_w = lambda g: _group(view, g, w.dtype, dtype)
    if a is None:
        return lambda g: (get_w(g), None, None)
    av, bv = _view(a), _view(b)
    return lambda g: (get_w(g), _group(av, g, a.dtype, dtype), _group(bv, g, b.dtype, dtype))


def _padded(x, block):
    """x with zero rows appended up to block rows (tiles read block rows)."""
    return jnp.pad(x, ((0, max(block - x.shape[0], 0)), (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tiled(block, scale, x, w, a, b, group_sizes):
    dtype, m = x.dtype, x.shape[0]
    xv = _view(_padded(x, block))

    def body(tile, ops, y):
        g, start, own = tile
        wg, ag, bg = ops
        xt = _rows(xv, start, block, dtype)
        yt = jnp.dot(xt, wg, preferred_element_type=jnp.float32)
        if ag is not None:
            h = jnp.dot(xt, ag, preferred_element_type=jnp.float32).astype(dtype)
            yt = yt + scale * jnp.dot(h, bg, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(y, start, block)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(own[:, None], yt, old), start, 0)

    y = jnp.zeros((max(m, block), w.shape[-1]), jnp.float32)
    return _tile_loop(block, y.shape[0], group_sizes, _operands(dtype, w, a, b), body, y)[:m]


def _tiled_fwd(block, scale, x, w, a, b, group_sizes):
    return _tiled(block, scale, x, w, a, b, group_sizes), (x, w, a, b, group_sizes)


def _tiled_bwd(block, scale, saved, dy):
    """The gradients over the rows of each group g, transposed (dx^T = w[g] dy^T, ...) so that every matmul
    takes w, a and b as they are (a transposed operand makes XLA:CPU run a bf16 matmul in float32, and a
    transposed copy of w costs more than dy^T): dx = dy w[g]^T + (s dy b[g]^T) a[g]^T, da[g] = x^T (s dy b[g]^T),
    db[g] = s (x a[g])^T dy, dw[g] = x^T dy; operands in the forward pass's dtype, accumulated in float32."""
    x, w, a, b, group_sizes = saved
    dtype, m = x.dtype, x.shape[0]
    xp = _padded(x, block)
    mp = xp.shape[0]
    xv = _view(xp)
    dytv = _view(_padded(dy, block).astype(dtype).T)  # (out, M)

    def body(tile, ops, carry):
        dxt, dat, dbt = carry  # dx^T (in, M), da^T (G, R, in), db^T (G, out, R)
        g, start, own = tile
        wg, ag, bg = ops
        dy_t = _rows(dytv, start, block, dtype, axis=1)  # (out, block)
        dx_t = jnp.dot(wg, dy_t, preferred_element_type=jnp.float32)  # (in, block)
        if ag is not None:
            dh_t = scale * jnp.dot(bg, dy_t, preferred_element_type=jnp.float32)
            dh_t = jnp.where(own[None, :], dh_t, 0.0).astype(dtype)  # (R, block), other rows dropped
            dx_t = dx_t + jnp.dot(ag, dh_t, preferred_element_type=jnp.float32)
            xt = _rows(xv, start, block, dtype)
            h = jnp.where(own[:, None], jnp.dot(xt, ag, preferred_element_type=jnp.float32), 0.0).astype(dtype)
            dat = dat.at[g].add(jnp.dot(dh_t, xt, preferred_element_type=jnp.float32))
            dbt = dbt.at[g].add(scale * jnp.dot(dy_t, h, preferred_element_type=jnp.float32))
        old = jax.lax.dynamic_slice_in_dim(dxt, start, block, 1)
        return jax.lax.dynamic_update_slice_in_dim(dxt, jnp.where(own[None, :], dx_t, old), start, 1), dat, dbt

    zeros_t = lambda v: None if v is None else jnp.zeros(jnp.swapaxes(v, -1, -2).shape, jnp.float32)
    init = (jnp.zeros((x.shape[1], mp), jnp.float32), zeros_t(a), zeros_t(b))
    dxt, dat, dbt = _tile_loop(block, mp, group_sizes, _operands(dtype, w, a, b), body, init)
    untranspose = lambda v, like: jnp.swapaxes(v, -1, -2).astype(like.dtype)
    da, db = (None, None) if a is None else (untranspose(dat, a), untranspose(dbt, b))
    dx = dxt[:, :m].T.astype(dtype)
    no_sizes = np.zeros(group_sizes.shape, jax.dtypes.float0)
    if hasattr(w, "dequantize"):  # frozen 4-bit codes and scales: no gradient (zeros of each leaf's kind)
        dw = jax.tree.map(lambda v: np.zeros(v.shape, jax.dtypes.float0) if not jnp.issubdtype(v.dtype, jnp.floating)
                          else jnp.zeros_like(v), w)
        return dx, dw, da, db, no_sizes

    def dw_body(tile, ops, dwt):  # a loop of its own, which XLA drops where w is frozen (LoRA)
        g, start, own = tile
        xt = jnp.where(own[:, None], _rows(xv, start, block, dtype), 0).astype(dtype)
        return dwt.at[g].add(jnp.dot(_rows(dytv, start, block, dtype, axis=1), xt, preferred_element_type=jnp.float32))

    dwt = _tile_loop(block, mp, group_sizes, lambda g: None, dw_body, zeros_t(w))
    return dx, untranspose(dwt, w), da, db, no_sizes


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
