"""Context parallelism (`jaxft.parallel.context`) == one device: outputs and gradients of ring attention with the
sequence split over a `context` mesh axis of 2, 4 and 8 simulated CPU devices, alone, with `data` and `tensor`
axes, and as one ring over two mesh axes; on causal, packed (segment ids, padding, a shared soft prompt),
sliding-window, grouped-query, multi-query and bidirectional inputs, with several query and key blocks per device, in
sequence order and in the zig-zag layout. And the one-line errors for an axis that does not divide the
sequence and a key block that does not divide a device's part.

The 8-device part runs once, in a subprocess (`python tests/test_context_parallel.py OUT.json`, with
--xla_force_host_platform_device_count=8), so the rest of the suite keeps its single device.
"""

import json
import sys

import numpy as np
import pytest

# mesh (data, context, tensor) -> the cases run on it; every case runs on context=8 and data=2 x context=4.
MESHES = {(1, 2, 1): ["causal", "packed"], (1, 4, 1): ["causal", "packed", "window", "zigzag"],
          (1, 8, 1): ["causal", "packed", "window", "mqa", "bidirectional", "bf16", "zigzag"],
          (2, 4, 1): ["causal", "packed", "window", "mqa", "bidirectional", "bf16", "zigzag"],
          (2, 2, 2): ["packed", "window"],
          (2, 4, 1, "seq_over_data"): ["packed"]}  # rules.seq = data,context: a ring of 8 over two mesh axes
RUNS = [(m, c) for m, cases in MESHES.items() for c in cases]
T = 16


def _case(name):
    """(kv heads, segment ids, positions, window, causal, dtype) of a case; B=2, T=16, N=4 query heads, H=8."""
    import jax.numpy as jnp

    packed = jnp.array([[1] * 5 + [2] * 7 + [0] * 4,  # two examples, then padding
                        [-1] * 3 + [1] * 9 + [2] * 4])  # a soft prompt every example sees, then two examples
    restart = jnp.array([list(range(5)) + list(range(7)) + [0] * 4, list(range(3)) + list(range(9)) + [0, 1, 2, 3]])
    return {"causal": (2, None, None, 0, True, jnp.float32),
            "packed": (2, packed, restart, 0, True, jnp.float32),
            "window": (2, packed, restart, 3, True, jnp.float32),
            "zigzag": (2, packed, restart, 3, True, jnp.float32),  # laid out by context.zigzag
            "mqa": (1, packed, restart, 5, True, jnp.float32),
            "bidirectional": (4, jnp.array([[1] * 11 + [0] * 5, [1] * 16]), None, 0, False, jnp.float32),
            "bf16": (2, packed, restart, 3, True, jnp.bfloat16)}[name]


def _run(out_path):
    """In the 8-device subprocess: max |ring - plain| of outputs and of the gradients of q, k, v, per run."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    from jaxft.models.attention import attention
    from jaxft.parallel.context import context_attention, zigzag
    from jaxft.parallel.rules import Layout, ShardingError

    def layout(shape):
        seq_over_data = shape[3:] == ("seq_over_data",)
        mesh = jax.make_mesh(shape[:3], ("data", "context", "tensor"), axis_types=(AxisType.Auto,) * 3,
                             devices=jax.devices()[:int(np.prod(shape[:3]))])
        batch, seq = ((), ("data", "context")) if seq_over_data else (("data",), ("context",))
        rules = (("batch", batch), ("seq", seq), ("embed", ()), ("heads", ("tensor",)),
                 ("kv_heads", ("tensor",)), ("head_dim", ()), ("mlp", ()), ("vocab", ()), ("layers", ()),
                 ("lora_rank", ()), ("experts", ()))
        return Layout(mesh, rules)

    def plain(q, k, v, seg, pos, window, causal):
        b, t = q.shape[:2]
        seg = jnp.ones((b, t), jnp.int32) if seg is None else seg
        pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if pos is None else pos
        idx = jnp.broadcast_to(jnp.arange(t), (b, t))
        return attention(q, k, v, q_segments=seg, k_segments=seg, q_positions=pos, k_positions=pos, q_index=idx,
                         k_index=idx, window=window, causal=causal, impl="xla")

    results, reference = {}, {}
    for mesh, name in RUNS:
        kv_heads, seg, pos, window, causal, dtype = _case(name)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q = jax.random.normal(keys[0], (2, T, 4, 8)).astype(dtype)
        k, v = (jax.random.normal(key, (2, T, kv_heads, 8)).astype(dtype) for key in keys[1:3])
        # Padding rows see no key: their outputs are arbitrary averages, and no loss reaches them.
        live = jnp.ones((2, T, 1, 1)) if seg is None else (seg != 0)[:, :, None, None].astype(jnp.float32)
        weights = jax.random.normal(keys[3], (2, T, 4, 8)) * live
        lay = layout(mesh)
        order = zigzag(T, lay.mesh.shape["context"]) if name == "zigzag" else np.arange(T)

        def ring(q, k, v, w):  # in `order`, and back
            seg_, pos_ = (None if x is None else x[:, order] for x in (seg, pos))
            out = context_attention(q[:, order], k[:, order], v[:, order], lay, seg_, pos_, w, causal=causal,
                                    slots=jnp.asarray(order)[None], block_q=2, block_k=2)  # several blocks a device
            return out[:, np.argsort(order)]

        window = jnp.int32(window)  # traced, as the model passes it
        if name not in reference:
            reference[name] = _out_and_grads(lambda q, k, v, w: plain(q, k, v, seg, pos, w, causal), q, k, v,
                                             window, weights)
        got, want = _out_and_grads(ring, q, k, v, window, weights), reference[name]
        out_diff = float(jnp.abs((got[0] - want[0]) * live).max())
        grad_diff = [float(jnp.abs(a - b).max()) for a, b in zip(got[1], want[1])]
        grad_scale = [float(jnp.abs(b).max()) for b in want[1]]
        results["x".join(map(str, mesh)) + "/" + name] = {"out": out_diff, "grads": grad_diff,
                                                          "grad_scale": grad_scale}
    errors = {}
    for shape, t, block_k in (((1, 8, 1), 12, 512), ((2, 4, 1), 18, 512), ((1, 2, 1), 16, 3)):
        q = jnp.zeros((2, t, 4, 8))
        try:
            context_attention(q, q[:, :, :2], q[:, :, :2], layout(shape), block_k=block_k)
            errors["x".join(map(str, shape))] = None
        except ShardingError as e:
            errors["x".join(map(str, shape))] = str(e)
    with open(out_path, "w") as f:
        json.dump({"runs": results, "errors": errors}, f)


def _out_and_grads(attn, q, k, v, window, weights):
    """attn's output and the gradients of sum(output * weights) (a loss that reaches every output), float32."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(q, k, v, window):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, window), q, k, v)
        return out, vjp(weights.astype(out.dtype))

    out, grads = run(q, k, v, window)
    return out.astype(jnp.float32), [g.astype(jnp.float32) for g in grads]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tiny  # (not at the top: this file is also the subprocess's script, which needs no torch)
    return tiny.on_simulated_devices(__file__, tmp_path_factory.mktemp("context") / "results.json")


@pytest.mark.parametrize("mesh,case", RUNS, ids=["x".join(map(str, m)) + "-" + c for m, c in RUNS])
def test_ring_attention_equals_one_device(results, mesh, case):
    got = results["runs"]["x".join(map(str, mesh)) + "/" + case]
    tol = 2e-2 if case == "bf16" else 1e-5
    assert got["out"] <= tol, got
    # Gradients relative to their largest entry (bf16: the plain attention rounds its probabilities to bf16).
    assert all(d <= tol * max(1.0, s) for d, s in zip(got["grads"], got["grad_scale"])), got
    assert min(got["grad_scale"]) > 0.1  # the loss reaches q, k and v


def test_context_axis_must_divide_the_sequence(results):
    assert results["errors"]["1x8x1"] == ("mesh.context=8 does not divide the sequence length 12 "
                                          "(rules.seq splits it over context)")
    assert results["errors"]["2x4x1"].startswith("mesh.context=4 does not divide the sequence length 18")
    assert results["errors"]["1x2x1"] == ("context attention: block_k=3 does not divide the 8 positions each "
                                          "device holds (T=16 over 2 devices)")


def test_block_mask_is_the_models_mask():
    """The ring's mask of one block pair equals jaxft.models.layers.attention_mask on those slots."""
    import jax
    import jax.numpy as jnp

    from jaxft.models.layers import attention_mask
    from jaxft.parallel.context import _block_mask

    seg = jax.random.randint(jax.random.PRNGKey(1), (3, 24), -1, 3)
    pos = jax.random.randint(jax.random.PRNGKey(2), (3, 24), 0, 10)
    idx = jnp.broadcast_to(jnp.arange(24), (3, 24))
    for window, causal in ((0, True), (4, True), (3, False)):
        full = attention_mask(seg, pos, idx, seg, pos, idx, jnp.int32(window), causal)
        for q, k in ((slice(8, 16), slice(16, 24)), (slice(16, 24), slice(0, 8))):
            block = _block_mask(seg[:, q], pos[:, q], idx[:, q], seg[:, k], pos[:, k], idx[:, k],
                                jnp.int32(window), causal)
            np.testing.assert_array_equal(block, full[:, q, k])


def test_zigzag_balances_causal_work():
    from jaxft.parallel.context import zigzag
    from jaxft.parallel.rules import ShardingError

    np.testing.assert_array_equal(zigzag(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    order = zigzag(64, 4).reshape(4, 16)  # device i's slots
    pairs = [int((order[i][:, None] >= np.arange(64)[None]).sum()) for i in range(4)]  # (query, key <= query)
    assert pairs == [pairs[0]] * 4, pairs
    assert sorted(order.ravel()) == list(range(64))
    with pytest.raises(ShardingError, match=r"^zig-zag layout: 2 \* mesh.context = 8 does not divide the "
                                            r"sequence length 12$"):
        zigzag(12, 4)


if __name__ == "__main__":
    _run(sys.argv[1])
