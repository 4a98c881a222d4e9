"""QLoRA end to end on a tiny model: a LoRA trained on a quantized base merged into it (bf16, or quantized
again), and generation from a quantized base."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.generate import generate
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora
from jaxft.quant import QuantizedWeight, quantize_params, stored_bits
from jaxft.peft.qlora import merge_lora
from jaxft.tree import flatten, map_with_path, unflatten
from jaxprs import equations

BLOCK = 32
CFG = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                  max_seq_len=64)
TOKENS = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
forward = jax.jit(lambda base, trainable, spec: llama.forward(CFG, base, TOKENS, trainable=trainable, lora=spec)[0],
                  static_argnums=2)  # float32 compute: dequantized and merged weights are used as they are


@pytest.fixture(scope="module")
def params():
    # std 0.1 rather than init's 0.02: peaked logits, so that greedy decoding has no near-ties
    init = jax.jit(llama.init, static_argnums=1)(jax.random.PRNGKey(0), CFG)
    return map_with_path(lambda path, x: 5.0 * x if path.endswith("/w") else x, init)


def _adapter(params, spec, targets="all-linear", seed=2):
    """A LoRA as after some training: B random (at init it is zero, and the merge would be trivially exact),
    DoRA magnitudes off the column norms. Drawn with numpy: XLA compiles jax.random's generator slowly."""
    rng = np.random.default_rng(seed)
    flat, adapter = flatten(params), {}
    for path in lora.target_paths(params, targets):
        module, (n_layers, d_in, d_out) = path.rsplit("/", 1)[0], flat[path].shape
        adapter[f"{module}/lora_a"] = rng.uniform(-1, 1, (n_layers, d_in, spec.rank)) / np.sqrt(d_in)
        adapter[f"{module}/lora_b"] = 0.2 * rng.standard_normal((n_layers, spec.rank, d_out))
        if spec.dora:
            norms = np.linalg.norm(np.asarray(flat[path]), axis=-2)
            adapter[f"{module}/magnitude"] = norms * rng.uniform(0.8, 1.2, norms.shape)
    return unflatten({p: jnp.asarray(x, jnp.float32) for p, x in adapter.items()})


def _expected_bits(base, double_quant) -> float:
    """Bits per parameter of the linear weights of `base`, re-derived from the QuantizedWeight invariant."""
    bits = count = 0
    for x in flatten(base).values():
        if isinstance(x, QuantizedWeight):
            n_layers, n = x.shape[0], x.in_dim * x.out_dim
            scales = n // x.block_size
            per_layer = 4 * n + (8 * scales + 32 * -(-scales // 256) + 32 if double_quant else 32 * scales)
            bits, count = bits + n_layers * per_layer, count + n_layers * n
    return bits / count


def test_merged_bf16_base_equals_adapted_quantized_model(params):
    base = quantize_params(params, "nf4", block_size=BLOCK)
    spec = lora.LoraSpec(rank=4, alpha=8)
    trainable = _adapter(params, spec)
    want = forward(base, trainable, spec)

    merged = merge_lora(base, trainable, spec)
    flat = flatten(merged)
    assert not any(isinstance(x, QuantizedWeight) for x in flat.values())
    assert {flat[p].dtype for p in flat if p.endswith("/w")} == {jnp.dtype(jnp.bfloat16)}
    got = forward(merged, None, None)
    # Rounding the merged weights to bf16 moves the logits by up to ~2.5% of their spread here, as much as
    # casting the dequantized base to bf16 does; twice that is allowed.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0.05 * float(jnp.std(want)))
    # Merged in float32, the only difference is the order of float32 operations (~3e-6 of the spread).
    exact = forward(merge_lora(base, trainable, spec, dtype=jnp.float32), None, None)
    np.testing.assert_allclose(np.asarray(exact), np.asarray(want), rtol=0, atol=2e-5 * float(jnp.std(want)))


def test_requantized_merge(params):
    base = quantize_params(params, "nf4", block_size=BLOCK)
    spec = lora.LoraSpec(rank=4, alpha=8)
    trainable = _adapter(params, spec)
    want = forward(base, trainable, spec)

    merged = merge_lora(base, trainable, spec, requantize=True)
    flat = flatten(merged)
    linear = [p for p in flat if p.startswith("layers/") and p.endswith("/w")]
    assert all(isinstance(flat[p], QuantizedWeight) and flat[p].format == "nf4" and flat[p].block_size == BLOCK
               and flat[p].offset is not None for p in linear)
    assert stored_bits(merged) == pytest.approx(_expected_bits(merged, True), rel=1e-12)
    assert stored_bits(merged) == stored_bits(base)
    # Rounded once more, the merged model is as far from base + adapter as NF4 put the base from the original
    # weights, and far nearer to it than the base without the adapter.
    rms = lambda a, b: float(jnp.sqrt(jnp.mean(jnp.square(a - b))))
    err = rms(forward(merged, None, None), want)
    assert err < 1.5 * rms(forward(base, None, None), forward(params, None, None))
    assert err < 0.5 * rms(forward(base, None, None), want)

    as_int4 = merge_lora(base, trainable, spec, requantize="int4")
    assert {x.format for x in flatten(as_int4).values() if isinstance(x, QuantizedWeight)} == {"int4"}
    assert stored_bits(as_int4) == pytest.approx(_expected_bits(as_int4, True), rel=1e-12)

    # An unchanged weight quantizes back to its own codes.
    zero = jax.tree.map(jnp.zeros_like, trainable)
    again = flatten(merge_lora(base, zero, spec, requantize=True))
    for p in linear:
        np.testing.assert_array_equal(np.asarray(again[p].codes), np.asarray(flatten(base)[p].codes))


def test_merge_of_some_targets_dora(params):
    base = quantize_params(params, "nf4", block_size=BLOCK)
    spec = lora.LoraSpec(rank=4, alpha=8, dora=True)
    trainable = _adapter(params, spec, targets="default")  # q_proj and v_proj only
    flat, adapter = flatten(base), flatten(trainable)

    kept = flatten(merge_lora(base, trainable, spec, requantize=True))
    assert kept["layers/mlp/up_proj/w"] is flat["layers/mlp/up_proj/w"]  # not adapted: kept bit for bit
    assert isinstance(kept["layers/attn/q_proj/w"], QuantizedWeight)
    assert kept["layers/attn/q_proj/w"] is not flat["layers/attn/q_proj/w"]
    assert kept["embed/w"] is flat["embed/w"]

    dense = flatten(merge_lora(base, trainable, spec))
    assert not any(isinstance(x, QuantizedWeight) for x in dense.values())
    assert dense["layers/mlp/up_proj/w"].dtype == jnp.bfloat16  # dequantized, not adapted

    # DoRA on the dequantized weight: m * (W + s A B) / ||W + s A B||, per output column.
    merged = flatten(merge_lora(base, trainable, spec, dtype=jnp.float32))["layers/attn/q_proj/w"]
    w = np.asarray(jax.jit(lambda q: q.dequantize(jnp.float32))(flat["layers/attn/q_proj/w"]))
    a, b, m = (np.asarray(adapter[f"layers/attn/q_proj/{k}"]) for k in ("lora_a", "lora_b", "magnitude"))
    w = w + spec.scaling * a @ b
    np.testing.assert_allclose(np.asarray(merged), w * (m / np.linalg.norm(w, axis=-2))[:, None, :], rtol=1e-5,
                               atol=1e-6)

    with pytest.raises(ValueError, match="requantize"):
        merge_lora(base, trainable, spec, requantize="nf8")


def test_generate_from_quantized_base_equals_dequantized_twin(params):
    base = quantize_params(params, "nf4", block_size=BLOCK)
    twin = jax.jit(lambda b: jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, QuantizedWeight)
                                          else x, b, is_leaf=lambda x: isinstance(x, QuantizedWeight)))(base)
    prompts = [[5, 9, 13, 2], [7, 1]]
    run = partial(generate, CFG, prompts=prompts, max_new_tokens=12, dtype=jnp.float32)
    assert run(base) == run(twin)
    assert len(set(run(twin)[0])) > 1  # not one repeated token



def test_training_keeps_no_dense_copy_of_the_base(params):
    """Differentiated, the layer scan keeps no dequantized weight for the backward pass (which dequantizes
    again): no residual the forward scan hands to the backward one has the shape of a dense linear weight."""
    base = quantize_params(params, "nf4", block_size=BLOCK)
    spec = lora.LoraSpec(rank=4, alpha=8)
    trainable = lora.init(jax.random.PRNGKey(1), base, spec, lora.target_paths(base, "all-linear"))

    def loss(t):
        return jnp.mean(llama.forward(CFG, base, TOKENS, trainable=t, lora=spec, dtype=jnp.bfloat16)[0])

    dense_shapes = {x.shape for x in flatten(base).values() if isinstance(x, QuantizedWeight)}
    scans = [e for e in equations(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr) if e.primitive.name == "scan"]
    assert len(scans) == 2  # forward and backward
    for scan in scans:
        assert not [v.aval for v in scan.outvars
                    if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.shape in dense_shapes]
