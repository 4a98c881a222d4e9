"""The LLaMA family against transformers: tiny random-weight models saved with `save_pretrained`, loaded by
`jaxft.checkpoint.load`, run in PyTorch and in JAX; and `save_hf` read back by transformers."""

import copy
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from jaxft import checkpoint, tree
from jaxft.models import llama

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# name: (config class, model class, config overrides, save_pretrained max_shard_size)
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, None),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}, None),
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 5}, None),
    "qwen2_sharded": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}, "40KB"),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}, None),
}
TOKENS = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 12))  # 12 > the Mistral window of 5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (PyTorch model, directory it was saved to), built on first use."""

    @functools.cache
    def get(variant):
        config_cls, model_cls, overrides, shard = VARIANTS[variant]
        torch.manual_seed(0)
        # A wider init than the default 0.02, so that logits are far from zero and differences show.
        model = model_cls(config_cls(**TINY, **overrides, initializer_range=0.1)).eval()
        path = tmp_path_factory.mktemp(variant)
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        return model, path

    return get


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@functools.cache
def _forward(cfg, dtype):
    return jax.jit(lambda params, tokens, positions, segment_ids: llama.forward(
        cfg, params, tokens, positions=positions, segment_ids=segment_ids, dtype=dtype)[0])


def jax_logits(loaded, tokens=TOKENS, positions=None, segment_ids=None, dtype=jnp.float32):
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
    segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
    return np.asarray(_forward(loaded.cfg, dtype)(loaded.params, tokens, positions, segment_ids))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant):
    model, path = saved(variant)
    loaded = checkpoint.load(str(path))
    assert loaded.source == "hf" and loaded.path == path and loaded.tokenizer is None
    ref = torch_logits(model)
    assert np.abs(ref).max() > 1.0  # a meaningful comparison, not two near-zero arrays
    np.testing.assert_allclose(jax_logits(loaded), ref, atol=1e-4, rtol=0)
    if variant == "qwen2_sharded":
        assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2


def test_bf16_checkpoint_and_bf16_compute(saved, tmp_path):
    """bfloat16 tensors are read exactly; bf16 compute stays close to float32."""
    model = copy.deepcopy(saved("llama")[0])
    with torch.no_grad():
        for p in model.parameters():  # parameters only: a bf16 rotary table would change the reference
            p.copy_(p.bfloat16().float())
    ref = torch_logits(model)  # the bf16 weights, computed in float32
    path = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    np.testing.assert_allclose(jax_logits(checkpoint.load(path)), ref, atol=1e-4, rtol=0)
    loaded = checkpoint.load(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(loaded.params))
    out = jax_logits(loaded, dtype=jnp.bfloat16)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_left_padded_batch_equals_unpadded_rows(saved):
    model, path = saved("mistral_window")
    loaded = checkpoint.load(path)
    lengths = [12, 7]
    tokens, positions, segment_ids = (np.zeros((2, 12), np.int32) for _ in range(3))
    for row, n in enumerate(lengths):
        tokens[row, 12 - n:] = TOKENS[row, :n]
        positions[row, 12 - n:] = np.arange(n)
        segment_ids[row, 12 - n:] = 1
    padded = jax_logits(loaded, tokens, positions, segment_ids)
    for row, n in enumerate(lengths):
        alone = torch_logits(model, TOKENS[row:row + 1, :n])[0]
        np.testing.assert_allclose(padded[row, 12 - n:], alone, atol=1e-4, rtol=0)
    assert np.isfinite(padded).all()  # fully masked padding rows give no NaN


def test_leaf_fn_sees_each_stacked_leaf_once(saved):
    _, path = saved("qwen2_sharded")
    calls = []

    def leaf_fn(p, x):
        calls.append((p, x.shape, isinstance(x, np.ndarray)))  # a host array: nothing reached the device
        return jnp.asarray(x)

    loaded = checkpoint.load(path, leaf_fn=leaf_fn)
    shapes = {p: shape for p, shape, _ in calls}
    assert len(calls) == len(shapes) == len(tree.flatten(loaded.params)) and all(host for *_, host in calls)
    cfg = loaded.cfg
    assert shapes["layers/attn/q_proj/w"] == (2, 64, cfg.n_heads * cfg.head_dim)
    assert shapes["layers/attn/k_proj/b"] == (2, cfg.n_kv_heads * cfg.head_dim)
    assert shapes["lm_head/w"] == (64, 128) and shapes["embed/w"] == (128, 64)


@pytest.mark.parametrize("variant,shard_bytes", [("llama", 2**30), ("llama3_rope", 2**30),
                                                 ("mistral_window", 2**30), ("qwen2_sharded", 30_000),
                                                 ("llama_tied", 30_000)])
def test_save_hf_loads_in_transformers(saved, tmp_path, variant, shard_bytes):
    model, path = saved(variant)
    loaded = checkpoint.load(path)
    out = tmp_path / "export"
    checkpoint.save_hf(loaded.cfg, loaded.params, out, dtype=jnp.float32, max_shard_bytes=shard_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (shard_bytes < 2**20) and (sharded or (out / "model.safetensors").exists())
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(model)
    np.testing.assert_allclose(torch_logits(back), torch_logits(model), atol=1e-5, rtol=0)


def test_save_hf_bf16_and_overwrite(saved, tmp_path):
    _, path = saved("llama")
    loaded = checkpoint.load(path)
    out = tmp_path / "export"
    checkpoint.save_hf(loaded.cfg, loaded.params, out)  # bfloat16 by default
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.save_hf(loaded.cfg, loaded.params, out)
    checkpoint.save_hf(loaded.cfg, loaded.params, out, dtype=jnp.float32, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    again = checkpoint.load(out)
    for p, x in tree.flatten(again.params).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(tree.flatten(loaded.params)[p]))
    (tmp_path / "bf16").mkdir()  # an existing empty directory is fine
    checkpoint.save_hf(loaded.cfg, loaded.params, tmp_path / "bf16")
    bf = checkpoint.load(tmp_path / "bf16", dtype=None, leaf_fn=lambda p, x: x)
    assert bf.params["embed"]["w"].dtype == ml_dtypes.bfloat16
