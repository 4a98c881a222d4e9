"""The grouped matmul of the MoE experts: rows sorted by group (expert), each times its own group's weight.

  grouped_matmul(x (M, in), w (G, in, out), group_sizes (G,)) -> (M, out) float32,
  row m of group g (rows sum(group_sizes[:g]) .. sum(group_sizes[:g+1]) - 1) = x[m] @ w[g]; rows past the last
  group give zeros.

Two implementations behind one seam, chosen by backend (`impl_for`):
  ragged_dot  `jax.lax.ragged_dot`: XLA's grouped GEMM on GPU and TPU. On CPU, JAX lowers it to a dense product
              over a masked (G, M, in) copy of x: G times the FLOPs (bench/moe_grouped.py has the times).
  tiled       a `lax.scan` over tiles (a block of `block` consecutive rows, one group present in it); each tile
              is one (block, in) x (in, out) product with the rows of other groups masked. Tiles: at most
              ceil(M / block) + G - 1, so (1 + (G - 1) * block / M) times the FLOPs of the grouped product.
              Its backward pass is written out (`custom_vjp`): dx by the same tiles against w[g]^T, dw[g] by
              accumulating x_tile^T dy_tile into g's slot (a quantized w is frozen: no dw). A quantized w is
              dequantized one group slice per tile, so the dense (G, in, out) copy never exists.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant import as_dense

IMPLS = ("ragged_dot", "tiled")
BLOCK = 64  # rows per tile: enough for an efficient CPU matmul, little waste at group edges


def impl_for(backend: str) -> str:
    """The grouped-matmul implementation for a JAX backend name: XLA's grouped GEMM where it has one."""
    return "tiled" if backend == "cpu" else "ragged_dot"


def grouped_matmul(x, w, group_sizes, impl: str = "ragged_dot", block: int = BLOCK):
    """x (M, in) sorted by group, w (G, in, out) dense or a `jaxft.quant.QuantizedWeight` (leading G),
    group_sizes (G,) int32 -> (M, out) float32 (see the module docstring). Matmuls in x's dtype, accumulated
    in float32."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, as_dense(w, x.dtype), group_sizes, preferred_element_type=jnp.float32)
    if impl != "tiled":
        raise ValueError(f"grouped matmul implementation {impl!r}: expected one of {', '.join(IMPLS)}")
    m = x.shape[0]
    block = min(block, -(-m // 8) * 8)
    return _tiled(block, x, w, group_sizes.astype(jnp.int32))


def _schedule(group_sizes, m: int, block: int):
    """Static-length tile list: (tile block index (T,), tile group (T,), valid (T,)), T = ceil(M/block) + G - 1.
    Groups in order; a group covering rows [s, e) has one tile per block it touches."""
    n_groups = group_sizes.shape[0]
    n_tiles = -(-m // block) + n_groups - 1
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // block
    count = jnp.where(group_sizes > 0, (ends - 1) // block - first + 1, 0)
    tile_end = jnp.cumsum(count)
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), n_groups - 1).astype(jnp.int32)
    blk = first[group] + t - (tile_end[group] - count[group])
    valid = t < tile_end[-1]
    return jnp.where(valid, blk, 0), group, valid, starts, ends


def _slice_group(w, g):
    """w[g] of a dense array or of every array of a QuantizedWeight (their leading axis is G)."""
    if hasattr(w, "dequantize"):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, keepdims=False), w)
    return jax.lax.dynamic_index_in_dim(w, g, keepdims=False)


def _tile_loop(block, x, group_sizes, product, out_dim):
    """Σ over tiles of product(x_tile, g) masked to g's rows: (M, out_dim) float32."""
    m = x.shape[0]
    padded = -(-m // block) * block
    xp = jnp.pad(x, ((0, padded - m), (0, 0)))
    blk, group, valid, starts, ends = _schedule(group_sizes, m, block)

    def step(y, tile):
        b, g, ok = tile
        rows = b * block + jnp.arange(block)
        mask = ok & (rows >= starts[g]) & (rows < ends[g])
        xt = jax.lax.dynamic_slice_in_dim(xp, b * block, block)
        yt = jnp.where(mask[:, None], product(xt, g), 0.0)
        return jax.lax.dynamic_update_slice_in_dim(y, jax.lax.dynamic_slice_in_dim(y, b * block, block) + yt,
                                                   b * block, 0), None

    y, _ = jax.lax.scan(step, jnp.zeros((padded, out_dim), jnp.float32), (blk, group, valid))
    return y[:m]


def _dense_of(w, g, dtype):
    wg = _slice_group(w, g)
    return wg.dequantize(dtype) if hasattr(wg, "dequantize") else wg.astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(block, x, w, group_sizes):
    return _tile_loop(block, x, group_sizes,
                      lambda xt, g: jnp.dot(xt, _dense_of(w, g, x.dtype), preferred_element_type=jnp.float32),
                      w.shape[-1])


def _tiled_fwd(block, x, w, group_sizes):
    return _tiled(block, x, w, group_sizes), (x, w, group_sizes)


def _tiled_bwd(block, saved, dy):
    x, w, group_sizes = saved
    dy = dy.astype(x.dtype)
    dx = _tile_loop(block, dy, group_sizes,
                    lambda dyt, g: jnp.dot(dyt, _dense_of(w, g, x.dtype).T, preferred_element_type=jnp.float32),
                    x.shape[-1]).astype(x.dtype)
    if hasattr(w, "dequantize"):  # frozen 4-bit codes and scales: no gradient (zeros of each leaf's kind)
        dw = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                          else jnp.zeros_like(a), w)
        return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)
    m = x.shape[0]
    padded = -(-m // block) * block
    xp = jnp.pad(x, ((0, padded - m), (0, 0)))
    dyp = jnp.pad(dy, ((0, padded - m), (0, 0)))
    blk, group, valid, starts, ends = _schedule(group_sizes, m, block)

    def step(dw, tile):
        b, g, ok = tile
        rows = b * block + jnp.arange(block)
        mask = ok & (rows >= starts[g]) & (rows < ends[g])
        xt = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(xp, b * block, block), 0)
        dyt = jax.lax.dynamic_slice_in_dim(dyp, b * block, block)
        update = jnp.dot(xt.T, dyt, preferred_element_type=jnp.float32)
        return dw.at[g].add(update), None

    dw, _ = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), (blk, group, valid))
    return dx, dw.astype(w.dtype), np.zeros(group_sizes.shape, jax.dtypes.float0)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
