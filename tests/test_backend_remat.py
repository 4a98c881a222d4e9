"""train.remat=auto on the CPU (`jaxft.backend.resolve`): layers rematerialized, in the scan, once a micro-batch
holds CPU_REMAT_TOKENS tokens a device, not below; the run builder counts the tokens each device holds and the
trainer logs the choice. Unrolled remat recomputes LoRA dropout instead of keeping every layer's random bits."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import tiny
from jaxft import backend, config as config_lib, parallel
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora
from jaxft.train import build

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")


def test_cpu_rematerializes_long_steps_in_the_scan_and_short_ones_not():
    n = backend.CPU_REMAT_TOKENS
    short, long = backend.resolve("cpu", jnp.bfloat16, tokens=n - 1), backend.resolve("cpu", jnp.bfloat16, tokens=n)
    assert (short.remat, short.unroll_layers) == (False, True)
    assert (long.remat, long.unroll_layers) == (True, False)
    assert not backend.resolve("cpu", jnp.bfloat16, remat="false", tokens=4 * n).remat  # an explicit value wins
    assert backend.resolve("cpu", jnp.bfloat16, layer_loop="unroll", tokens=n).unroll_layers
    assert backend.resolve("cpu", jnp.bfloat16, remat="true").remat  # scanned too: remat is asked for memory
    assert not backend.resolve("cpu", jnp.bfloat16, remat="true").unroll_layers
    assert backend.resolve("tpu", tokens=1).remat and backend.resolve("gpu", tokens=1).remat


def _config(*extra):
    return config_lib.load(CONFIG, list(extra))


def test_tokens_per_device_counts_one_micro_batch_over_the_axes_that_split_it():
    assert build.tokens_per_device(_config("train.batch_size=8", "train.seq_len=256"), None) == 2048
    accum = _config("train.batch_size=8", "train.grad_accum=4", "train.seq_len=4096")
    assert build.tokens_per_device(accum, None) == 8192
    sizes = {"data": 2, "fsdp": 2, "context": 2, "tensor": 3}  # (no devices: an abstract mesh)
    mesh = AbstractMesh(tuple(sizes.get(a, 1) for a in parallel.MESH_AXES), parallel.MESH_AXES)
    layout = parallel.Layout(mesh, parallel.rules_from_config(_config().rules))
    # rows over data x fsdp, positions over context, not over tensor: 8 rows x 4096 tokens over 8 of 24 devices
    assert build.tokens_per_device(_config("train.batch_size=8", "train.seq_len=4096"), layout) == 4096


def test_the_run_builder_rematerializes_from_the_token_count():
    for rows, t, want in ((1, 4096, True), (1, 2048, False), (8, 256, False), (2, 2048, True)):
        config = _config(f"train.batch_size={rows}", f"train.seq_len={t}")
        m = build.task_model(config, llama, None, None, None, None)
        assert (m.remat, m.unroll) == (want, not want), (rows, t)


def test_the_trainer_logs_the_resolved_choice(tmp_path, monkeypatch, caplog):
    from jaxft.train.loop import train

    monkeypatch.setattr(backend, "CPU_REMAT_TOKENS", 4 * 32)  # this tiny run's tokens: a long step
    model = tiny.llama_dir(tmp_path / "model")
    data = tiny.alpaca_file(tmp_path / "train.jsonl", 8)
    config = config_lib.load(CONFIG, [f"model={model}", f"data.train={data}", "train.batch_size=4",
                                      "train.seq_len=32", "train.steps=1", "train.eval_every=0",
                                      "train.eval_batches=1", "lora.rank=4"])
    with caplog.at_level(logging.INFO, logger="jaxft.train"):
        train(config, tmp_path / "run")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("layers: "))
    assert line.startswith("layers: scanned, rematerialized (train.layer_loop=auto, train.remat=auto;"), line
    assert "128 tokens a device" in line, line


def test_unrolled_remat_recomputes_dropout_instead_of_keeping_its_bits():
    """With LoRA dropout the unrolled rematerialized layers give the plain gradients (same keys), and hold
    little more than without dropout: XLA once merged the recomputed random bits with the forward pass's and
    kept every layer's bits until its backward pass (measured here: 128 MB against 46 without dropout, 91
    now; the plain step 339)."""
    cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=512)
    base = llama.init(jax.random.key(0), cfg)
    tokens = np.random.RandomState(0).randint(0, 256, (4, 256)).astype(np.int32)

    def grad(dropout, remat):
        spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=dropout)
        trainable = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), base, spec,
                                                                lora.target_paths(base, "all-linear")))

        def loss(t):
            out = llama.forward(cfg, base, tokens, trainable=t, lora=spec, unroll=True, remat=remat,
                                rng=jax.random.PRNGKey(3))[0]
            return jnp.sum(jnp.sin(out))
        fn = jax.jit(jax.grad(loss))
        return fn, trainable

    (plain, t), (remat, _) = grad(0.1, False), grad(0.1, True)
    expected, actual = plain(t), remat(t)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        assert np.abs(a).max() > 0
        # (float32 sums over 1,024 tokens in another order; other dropout masks would differ by ~10%)
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())

    def temp_mb(fn, t):
        return fn.lower(t).compile().memory_analysis().temp_size_in_bytes / 2**20

    no_dropout, dropout = temp_mb(*grad(0.0, True)), temp_mb(remat, t)
    assert dropout < no_dropout + 60, (no_dropout, dropout)
