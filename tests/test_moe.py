"""The mixture-of-experts block (`jaxft.models.moe`) and its router losses against transformers' Mixtral and
Qwen2-MoE blocks and load_balancing_loss_func, and against plain all-experts implementations (LoRA, capacity,
FLOPs, quantized experts, upcycling). Tiny random models, float32."""

import math
from functools import partial

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from jaxft.models import moe
from jaxft.models.grouped import grouped_matmul
from jaxft.models.moe_losses import expert_share, load_balancing_loss, router_z_loss
from jaxft.quant import as_dense, quantize

D, F, E, K = 16, 24, 6, 2


def _randomized(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return module.eval()


def _experts_from_hf(experts) -> dict:
    """transformers 5's fused layout, gate_up_proj (E, 2F, D) and down_proj (E, D, F), -> ours (E, in, out)."""
    gate_up = experts.gate_up_proj.detach().numpy()
    f = gate_up.shape[1] // 2
    return {"gate_proj": {"w": jnp.asarray(gate_up[:, :f].transpose(0, 2, 1))},
            "up_proj": {"w": jnp.asarray(gate_up[:, f:].transpose(0, 2, 1))},
            "down_proj": {"w": jnp.asarray(experts.down_proj.detach().numpy().transpose(0, 2, 1))}}


def _linear_from_hf(layer) -> dict:
    return {"w": jnp.asarray(layer.weight.detach().numpy().T)}


_block = jax.jit(moe.moe_block, static_argnames=("top_k", "normalize", "capacity_factor", "lora_scale",
                                                   "grouped"))


def _x(seed=1, b=2, t=7):
    return np.random.default_rng(seed).normal(size=(b, t, D)).astype(np.float32)


@pytest.mark.parametrize("grouped", ["tiled", "ragged_dot"])
def test_mixtral_block_equals_transformers(grouped):
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
    block = _randomized(MixtralSparseMoeBlock(cfg))
    x = _x()
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
        want_logits = block.gate(torch.from_numpy(x).reshape(-1, D))[0].numpy()
    p = {"router": _linear_from_hf(block.gate), "experts": _experts_from_hf(block.experts)}
    got, aux = _block(jnp.asarray(x), p, top_k=K, normalize=True, grouped=grouped)
    np.testing.assert_allclose(np.asarray(aux["router_logits"]).reshape(-1, E), want_logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert int(aux["dropped"]) == 0


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_olmoe_and_qwen3_moe_blocks_equal_transformers(family):
    if family == "olmoe":  # norm_topk_prob False by default
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        cfg = transformers.OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K)
        assert not cfg.norm_topk_prob
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                          num_experts_per_tok=K, norm_topk_prob=True)
    block = _randomized(Block(cfg), seed=17)
    x = _x(seed=18)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    p = {"router": _linear_from_hf(block.gate), "experts": _experts_from_hf(block.experts)}
    got, _ = _block(jnp.asarray(x), p, top_k=K, normalize=cfg.norm_topk_prob)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_moe_block_with_shared_expert_equals_transformers(norm_topk_prob):
    cfg = transformers.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=20,
                                      num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk_prob)
    block = _randomized(Qwen2MoeSparseMoeBlock(cfg), seed=2)
    x = _x(seed=3)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
        want_logits = block.gate(torch.from_numpy(x).reshape(-1, D))[0].numpy()
    s = block.shared_expert
    p = {"router": _linear_from_hf(block.gate), "experts": _experts_from_hf(block.experts),
         "shared": {n: _linear_from_hf(getattr(s, n)) for n in ("gate_proj", "up_proj", "down_proj")},
         "shared_gate": _linear_from_hf(block.shared_expert_gate)}
    got, aux = _block(jnp.asarray(x), p, top_k=K, normalize=norm_topk_prob)
    np.testing.assert_allclose(np.asarray(aux["router_logits"]).reshape(-1, E), want_logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_aux_losses_equal_transformers_with_padding():
    rng = np.random.default_rng(4)
    b, t, layers = 3, 5, 3
    logits = rng.normal(size=(layers, b, t, E)).astype(np.float32) * 2
    mask = np.ones((b, t), np.int64)
    mask[0, 3:] = 0  # padding: its routing must count for nothing
    mask[2, 1:] = 0
    as_torch = tuple(torch.from_numpy(l.reshape(b * t, E)) for l in logits)
    want = load_balancing_loss_func(as_torch, E, K, torch.from_numpy(mask)).item()
    np.testing.assert_allclose(float(load_balancing_loss(jnp.asarray(logits), K, jnp.asarray(mask))), want,
                               rtol=1e-6)
    want_unmasked = load_balancing_loss_func(as_torch, E, K).item()
    np.testing.assert_allclose(float(load_balancing_loss(list(logits), K)), want_unmasked, rtol=1e-6)
    assert abs(want - want_unmasked) > 1e-3  # the mask made a difference the test sees

    want_z = router_z_loss_func(torch.from_numpy(logits.reshape(layers * b, t, E))).item()
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits))), want_z, rtol=1e-6)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1)) ** 2  # (L, B, T)
    want_z_masked = (lse * mask).sum() / (layers * mask.sum())
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits), jnp.asarray(mask))), want_z_masked,
                               rtol=1e-5)

    share, ratio = expert_share(jnp.asarray(logits), K, jnp.asarray(mask))
    chosen = np.argsort(-logits, axis=-1)[..., :K]  # (L, B, T, K)
    counts = np.stack([np.bincount(chosen[l][mask.astype(bool)].ravel(), minlength=E) for l in range(layers)])
    np.testing.assert_allclose(np.asarray(share), counts / counts.sum(-1, keepdims=True), atol=1e-7)
    want_ratio = np.where(counts.min(-1) > 0, counts.max(-1) / np.maximum(counts.min(-1), 1), np.inf)
    np.testing.assert_allclose(np.asarray(ratio), want_ratio, rtol=1e-6)


def _random_block(seed, d=D, f=F, e=E, r=None):
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    p = {"router": {"w": jax.random.normal(keys[0], (d, e))},
         "experts": {"gate_proj": {"w": 0.3 * jax.random.normal(keys[1], (e, d, f))},
                     "up_proj": {"w": 0.3 * jax.random.normal(keys[2], (e, d, f))},
                     "down_proj": {"w": 0.3 * jax.random.normal(keys[3], (e, f, d))}}}
    if r:
        for i, (name, (i_dim, o_dim)) in enumerate((("gate_proj", (d, f)), ("up_proj", (d, f)),
                                                    ("down_proj", (f, d)))):
            ka, kb = jax.random.split(keys[4 + i])
            p["experts"][name]["lora_a"] = 0.3 * jax.random.normal(ka, (e, i_dim, r))
            p["experts"][name]["lora_b"] = 0.3 * jax.random.normal(kb, (e, r, o_dim))
    return p


def _all_experts_reference(x, p, top_k, normalize, scale=1.0, keep=None):
    """Every expert on every token with its merged weight W_e + scale * A_e @ B_e, combined by a dense (N, E)
    matrix of routing weights (`keep` (N, k) zeroes dropped assignments)."""
    flat = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax(flat @ p["router"]["w"], axis=-1)
    weights, chosen = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    if keep is not None:
        weights = weights * keep
    combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(chosen, probs.shape[-1]))
    w = {n: q["w"] + scale * q["lora_a"] @ q["lora_b"] if "lora_a" in q else q["w"] for n, q in p["experts"].items()}
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", flat, w["gate_proj"])) * jnp.einsum("nd,edf->enf", flat, w["up_proj"])
    out = jnp.einsum("enf,efd->end", h, w["down_proj"])
    return jnp.einsum("ne,end->nd", combine, out).reshape(x.shape)


@pytest.mark.parametrize("grouped", ["tiled", "ragged_dot"])
def test_lora_on_experts_equals_materialized_deltas_with_gradients(grouped):
    r = 4
    p = _random_block(5, r=r)
    x = jnp.asarray(_x(seed=6))
    scale = 8.0 / math.sqrt(r)  # rsLoRA's alpha / sqrt(r), the caller's choice
    cotangent = jax.random.normal(jax.random.PRNGKey(7), x.shape)

    def loss(trained, fn):  # LoRA factors, a trainable router, and the block's input
        q = jax.tree.map(lambda a: a, p)
        for name, (a, b) in trained["lora"].items():
            q["experts"][name].update(lora_a=a, lora_b=b)
        q["router"]["w"] = trained["router"]
        return jnp.sum(fn(q, trained["x"]) * cotangent)

    trained = {"lora": {n: (p["experts"][n]["lora_a"], p["experts"][n]["lora_b"]) for n in p["experts"]},
               "router": p["router"]["w"], "x": x}
    block = lambda q, x: moe.moe_block(x, q, top_k=K, normalize=False, lora_scale=scale, grouped=grouped)[0]
    reference = lambda q, x: _all_experts_reference(x, q, K, False, scale)
    outputs = jax.jit(lambda: (block(p, x), reference(p, x)))()
    np.testing.assert_allclose(np.asarray(outputs[0]), np.asarray(outputs[1]), atol=1e-5, rtol=1e-5)
    got, want = jax.jit(lambda t: (jax.grad(loss)(t, block), jax.grad(loss)(t, reference)))(trained)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.abs(w).max()) > 1e-3  # a gradient that is there to compare
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_factor_drops_what_it_says(factor):
    p = _random_block(8)
    x = jnp.asarray(_x(seed=9, b=2, t=9))
    n = 18
    cap = moe.capacity(n, E, K, factor)
    assert cap == math.ceil(factor * n * K / E)
    got, aux = _block(x, p, top_k=K, normalize=True, capacity_factor=factor, grouped="ragged_dot")
    # Choice-major priority: every first choice, token by token, then every second choice.
    logits = np.asarray(x).reshape(n, D) @ np.asarray(p["router"]["w"])
    chosen = np.argsort(-logits, axis=-1)[:, :K]
    keep, taken = np.zeros((n, K), np.float32), np.zeros(E, int)
    for j in range(K):
        for i in range(n):
            if taken[chosen[i, j]] < cap:
                keep[i, j], taken[chosen[i, j]] = 1.0, taken[chosen[i, j]] + 1
    assert int(aux["dropped"]) == int((keep == 0).sum())
    if factor == 0.5:
        assert int(aux["dropped"]) > 0
    want = jax.jit(_all_experts_reference, static_argnums=(2, 3))(x, p, K, True, keep=jnp.asarray(keep))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and ragged_dot_general in a jaxpr (sub-jaxprs included, a scan's
    body times its length), counted from the operands' shapes: a ragged product multiplies each row by one
    group's weight."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "ragged_dot_general":
            (m, kd), n_out = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[-1]
            total += 2 * m * kd * n_out
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _matmul_flops(sub) * (eqn.params["length"] if name == "scan" else 1)
    return total


def test_grouped_flops_are_top_k_over_experts_of_dense():
    e, k, f = 8, 2, 32
    p = _random_block(10, f=f, e=e)
    x = jnp.asarray(_x(seed=11, b=4, t=8))
    n, m = 32, 64
    flops = lambda fn: _matmul_flops(jax.make_jaxpr(fn)(x).jaxpr)
    dense = flops(lambda x: _all_experts_reference(x, p, k, True))
    ragged = flops(lambda x: moe.moe_block(x, p, top_k=k, normalize=True, grouped="ragged_dot")[0])
    router, combine = 2 * n * D * e, 2 * m * D
    assert ragged == router + 3 * 2 * m * D * f + combine  # each routed row through one expert's three matrices
    assert ragged <= 1.2 * (k / e) * dense
    assert moe.block_flops(n, D, f, e, k) == {"grouped": ragged, "all_experts": dense}
    full = _random_block(10, f=f, e=e, r=4)  # + LoRA on the experts and a gated shared expert of width 20
    full["shared"] = {"gate_proj": {"w": jnp.ones((D, 20))}, "up_proj": {"w": jnp.ones((D, 20))},
                      "down_proj": {"w": jnp.ones((20, D))}}
    full["shared_gate"] = {"w": jnp.ones((D, 1))}
    counted = flops(lambda x: moe.moe_block(x, full, top_k=k, normalize=True, grouped="ragged_dot")[0])
    assert counted == moe.block_flops(n, D, f, e, k, rank=4, shared_dim=20)["grouped"]
    # Tiled: a loop over the e experts, each a loop over its full tiles of min(m, 128) rows, here 64, then one over
    # small tiles of 64 / 4 = 16 rows (the count takes each inner body once; tests/test_grouped_fused.py counts
    # the tiles that run).
    tiled = flops(lambda x: moe.moe_block(x, p, top_k=k, normalize=True, grouped="tiled")[0])
    assert tiled == router + e * 3 * 2 * (64 + 16) * D * f + combine


def test_tiled_grouped_matmul_equals_ragged_dot():
    m, i, o = 45, 16, 12
    keys = jax.random.split(jax.random.PRNGKey(16), 3)
    x, w = jax.random.normal(keys[0], (m, i)), jax.random.normal(keys[1], (5, i, o))
    sizes = jnp.array([10, 0, 17, 3, 9], jnp.int32)  # an empty group; the last 6 rows in none
    cotangent = jax.random.normal(keys[2], (m, o))
    q = quantize(np.asarray(w), "nf4", block_size=8)

    @partial(jax.jit, static_argnums=(2,))
    def value_and_grads(x, w, impl):
        fn = lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, impl, block=8) * cotangent)
        return grouped_matmul(x, w, sizes, impl, block=8), jax.grad(fn, argnums=(0, 1))(x, w)

    want, got = value_and_grads(x, w, "ragged_dot"), value_and_grads(x, w, "tiled")
    assert float(jnp.abs(got[0][39:]).max()) == 0.0 and float(jnp.abs(want[1][1]).max()) > 1.0
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), atol=2e-5, rtol=1e-5)
    # A quantized weight, one expert dequantized per tile: equal to the product with the dequantized weight.
    tiled_q = jax.jit(lambda x: jax.grad(lambda x: jnp.sum(grouped_matmul(x, q, sizes, "tiled", 8) * cotangent))(x))
    dense_q = value_and_grads(x, as_dense(q, jnp.float32), "ragged_dot")
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: grouped_matmul(x, q, sizes, "tiled", 8))(x)),
                               np.asarray(dense_q[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(tiled_q(x)), np.asarray(dense_q[1][0]), atol=1e-5)
    with pytest.raises(ValueError, match="grouped matmul implementation 'megablox'"):
        grouped_matmul(x, w, sizes, "megablox")


def test_nf4_experts_dequantized_inside_the_grouped_product():
    p = _random_block(12, d=32, f=64, r=4)
    x = jax.random.normal(jax.random.PRNGKey(13), (2, 5, 32))
    q = jax.tree.map(lambda a: a, p)
    dequantized = jax.tree.map(lambda a: a, p)
    for name in ("gate_proj", "up_proj", "down_proj"):
        q["experts"][name]["w"] = quantize(np.asarray(p["experts"][name]["w"]), "nf4", block_size=16)
        assert q["experts"][name]["w"].shape == p["experts"][name]["w"].shape  # (E, in, out), E leading
        dequantized["experts"][name]["w"] = as_dense(q["experts"][name]["w"], jnp.float32)
        assert float(jnp.abs(dequantized["experts"][name]["w"] - p["experts"][name]["w"]).max()) > 1e-3

    @partial(jax.jit, static_argnums=(2,))
    def output_and_grad(a, params, grouped):  # the block's output and the gradient w.r.t. one LoRA factor
        def loss(a):
            inner = jax.tree.map(lambda v: v, params)
            inner["experts"]["down_proj"]["lora_a"] = a
            y = moe.moe_block(x, inner, top_k=K, normalize=True, lora_scale=0.5, grouped=grouped)[0]
            return jnp.sum(y ** 2), y
        return jax.grad(loss, has_aux=True)(a)

    a = p["experts"]["down_proj"]["lora_a"]
    want = output_and_grad(a, dequantized, "ragged_dot")
    for grouped in ("tiled", "ragged_dot"):  # one expert per tile / the whole (E, in, out) rematerialized
        got = output_and_grad(a, q, grouped)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-4, rtol=1e-5)


def test_upcycled_block_equals_the_dense_mlp():
    keys = jax.random.split(jax.random.PRNGKey(14), 4)
    layers = 2
    mlp = {"gate_proj": {"w": 0.3 * jax.random.normal(keys[0], (layers, D, F))},
           "up_proj": {"w": 0.3 * jax.random.normal(keys[1], (layers, D, F))},
           "down_proj": {"w": 0.3 * jax.random.normal(keys[2], (layers, F, D))}}
    x = jax.random.normal(keys[3], (2, 6, D))
    stacked = moe.upcycle(mlp, n_experts=8)
    assert stacked["experts"]["down_proj"]["w"].shape == (layers, 8, F, D)
    noisy = moe.upcycle(mlp, n_experts=8, router_std=0.5, key=keys[3])

    @jax.jit
    def both(one, m):
        want = (jax.nn.silu(x @ m["gate_proj"]["w"]) * (x @ m["up_proj"]["w"])) @ m["down_proj"]["w"]
        return moe.moe_block(x, one, top_k=2, normalize=True, grouped="ragged_dot")[0], want

    for params in (stacked, noisy):
        for layer in range(layers):
            got, want = both(*jax.tree.map(lambda a: a[layer], (params, mlp)))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_bad_input_one_line_errors():
    p = _random_block(15)
    x = jnp.asarray(_x())
    with pytest.raises(ValueError, match="top_k=7"):
        moe.moe_block(x, p, top_k=7, normalize=True)
    bad = jax.tree.map(lambda a: a, p)
    bad["experts"]["up_proj"]["w"] = bad["experts"]["up_proj"]["w"][:4]
    with pytest.raises(ValueError, match="experts/up_proj/w has 4 experts but router/w routes to 6"):
        moe.moe_block(x, bad, top_k=2, normalize=True)
    bad = _random_block(15, r=2)
    bad["experts"]["down_proj"]["lora_b"] = bad["experts"]["down_proj"]["lora_b"][:5]
    with pytest.raises(ValueError, match="experts/down_proj/lora_b has 5 experts"):
        moe.moe_block(x, bad, top_k=2, normalize=True)
    with pytest.raises(ValueError, match=r"attention mask of shape \(2, 3\)"):
        load_balancing_loss(jnp.zeros((1, 2, 7, E)), K, jnp.ones((2, 3)))
