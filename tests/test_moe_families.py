"""The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE with and without dense layers, OLMoE) against
transformers: tiny random models saved with `save_pretrained` (one tensor per expert) or as transformers 5's fused
in-memory state dict, loaded by `jaxft.checkpoint.load`; logits, router logits, greedy generation and the router's
load-balancing loss. Float32."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from jaxft import checkpoint
from jaxft.checkpoint import LoadError
from jaxft.generate import generate
from jaxft.models import ConfigError, config_from_hf, family_of

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, num_experts_per_tok=2, initializer_range=0.2)
VARIANTS = {  # name: (config class, model class, overrides)
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                       num_experts=4, norm_topk_prob=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,  # head_dim 12 != 32 / 4
                  dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True,
                       head_dim=12)),
    "qwen3_moe_mixed": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,  # layer 1 dense
                        dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                             mlp_only_layers=[1])),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,  # top-3 of 6, not renormalized
              dict(intermediate_size=24, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False)),
}
EXPERTS = {"mixtral": (4, 2), "qwen2_moe": (4, 2), "qwen3_moe": (4, 2), "qwen3_moe_mixed": (4, 2),
           "olmoe": (6, 3)}  # (E, k)
TOKENS = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 9))


@functools.cache
def _model(variant):
    config_cls, model_cls, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # norms away from one, so that a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model, path, layout):
    if layout == "per_expert":
        model.save_pretrained(path)
    else:  # transformers 5's in-memory names: experts.gate_up_proj (E, 2F, D), experts.down_proj (E, D, F)
        path.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    return path


@functools.cache
def _forward(cfg):
    return jax.jit(lambda params, tokens: family_of(cfg).forward(cfg, params, tokens, return_aux=True))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_and_router_logits_equal_transformers(tmp_path, variant, layout):
    model = _model(variant)
    if layout == "fused":
        assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    loaded = checkpoint.load(_save(model, tmp_path / "m", layout))
    n_experts, top_k = EXPERTS[variant]
    assert (loaded.cfg.model_type, loaded.cfg.n_experts, loaded.cfg.top_k) == (model.config.model_type, n_experts,
                                                                                top_k)
    with torch.no_grad():
        out = model(torch.tensor(TOKENS), output_router_logits=True)
    logits, _, router = _forward(loaded.cfg)(loaded.params, jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4, rtol=1e-4)
    want_router = np.stack([r.numpy().reshape(TOKENS.shape + (n_experts,)) for r in out.router_logits])
    sparse = [i for i in range(loaded.cfg.n_layers) if i not in getattr(loaded.cfg, "dense_layers", ())]
    assert len(sparse) == len(want_router)  # transformers' dense layers have no router
    np.testing.assert_allclose(np.asarray(router)[sparse], want_router, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_token_equal(tmp_path, variant):
    model = _model(variant)
    loaded = checkpoint.load(_save(model, tmp_path / "m", "per_expert"))
    prompts = [list(TOKENS[0, :5]), list(TOKENS[1, :3])]
    got = generate(loaded.cfg, loaded.params, prompts, max_new_tokens=6, unroll=False)
    for prompt, new in zip(prompts, got):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert new == want


def test_config_round_trip_and_bad_input(tmp_path):
    for variant in VARIANTS:
        once = config_from_hf(_model(variant).config.to_dict())
        assert config_from_hf(once.to_hf()) == once
        assert transformers.AutoConfig.for_model(**once.to_hf()).to_dict()["num_experts_per_tok"] == \
            EXPERTS[variant][1]
        assert once.n_params == sum(p.numel() for p in _model(variant).parameters()), variant
    hf = _model("qwen2_moe").config.to_dict()
    with pytest.raises(ConfigError, match=r"decoder_sparse_step=2, mlp_only_layers=\[\]: dense layers"):
        config_from_hf(dict(hf, decoder_sparse_step=2))
    mixed = _model("qwen3_moe").config.to_dict()
    assert config_from_hf(dict(mixed, decoder_sparse_step=2, mlp_only_layers=[])).dense_layers == (0,)
    with pytest.raises(ConfigError, match=r"decoder_sparse_step=1, mlp_only_layers=\[0, 1\] leave no sparse layer"):
        config_from_hf(dict(mixed, mlp_only_layers=[0, 1]))
    with pytest.raises(ConfigError, match=r"^config.json: clip_qkv=8.0 is not supported \(expected null\)$"):
        config_from_hf(dict(_model("olmoe").config.to_dict(), clip_qkv=8.0))
    # A checkpoint with more experts than its config: the loader names the field and the count on disk.
    path = _save(_model("mixtral"), tmp_path / "more", "per_expert")
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(hf, num_local_experts=3)))
    with pytest.raises(LoadError, match=r"config\.json: num_local_experts=3, but .* holds 4 experts per layer"):
        checkpoint.load(path)


def test_training_loss_adds_the_router_losses_as_transformers(tmp_path):
    """causal_lm's training loss on a padded batch = transformers' Mixtral loss (cross-entropy +
    router_aux_loss_coef * load_balancing_loss_func with the attention mask) + the z-loss weight times the masked
    router z-loss; evaluation (no rng) leaves the router losses out."""
    import dataclasses

    from jaxft import config as config_lib
    from jaxft.config.checks import moe_settings
    from jaxft.tasks import Model, causal_lm

    model = _model("mixtral")
    loaded = checkpoint.load(_save(model, tmp_path / "m", "per_expert"))
    config = config_lib.base.get_config()
    config.moe.aux_loss_coef, config.moe.router_z_loss_coef = 0.3, 0.01
    cfg = moe_settings(config, loaded.cfg, "m")
    assert (cfg.router_aux_loss_coef, cfg.router_z_loss_coef) == (0.3, 0.01)
    assert moe_settings(config_lib.base.get_config(), loaded.cfg, "m").router_aux_loss_coef == \
        model.config.router_aux_loss_coef  # None: the checkpoint's own
    mask = np.ones(TOKENS.shape, np.int32)
    mask[1, 5:] = 0  # right padding in the second row
    batch = {"tokens": jnp.asarray(TOKENS), "segment_ids": jnp.asarray(mask),
             "positions": jnp.asarray(np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape)),
             "targets": jnp.asarray(np.roll(TOKENS, -1, axis=1)),
             "loss_mask": jnp.asarray(mask * np.roll(mask, -1, axis=1) * (np.arange(TOKENS.shape[1]) < 8))}
    m = Model(family=family_of(cfg), cfg=cfg)
    total, count = jax.jit(lambda b, r: causal_lm.loss(causal_lm.forward(m, loaded.params, None, b, r), b))(
        batch, jax.random.PRNGKey(0))
    labels = torch.tensor(np.where(mask > 0, TOKENS, -100))
    coef, model.router_aux_loss_coef = model.router_aux_loss_coef, 0.3  # (read by forward; restored for the others)
    with torch.no_grad():
        out = model(torch.tensor(TOKENS), attention_mask=torch.tensor(mask), labels=labels, output_router_logits=True)
    model.router_aux_loss_coef = coef
    logits = np.stack([r.numpy().reshape(TOKENS.shape + (4,)) for r in out.router_logits]).astype(np.float64)
    z = (np.log(np.exp(logits).sum(-1)) ** 2 * mask).sum() / (2 * mask.sum())
    assert out.aux_loss.item() > 0.5 and z > 0.01  # both terms there to see
    np.testing.assert_allclose(float(total / count), out.loss.item() + 0.01 * z, rtol=2e-5)
    plain = causal_lm.loss(causal_lm.forward(m, loaded.params, None, batch, None), batch)
    np.testing.assert_allclose(float(plain[0] / plain[1]), out.loss.item() - 0.3 * out.aux_loss.item(), rtol=2e-5)


def test_moe_keys_on_a_dense_model_and_bad_values_are_one_line_errors():
    from jaxft import config as config_lib
    from jaxft.config.checks import ConfigFileError, moe_settings
    from jaxft.models.config import LlamaConfig

    config = config_lib.base.get_config()
    dense = LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, mlp_dim=8)
    assert moe_settings(config, dense, "d") is dense
    config.moe.router_z_loss_coef = 0.001
    with pytest.raises(ConfigFileError, match=r"^moe.router_z_loss_coef: 0.001 is for mixture-of-experts models, "
                                              r"but d is a dense llama model"):
        moe_settings(config, dense, "d")
    config.moe.aux_loss_coef, config.train.learning_rate = -1.0, 1e-4
    with pytest.raises(ConfigFileError, match=r"^moe.aux_loss_coef: -1.0 must be a number >= 0"):
        config_lib.validate(config, require_data=False)


def test_trainer_fine_tunes_an_upcycled_model_and_logs_the_router(tmp_path):
    """`jaxft.train.train` on a tiny upcycled Llama with LoRA on attention, experts and router: metrics.jsonl holds
    the router losses (their weighted sum is what the loss adds) and each layer's expert max/min share."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny
    from jaxft import config as config_lib, tree
    from jaxft.peft import io as adapter_io
    from jaxft.train.loop import train
    from jaxft.upcycle import upcycle

    upcycle(tiny.llama_dir(tmp_path / "dense"), tmp_path / "moe", experts=4, top_k=2, dtype=jnp.float32,
            router_noise=0.1)
    config = config_lib.load(Path(__file__).parent.parent / "configs" / "moe_lora.py", [
        f"model={tmp_path / 'moe'}", f"data.train={tiny.alpaca_file(tmp_path / 'train.jsonl', 24)}", "dtype=float32",
        "param_dtype=float32", "train.batch_size=4", "train.grad_accum=2", "train.seq_len=32", "train.steps=2",
        "train.eval_every=2", "train.eval_batches=1", "train.warmup_steps=0", "lora.rank=4"])
    assert train(config, tmp_path / "run")["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        np.testing.assert_allclose(row["moe_aux_loss"], 0.02 * row["moe_load_balancing"] + 1e-3 * row["moe_router_z"],
                                   rtol=1e-5)  # the checkpoint's router_aux_loss_coef, configs/moe_lora.py's z weight
        assert row["moe_load_balancing"] > 1.0 and {"moe_expert_ratio_l0", "moe_expert_ratio_l1"} <= set(row)
    adapter = tree.flatten(adapter_io.load(tmp_path / "run" / "adapter")[0])
    assert {"layers/mlp/router/lora_a", "layers/mlp/experts/down_proj/lora_b", "layers/attn/q_proj/lora_a"} <= \
        set(adapter)
    assert np.abs(adapter["layers/mlp/experts/down_proj/lora_b"]).max() > 0  # trained away from its zero init


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_hf_writes_back_the_tensors_it_loaded(tmp_path, variant):
    """Load (fused layout) then `save_hf`: the published per-expert names, and every tensor equal to what
    transformers' save_pretrained wrote."""
    from safetensors.numpy import load_file

    model = _model(variant)
    original = load_file(str(_save(model, tmp_path / "per_expert", "per_expert") / "model.safetensors"))
    loaded = checkpoint.load(_save(model, tmp_path / "fused", "fused"))
    out = checkpoint.save_hf(loaded.cfg, loaded.params, tmp_path / "out", dtype=jnp.float32)
    written = load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for name, x in original.items():
        np.testing.assert_array_equal(written[name], x, err_msg=name)


def test_capacity_factor_key_reaches_the_model(tmp_path):
    """moe.capacity_factor: large enough (capacity = every routed row) gives the dropless logits; a small one
    drops rows (which ones: tests/test_moe.py's test_capacity_factor_drops_what_it_says) and so changes them; 0
    means dropless; on a dense model or negative, a one-line error naming the key."""
    from jaxft import config as config_lib
    from jaxft.config.checks import ConfigFileError, moe_settings
    from jaxft.models.config import LlamaConfig

    loaded = checkpoint.load(_save(_model("mixtral"), tmp_path / "m", "per_expert"))
    config = config_lib.base.get_config()
    dropless = np.asarray(_forward(moe_settings(config, loaded.cfg, "m"))(loaded.params, TOKENS)[0])
    config.moe.capacity_factor = 0.0
    assert moe_settings(config, loaded.cfg, "m").capacity_factor is None
    config.moe.capacity_factor = 2.0  # E / k: each expert may take all N tokens
    cfg = moe_settings(config, loaded.cfg, "m")
    assert cfg.capacity_factor == 2.0
    np.testing.assert_allclose(np.asarray(_forward(cfg)(loaded.params, TOKENS)[0]), dropless, atol=1e-6)
    config.moe.capacity_factor = 0.5
    small = np.asarray(_forward(moe_settings(config, loaded.cfg, "m"))(loaded.params, TOKENS)[0])
    assert np.abs(small - dropless).max() > 1e-3
    dense = LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, mlp_dim=8)
    with pytest.raises(ConfigFileError, match=r"^moe.capacity_factor: 0.5 is for mixture-of-experts models"):
        moe_settings(config, dense, "d")
    config.moe.capacity_factor, config.train.learning_rate = -1.0, 1e-4
    with pytest.raises(ConfigFileError, match=r"^moe.capacity_factor: -1.0 must be a number >= 0, or None for "
                                              r"dropless routing"):
        config_lib.validate(config, require_data=False)


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_mixed", "olmoe"])
def test_router_losses_equal_transformers_load_balancing(tmp_path, variant):
    """`aux_losses` on a padded batch: the load-balancing loss equals transformers' `load_balancing_loss_func` (its
    model's `aux_loss` with the attention mask), weighted by the checkpoint's router_aux_loss_coef."""
    model = _model(variant)
    loaded = checkpoint.load(_save(model, tmp_path / "m", "per_expert"))
    coef = {"qwen3_moe": 1e-3, "olmoe": 1e-2}[model.config.model_type]
    assert loaded.cfg.router_aux_loss_coef == model.config.router_aux_loss_coef == coef
    mask = np.ones(TOKENS.shape, np.int32)
    mask[0, 6:] = 0
    _, _, router = _forward(loaded.cfg)(loaded.params, jnp.asarray(TOKENS))
    got = family_of(loaded.cfg).aux_losses(loaded.cfg, router, jnp.asarray(mask))
    with torch.no_grad():
        out = model(torch.tensor(TOKENS), attention_mask=torch.tensor(mask), output_router_logits=True)
    assert out.aux_loss.item() > EXPERTS[variant][1]  # above a uniform router's k: a real imbalance
    np.testing.assert_allclose(float(got["load_balancing"]), out.aux_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(got["loss"]), model.config.router_aux_loss_coef * out.aux_loss.item(), rtol=1e-5)
