"""The grouped matmul with LoRA in the same pass (`jaxft.models.grouped`, the CPU's tiled loop) against the dense
per-expert formula and `jax.lax.ragged_dot`: values and gradients w.r.t. the rows, the weight and both factors,
with an empty group and rows past the last group; NF4 experts; DoRA's expert_linear; bfloat16; the tile count."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models.grouped import _schedule, grouped_matmul, small_block
from jaxft.peft.lora import LoraSpec, expert_linear
from jaxft.quant import as_dense, quantize

M, IN, OUT, R = 45, 16, 12, 4
SIZES = np.array([10, 0, 17, 3, 9], np.int32)  # an empty group; the last 6 rows in none
SCALE = 1.5


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    g = len(SIZES)
    return {"x": jax.random.normal(k[0], (M, IN)).astype(dtype), "w": jax.random.normal(k[1], (g, IN, OUT)),
            "a": jax.random.normal(k[2], (g, IN, R)), "b": jax.random.normal(k[3], (g, R, OUT))}, \
        jax.random.normal(k[4], (M, OUT))


def _per_expert(x, w, a, b, scale=SCALE):
    """Every row through its own group's weight, the plain way: (M, out), zeros past the last group."""
    group = np.repeat(np.arange(len(SIZES)), SIZES)
    rows = jnp.arange(len(group))
    y = jnp.einsum("mi,mio->mo", x[rows], w[group]) + scale * jnp.einsum(
        "mr,mro->mo", jnp.einsum("mi,mir->mr", x[rows], a[group]), b[group])
    return jnp.zeros((x.shape[0], w.shape[-1])).at[rows].set(y)


def _value_and_grads(fn, args, cotangent):
    return jax.jit(lambda args: (fn(**args), jax.grad(lambda args: jnp.sum(fn(**args) * cotangent))(args)))(args)


@pytest.mark.parametrize("block", [8, 16, 128])  # several tiles per group / some / one tile for all rows
def test_fused_lora_equals_per_expert_formula_and_ragged_dot(block):
    args, cotangent = _inputs()
    sizes = jnp.asarray(SIZES)
    tiled = lambda x, w, a, b: grouped_matmul(x, w, sizes, "tiled", block, lora=(a, b, SCALE))
    ragged = lambda x, w, a, b: grouped_matmul(x, w, sizes, "ragged_dot", lora=(a, b, SCALE))
    want = _value_and_grads(_per_expert, args, cotangent)
    assert float(jnp.abs(want[1]["b"]).max()) > 1.0 and float(jnp.abs(want[1]["w"]).max()) > 1.0
    for got in (_value_and_grads(tiled, args, cotangent), _value_and_grads(ragged, args, cotangent)):
        assert float(jnp.abs(got[0][sum(SIZES):]).max()) == 0.0 and float(jnp.abs(got[1]["x"][sum(SIZES):]).max()) == 0
        for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(v), atol=1e-5, rtol=1e-5)


def test_nf4_experts_with_lora_equal_their_dequantized_weights():
    args, cotangent = _inputs(1)
    q = quantize(np.asarray(args.pop("w")), "nf4", block_size=8)
    dense = as_dense(q, jnp.float32)
    tiled = lambda x, a, b: grouped_matmul(x, q, jnp.asarray(SIZES), "tiled", 8, lora=(a, b, SCALE))
    want = _value_and_grads(lambda x, a, b: _per_expert(x, dense, a, b), args, cotangent)
    got = _value_and_grads(tiled, args, cotangent)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), atol=1e-5, rtol=1e-5)


def test_dora_expert_linear_tiled_equals_ragged_dot():
    args, cotangent = _inputs(2)
    magnitude = 1.0 + jax.random.uniform(jax.random.PRNGKey(3), (len(SIZES), OUT))
    spec = LoraSpec(rank=R, alpha=6.0, dora=True)

    def fn(impl, x, w, a, b, magnitude):
        p = {"w": w, "lora_a": a, "lora_b": b, "magnitude": magnitude}
        return expert_linear(spec, x, p, jnp.asarray(SIZES), impl)

    args["magnitude"] = magnitude
    want = _value_and_grads(partial(fn, "ragged_dot"), args, cotangent)
    got = _value_and_grads(partial(fn, "tiled"), args, cotangent)
    assert float(jnp.abs(want[1]["magnitude"]).max()) > 0.1
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), atol=1e-5, rtol=1e-5)


def test_bfloat16_rows_equal_ragged_dot():
    """bf16 rows go through the loop as uint16 (`_view`): the same bf16 products as ragged_dot's."""
    args, cotangent = _inputs(4, jnp.bfloat16)
    args["w"] = args["w"].astype(jnp.bfloat16)
    sizes = jnp.asarray(SIZES)
    fn = lambda impl: lambda x, w, a, b: grouped_matmul(x, w, sizes, impl, 8, lora=(a, b, SCALE))
    want = _value_and_grads(fn("ragged_dot"), args, cotangent)
    got = _value_and_grads(fn("tiled"), args, cotangent)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        v = np.asarray(v, np.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32), v, atol=2e-2 * np.abs(v).max(), rtol=2e-2)


@pytest.mark.parametrize("sizes,block", [([10, 0, 17, 3, 9], 8), ([128, 0, 129, 1, 255, 97], 128), ([0, 0], 16),
                                         ([7, 16, 23], 16)])
def test_tiles_partition_each_group(sizes, block):
    """Full tiles, then small ones, own each group's rows exactly once, and read fewer than small_block(block)
    rows beyond those a group owns."""
    m = max(sum(sizes) + 5, block)
    full, small, full_tile, small_tile = _schedule(jnp.asarray(sizes, jnp.int32), m, block)
    s = small_block(block)
    owner, read = np.full(m, -1), 0
    for g in range(len(sizes)):
        assert int(full[g]) == sizes[g] // block and int(small[g]) == -(-(sizes[g] % block) // s)
        tiles = [(int(full_tile(g, j)), int(full_tile(g, j)), int(full_tile(g, j)) + block, block)
                 for j in range(int(full[g]))]
        tiles += [tuple(map(int, small_tile(g, k))) + (s,) for k in range(int(small[g]))]
        for start, lo, hi, n in tiles:
            assert 0 <= start <= lo < hi <= start + n <= m
            assert (owner[lo:hi] == -1).all()
            owner[lo:hi] = g
            read += n
    np.testing.assert_array_equal(owner, np.concatenate([np.repeat(np.arange(len(sizes)), sizes),
                                                         np.full(m - sum(sizes), -1)]))
    assert read <= sum(sizes) + len(sizes) * (s - 1)
