"""DoRA (and LoRA) on the routed experts: the grouped computation against the dense per-expert formula (outputs and
gradients), merge exact, a fresh adapter leaving the model as it is, and training on the Qwen3-MoE and OLMoE
families. (HF PEFT refuses DoRA on `target_parameters` (its ParamWrapper: "does not work with use_dora=True"), so
there is no PEFT reference for it.) Tiny random models, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import tree
from jaxft.models import moe, olmoe, qwen3_moe
from jaxft.peft import lora

D, F, E, K, R = 16, 12, 4, 2, 3
SPEC = lora.LoraSpec(rank=R, alpha=5.0, dora=True)


def _block_params(key):
    """One MoE block with DoRA factors on its experts, B and the magnitudes away from their init."""
    keys = iter(jax.random.split(key, 16))
    experts = {}
    for name, (d_in, d_out) in {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}.items():
        w = 0.3 * jax.random.normal(next(keys), (E, d_in, d_out))
        experts[name] = {"w": w, "lora_a": 0.3 * jax.random.normal(next(keys), (E, d_in, R)),
                         "lora_b": 0.3 * jax.random.normal(next(keys), (E, R, d_out)),
                         "magnitude": jnp.linalg.norm(w, axis=-2) * (1 + 0.5 * jax.random.uniform(next(keys),
                                                                                                 (E, d_out)))}
    return {"router": {"w": jax.random.normal(next(keys), (D, E))}, "experts": experts}


def _dense_reference(x, p, spec):
    """Every expert on every token with its DoRA weight m_e * (W_e + s A_e B_e) / ||W_e + s A_e B_e|| (norm over
    the input axis, held constant for the gradient), combined with the routing weights."""
    flat = x.reshape(-1, D)
    weights, experts = moe.route(flat @ p["router"]["w"], K, True)
    combine = jnp.zeros((flat.shape[0], E)).at[jnp.arange(flat.shape[0])[:, None], experts].add(weights)

    def proj(h, q):  # h (E, N, in) -> (E, N, out)
        merged = q["w"] + spec.scaling * q["lora_a"] @ q["lora_b"]
        scale = q["magnitude"] / jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=1))
        return jnp.einsum("eni,eio->eno", h, merged) * scale[:, None, :]

    xe = jnp.broadcast_to(flat, (E,) + flat.shape)
    q = p["experts"]
    out = proj(jax.nn.silu(proj(xe, q["gate_proj"])) * proj(xe, q["up_proj"]), q["down_proj"])
    return jnp.einsum("ne,end->nd", combine, out).reshape(x.shape)


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_expert_dora_equals_the_dense_per_expert_formula(impl):
    p = _block_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, D))
    cot = jax.random.normal(jax.random.PRNGKey(2), (2, 9, D))
    trainable = {"experts": {n: {k: v for k, v in q.items() if k != "w"} for n, q in p["experts"].items()}}
    frozen = {"router": p["router"], "experts": {n: {"w": q["w"]} for n, q in p["experts"].items()}}

    def grouped(t):
        y, _ = moe.moe_block(x, tree.overlay(frozen, t), top_k=K, normalize=True, grouped=impl,
                             expert_linear=SPEC.grouped_linear)
        return jnp.sum(y * cot), y

    def dense(t):
        y = _dense_reference(x, tree.overlay(frozen, t), SPEC)
        return jnp.sum(y * cot), y

    (_, yg), gg = jax.jit(jax.value_and_grad(grouped, has_aux=True))(trainable)
    (_, yd), gd = jax.jit(jax.value_and_grad(dense, has_aux=True))(trainable)
    plain = moe.moe_block(x, frozen, top_k=K, normalize=True, grouped=impl)[0]
    assert np.abs(np.asarray(yd - plain)).max() > 0.1  # the adapter and the magnitudes are there to see
    np.testing.assert_allclose(np.asarray(yg), np.asarray(yd), atol=1e-5, rtol=1e-5)
    for (path, a), b in zip(tree.flatten(gg).items(), tree.flatten(gd).values()):
        assert float(jnp.abs(b).max()) > 1e-3, path
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=path)
    q = p["experts"]["up_proj"]  # the norm without the (E, in, out) sum equals the plain one
    np.testing.assert_allclose(np.asarray(lora.expert_weight_norm(q["w"], q["lora_a"], q["lora_b"], SPEC.scaling)),
                               np.asarray(jnp.linalg.norm(q["w"] + SPEC.scaling * q["lora_a"] @ q["lora_b"], axis=1)),
                               rtol=1e-5)


def test_expert_dora_on_nf4_experts_equals_their_dequantized_weights():
    """QLoRA + DoRA: NF4 experts (the norm reads them dequantized) give the outputs of their dequantized weights."""
    from jaxft import quant

    p = _block_params(jax.random.PRNGKey(3))
    q = quant.quantize_params(p, "nf4", block_size=4, include=r"experts/.*/w", dense_dtype=None)
    assert isinstance(q["experts"]["up_proj"]["w"], quant.QuantizedWeight)
    dequantized = jax.tree.map(lambda w: w.dequantize(jnp.float32) if isinstance(w, quant.QuantizedWeight) else w, q,
                               is_leaf=lambda w: isinstance(w, quant.QuantizedWeight))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, D))
    block = jax.jit(lambda p: moe.moe_block(x, p, top_k=K, normalize=True, grouped="tiled",
                                            expert_linear=SPEC.grouped_linear)[0])
    yq, yd, yf = block(q), block(dequantized), block(p)
    assert np.abs(np.asarray(yf - yd)).max() > 1e-3  # the quantization is there to see
    np.testing.assert_allclose(np.asarray(yq), np.asarray(yd), atol=1e-5, rtol=1e-5)


FAMILIES = {
    "qwen3_moe": (qwen3_moe, dict(head_dim=6, normalize=True)),
    "olmoe": (olmoe, dict(head_dim=4, normalize=False)),
    "qwen3_moe_mixed": (qwen3_moe, dict(head_dim=6, normalize=True, dense_layers=(1,), dense_mlp_dim=20)),
}
TOKENS = np.random.RandomState(0).randint(0, 48, (2, 10))


def _model(variant):
    family, extra = FAMILIES[variant]
    cfg = family.Config(vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=F, n_experts=E, top_k=K,
                        **extra)
    params = family.init(jax.random.PRNGKey(0), cfg)
    if variant == "qwen3_moe_mixed":  # each layer's unused MLP zero, as loaded (`qwen3_moe.checkpoint_view`)
        mlp, dense = params["layers"]["mlp"], jnp.asarray([0.0, 1.0])  # layer 1 dense
        for name in ("gate_proj", "up_proj", "down_proj"):
            mlp[name]["w"] = mlp[name]["w"] * dense[:, None, None]
            mlp["experts"][name]["w"] = mlp["experts"][name]["w"] * (1 - dense)[:, None, None, None]
        mlp["router"]["w"] = mlp["router"]["w"] * (1 - dense)[:, None, None]
    return family, cfg, params


@pytest.mark.parametrize("variant,dora", [("olmoe", False), ("olmoe", True), ("qwen3_moe_mixed", True)])
def test_fresh_adapter_is_the_base_and_merge_is_exact(variant, dora):
    """LoRA / DoRA on attention and experts (`all-linear`): fresh, the logits are the base model's; trained
    (random factors and magnitudes), `lora.merge` gives plain weights with the adapted logits."""
    family, cfg, base = _model(variant)
    spec = lora.LoraSpec(rank=R, alpha=5.0, dora=dora)
    trainable = lora.init(jax.random.PRNGKey(1), base, spec, lora.target_paths(base, "all-linear", cfg.model_type))
    assert trainable["layers"]["mlp"]["experts"]["down_proj"]["lora_a"].shape == (2, E, F, R)
    if dora:
        assert trainable["layers"]["mlp"]["experts"]["gate_proj"]["magnitude"].shape == (2, E, F)
    tokens = jnp.asarray(TOKENS)
    logits = jax.jit(lambda params, t: family.forward(cfg, params, tokens, trainable=t, peft=spec.as_method())[0])
    plain = np.asarray(logits(base, None))
    np.testing.assert_allclose(np.asarray(logits(base, trainable)), plain, atol=1e-6)
    trained = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), trainable)
    adapted = np.asarray(logits(base, trained))
    assert np.abs(adapted - plain).max() > 1e-2
    np.testing.assert_allclose(np.asarray(logits(lora.merge(base, trained, spec), None)), adapted, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("variant,dora", [("qwen3_moe", False), ("olmoe", False), ("qwen3_moe", True)])
def test_adapter_on_the_experts_trains(variant, dora):
    """A few Adam steps on LoRA / DoRA of the experts alone (router and attention frozen): the loss falls."""
    family, cfg, base = _model(variant)
    spec = lora.LoraSpec(rank=R, alpha=5.0, dora=dora)
    paths = lora.target_paths(base, r"layers/mlp/experts/.*", cfg.model_type)
    trainable = lora.init(jax.random.PRNGKey(1), base, spec, paths)
    assert set(trainable["layers"]) == {"mlp"} and set(trainable["layers"]["mlp"]) == {"experts"}
    tokens = jnp.asarray(TOKENS)

    def loss(t):
        logits = family.forward(cfg, base, tokens[:, :-1], trainable=t, peft=spec.as_method())[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    opt = optax.adam(3e-2)

    @jax.jit
    def step(t, state):
        value, grads = jax.value_and_grad(loss)(t)
        updates, state = opt.update(grads, state, t)
        return optax.apply_updates(t, updates), state, value

    state, losses = opt.init(trainable), []
    for _ in range(3):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.01, losses
