"""LoRA, rsLoRA and DoRA: identity at init, equality with HF PEFT's arithmetic, exact merging, targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxft import checkpoint, tree
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora

TINY = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 96, (2, 10)))


def _logits(base, trainable=None, spec=None, rng=None, cfg=TINY):
    return llama.forward(cfg, base, TOKENS, trainable=trainable, lora=spec, rng=rng)[0]


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_at_init_leaves_outputs_unchanged(dora):
    base = llama.init(jax.random.PRNGKey(0), TINY)
    spec = lora.LoraSpec(rank=4, alpha=8, dora=dora)
    trainable = lora.init(jax.random.PRNGKey(1), base, spec, lora.target_paths(base, "all-linear"))
    np.testing.assert_allclose(_logits(base, trainable, spec), _logits(base), atol=1e-6)


def test_targets_default_all_linear_and_errors():
    base = llama.init(jax.random.PRNGKey(0), TINY)
    assert lora.target_paths(base, "default") == ["layers/attn/q_proj/w", "layers/attn/v_proj/w"]
    assert len(lora.target_paths(base, "all-linear")) == 7
    assert lora.target_paths(base, r"layers/mlp/.*") == [
        "layers/mlp/down_proj/w", "layers/mlp/gate_proj/w", "layers/mlp/up_proj/w"]
    with pytest.raises(lora.LoraError, match="matches no linear weight"):
        lora.target_paths(base, r"layers/attn/qproj/w")
    with pytest.raises(lora.LoraError, match="not a valid regex"):
        lora.target_paths(base, r"layers/(attn")
    with pytest.raises(lora.LoraError, match="lora.rank"):
        lora.init(jax.random.PRNGKey(0), base, lora.LoraSpec(rank=0), ["layers/attn/q_proj/w"])


def test_scaling_rslora():
    assert lora.LoraSpec(rank=16, alpha=32).scaling == 2.0
    assert lora.LoraSpec(rank=16, alpha=32, rslora=True).scaling == 8.0


def test_kaiming_init_bounds_as_peft():
    base = llama.init(jax.random.PRNGKey(0), TINY)
    t = lora.init(jax.random.PRNGKey(1), base, lora.LoraSpec(rank=4), ["layers/mlp/down_proj/w"])
    a = np.asarray(t["layers"]["mlp"]["down_proj"]["lora_a"])
    bound = 1 / np.sqrt(TINY.mlp_dim)  # kaiming_uniform(a=sqrt(5)) on (R, in)
    assert a.shape == (2, 48, 4) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.any(np.asarray(t["layers"]["mlp"]["down_proj"]["lora_b"]))


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_equals_hf_peft(tmp_path, variant):
    """Same LoRA values in PEFT (PyTorch) and jaxft give the same logits."""
    import peft

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, use_rslora=variant == "rslora",
                           use_dora=variant == "dora", lora_dropout=0.0)
    pm = peft.get_peft_model(model, pcfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
        ref = pm(torch.tensor(np.asarray(TOKENS))).logits.numpy()

    loaded = checkpoint.load(str(tmp_path))
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    flat = {}
    for mod, group in [(m, "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp")
                       for m in modules]:
        ours = f"layers/{'attn' if group == 'self_attn' else 'mlp'}/{mod}"
        hf = "base_model.model.model.layers.{i}." + f"{group}.{mod}"
        flat[f"{ours}/lora_a"] = np.stack([sd[f"{hf.format(i=i)}.lora_A.default.weight"].T for i in range(2)])
        flat[f"{ours}/lora_b"] = np.stack([sd[f"{hf.format(i=i)}.lora_B.default.weight"].T for i in range(2)])
        if variant == "dora":
            flat[f"{ours}/magnitude"] = np.stack(
                [sd[f"{hf.format(i=i)}.lora_magnitude_vector.default.weight"] for i in range(2)])
    trainable = tree.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    spec = lora.LoraSpec(rank=4, alpha=8, rslora=variant == "rslora", dora=variant == "dora")
    out = _logits(loaded.params, trainable, spec, cfg=loaded.cfg)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_adapted_model(dora):
    base = llama.init(jax.random.PRNGKey(0), TINY)
    spec = lora.LoraSpec(rank=4, alpha=8, dora=dora)
    trainable = lora.init(jax.random.PRNGKey(1), base, spec, lora.target_paths(base, "all-linear"))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
    merged = lora.merge(base, trainable, spec)
    assert set(tree.flatten(merged)) == set(tree.flatten(base))
    adapted = _logits(base, trainable, spec)
    assert float(jnp.abs(adapted - _logits(base)).max()) > 1e-2  # the adapter does something
    np.testing.assert_allclose(_logits(merged), adapted, atol=2e-5)


def test_dropout_only_with_rng():
    base = llama.init(jax.random.PRNGKey(0), TINY)
    spec = lora.LoraSpec(rank=4, alpha=8, dropout=0.5)
    trainable = lora.init(jax.random.PRNGKey(1), base, spec, lora.target_paths(base, "all-linear"))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    no_drop = lora.LoraSpec(rank=4, alpha=8, dropout=0.0)
    np.testing.assert_array_equal(_logits(base, trainable, spec), _logits(base, trainable, no_drop))
    dropped = _logits(base, trainable, spec, rng=jax.random.PRNGKey(3))
    assert float(jnp.abs(dropped - _logits(base, trainable, no_drop)).max()) > 1e-4
