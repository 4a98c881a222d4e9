"""`train.mlp_chunk`: the LLaMA MLP over strided chunks of a row, each under its own checkpoint
(`jaxft.models.llama.chunked_mlp`). The loss and every LoRA gradient equal the whole-row MLP's (float32), in a
rematerialized layer scan; the gradient's jaxpr holds no (T, F) value any more; a bad value is one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import backend, config as config_lib, parallel
from jaxft.config import base as base_config
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=96)
B, T = 2, 32


def _setup():
    base = llama.init(jax.random.key(0), CFG)
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    trainable = lora.init(jax.random.key(1), base, spec, lora.target_paths(base, "all-linear"))
    trainable = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), trainable)
    tokens = jax.random.randint(jax.random.key(3), (B, T), 0, CFG.vocab_size)
    return base, spec, trainable, tokens


def _layout(chunk: int):
    mesh = parallel.make_mesh((1, 1, 1, 1, 1), jax.devices()[:1])
    rules = parallel.rules_from_config(base_config.get_config().rules)
    return parallel.Layout(mesh, rules, backend.Attention("xla"), mlp_chunk=chunk)


def _loss(trainable, base, spec, tokens, layout):
    logits, _ = llama.forward(CFG, base, tokens, trainable=trainable, peft=spec, remat=True, layout=layout)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)


def test_chunked_mlp_equals_the_whole_row_values_and_gradients():
    base, spec, trainable, tokens = _setup()
    grad = jax.value_and_grad(_loss)
    want_loss, want = grad(trainable, base, spec, tokens, _layout(0))
    for chunk in (8, 16):
        got_loss, got = grad(trainable, base, spec, tokens, _layout(chunk))
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=1e-6 * float(jnp.abs(w).max()) + 1e-9)


def test_chunked_mlp_keeps_no_whole_row_intermediate():
    from jaxprs import equations

    base, spec, trainable, tokens = _setup()

    def largest(chunk):
        loss = lambda t: _loss(t, base, spec, tokens, _layout(chunk))  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
        return max(int(np.prod(v.aval.shape)) for e in equations(jaxpr) for v in e.outvars
                   if hasattr(v.aval, "shape") and CFG.mlp_dim in v.aval.shape)

    assert largest(0) == B * T * CFG.mlp_dim  # the whole rows' (B, T, F) intermediates
    assert largest(8) == B * 8 * CFG.mlp_dim  # one chunk's


def test_mlp_chunk_must_divide_the_sequence():
    config = base_config.get_config()
    config.train.seq_len = 256
    config.train.mlp_chunk = 96
    config.train.learning_rate = 1e-4
    with pytest.raises(config_lib.ConfigFileError, match=r"^train.mlp_chunk: 96 does not divide train.seq_len=256$"):
        config_lib.validate(config, require_data=False)
