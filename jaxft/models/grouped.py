"""The grouped matmul of the MoE experts: rows sorted by group (expert), each times its own group's weight, with
the group's LoRA factors applied in the same pass.

  grouped_matmul(x (M, in), w (G, in, out), group_sizes (G,), lora=(a (G, in, R), b (G, R, out), s)) -> (M, out)
  in x's dtype: row m of group g (rows sum(group_sizes[:g]) .. sum(group_sizes[:g+1]) - 1) = x[m] @ w[g]
  (+ s * (x[m] @ a[g] in x's dtype) @ b[g]), accumulated in float32 and rounded once; rows past the last group
  give zeros.

Two implementations behind one seam, chosen by backend (`impl_for`):
  ragged_dot  `jax.lax.ragged_dot`: XLA's grouped GEMM on GPU and TPU (LoRA: two more ragged products of rank
              R). On CPU, JAX lowers it to a dense product over a masked (G, M, in) copy of x: G times the FLOPs.
  tiled       a loop over the groups, and in each over tiles of consecutive rows: size // block full tiles of
              `block` rows, then small tiles of block / 4 rows (`small_block`) for the rest, the last of them
              ending at the group's end (rows before it computed again and dropped). Each tile is one
              (n, in) x (in, out) product plus, with LoRA, its two rank-R products, so a LoRA projection is one
              loop, not three. Rows computed: at most M + G * (block / 4 - 1) (about G * block / 8 more than
              M on average). Small tiles multiply at about 85% of a full tile's rate on XLA:CPU.
              Its backward pass is written out (`custom_vjp`): one loop gives dx and the LoRA factors'
              gradients, a second one dw, which XLA drops when w is frozen (a quantized w always is: no dw). A
              quantized w is dequantized one group at a time, once per group (a group's tiles are consecutive),
              so the dense (G, in, out) copy never exists.
              XLA:CPU specifics it is written around (bench/moe_grouped.py measures them): bf16 operands are
              sliced and written through a uint16 view (`_view`), outputs and dx are kept in x's dtype, and no
              large operand is transposed by a copy (dy w^T contracts w's output axis in place).
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
    group_sizes (G,) int32 -> (M, out) in x's dtype (see the module docstring). lora: None or (a (G, in, R),
    b (G, R, out), scale (a Python float)). Matmuls in x's dtype (w, a and b are cast to it), accumulated in
    float32; the LoRA hidden x @ a is rounded to x's dtype before the product with b."""
    if impl == "ragged_dot":
        dot = partial(jax.lax.ragged_dot, group_sizes=group_sizes, preferred_element_type=jnp.float32)
        y = dot(x, as_dense(w, x.dtype))
        if lora is not None:
            a, b, scale = lora
            y = y + scale * dot(dot(x, a.astype(x.dtype)).astype(x.dtype), b.astype(x.dtype))
        return y.astype(x.dtype)
    if impl != "tiled":
        raise ValueError(f"grouped matmul implementation {impl!r}: expected one of {', '.join(IMPLS)}")
    block = max(8, min(block, -(-x.shape[0] // 8) * 8))  # at most the rows rounded up to 8 (no rows: 8)
    a, b, scale = (None, None, 0.0) if lora is None else lora
    return _tiled(block, float(scale), x, w, a, b, group_sizes.astype(jnp.int32))


def small_block(block: int) -> int:
    """The rows of the small tiles that take a group's rows past its last full tile: max(8, block / 4)."""
    return max(8, block // 4 // 8 * 8)


def _schedule(group_sizes, m: int, block: int):
    """Group g's tiles: full = size // block tiles of block rows, tile j reading and owning rows lo + j * block ..
    (lo the group's first row), then small = ceil(r / s) tiles of s = `small_block(block)` rows for the rest of r
    rows (r < block), tile k owning the next s of them (the last one fewer: it reads s rows ending at the
    group's end, 0 <= start <= m - s; x has at least block rows). Returns full (G,), small (G,),
    full_tile(g, j) -> start and small_tile(g, k) -> (start, lo, hi), owning rows lo .. hi - 1."""
    ends = jnp.cumsum(group_sizes)
    full = group_sizes // block
    s = small_block(block)

    def full_tile(g, j):
        return ends[g] - group_sizes[g] + j * block

    def small_tile(g, k):
        lo = ends[g] - group_sizes[g] + full[g] * block + k * s
        return jnp.clip(jnp.minimum(lo, ends[g] - s), 0, m - s), lo, jnp.minimum(lo + s, ends[g])

    return full, -(-(group_sizes % block) // s), full_tile, small_tile


def _view(a):
    """a with 16-bit floats viewed as uint16 (a bitcast), for slicing inside the loop: XLA's CPU compiler slices
    bf16 by converting the whole array to float32 before the loop and each slice back inside it, which costs
    more than the tile's matmul. `_unview` undoes it on the slice."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if jnp.dtype(a.dtype).itemsize == 2 else a


def _unview(a, dtype):
    """A slice of `_view(v)` back in v's dtype."""
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def _rows(view, start, n: int, dtype):
    """n rows from start of `_view(v)`, v of `dtype`."""
    return _unview(jax.lax.dynamic_slice_in_dim(view, start, n), dtype)


def _store(view, rows, start, own, dtype):
    """`view` (`_view` of an array of `dtype`) with rows (n, width), rounded to dtype, written from row start
    where own (n,) is True (own None: all of them)."""
    rows = _view(rows.astype(dtype))
    if own is not None:
        rows = jnp.where(own[:, None], rows, jax.lax.dynamic_slice_in_dim(view, start, rows.shape[0]))
    return jax.lax.dynamic_update_slice_in_dim(view, rows, start, 0)


def _group(view, g, of, dtype):
    """view[g] of `_view(v)`, v of dtype `of`, cast to dtype."""
    return _unview(jax.lax.dynamic_index_in_dim(view, g, keepdims=False), of).astype(dtype)


def _tile_loop(block, m: int, group_sizes, operands, body, init):
    """Runs body(tile, ops, carry) over the tiles of m (>= block) rows from init, group by group: ops =
    operands(g) (the group's weights, sliced or dequantized once per group), tile = (g, start, n, own): n rows
    from start, own None (all owned: a full tile) or the owned-row mask (n,) of a small tile."""
    full, small, full_tile, small_tile = _schedule(group_sizes, m, block)
    s = small_block(block)

    def small_step(g, ops):
        def run(k, carry):
            start, lo, hi = small_tile(g, k)
            rows = start + jnp.arange(s)
            return body((g, start, s, (rows >= lo) & (rows < hi)), ops, carry)
        return run

    def group(g, carry):  # (loops, not conditionals: XLA:CPU copies the carry at every conditional)
        ops = operands(g)
        carry = jax.lax.fori_loop(0, full[g], lambda j, c: body((g, full_tile(g, j), block, None), ops, c), carry)
        return jax.lax.fori_loop(0, small[g], small_step(g, ops), carry)

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


def _dot(a, b, contract=((1,), (0,))):
    """a . b contracting the given axes (default: a plain matmul), accumulated in float32."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


_NT = ((1,), (1,))  # a (n, k) . b (o, k) -> (n, o): b transposed by the contraction, not copied


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tiled(block, scale, x, w, a, b, group_sizes):
    dtype, m = x.dtype, x.shape[0]
    xv = _view(_padded(x, block))

    def body(tile, ops, y):
        g, start, n, own = tile
        wg, ag, bg = ops
        xt = _rows(xv, start, n, dtype)
        yt = _dot(xt, wg)
        if ag is not None:
            yt = yt + scale * _dot(_dot(xt, ag).astype(dtype), bg)
        return _store(y, yt, start, own, dtype)

    y = _view(jnp.zeros((xv.shape[0], w.shape[-1]), dtype))
    return _unview(_tile_loop(block, xv.shape[0], group_sizes, _operands(dtype, w, a, b), body, y), dtype)[:m]


def _tiled_fwd(block, scale, x, w, a, b, group_sizes):
    return _tiled(block, scale, x, w, a, b, group_sizes), (x, w, a, b, group_sizes)


def _tiled_bwd(block, scale, saved, dy):
    """The gradients over the rows of each group g: dx = dy w[g]^T + (s dy b[g]^T) a[g]^T (w, b and a transposed
    by the contraction: XLA:CPU multiplies those at full speed, where a transposed copy of dy or of the weights
    costs more), da[g] = x^T (s dy b[g]^T), db[g] = s (x a[g])^T dy (rank-R operands transposed: a few KiB a
    tile), dw[g] = x^T dy; operands in the forward pass's dtype, accumulated in float32, dx rounded to x's dtype."""
    x, w, a, b, group_sizes = saved
    dtype, m = x.dtype, x.shape[0]
    xp = _padded(x, block)
    mp = xp.shape[0]
    xv, dyv = _view(xp), _view(_padded(dy, block).astype(dtype))

    def body(tile, ops, carry):
        dx, dat, db = carry  # dx (M, in) as `_view`, da^T (G, R, in), db (G, R, out)
        g, start, n, own = tile
        wg, ag, bg = ops
        dy_t = _rows(dyv, start, n, dtype)  # (n, out)
        dx_t = _dot(dy_t, wg, _NT)  # (n, in)
        if ag is not None:
            dh = scale * _dot(dy_t, bg, _NT)  # (n, R)
            dh = (dh if own is None else jnp.where(own[:, None], dh, 0.0)).astype(dtype)  # other groups' rows dropped
            dx_t = dx_t + _dot(dh, ag, _NT)
            xt = _rows(xv, start, n, dtype)
            h = _dot(xt, ag)
            h = (h if own is None else jnp.where(own[:, None], h, 0.0)).astype(dtype)
            dat = dat.at[g].add(_dot(dh.T, xt))
            db = db.at[g].add(scale * _dot(h.T, dy_t))
        return _store(dx, dx_t, start, own, dtype), dat, db

    zeros_t = lambda v: None if v is None else jnp.zeros(jnp.swapaxes(v, -1, -2).shape, jnp.float32)
    init = (_view(jnp.zeros(xp.shape, dtype)), zeros_t(a), None if b is None else jnp.zeros(b.shape, jnp.float32))
    dx, dat, db = _tile_loop(block, mp, group_sizes, _operands(dtype, w, a, b), body, init)
    da, db = (None, None) if a is None else (jnp.swapaxes(dat, -1, -2).astype(a.dtype), db.astype(b.dtype))
    dx = _unview(dx, dtype)[:m]
    no_sizes = np.zeros(group_sizes.shape, jax.dtypes.float0)
    if hasattr(w, "dequantize"):  # frozen 4-bit codes and scales: no gradient (zeros of each leaf's kind)
        dw = jax.tree.map(lambda v: np.zeros(v.shape, jax.dtypes.float0) if not jnp.issubdtype(v.dtype, jnp.floating)
                          else jnp.zeros_like(v), w)
        return dx, dw, da, db, no_sizes

    # dw: a loop of its own, which XLA drops where w is frozen (LoRA). x^T dy with the rows contracted runs slowly
    # on XLA:CPU with either operand transposed by the contraction; dy transposed once, dw^T[g] = dy^T x is a
    # plain product.
    dytv = _view(_padded(dy, block).astype(dtype).T)  # (out, M)

    def dw_body(tile, ops, dwt):
        g, start, n, own = tile
        xt = _rows(xv, start, n, dtype)
        if own is not None:
            xt = jnp.where(own[:, None], xt, 0).astype(dtype)
        dy_t = _unview(jax.lax.dynamic_slice_in_dim(dytv, start, n, 1), dtype)  # (out, n)
        return dwt.at[g].add(_dot(dy_t, xt))

    dwt = _tile_loop(block, mp, group_sizes, lambda g: None, dw_body, zeros_t(w))
    return dx, jnp.swapaxes(dwt, -1, -2).astype(w.dtype), da, db, no_sizes


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
