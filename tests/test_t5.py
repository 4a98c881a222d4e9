"""The T5 family against transformers and PEFT: tiny random-weight T5ForConditionalGeneration models saved with
`save_pretrained`, loaded by `jaxft.checkpoint.load`, run in PyTorch and in JAX (logits, greedy generation, the
seq2seq loss, LoRA on q and v)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from jaxft import checkpoint, tree
from jaxft.checkpoint.assemble import LoadError
from jaxft import generate as gen
from jaxft.models import t5
from jaxft.models.config import ConfigError
from jaxft.peft import lora

# Few buckets and a short max_distance, so that 20 tokens reach the logarithmic and the saturated buckets.
TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu", num_decoder_layers=3),  # tied head, output scaled by D**-0.5
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # transformers 5 still ties it
    "v1.1_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=1),
}
rs = np.random.RandomState(0)
ENC = rs.randint(2, 64, (3, 20))
ENC_MASK = np.ones_like(ENC)
ENC_MASK[1, 13:] = 0  # right padding
ENC_MASK[2, :5] = 0  # left padding
ENC = ENC * ENC_MASK
DEC = np.concatenate([np.zeros((3, 1), np.int64), rs.randint(2, 64, (3, 7))], 1)  # starts with the start token


def _model(variant, seed=0):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **VARIANTS[variant])).eval()
    if variant.endswith("untied"):  # a separate head, as flan-T5 checkpoints hold
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model


def _save_legacy(model, path):
    """The model as transformers 4 wrote T5 checkpoints: the embedding copied into each stack, an untied head
    saved beside it with tie_word_embeddings=false, and an unused cross-attention bias table."""
    model.save_pretrained(path)
    sd = load_file(str(path / "model.safetensors"))
    sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
    for stack in ("encoder", "decoder"):
        sd[f"{stack}.embed_tokens.weight"] = sd["shared.weight"].clone()
    sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    (path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (PyTorch model, directory it was saved to), built on first use."""

    @functools.cache
    def get(variant):
        model = _model(variant)
        path = tmp_path_factory.mktemp(variant.replace(".", "_"))
        model.save_pretrained(path)
        return model, path

    return get


def torch_logits(model, enc=ENC, mask=ENC_MASK, dec=DEC):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


@functools.cache
def _forward(cfg):
    return jax.jit(lambda params, trainable, enc, mask, dec, spec=None: t5.forward(
        cfg, params, enc, dec, enc_segment_ids=mask, trainable=trainable, peft=spec)[0], static_argnames="spec")


def jax_logits(loaded, trainable=None, spec=None, enc=ENC, mask=ENC_MASK, dec=DEC, params=None):
    params = loaded.params if params is None else params
    return np.asarray(_forward(loaded.cfg)(params, trainable, enc, mask, dec, spec=spec))


def _close(ours, ref, atol=1e-4):
    assert np.abs(ref).max() > 1.0  # a meaningful comparison, not two near-zero arrays
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant):
    model, path = saved(variant)
    loaded = checkpoint.load(str(path))
    cfg = loaded.cfg
    assert (cfg.n_layers, cfg.n_decoder_layers, cfg.gated) == (2, model.config.num_decoder_layers, variant != "v1.0")
    assert (cfg.scale_decoder_outputs, cfg.tie_embeddings) == (variant == "v1.0", not variant.endswith("untied"))
    _close(jax_logits(loaded), torch_logits(model))


def test_legacy_checkpoints(tmp_path):
    """transformers 4 checkpoints (embedding copies, a separate head, tie_word_embeddings=false), and the same
    re-saved by transformers 5, which writes tie_word_embeddings=true beside the separate head."""
    model = _model("v1.1_untied")
    _save_legacy(model, tmp_path / "v4")
    loaded = checkpoint.load(str(tmp_path / "v4"))
    assert not loaded.cfg.tie_embeddings and not loaded.cfg.scale_decoder_outputs
    ref = torch_logits(model)
    _close(jax_logits(loaded), ref)
    resaved = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "v4").eval()
    _close(torch_logits(resaved), ref, atol=1e-6)
    resaved.save_pretrained(tmp_path / "v5")
    assert json.loads((tmp_path / "v5" / "config.json").read_text())["tie_word_embeddings"] is True
    _close(jax_logits(checkpoint.load(str(tmp_path / "v5"))), ref)


def test_save_hf_loads_in_transformers(saved, tmp_path):
    model, path = saved("v1.1_untied")
    loaded = checkpoint.load(str(path))
    checkpoint.save_hf(loaded.cfg, loaded.params, tmp_path / "out", dtype=jnp.float32)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    _close(torch_logits(back), torch_logits(model), atol=1e-6)


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16)])
def test_bucket_table_equals_transformers(buckets, distance):
    cfg = t5.Config(vocab_size=8, dim=8, n_layers=1, n_decoder_layers=1, n_heads=1, head_dim=8, mlp_dim=8,
                    num_buckets=buckets, max_distance=distance)
    rel = torch.arange(-300, 301)
    for bidirectional in (True, False):
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance).numpy()
        table = t5.bucket_table(cfg, bidirectional)
        np.testing.assert_array_equal(table[np.clip(rel.numpy(), -distance, distance) + distance], ref)


def test_generate_equals_transformers_greedy(saved):
    model, path = saved("v1.1")
    loaded = checkpoint.load(str(path))
    prompts = [list(ENC[0]), list(ENC[1, :13]), list(ENC[2, 5:9])]
    batch = np.zeros((3, 20), np.int64)
    mask = np.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, :len(p)], mask[i, :len(p)] = p, 1
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(batch), attention_mask=torch.tensor(mask), max_new_tokens=12,
                             do_sample=False, num_beams=1).numpy()
    expected = []
    for row in ref[:, 1:].tolist():  # without the start token; up to the first EOS, excluded
        expected.append(row[:row.index(1)] if 1 in row else row)
    out = gen.generate(loaded.cfg, loaded.params, prompts, max_new_tokens=12)
    assert out == expected
    assert max(len(r) for r in out) >= 5  # rows decode for a while: the comparison means something


def test_cached_decoding_equals_full_decoder(saved):
    """A prefill of 3 decoder tokens (encoding, filling the cross-attention cache), then one token at a time."""
    _, path = saved("v1.0")
    loaded = checkpoint.load(str(path))
    cfg, params = loaded.cfg, loaded.params
    enc, mask = jnp.asarray(ENC), jnp.asarray(ENC_MASK)
    full = jax_logits(loaded)
    step = jax.jit(lambda params, dec, cache, enc=None, mask=None: t5.forward(
        cfg, params, enc, dec, enc_segment_ids=mask, cache=cache))
    logits, cache = step(params, jnp.asarray(DEC[:, :3]), t5.init_cache(cfg, 3, 16), enc, mask)
    steps = [logits]
    for i in range(3, DEC.shape[1]):
        logits, cache = step(params, jnp.asarray(DEC[:, i:i + 1]), cache)
        steps.append(logits)
    assert int(cache["index"]) == DEC.shape[1]
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=0)


def test_shift_right_and_loss_equal_transformers(saved):
    model, path = saved("v1.1")
    loaded = checkpoint.load(str(path))
    targets = rs.randint(2, 64, (3, 6))
    target_mask = np.ones_like(targets)
    target_mask[0, 4:] = 0
    target_mask[2, 2:] = 0
    labels = np.where(target_mask == 1, targets, -100)
    np.testing.assert_array_equal(np.asarray(t5.shift_right(labels, loaded.cfg)),
                                  model._shift_right(torch.tensor(labels)).numpy())
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK),
                    labels=torch.tensor(labels)).loss.item()
    loss = jax.jit(functools.partial(t5.loss, loaded.cfg))
    total, count = loss(loaded.params, ENC, targets, target_mask, enc_segment_ids=ENC_MASK)
    assert int(count) == target_mask.sum()
    assert abs(float(total / count) - ref) < 1e-5


def test_lora_default_targets_equal_peft(saved):
    import peft

    model, path = saved("v1.0")
    loaded = checkpoint.load(str(path))
    paths = lora.target_paths(loaded.params, "default", "t5")
    assert paths == ["decoder/layers/cross_attn/q_proj/w", "decoder/layers/cross_attn/v_proj/w",
                     "decoder/layers/self_attn/q_proj/w", "decoder/layers/self_attn/v_proj/w",
                     "encoder/layers/self_attn/q_proj/w", "encoder/layers/self_attn/v_proj/w"]
    pm = peft.get_peft_model(_model("v1.0"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                               lora_dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
        ref = pm(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK),
                 decoder_input_ids=torch.tensor(DEC)).logits.numpy()
    sd = {k: v.numpy() for k, v in pm.state_dict().items()}
    hf = {"encoder/layers/self_attn": ("encoder", 2, "0.SelfAttention"),
          "decoder/layers/self_attn": ("decoder", 3, "0.SelfAttention"),
          "decoder/layers/cross_attn": ("decoder", 3, "1.EncDecAttention")}
    flat = {}
    for path in paths:
        module, proj = path.rsplit("/", 2)[:2]
        stack, n, sub = hf[module]
        name = "base_model.model.{}.block.{}.layer.{}.{}.lora_{}.default.weight"
        for ours, theirs in (("lora_a", "A"), ("lora_b", "B")):
            flat[f"{module}/{proj}/{ours}"] = jnp.asarray(np.stack(
                [sd[name.format(stack, i, sub, proj[0], theirs)].T for i in range(n)]))
    spec = lora.LoraSpec(rank=4, alpha=8)
    ours = jax_logits(loaded, tree.unflatten(flat), spec)
    assert np.abs(ours - jax_logits(loaded)).max() > 1e-2  # the adapter does something
    _close(ours, ref)


def test_unsupported_config_fields(saved, tmp_path):
    _, path = saved("v1.0")
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ConfigError, match="feed_forward_proj 'gated-swish-x'"):
        t5.Config.from_hf(dict(config, feed_forward_proj="gated-swish-x"))
    with pytest.raises(ConfigError, match="feed_forward_proj 'softplus'"):
        t5.Config.from_hf(dict(config, feed_forward_proj="softplus"))
    with pytest.raises(ConfigError, match="missing field 'd_kv'"):
        t5.Config.from_hf({k: v for k, v in config.items() if k != "d_kv"})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(config, feed_forward_proj="gated-mish")))
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(LoadError, match=r"config.json: feed_forward_proj 'gated-mish' is not supported"):
        checkpoint.load(str(bad))
