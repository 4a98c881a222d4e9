"""`jaxft.models.attention`: every implementation equals the plain one (`xla`, itself the einsum softmax `_plain`
over `layers.attention_mask`), outputs and gradients, on the batches the models build. Splash runs in Pallas
interpret mode and cudnn's call through XLA, as no TPU or GPU is here."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import attention as attention_lib
from jaxft.models.attention import AttentionError, attention
from jaxft.models.layers import NEG_INF, attention_mask

B, N, K, H = 2, 4, 2, 8  # grouped-query: two query heads per key/value head


def _qkv(t, s, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, t, N, H)).astype(dtype), jax.random.normal(kk, (B, s, K, H)).astype(dtype),
            jax.random.normal(kv, (B, s, K, H)).astype(dtype))


def _packed(t):
    """Two examples per row then padding (row 1 packs them differently): segment ids and positions."""
    cuts = [(t // 3, t // 2), (t // 2, t // 4)]
    seg = np.zeros((B, t), np.int32)
    pos = np.zeros((B, t), np.int32)
    for row, (a, b) in enumerate(cuts):
        seg[row, :a], seg[row, a:a + b] = 1, 2
        pos[row, :a], pos[row, a:a + b] = np.arange(a), np.arange(b)
    return jnp.asarray(seg), jnp.asarray(pos)


def _case(name, t=64):
    """(q, k, v, attention keywords, the plain mask (B, T, S) and extra arguments of the plain reference,
    (B, T) rows that see some key)."""
    q, k, v = _qkv(t, t)
    idx = jnp.broadcast_to(jnp.arange(t), (B, t))
    ones = jnp.ones((B, t), jnp.int32)
    if name == "causal":
        return q, k, v, {}, attention_mask(ones, idx, idx, ones, idx, idx, 0), ones
    if name in ("packed", "window"):
        seg, pos = _packed(t)
        window = 5 if name == "window" else 0
        kw = dict(q_segments=seg, k_segments=seg, q_positions=pos, k_positions=pos, window=window,
                  segment_kind="packed")
        return q, k, v, kw, attention_mask(seg, pos, idx, seg, pos, idx, window), seg
    if name == "soft_prompt":  # 4 soft-prompt keys (segment -1) before two packed examples
        seg, pos = _packed(t)
        seg = seg.at[:, :4].set(-1)
        kw = dict(q_segments=seg, k_segments=seg, q_positions=pos, k_positions=pos, window=0)
        return q, k, v, kw, attention_mask(seg, pos, idx, seg, pos, idx, 0), seg
    if name == "cache":  # T = 16 new tokens at slots 24..39 of a 64-slot cache whose slots 40.. are empty
        t_new, index = 16, 24
        q = q[:, :t_new]
        q_idx = jnp.broadcast_to(index + jnp.arange(t_new), (B, t_new))
        k_seg = (idx < index + t_new).astype(jnp.int32)
        kw = dict(q_segments=jnp.ones((B, t_new), jnp.int32), k_segments=k_seg, q_positions=q_idx,
                  k_positions=idx, q_index=q_idx, k_index=idx, window=20, block_q=8, block_k=16)
        mask = attention_mask(jnp.ones((B, t_new), jnp.int32), q_idx, q_idx, k_seg, idx, idx, 20)
        return q, k, v, kw, mask, jnp.ones((B, t_new), jnp.int32)
    raise ValueError(name)


def _plain(q, k, v, mask):
    """The plain arithmetic: q (B, T, N, H), k/v (B, S, K, H), mask (B, T, S) -> (B, T, N, H)."""
    b, t, n, h = q.shape
    q = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, NEG_INF), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _compare(f, g_ref, args, rows, tol):
    """f and g_ref: (q, k, v, ...) -> (B, T, N, H); equal outputs on rows that see a key, and equal gradients
    of a random projection of those rows. Each side is one jitted compilation (value and gradients)."""
    valid = (rows != 0)[..., None, None]
    w = jax.random.normal(jax.random.PRNGKey(9), args[0].shape) * valid

    def run(fn):
        def loss(*a):
            out = fn(*a)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, tuple(range(len(args))), has_aux=True))(*args)
        return out, grads

    (out, grads), (ref, ref_grads) = run(f), run(g_ref)
    np.testing.assert_allclose(np.asarray(out * valid, np.float32), np.asarray(ref * valid, np.float32),
                               atol=tol, rtol=tol)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["causal", "packed", "window", "soft_prompt", "cache"])
def test_xla_is_todays_arithmetic_and_chunked_equals_it(name):
    q, k, v, kw, mask, rows = _case(name)
    kw = {"block_q": 16, "block_k": 16, **kw}
    np.testing.assert_array_equal(attention(q, k, v, impl="xla", **kw), _plain(q, k, v, mask))
    _compare(lambda q, k, v: attention(q, k, v, impl="chunked", **kw),
             lambda q, k, v: attention(q, k, v, impl="xla", **kw), (q, k, v), rows, 1e-5)


def test_chunked_equals_plain_in_bfloat16():
    q, k, v, kw, mask, rows = _case("window")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    _compare(lambda q, k, v: attention(q, k, v, impl="chunked", block_q=16, block_k=32, **kw),
             lambda q, k, v: _plain(q, k, v, mask), (q, k, v), rows, 2e-2)


def test_prefix_keys_are_seen_by_every_query_but_padding():
    """Prefix tuning's keys: the plain reference concatenates them with a mask column of 'not padding'."""
    q, k, v, kw, mask, rows = _case("window")
    pk, pv = jax.random.normal(jax.random.PRNGKey(3), (2, B, 5, K, H))
    seen = jnp.broadcast_to((rows != 0)[:, :, None], (B, q.shape[1], 5))

    def plain(q, k, v, pk, pv):
        return _plain(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1),
                      jnp.concatenate([seen, mask], -1))

    valid = (rows != 0)[..., None, None]
    np.testing.assert_allclose(attention(q, k, v, prefix=(pk, pv), **kw) * valid, plain(q, k, v, pk, pv) * valid,
                               atol=1e-6)
    _compare(lambda q, k, v, pk, pv: attention(q, k, v, prefix=(pk, pv), impl="chunked", block_q=16, block_k=16, **kw),
             plain, (q, k, v, pk, pv), rows, 1e-5)


def test_bias_and_its_gradient_t5_style():
    """Unscaled scores plus a (N, T, S) bias, bidirectional, with padding: the bias gets its gradient."""
    q, k, v = _qkv(32, 32)
    seg = jnp.asarray(np.r_[[1] * 27, [0] * 5])[None].repeat(B, 0)
    idx = jnp.broadcast_to(jnp.arange(32), (B, 32))
    mask = attention_mask(seg, idx, idx, seg, idx, idx, 0, causal=False)
    bias = jax.random.normal(jax.random.PRNGKey(4), (N, 32, 32))
    kw = dict(q_segments=seg, k_segments=seg, causal=False, scale=1.0, segment_kind="padding")

    def plain(q, k, v, bias):  # T5's _attend
        scores = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, 2)) + bias
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), -1)
        return jnp.einsum("bnts,bsnh->btnh", probs, jnp.repeat(v, N // K, 2))

    valid = (seg != 0)[..., None, None]
    np.testing.assert_allclose(attention(q, k, v, bias=bias, **kw) * valid, plain(q, k, v, bias) * valid, atol=1e-6)
    _compare(lambda q, k, v, bias: attention(q, k, v, bias=bias, impl="chunked", block_q=8, block_k=16, **kw),
             plain, (q, k, v, bias), seg, 1e-5)


@pytest.mark.parametrize("name,dtype,tol", [("causal", jnp.float32, 1e-5), ("window", jnp.float32, 1e-5),
                                            ("window", jnp.bfloat16, 2e-2)])
def test_splash_in_interpret_mode_equals_plain(name, dtype, tol):
    """Splash's blocks are 128 wide (segment ids need lanes of 128): T = 256, four blocks per call.
    'window' is packed too (segment ids)."""
    q, k, v, kw, mask, rows = _case(name, t=256)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    _compare(lambda q, k, v: attention(q, k, v, impl="splash", interpret=True, block_q=128, block_k=128, **kw),
             lambda q, k, v: _plain(q, k, v, mask), (q, k, v), rows, tol)


def test_cudnn_call_maps_causal_window_and_grouped_heads():
    q, k, v = _qkv(64, 64)
    idx = jnp.broadcast_to(jnp.arange(64), (B, 64))
    ones = jnp.ones((B, 64), jnp.int32)
    mask = attention_mask(ones, idx, idx, ones, idx, idx, 7)
    _compare(lambda q, k, v: attention(q, k, v, window=7, impl="cudnn", interpret=True),
             lambda q, k, v: _plain(q, k, v, mask), (q, k, v), ones, 1e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_what_a_kernel_cannot_express_falls_back_to_chunked_once_in_the_log(impl, caplog):
    q, k, v, kw, mask, rows = _case("soft_prompt")
    attention_lib._reported.clear()
    with caplog.at_level(logging.WARNING, logger="jaxft.models.attention"):
        for _ in range(2):
            out = attention(q, k, v, impl=impl, interpret=True, block_q=16, block_k=16, **kw)
    assert [r.getMessage() for r in caplog.records] == [
        f"attention.impl={impl} cannot express shared soft-prompt segments: using chunked"]
    valid = (rows != 0)[..., None, None]
    np.testing.assert_allclose(out * valid, _plain(q, k, v, mask) * valid, atol=1e-5)


def test_bad_settings_are_one_line_errors():
    q, k, v, kw, _, _ = _case("packed")
    with pytest.raises(AttentionError, match=r"^attention.impl=splash needs a TPU \(the backend is cpu\)"):
        attention(q, k, v, impl="splash", **kw)
    with pytest.raises(AttentionError, match=r"^attention.impl=cudnn cannot keep packed examples apart"):
        attention(q, k, v, impl="cudnn", interpret=True, **kw)
    with pytest.raises(AttentionError, match=r"^attention.block_k=24 does not divide the sequence length 64$"):
        attention(q, k, v, impl="chunked", block_q=16, block_k=24, **kw)
    with pytest.raises(AttentionError, match=r"^attention.impl='flash' is not one of"):
        attention(q, k, v, impl="flash")
    with pytest.raises(AttentionError, match=r"^attention.impl=cudnn needs an NVIDIA GPU \(the backend is tpu\)$"):
        attention(q, k, v, impl="cudnn", backend="tpu")


def test_chunked_backward_does_not_hold_the_scores():
    """XLA's memory analysis of the compiled gradient at T = 4096: the plain attention's temporaries hold the
    (B, N, T, S) float32 scores (here 256 MiB); the chunked one's hold a few (B, N, 512, 512) blocks
    and the inputs and their gradients (19 MB)."""
    shapes = [jax.ShapeDtypeStruct((1, 4096, 4, 64), jnp.float32),
              jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32), jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32)]

    def temp_bytes(impl):
        grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, block_q=512, block_k=512)), (0, 1, 2))
        return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    scores = 4 * 4096 * 4096 * 4
    assert temp_bytes("xla") >= scores
    assert temp_bytes("chunked") < scores / 8


def test_cudnn_padding_falls_back_and_auto_picks_by_backend(caplog):
    """cudnn cannot place padding anywhere in a row (only lengths): chunked runs instead. `auto` on a CPU runs
    the plain attention below AUTO_CHUNKED_KEYS keys."""
    q, k, v = _qkv(32, 32)
    seg = jnp.asarray(np.r_[[0] * 5, [1] * 27])[None].repeat(B, 0)  # left padding
    idx = jnp.broadcast_to(jnp.arange(32), (B, 32))
    mask = attention_mask(seg, idx, idx, seg, idx, idx, 0)
    valid = (seg != 0)[..., None, None]
    attention_lib._reported.clear()
    with caplog.at_level(logging.WARNING, logger="jaxft.models.attention"):
        out = attention(q, k, v, q_segments=seg, k_segments=seg, segment_kind="padding", impl="cudnn", interpret=True)
    assert [r.getMessage() for r in caplog.records] == [
        "attention.impl=cudnn cannot express padding-only segment ids: using chunked"]
    np.testing.assert_allclose(out * valid, _plain(q, k, v, mask) * valid, atol=1e-5)
    np.testing.assert_array_equal(attention(q, k, v, q_segments=seg, k_segments=seg, impl="auto"),
                                  _plain(q, k, v, mask))
