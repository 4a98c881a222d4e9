"""LoRA on the experts of a mixture of experts: against HF PEFT's `target_parameters` LoRA on transformers'
Mixtral (the same factors give the same logits), against the merged weights (outputs and gradients), and the
target selection (`all-linear` covers attention and experts, the router only by regex). Tiny models, float32."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

from jaxft import checkpoint, tree
from jaxft.models import mixtral
from jaxft.peft import lora

R, ALPHA = 2, 6.0
TOKENS = np.random.RandomState(1).randint(0, 80, (2, 7))


@functools.cache
def _mixtral(tmp_root):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=80, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, initializer_range=0.2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(f"{tmp_root}/mixtral")
    return model, checkpoint.load(f"{tmp_root}/mixtral")


@pytest.fixture(scope="module")
def mixtral_pair(tmp_path_factory):
    return _mixtral(str(tmp_path_factory.mktemp("moe_lora")))


def _from_peft(peft_model, n_layers: int, n_experts: int) -> dict:
    """PEFT's factors as jaxft's trainable tree. PEFT's ParamWrapper on a fused (E, out, in) expert parameter holds
    lora_A (R*E, in), expert-major rows, and lora_B (out, R*E), expert-minor columns; gate_up_proj's one adapter
    is gate's and up's (one A for both, B split at F)."""
    sd = {k: v.detach().numpy() for k, v in peft_model.state_dict().items() if "lora_" in k}
    flat = {}
    for i in range(n_layers):
        pre = f"base_model.model.model.layers.{i}"
        q = f"{pre}.self_attn.q_proj"
        flat.setdefault("layers/attn/q_proj/lora_a", []).append(sd[f"{q}.lora_A.default.weight"].T)
        flat.setdefault("layers/attn/q_proj/lora_b", []).append(sd[f"{q}.lora_B.default.weight"].T)
        for name, key in (("gate_up", f"{pre}.mlp.experts.base_layer"), ("down", f"{pre}.mlp.experts")):
            a, b = sd[f"{key}.lora_A.default.weight"], sd[f"{key}.lora_B.default.weight"]
            a = a.reshape(n_experts, R, -1).transpose(0, 2, 1)  # (E, in, R)
            b = b.reshape(b.shape[0], R, n_experts).transpose(2, 1, 0)  # (E, R, out)
            if name == "down":
                parts = {"down_proj": (a, b)}
            else:
                f = b.shape[-1] // 2
                parts = {"gate_proj": (a, b[..., :f]), "up_proj": (a, b[..., f:])}
            for proj, (pa, pb) in parts.items():
                flat.setdefault(f"layers/mlp/experts/{proj}/lora_a", []).append(pa)
                flat.setdefault(f"layers/mlp/experts/{proj}/lora_b", []).append(pb)
    return tree.unflatten({k: jnp.asarray(np.stack(v)) for k, v in flat.items()})


@pytest.mark.parametrize("rslora", [False, True])
def test_expert_lora_equals_peft_target_parameters(mixtral_pair, rslora):
    model, loaded = mixtral_pair
    config = hf_peft.LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=rslora, target_modules=["q_proj"],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                init_lora_weights=False)  # random A and B: the adapter changes the outputs
    torch.manual_seed(1)
    peft_model = hf_peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor(TOKENS)).logits.numpy()
        plain = model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(want - plain).max() > 0.05  # the experts' adapter is there to see
    trainable = _from_peft(peft_model, 2, 4)
    spec = lora.LoraSpec(rank=R, alpha=ALPHA, rslora=rslora)
    forward = jax.jit(lambda t: mixtral.forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS), trainable=t,
                                                peft=spec.as_method())[0])
    np.testing.assert_allclose(np.asarray(forward(trainable)), want, atol=1e-4, rtol=1e-4)
    attention_only = forward({"layers": {"attn": trainable["layers"]["attn"]}})
    assert np.abs(np.asarray(attention_only) - want).max() > 0.05  # the experts' factors count in the comparison


def test_targets_merge_and_gradients_equal_the_merged_model(mixtral_pair):
    _, loaded = mixtral_pair
    base = loaded.params
    paths = lora.target_paths(base, "all-linear", "mixtral")
    assert {p.rsplit("/", 2)[-2] for p in paths} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    assert not [p for p in paths if "router" in p]  # frozen by default
    assert lora.target_paths(base, r"layers/mlp/(router|experts/down_proj)/w", "mixtral") == \
        ["layers/mlp/experts/down_proj/w", "layers/mlp/router/w"]
    with pytest.raises(lora.LoraError, match="matches no linear weight"):
        lora.target_paths(base, r"layers/mlp/expert/.*", "mixtral")
    spec = lora.LoraSpec(rank=R, alpha=ALPHA)
    trainable = lora.init(jax.random.PRNGKey(0), base, spec, paths + ["layers/mlp/router/w"])
    assert trainable["layers"]["mlp"]["experts"]["up_proj"]["lora_a"].shape == (2, 4, 16, R)
    # B starts at zero; random B so that the adapter changes the model.
    trainable = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), trainable)
    tokens = jnp.asarray(TOKENS)
    cot = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 80))

    def adapted(t):
        return jnp.sum(mixtral.forward(loaded.cfg, base, tokens, trainable=t, peft=spec.as_method())[0] * cot)

    def merged(t):
        return jnp.sum(mixtral.forward(loaded.cfg, lora.merge(base, t, spec), tokens)[0] * cot)

    (va, ga), (vm, gm) = jax.jit(lambda t: (jax.value_and_grad(adapted)(t), jax.value_and_grad(merged)(t)))(trainable)
    plain = jnp.sum(mixtral.forward(loaded.cfg, base, tokens)[0] * cot)
    assert abs(float(va) - float(plain)) > 1.0
    np.testing.assert_allclose(float(va), float(vm), rtol=1e-5)
    for (path, g), m in zip(tree.flatten(ga).items(), tree.flatten(gm).values()):
        assert float(jnp.abs(m).max()) > 1e-4, path
        np.testing.assert_allclose(np.asarray(g), np.asarray(m), atol=1e-4, rtol=1e-4, err_msg=path)


def test_merged_export_loads_in_transformers_with_the_adapted_logits(mixtral_pair, tmp_path):
    """LoRA on attention and experts merged (`lora.merge`) and written by `save_hf` in the per-expert layout:
    transformers' MixtralForCausalLM and jaxft both load it with the adapted model's logits."""
    _, loaded = mixtral_pair
    spec = lora.LoraSpec(rank=R, alpha=ALPHA)
    trainable = lora.init(jax.random.PRNGKey(3), loaded.params, spec,
                          lora.target_paths(loaded.params, "all-linear", "mixtral"))
    trainable = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size + 1), a.shape), trainable)
    adapted = mixtral.forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS), trainable=trainable,
                              peft=spec.as_method())[0]
    out = checkpoint.save_hf(loaded.cfg, lora.merge(loaded.params, trainable, spec), tmp_path / "merged",
                             dtype=jnp.float32)
    model, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        want = model.eval()(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(want, np.asarray(adapted), atol=1e-4, rtol=1e-4)
    again = checkpoint.load(out)
    assert again.cfg == loaded.cfg
    np.testing.assert_allclose(np.asarray(mixtral.forward(again.cfg, again.params, jnp.asarray(TOKENS))[0]),
                               np.asarray(adapted), atol=1e-4, rtol=1e-4)


def test_qlora_nf4_experts_equal_their_dequantized_weights(mixtral_pair):
    """NF4 experts (leading (L, E) axes, double quantization), dequantized inside the grouped products: the
    adapted model's output and LoRA gradients equal those over the dequantized weights."""
    from jaxft import quant

    _, loaded = mixtral_pair
    q = quant.quantize_params(loaded.params, "nf4", block_size=8, include=r"layers/mlp/experts/.*/w",
                              dense_dtype=None)
    w = q["layers"]["mlp"]["experts"]["up_proj"]["w"]
    assert isinstance(w, quant.QuantizedWeight) and w.shape == (2, 4, 16, 24)
    dequantized = jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, quant.QuantizedWeight) else x,
                               q, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))
    spec = lora.LoraSpec(rank=R, alpha=ALPHA)
    trainable = lora.init(jax.random.PRNGKey(4), q, spec, lora.target_paths(q, "all-linear", "mixtral"))
    trainable = jax.tree.map(lambda a: a + 0.1, trainable)
    tokens = jnp.asarray(TOKENS)

    @jax.jit
    def value_and_grad(base):
        fn = lambda t: jnp.sum(mixtral.forward(loaded.cfg, base, tokens, trainable=t, peft=spec.as_method())[0] ** 2)
        return jax.value_and_grad(fn)(trainable)

    (vq, gq), (vd, gd), (vf, _) = value_and_grad(q), value_and_grad(dequantized), value_and_grad(loaded.params)
    assert abs(float(vf) - float(vd)) > 1e-3 * abs(float(vd))  # the quantization is there to see
    np.testing.assert_allclose(float(vq), float(vd), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3", "full", "partial"])
def test_every_method_starts_at_the_base_model_and_trains(mixtral_pair, method):
    """Each method's fresh tree (`jaxft.peft.build`) on the Mixtral family leaves the logits as they are and gets a
    gradient (the experts carry LoRA factors, IA3 acts on keys and values only: there is no dense down_proj)."""
    from jaxft import config as config_lib, peft

    _, loaded = mixtral_pair
    config = config_lib.base.get_config()
    config.peft.method, config.adapter.size, config.train.seq_len = method, 8, 32
    trainable, spec = peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)
    tokens = jnp.asarray(TOKENS)
    logits = lambda t: mixtral.forward(loaded.cfg, loaded.params, tokens, trainable=t, peft=spec)[0]
    grad = jax.grad(lambda t: jnp.sum(logits(t) ** 2))
    adapted, plain, grads = jax.jit(lambda t: (logits(t), logits(None), grad(t)))(trainable)
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(plain), atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3
    if method == "lora":
        assert "experts" in trainable["layers"]["mlp"] and "router" not in trainable["layers"]["mlp"]
