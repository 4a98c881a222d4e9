"""How the layers run. train.layer_loop: the layers run unrolled (`forward(..., unroll=True)`) give the scan's
logits and LoRA gradients on every family, the lowered program has no loop over the layers, and `auto` picks
unrolling only for bfloat16 on the CPU backend. train.remat: rematerialized layers give the same gradients on
every family and every method, scanned and unrolled, and the backward pass recomputes them: a remat in the
jaxpr, and several times less memory for XLA's temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import bert, llama, t5
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora
from jaxft.backend import resolve

rs = np.random.RandomState(0)
TOKENS = rs.randint(1, 64, (2, 7)).astype(np.int32)
SEGMENTS = np.ones_like(TOKENS)
SEGMENTS[1, 5:] = 0  # a padded row
SPEC = lora.LoraSpec(rank=4, alpha=8.0)


def _lora(base, key=1):
    trainable = lora.init(jax.random.key(key), base, SPEC, lora.target_paths(base, "all-linear"))
    return jax.tree.map(lambda x: x + 0.05, trainable)  # B non-zero: the adapter changes the outputs


def _llama(unroll=False, remat=False):
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
    base = llama.init(jax.random.key(0), cfg)
    return base, lambda b, t: llama.forward(cfg, b, TOKENS, trainable=t, segment_ids=SEGMENTS, lora=SPEC,
                                            unroll=unroll, remat=remat)[0]


def _bert(unroll=False, remat=False):
    cfg = bert.Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, mlp_dim=48, mlm_head=True)
    base = bert.init(jax.random.key(0), cfg)
    return base, lambda b, t: bert.forward(cfg, b, TOKENS, trainable=t, segment_ids=SEGMENTS, lora=SPEC,
                                           unroll=unroll, remat=remat)[0]


def _t5(unroll=False, remat=False):
    cfg = t5.Config(vocab_size=64, dim=32, n_layers=2, n_decoder_layers=3, n_heads=4, head_dim=8, mlp_dim=48,
                    gated=True, act="gelu_new")
    base = t5.init(jax.random.key(0), cfg)
    dec = np.concatenate([np.zeros((2, 1), np.int32), TOKENS[:, :4]], 1)
    return base, lambda b, t: t5.forward(cfg, b, TOKENS, dec, enc_segment_ids=SEGMENTS, trainable=t, peft=SPEC,
                                         unroll=unroll, remat=remat)[0]


def _loss_grad(f, base):
    """trainable -> the gradient of a loss in which every logit's gradient differs."""
    return jax.grad(lambda t: jnp.sum(jnp.sin(f(base, t))))


def _assert_grads_equal(expected, actual):
    """Same tree, leaves equal (f32 tolerances), and every expected leaf non-zero (the check can fail)."""
    got = dict(jax.tree_util.tree_leaves_with_path(actual))
    for path, a in jax.tree_util.tree_leaves_with_path(expected):
        assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(got[path], a, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", [_llama, _bert, _t5], ids=["llama", "bert", "t5"])
def test_unrolled_layers_equal_the_scan(family):
    base, scanned = family()
    _, unrolled = family(unroll=True)
    trainable = _lora(base)

    out_scan, out_unroll = scanned(base, trainable), unrolled(base, trainable)
    np.testing.assert_allclose(out_unroll, out_scan, atol=1e-5, rtol=1e-5)
    assert not np.allclose(out_scan, scanned(base, None), atol=1e-3)  # the adapter is in play
    _assert_grads_equal(_loss_grad(scanned, base)(trainable), _loss_grad(unrolled, base)(trainable))

    # The scan lowers to a loop over the layers; unrolled, the program is straight-line.
    assert "while" in jax.jit(scanned).lower(base, trainable).as_text()
    assert "while" not in jax.jit(unrolled).lower(base, trainable).as_text()


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unroll"])
@pytest.mark.parametrize("family", [_llama, _bert, _t5], ids=["llama", "bert", "t5"])
def test_rematerialized_layers_give_the_same_gradients(family, unroll):
    base, plain = family(unroll=unroll)
    _, remat = family(unroll=unroll, remat=True)
    trainable = _lora(base)

    _assert_grads_equal(_loss_grad(plain, base)(trainable), _loss_grad(remat, base)(trainable))
    if not unroll:  # unrolled, the recomputation is a custom_vjp, which the gradient's jaxpr shows expanded
        assert "remat" in str(jax.make_jaxpr(_loss_grad(remat, base))(trainable))
    assert "remat" not in str(jax.make_jaxpr(_loss_grad(plain, base))(trainable))


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unroll"])
def test_rematerialized_layers_save_memory(unroll):
    """What remat is for, scanned and unrolled: XLA's temporaries of the gradient program shrink several-fold.
    Unrolled, `jax.checkpoint` saved nothing here (XLA:CPU ran the recomputation during the forward pass)."""
    cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=512)
    base = llama.init(jax.random.key(0), cfg)
    trainable = lora.init(jax.random.key(1), base, SPEC, lora.target_paths(base, "all-linear"))
    tokens = np.random.RandomState(0).randint(0, 256, (4, 256)).astype(np.int32)

    def temp_mb(remat):
        def loss(t):
            return jnp.sum(llama.forward(cfg, base, tokens, trainable=t, lora=SPEC, unroll=unroll, remat=remat)[0] ** 2)
        return jax.jit(jax.grad(loss)).lower(trainable).compile().memory_analysis().temp_size_in_bytes / 2**20

    plain, remat = temp_mb(False), temp_mb(True)
    assert remat < plain / 3, (plain, remat)  # measured: 228 -> 48 MB scanned, 250 -> 47 MB unrolled


def unrolled(loop, dtype, quantized, backend):
    return resolve(backend, dtype, quantized, loop).unroll_layers


def test_auto_unrolls_only_bf16_on_cpu_without_quantization():
    assert unrolled("auto", jnp.bfloat16, False, "cpu")
    assert not unrolled("auto", jnp.float32, False, "cpu")
    assert not unrolled("auto", jnp.bfloat16, False, "tpu")
    assert not unrolled("auto", jnp.bfloat16, False, "gpu")
    assert unrolled("unroll", jnp.float32, False, "tpu")
    assert not unrolled("scan", jnp.bfloat16, False, "cpu")
    assert not unrolled("auto", jnp.bfloat16, True, "cpu")  # QLoRA keeps its memory saving
    assert unrolled("unroll", jnp.bfloat16, True, "cpu")


def test_unknown_layer_loop_is_named():
    with pytest.raises(ValueError, match=r"train.layer_loop: 'rolled' is not one of auto, scan, unroll"):
        unrolled("rolled", jnp.float32, False, "cpu")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import tiny
    from jaxft import checkpoint

    return checkpoint.load(tiny.llama_dir(tmp_path_factory.mktemp("remat") / "model"))


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "ia3", "full", "partial"])
def test_unrolled_remat_keeps_every_methods_gradients(tiny_llama, method):
    """Unrolled, remat is a custom VJP over each layer (the arrays it closes over turned into arguments):
    every method's trainable tree, soft prompts and prefixes included, gets the plain gradients."""
    import os

    from jaxft import config as config_lib, peft

    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py"),
                             [f"peft.method={method}", "train.seq_len=32", "adapter.size=8", "prefix.length=4", "prompt.length=3",
                              "partial.select=top1", "lora.rank=4", "prefix.init=random"])
    cfg, base = tiny_llama.cfg, tiny_llama.params
    trainable, spec = peft.build(jax.random.key(1), base, config, cfg, tiny_llama.tokenizer)
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # zero-initialized parts (LoRA B) away from zero
    tokens = np.random.RandomState(0).randint(4, 200, (2, 12)).astype(np.int32)

    def grad(remat):
        def loss(t):
            logits = llama.forward(cfg, base, tokens, trainable=t, peft=spec, unroll=True, remat=remat)[0]
            return jnp.sum(jnp.sin(logits))
        return jax.jit(jax.grad(loss))(trainable)

    plain, remat = grad(False), grad(True)
    for path, a in jax.tree_util.tree_leaves_with_path(plain):
        b = dict(jax.tree_util.tree_leaves_with_path(remat))[path]
        np.testing.assert_allclose(b, a, atol=1e-3 * float(np.abs(a).max()) + 1e-6, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(plain)) > 1.0
