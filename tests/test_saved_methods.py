"""Every (family, method) adapter that can be saved loads back and continues training (`peft.init_from`) as
the very tree that was saved, checked against each family's base by the method's own layout; and a T5 run that
used bottleneck adapters continues, its model computing what the saved run computed. Tiny jaxft-initialized
models; no training (the saved trees are perturbed so that no leaf is at its initial value)."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import config as config_lib, tree
from jaxft import peft
from jaxft.models import bert, llama, t5
from jaxft.models.config import LlamaConfig
from jaxft.peft import PeftError, sources
from jaxft.peft import io as adapter_io

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
SMALL = ["train.seq_len=8", "adapter.size=4", "prefix.length=2", "prompt.length=2", "partial.select=top1",
         "prefix.init=random", "prompt.init=random", "lora.rank=2", "lora.dora=true"]
CONFIGS = {
    "llama": LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=24,
                         max_seq_len=32),
    "bert": bert.Config(vocab_size=32, dim=16, n_layers=2, n_heads=4, mlp_dim=24, max_seq_len=32),
    "t5": t5.Config(vocab_size=32, dim=16, n_layers=2, n_decoder_layers=3, n_heads=4, head_dim=4, mlp_dim=24,
                    num_buckets=8, max_distance=16, gated=True, act="gelu_new", tie_embeddings=False,
                    scale_decoder_outputs=False, max_seq_len=32),
}
FAMILIES = {"llama": llama, "bert": bert, "t5": t5}
SAVED = ("lora", "adapter", "prefix", "prompt", "ia3", "full", "partial")


def _config(method, *extra):
    return config_lib.load(CONFIG, [f"peft.method={method}", *SMALL, *extra])


@functools.cache
def _base(family):
    return jax.jit(FAMILIES[family].init, static_argnums=1)(jax.random.key(1), CONFIGS[family])


def _build(base, config, cfg, key=2):
    """peft.build as the trainer runs it, under jit (one compilation, not one per eager op)."""
    static = {}

    def build(key, base):
        trainable, static["spec"] = peft.build(key, base, config, cfg)
        return trainable

    return jax.jit(build)(jax.random.key(key), base), static["spec"]


def _trained(trainable):
    """The tree moved away from its initialization, as training would (on the host: no compilation)."""
    rs = np.random.RandomState(7)
    return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rs.standard_normal(x.shape).astype(np.float32), trainable)


def _save(tmp_path, method, family, *extra):
    cfg, base, config = CONFIGS[family], _base(family), _config(method, *extra)
    trainable, spec = _build(base, config, cfg)
    trained = peft.finalize(spec, _trained(trainable))
    adapter_io.save(tmp_path / "adapter", trained, spec, config, "tiny")  # a training workdir's adapter/
    return cfg, base, config, trained, spec


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", SAVED)
def test_saved_adapter_loads_and_continues(tmp_path, family, method):
    cfg, base, config, trained, spec = _save(tmp_path, method, family)
    loaded, loaded_spec = sources.load(tmp_path, cfg)
    assert (loaded_spec if method != "lora" else peft.as_method(loaded_spec)) == spec
    again, again_spec = _build(base, _config(method, f"peft.init_from={tmp_path}"), cfg, key=3)
    assert again_spec == spec
    for got in (loaded, again):
        assert sorted(tree.flatten(got)) == sorted(tree.flatten(trained))
        for path, x in tree.items(trained):
            np.testing.assert_array_equal(np.asarray(tree.flatten(got)[path]), np.asarray(x), err_msg=path)
    # Made for another base of the family (twice the width), it is refused naming a leaf.
    heads = {"head_dim": 2 * cfg.head_dim} if "head_dim" in {f.name for f in dataclasses.fields(cfg)} else {}
    wider = dataclasses.replace(cfg, dim=2 * cfg.dim, mlp_dim=2 * cfg.mlp_dim, **heads)
    with pytest.raises(peft.method.AdapterError, match=r"adapter.safetensors: .*(shape|not a leaf|missing)"):
        sources.load(tmp_path, wider)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_t5_bottleneck_adapter_run_continues(tmp_path, placement):
    cfg, base, config, trained, spec = _save(tmp_path, "adapter", "t5", f"adapter.placement={placement}")
    flat = tree.flatten(trained)
    assert ("encoder/layers/self_attn/adapter/down/w" in flat) == (placement == "houlsby")
    assert "decoder/layers/mlp/adapter/up/b" in flat
    continued, continued_spec = _build(base, _config("adapter", f"adapter.placement={placement}",
                                                     f"peft.init_from={tmp_path}"), cfg, key=3)
    enc = jnp.asarray(np.random.RandomState(0).randint(2, 32, (2, 7)), jnp.int32)
    dec = jnp.asarray(np.random.RandomState(1).randint(2, 32, (2, 5)), jnp.int32)
    forward = jax.jit(lambda trainable, spec: t5.forward(cfg, base, enc, dec, trainable=trainable, peft=spec)[0],
                      static_argnums=1)
    want = forward(jax.tree.map(jnp.asarray, trained), spec)
    np.testing.assert_array_equal(np.asarray(forward(continued, continued_spec)), np.asarray(want))
    plain = forward({}, None)
    assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 1e-3  # the adapters do something
    other = "pfeiffer" if placement == "houlsby" else "houlsby"
    with pytest.raises(PeftError, match=f"adapter.placement='{other}', but the adapter at .* has '{placement}'"):
        peft.build(jax.random.key(3), base, _config("adapter", f"adapter.placement={other}",
                                                    f"peft.init_from={tmp_path}"), cfg)
    with pytest.raises(PeftError, match="adapter.size=8, but the adapter at .* has 4"):
        peft.build(jax.random.key(3), base, _config("adapter", f"adapter.placement={placement}", "adapter.size=8",
                                                    f"peft.init_from={tmp_path}"), cfg)
