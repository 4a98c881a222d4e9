"""The backend policy: CPU-only speed choices stay on the CPU; GPU and TPU keep the scan and copy nothing."""

import jax.numpy as jnp
import pytest

from jaxft import backend


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_accelerators_keep_the_scan_and_copy_nothing(name):
    for dtype in (jnp.float32, jnp.bfloat16):
        for quantized in (False, True):
            p = backend.resolve(name, dtype, quantized)
            assert not p.unroll_layers and p.decode_unroll_from is None and not p.tied_head_table_first
            assert p.remat and p.prng_impl == "rbg"
            assert not backend.decode_unrolled(p, 64)


def test_cpu_unrolls_bf16_only_without_a_quantized_base():
    assert backend.resolve("cpu", jnp.bfloat16).unroll_layers
    assert not backend.resolve("cpu", jnp.float32).unroll_layers
    assert not backend.resolve("cpu", jnp.bfloat16, quantized=True).unroll_layers
    p = backend.resolve("cpu", jnp.float32)
    assert (backend.decode_unrolled(p, 3), backend.decode_unrolled(p, 4)) == (False, True)
    assert p.tied_head_table_first and not p.remat


def test_explicit_layer_loop_wins_and_bad_values_name_the_key():
    assert backend.resolve("tpu", jnp.float32, layer_loop="unroll").unroll_layers
    assert not backend.resolve("cpu", jnp.bfloat16, layer_loop="scan").unroll_layers
    with pytest.raises(backend.PolicyError, match=r"^train.layer_loop: 'sideways' is not one of auto, scan, unroll$"):
        backend.resolve("cpu", layer_loop="sideways")
    with pytest.raises(backend.PolicyError, match="backend 'metal'"):
        backend.resolve("metal")


def test_aot_reads_the_tpu_compilers_out_of_memory_messages():
    """The two forms XLA's TPU compiler reports a program that does not fit in (the first captured from libtpu
    0.0.42.1 compiling for v5e:2x2 here); `jaxft.parallel.aot` turns them into one line."""
    from jaxft.parallel.aot import out_of_memory
    new = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (28.00G) "
           "exceeds available HBM (15.75G).")
    old = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.81G "
           "of 15.48G hbm. Exceeded hbm capacity by 5.33G.")
    assert out_of_memory(new) == (28 * 2**30, int(15.75 * 2**30))
    assert out_of_memory(old) == (int(20.81 * 2**30), int(15.48 * 2**30))
    assert out_of_memory("INVALID_ARGUMENT: shapes do not match") is None
