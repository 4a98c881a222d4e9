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
            assert not backend.decode_unrolled(p, 64)


def test_cpu_unrolls_bf16_only_without_a_quantized_base():
    assert backend.resolve("cpu", jnp.bfloat16).unroll_layers
    assert not backend.resolve("cpu", jnp.float32).unroll_layers
    assert not backend.resolve("cpu", jnp.bfloat16, quantized=True).unroll_layers
    p = backend.resolve("cpu", jnp.float32)
    assert (backend.decode_unrolled(p, 3), backend.decode_unrolled(p, 4)) == (False, True)
    assert p.tied_head_table_first


def test_accelerators_rematerialize_and_draw_dropout_from_rbg_the_cpu_neither():
    """train.remat=auto: on for GPU / TPU (an 8B LoRA step fits 512 tokens a row without it on a v5e 2x2, 6,144
    with it), off on the CPU for short steps (long ones: tests/test_backend_remat.py); an explicit value wins.
    Dropout bits from rbg on accelerators (compile time)."""
    for name in ("gpu", "tpu"):
        p = backend.resolve(name, jnp.bfloat16)
        assert p.remat and p.prng_impl == "rbg"
        assert not backend.resolve(name, remat="false").remat and not backend.resolve(name, remat=False).remat
    p = backend.resolve("cpu", jnp.bfloat16)
    assert not p.remat and p.prng_impl is None
    assert backend.resolve("cpu", remat="true").remat and backend.resolve("cpu", remat=True).remat
    with pytest.raises(backend.PolicyError, match=r"^train.remat: 'often' is not one of auto, true, false$"):
        backend.resolve("cpu", remat="often")


def test_apply_prng_sets_the_policys_prng_and_the_cpu_keeps_jaxs():
    import jax

    before = jax.config.jax_default_prng_impl
    try:
        backend.apply_prng(backend.resolve("cpu"))
        assert jax.config.jax_default_prng_impl == before
        backend.apply_prng(backend.resolve("tpu"))
        assert jax.random.PRNGKey(0).shape == (4,)  # an rbg key: four 32-bit words (threefry's has two)
    finally:
        jax.config.update("jax_default_prng_impl", before)


def test_the_run_builder_takes_remat_from_the_policy(tmp_path):
    """`jaxft.train.build.task_model`: train.remat=auto is the policy's choice for this backend (the CPU: off)."""
    import os

    from jaxft import config as config_lib
    from jaxft.models import llama
    from jaxft.train import build

    default = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
    for value, want in (("auto", False), ("true", True), ("false", False)):
        config = config_lib.load(default, [f"train.remat={value}"])
        assert build.task_model(config, llama, None, None, None, None).remat is want


def test_explicit_layer_loop_wins_and_bad_values_name_the_key():
    assert backend.resolve("tpu", jnp.float32, layer_loop="unroll").unroll_layers
    assert not backend.resolve("cpu", jnp.bfloat16, layer_loop="scan").unroll_layers
    with pytest.raises(backend.PolicyError, match=r"^train.layer_loop: 'sideways' is not one of auto, scan, unroll$"):
        backend.resolve("cpu", layer_loop="sideways")
    with pytest.raises(backend.PolicyError, match="backend 'metal'"):
        backend.resolve("metal")


def test_aot_reads_the_tpu_compilers_out_of_memory_messages():
    """The two forms XLA's TPU compiler reports a program that does not fit in (the first captured from libtpu
    0.0.42.1 compiling for v5e:2x2 here); `jaxft aot` (jaxft.train.aot) turns them into one line."""
    from jaxft.train.aot import out_of_memory
    new = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (28.00G) "
           "exceeds available HBM (15.75G).")
    old = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.81G "
           "of 15.48G hbm. Exceeded hbm capacity by 5.33G.")
    assert out_of_memory(new) == (28 * 2**30, int(15.75 * 2**30))
    assert out_of_memory(old) == (int(20.81 * 2**30), int(15.48 * 2**30))
    assert out_of_memory("INVALID_ARGUMENT: shapes do not match") is None


def test_generation_follows_the_policy_with_equal_tokens():
    """The CPU policy's choices (tied head as the left operand, split layers from 4 prompts on) give the tokens
    the accelerator policy (neither) gives, and its tied-head logits equal the plain product's."""
    import jax
    import numpy as np

    from jaxft.generate import generate
    from jaxft.models import llama
    from jaxft.models.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      tie_embeddings=True, max_seq_len=64)
    base = llama.init(jax.random.PRNGKey(0), cfg)
    hidden = jax.random.normal(jax.random.PRNGKey(1), (5, 32))
    cpu, tpu = backend.resolve("cpu"), backend.resolve("tpu")
    np.testing.assert_allclose(llama.decode_logits(cfg, base, None, hidden, jnp.float32, cpu),
                               np.asarray(hidden) @ np.asarray(base["embed"]["w"]).T, atol=1e-5)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    assert backend.decode_unrolled(cpu, len(prompts)) and not backend.decode_unrolled(tpu, len(prompts))
    assert (generate(cfg, base, prompts, max_new_tokens=6, policy=cpu)
            == generate(cfg, base, prompts, max_new_tokens=6, policy=tpu))


def test_tpu_steps_generate_each_devices_random_bits_alone():
    """On a TPU the train step is compiled with XLA's per-shard random bits (else every chip generates the
    uint32 bits of every row of each LoRA dropout mask: most of an 8B step's peak, bench/README.md); the
    flag is the TPU compiler's, so no other backend gets it."""
    assert backend.compiler_options("tpu") == {"xla_tpu_spmd_rng_bit_generator_unsafe": True}
    assert backend.compiler_options("gpu") is None and backend.compiler_options("cpu") is None
