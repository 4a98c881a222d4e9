"""LoRA's memory in a bf16 step: the adapted layer keeps no float32 (T, out) sum, and dropout's mask comes from
8-bit random integers with a scale matching its real keep rate (bench/README.md, the 8B step at 16k tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.peft import lora
from tests.jaxprs import equations

T, IN, OUT, R = 64, 32, 48, 4


def _layer(dtype, bias=False):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(ks[0], (T, IN)).astype(dtype)
    p = {"w": (jax.random.normal(ks[1], (IN, OUT)) / 4).astype(dtype),
         "lora_a": jax.random.normal(ks[2], (IN, R)) / 4, "lora_b": jax.random.normal(ks[3], (R, OUT)) / 4}
    if bias:
        p["b"] = jax.random.normal(ks[4], (OUT,)).astype(dtype)
    return x, p


def test_bf16_layer_adds_lora_in_the_compute_dtype_as_peft():
    """PEFT's order in bf16: the base output (bias included) and LoRA's term each rounded to bf16, then added;
    no add of float32 (T, out) arrays is left for XLA to keep both operands of."""
    spec = lora.LoraSpec(rank=R, alpha=2.0 * R)  # scaling 2: exact in bf16, as PEFT's `* scaling` is
    x, p = _layer(jnp.bfloat16)  # (a bias is added in float32 to the base matmul's output, in its fusion)
    jaxpr = jax.make_jaxpr(lambda x, p: lora.adapted_linear(spec, x, p))(x, p).jaxpr
    adds = [e for e in equations(jaxpr) if e.primitive.name == "add" and e.outvars[0].aval.shape == (T, OUT)]
    assert [e.outvars[0].aval.dtype for e in adds] == [jnp.bfloat16], \
        "a float32 base output and a float32 LoRA term added: both kept until their sum"

    x, p = _layer(jnp.bfloat16, bias=True)

    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    bf = lambda a: f(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16))  # noqa: E731 (round to bf16)
    xs, w, a, b = f(x), f(p["w"]), f(jnp.asarray(p["lora_a"], jnp.bfloat16)), f(jnp.asarray(p["lora_b"], jnp.bfloat16))
    want = bf(bf(xs @ w + f(p["b"])) + bf(bf(xs @ a) @ b * spec.scaling))
    got = f(lora.adapted_linear(spec, x, p))
    assert lora.adapted_linear(spec, x, p).dtype == jnp.bfloat16
    # float64 products against XLA's float32 accumulation: a rounding boundary may fall between, one bf16 step
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)
    assert np.mean(got == want) > 0.97


@pytest.mark.parametrize("bias", [False, True])
def test_float32_layer_is_the_plain_sum(bias):
    """float32: x @ w (+ b) + s (x @ A) @ B, against float64 numpy."""
    spec = lora.LoraSpec(rank=R, alpha=3.0)
    x, p = _layer(jnp.float32, bias)
    want = np.asarray(x, np.float64) @ np.asarray(p["w"], np.float64) + spec.scaling * (
        np.asarray(x, np.float64) @ np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64))
    if bias:
        want = want + np.asarray(p["b"], np.float64)
    got = lora.adapted_linear(spec, x, p)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_mask_draws_8_bit_integers():
    spec = lora.LoraSpec(rank=R, alpha=8.0, dropout=0.05)
    x, p = _layer(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, p, k: lora.adapted_linear(spec, x, p, k))(x, p, jax.random.PRNGKey(1)).jaxpr
    widths = [e.params["bit_width"] for e in equations(jaxpr) if e.primitive.name == "random_bits"]
    assert widths == [8]


@pytest.mark.parametrize("rate, bits, k", [(0.05, 8, 13), (0.1, 8, 26), (0.5, 8, 128), (0.001, 16, 66)])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_is_unbiased(rate, bits, k, impl):
    """The real drop rate is k / 2^bits (the rounding `lora.dropout` documents) and the kept elements are scaled
    by its inverse keep rate, so the mean of the dropped-out input is the input's."""
    assert lora._dropout_bits(rate) == (bits, k)
    n = 1 << 21
    x = jnp.ones((n,), jnp.float32)
    y = np.asarray(lora.dropout(jax.random.key(3, impl=impl), x, rate))
    kept = y[y != 0]
    np.testing.assert_array_equal(kept, np.float32(2 ** bits / (2 ** bits - k)))
    real = k / 2 ** bits
    sigma = np.sqrt(real * (1 - real) / n)
    assert abs(np.mean(y == 0) - real) < 5 * sigma
    assert abs(y.mean() - 1.0) < 5 * sigma / (1 - real)
    assert abs(real - rate) <= 0.5 / 2 ** bits  # round to nearest
