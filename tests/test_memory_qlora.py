"""What the dequantization inside a QLoRA step leaves for XLA to hold (bench/README.md, the long-context trace of
the 8B step compiled for a TPU v5e): the table lookup must not end in an axis of 2 (a TPU's (8, 128) tiles pad
it 64-fold: 3.5 GiB for one 8B MLP weight), and the codes must not be transposed before it (XLA then copied
every layer's codes into a transposed layout ahead of the layer scan). Values: tests/test_quant.py."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant import quantize, weight
from jaxprs import equations


def _eqns(w):  # the lookup GPUs and TPUs compile (`jaxft.backend.per_platform`; the CPU keeps its own)
    return list(equations(jax.make_jaxpr(lambda w: weight._dense_accelerator(w, jnp.bfloat16))(w).jaxpr))


def test_the_lookup_ends_in_no_axis_of_two_and_reads_the_codes_as_stored():
    w = quantize(np.random.RandomState(0).randn(3, 128, 96).astype(np.float32))  # (L, in, out), nested scales
    eqns = _eqns(w)
    lookups = [e for e in eqns if e.primitive.name == "gather" and e.invars[0].aval.shape[:1] == (256,)]  # by byte
    assert lookups and all(e.outvars[0].aval.shape[-1] != 2 for e in lookups), \
        [e.outvars[0].aval.shape for e in lookups]
    assert not [e for e in eqns if e.primitive.name == "transpose" and e.invars[0].aval.dtype == jnp.uint8]


def test_dequantize_equals_the_table_times_the_block_scales():
    """The lookup through the complex table against the invariant of QuantizedWeight, written out in numpy."""
    from jaxft.quant.codebooks import NF4

    w = quantize(np.random.RandomState(1).randn(2, 128, 64).astype(np.float32), double_quant=False)
    codes = np.asarray(w.codes)  # (L, out, in // 2)
    nibbles = np.stack([codes >> 4, codes & 15], -1).reshape(2, 64, 128)  # (L, out, in)
    scale = np.repeat(np.asarray(w.scales), 64, axis=-1)  # (L, out, in)
    want = np.swapaxes(NF4[nibbles] * scale, -1, -2)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), want.astype(np.float32))
    for dense in (weight._dense_cpu, weight._dense_accelerator):  # the CPU's layout and the accelerators'
        np.testing.assert_array_equal(np.asarray(jax.jit(dense, static_argnums=1)(w, jnp.float32)), want)
