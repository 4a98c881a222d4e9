"""`layers.einsum`: float32 accumulation forward, and a backward pass that stays in the operands' dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models.layers import einsum
from jaxprs import equations

SPECS = [("...i,io->...o", (2, 5, 8), (8, 6)), ("btd,vd->btv", (2, 3, 8), (7, 8)),
         ("btkgh,bskh->bkgts", (2, 3, 2, 2, 4), (2, 5, 2, 4))]


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_bf16_gradients_equal_the_float32_ones_within_bf16_rounding(spec, sa, sb):
    ka, kb, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    a = jax.random.normal(ka, sa).astype(jnp.bfloat16)
    b = jax.random.normal(kb, sb).astype(jnp.bfloat16)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), a, b).shape
    g = jax.random.normal(kg, out_shape)

    def ours(a, b):
        return jnp.sum(einsum(spec, a, b) * g)

    def reference(a, b):  # the same in float32 from the same bf16 values
        return jnp.sum(jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)) * g)

    assert einsum(spec, a, b).dtype == jnp.float32
    np.testing.assert_array_equal(einsum(spec, a, b), jnp.einsum(spec, a, b, preferred_element_type=jnp.float32))
    da, db = jax.grad(ours, argnums=(0, 1))(a, b)
    ra, rb = jax.grad(reference, argnums=(0, 1))(a, b)
    assert da.dtype == db.dtype == jnp.bfloat16
    # g is rounded to bf16 once and each gradient once: a few bf16 ulps of the largest value
    for got, want in ((da, ra), (db, rb)):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.03 * float(jnp.max(jnp.abs(want))))


def test_backward_dots_keep_bf16_operands():
    """No dot of the backward pass takes a float32 copy of a bf16 operand (what jax's own transpose of a
    mixed-precision einsum does: on CPUs, float32-speed matmuls and a conversion of every frozen weight)."""
    x = jnp.ones((4, 8), jnp.bfloat16)
    w = jnp.ones((8, 6), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(einsum("...i,io->...o", x, w))))(x)
    dots = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_float32_operands_take_the_plain_einsum():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    da = jax.grad(lambda a: jnp.sum(einsum("...i,io->...o", a, b)))(a)
    np.testing.assert_array_equal(da, jnp.full((3, 4), 5.0))
