"""The quantized frozen base: NF4 bit for bit against bitsandbytes (a test dependency; it runs on the CPU),
int4 error bounds, storage cost, and a quantized Llama that computes what its dequantized twin computes."""

from functools import partial

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.quant import QuantizedWeight, as_dense, leaf_fn, quantize, quantize_params, stored_bits
from jaxft.quant.codebooks import DYNAMIC, NF4, encode_dynamic
from jaxft.tree import flatten, map_with_path
from jaxprs import equations

dense = jax.jit(lambda q: q.dequantize(jnp.float32))  # one compilation instead of one per eager op
init = jax.jit(llama.init, static_argnums=1)

# --------------------------------------------------------------------------------------------------------------
# NF4 against bitsandbytes. bitsandbytes quantizes the torch weight W (out, in); jaxft holds w = W.T (in, out).


def _torch_weight(out_dim, in_dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_dim, in_dim, generator=g) * 0.05
    w[0, :64] = 0.0  # an all-zero block
    w[1, 64:128] = 0.0
    w[1, 70], w[1, 80] = 0.3, -0.3  # a block whose absmax appears with both signs
    return w.to(dtype)


def _jaxft_weight(w: torch.Tensor):
    return jnp.asarray(w.float().numpy().T).astype(jnp.bfloat16 if w.dtype == torch.bfloat16 else jnp.float32)


def _bnb_state(q: QuantizedWeight, dtype):
    """A bitsandbytes QuantState holding jaxft's arrays, so that bitsandbytes dequantizes what jaxft stored."""
    nested = None
    if q.offset is not None:
        nested = bnbf.QuantState(absmax=torch.from_numpy(np.array(q.nested_scales)),
                                 code=torch.from_numpy(DYNAMIC.copy()), blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(
        absmax=torch.from_numpy(np.array(q.scales).reshape(-1)), shape=(q.out_dim, q.in_dim), dtype=dtype,
        blocksize=q.block_size, code=torch.from_numpy(NF4.copy()), quant_type="nf4",
        offset=None if nested is None else torch.tensor(float(q.offset)), state2=nested)


@pytest.mark.parametrize("out_dim,in_dim,block_size,dtype", [
    (48, 320, 64, torch.float32), (96, 512, 64, torch.bfloat16), (40, 256, 128, torch.float32),
    (24, 96, 32, torch.float32)])
def test_nf4_equals_bitsandbytes(out_dim, in_dim, block_size, dtype):
    w = _torch_weight(out_dim, in_dim, seed=out_dim, dtype=dtype)
    ref_codes, ref = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    q = quantize(_jaxft_weight(w), "nf4", block_size=block_size, double_quant=False)

    assert q.codes.shape == (out_dim, in_dim // 2) and q.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), ref_codes.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), ref.absmax.numpy())
    for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        ref.dtype = tdt
        expected = bnbf.dequantize_4bit(ref_codes, ref).float().numpy().T
        got = jax.jit(lambda q: q.dequantize(jdt))(q).astype(jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), expected)


def _cuda_dquantize(x):
    """bitsandbytes' CUDA `dQuantize<0>` (8-bit codes into the dynamic map), vectorized over x."""
    code = DYNAMIC
    pivot, lo_p, up_p = np.full(x.shape, 127), np.zeros(x.shape, int), np.full(x.shape, 255)
    lower, upper = np.full(x.shape, -1.0, np.float32), np.full(x.shape, 1.0, np.float32)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lo_p, lower = np.where(right, pivot, lo_p), np.where(right, val, lower)
        up_p, upper = np.where(right, up_p, pivot), np.where(right, upper, val)
        pivot = np.where(right, pivot + step, pivot - step)
        val = code[pivot]
    upper = np.where(up_p == 255, code[255], upper)
    lower = np.where(lo_p == 0, code[0], lower)
    above = x > val
    up = np.where(x > (upper + val) * np.float32(0.5), up_p, pivot)
    down = np.where(x < (lower + val) * np.float32(0.5), lo_p, pivot)
    return np.where(above, up, down)


def test_dynamic_map_and_8bit_rounding():
    np.testing.assert_array_equal(DYNAMIC, bnbf.create_dynamic_map().numpy())
    rng = np.random.default_rng(0)
    mids = (DYNAMIC[:-1] + DYNAMIC[1:]) * np.float32(0.5)
    x = np.concatenate([rng.uniform(-1, 1, 4000), rng.uniform(-1, 1, 4000) * 10.0 ** rng.uniform(-8, 0, 4000),
                        mids, DYNAMIC]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(encode_dynamic(jnp.asarray(x))), _cuda_dquantize(x))


@pytest.mark.parametrize("out_dim,in_dim", [(48, 320), (200, 1024)])  # the last nested block partial
def test_nf4_double_quant_equals_bitsandbytes(out_dim, in_dim):
    w = _torch_weight(out_dim, in_dim, seed=in_dim)
    ref_codes, ref = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize(_jaxft_weight(w), "nf4", block_size=64, double_quant=True)
    absmax = np.asarray(quantize(_jaxft_weight(w), "nf4", double_quant=False).scales).reshape(-1)

    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), ref_codes.numpy().reshape(-1))
    assert q.scales.dtype == jnp.uint8 and q.offset.shape == ()
    # The mean of the scales may differ in the last bit: torch and XLA sum float32 in different orders.
    offset = np.float32(q.offset)
    assert abs(ref.offset.item() - offset) <= 2 * np.spacing(offset)
    np.testing.assert_allclose(np.asarray(q.nested_scales), ref.state2.absmax.numpy(), rtol=1e-6)

    # Given the same centered scales, the nested absmax is bitsandbytes' bit for bit and the 8-bit codes are
    # those of its CUDA kernel. Its CPU kernel rounds approximately, so it may differ, never by being closer.
    centered = absmax - offset
    cpu_codes, cpu_state = bnbf.quantize_blockwise(torch.from_numpy(centered), blocksize=256)
    np.testing.assert_array_equal(np.asarray(q.nested_scales), cpu_state.absmax.numpy())
    normed = centered * np.repeat(np.float32(1) / cpu_state.absmax.numpy(), 256)[:centered.size]
    mine = np.asarray(q.scales).reshape(-1)
    np.testing.assert_array_equal(mine, _cuda_dquantize(normed))
    assert np.all(np.abs(normed - DYNAMIC[mine]) <= np.abs(normed - DYNAMIC[cpu_codes.numpy()]))

    # bitsandbytes reads jaxft's stored arrays as its own, to the same values.
    expected = bnbf.dequantize_4bit(ref_codes, _bnb_state(q, torch.float32)).numpy().T
    np.testing.assert_array_equal(np.asarray(dense(q)), expected)
    # Its own double quantization differs by at most one 8-bit step of a scale (times |NF4 value| <= 1).
    theirs = bnbf.dequantize_4bit(ref_codes, ref).numpy().T
    step = np.diff(DYNAMIC).max() * np.asarray(q.nested_scales).max()
    np.testing.assert_allclose(np.asarray(dense(q)), theirs, rtol=0, atol=step * (1 + 1e-5))


# --------------------------------------------------------------------------------------------------------------
# int4, layout, storage cost.


@pytest.mark.parametrize("block_size", [32, 128])
def test_int4_round_trip(block_size):
    rng = np.random.default_rng(block_size)
    w = (rng.standard_normal((3, 256, 80)) * 0.02).astype(np.float32)
    blocks = np.abs(np.swapaxes(w, -1, -2).reshape(3, 80, 256 // block_size, block_size)).max(-1)
    bound = np.swapaxes(np.repeat(blocks / 14, block_size, axis=-1), -1, -2)  # half a step, scale = absmax / 7

    q = quantize(w, "int4", block_size=block_size, double_quant=False)
    err = np.abs(np.asarray(dense(q)) - w)
    assert np.all(err <= bound * (1 + 1e-6))
    nibbles = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15])
    assert nibbles.min() >= 1 and nibbles.max() <= 15  # -7..7, symmetric
    assert stored_bits(q) == 4 + 32 / block_size

    qd = quantize(w, "int4", block_size=block_size, double_quant=True)
    scale = np.asarray(jax.jit(lambda q: q.block_scales())(qd))
    scale_err = np.swapaxes(np.repeat(np.abs(scale - blocks / 7), block_size, axis=-1), -1, -2)
    err = np.abs(np.asarray(dense(qd)) - w)
    assert np.all(err <= bound * (1 + 1e-6) + 7 * scale_err * (1 + 1e-6))
    assert np.sqrt(np.mean(err ** 2) / np.mean(w ** 2)) < 0.15


def test_int4_exact_on_its_grid():
    rng = np.random.default_rng(0)
    w = (rng.integers(-7, 8, (128, 16)) * 0.01).astype(np.float32)
    w[0], w[64] = 0.07, -0.07  # every block spans 7 steps
    q = quantize(w, "int4", block_size=64, double_quant=False)
    np.testing.assert_allclose(np.asarray(dense(q)), w, rtol=1e-6, atol=1e-9)


def test_bits_per_parameter():
    """NF4 at block size 64, on a layer of realistic size (dense leaves are not counted; int4: see above)."""
    w = np.random.default_rng(1).standard_normal((2, 1024, 1024)).astype(np.float32)
    params = {"embed": {"w": np.ones((64, 1024), np.float32)},
              "layers": {"mlp": {"up_proj": {"w": w}}, "mlp_norm": {"scale": np.ones((2, 1024), np.float32)}}}
    assert stored_bits(quantize_params(params, "nf4", double_quant=True)) <= 4.127
    assert stored_bits(quantize_params(params, "nf4", double_quant=False)) <= 4.5


@pytest.mark.parametrize("format,double_quant", [("nf4", True), ("int4", False)])
def test_layout_leading_axes_and_scan(format, double_quant):
    w = np.random.default_rng(2).standard_normal((3, 128, 48)).astype(np.float32)
    q = quantize(w, format, double_quant=double_quant)
    assert q.shape == (3, 128, 48) and q.ndim == 3
    assert q.codes.shape == (3, 48, 64) and q.scales.shape == (3, 48, 2)
    if double_quant:
        assert q.nested_scales.shape == (3, 1) and q.offset.shape == (3,)
    full = np.asarray(dense(q))
    for i in range(3):  # each layer is quantized on its own, as bitsandbytes would quantize that layer
        np.testing.assert_array_equal(np.asarray(dense(quantize(w[i], format, double_quant=double_quant))), full[i])
    layer = jax.tree.map(lambda a: a[1], q)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda p: as_dense(p, jnp.float32))(layer)), full[1])
    _, ys = jax.jit(lambda q: jax.lax.scan(lambda c, p: (c, p.dequantize(jnp.float32)), None, q))(q)
    np.testing.assert_array_equal(np.asarray(ys), full)


# --------------------------------------------------------------------------------------------------------------
# The quantized base in the model.

CFG = LlamaConfig(vocab_size=97, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=256)


@pytest.fixture(scope="module")
def params():
    return init(jax.random.PRNGKey(0), CFG)


def test_quantized_llama_equals_dequantized(params):
    base = quantize_params(params, "nf4")
    flat = flatten(base)
    assert sorted(p for p, x in flat.items() if isinstance(x, QuantizedWeight)) == sorted(
        p for p in flat if p.startswith("layers/") and p.endswith("/w"))
    assert all(x.dtype == jnp.bfloat16 for x in flat.values() if not isinstance(x, QuantizedWeight))
    twin = map_with_path(lambda p, x: dense(x) if isinstance(x, QuantizedWeight) else x, base)

    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CFG.vocab_size)
    forward = jax.jit(partial(llama.forward, CFG))
    got, _ = forward(base, tokens)
    want, _ = forward(twin, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    # The scan carries the 4-bit codes, not dense weights: each layer is dequantized inside the loop.
    jaxpr = jax.make_jaxpr(partial(llama.forward, CFG))(base, tokens).jaxpr
    scans = [e for e in equations(jaxpr) if e.primitive.name == "scan"]
    assert len(scans) == 1
    ins = [(v.aval.dtype, v.aval.shape) for v in scans[0].invars]
    assert (jnp.uint8, (CFG.n_layers, CFG.mlp_dim, CFG.dim // 2)) in ins
    dense_shapes = {x.shape for x in flat.values() if isinstance(x, QuantizedWeight)}
    assert not [s for d, s in ins if jnp.issubdtype(d, jnp.floating) and s in dense_shapes]


def test_leaf_fn_quantizes_while_loading(params):
    fn = leaf_fn("nf4")
    loaded = {p: fn(p, np.asarray(x)) for p, x in flatten(params).items()}  # leaves as a loader hands them over
    expected = flatten(quantize_params(params, "nf4"))
    assert loaded.keys() == expected.keys()
    for p, x in loaded.items():
        assert type(x) is type(expected[p])
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(expected[p])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    only_mlp = quantize_params(params, "int4", include=r"layers/mlp/.*/w", dense_dtype=None)
    assert isinstance(only_mlp["layers"]["mlp"]["up_proj"]["w"], QuantizedWeight)
    assert only_mlp["layers"]["attn"]["q_proj"]["w"].dtype == jnp.float32


def test_loaded_qlora_base_equals_bitsandbytes_model(tmp_path):
    """A transformers Llama whose linear weights bitsandbytes quantized (NF4, double quantization) gives the
    logits of the same checkpoint loaded by jaxft with the `leaf_fn` hook."""
    import transformers

    from jaxft.checkpoint import load

    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path, leaf_fn=leaf_fn("nf4", dense_dtype=None))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                codes, state = bnbf.quantize_4bit(module.weight, blocksize=64, quant_type="nf4",
                                                  compress_statistics=True)
                module.weight.copy_(bnbf.dequantize_4bit(codes, state))
        tokens = torch.arange(12)[None] * 7 % 97
        want = model(tokens).logits.numpy()
    got, _ = jax.jit(partial(llama.forward, loaded.cfg))(loaded.params, jnp.asarray(tokens.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


def test_quantized_while_loading_layer_by_layer(tmp_path):
    """The loader hands `leaf_fn` each stacked leaf as `Layers`, read one layer at a time: the quantized base
    equals the float32 base quantized after loading, bit for bit, and so does a bf16 load its cast; a leaf_fn
    without `by_layer` still gets whole stacked host arrays."""
    import transformers

    from jaxft.checkpoint import load
    from jaxft.checkpoint.assemble import Layers

    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path)
    f32 = load(tmp_path).params
    seen, reads = {}, []
    inner = leaf_fn("nf4")

    def spy(path, x):
        seen[path] = type(x)
        if isinstance(x, Layers):
            read = x._read
            x._read = lambda i: reads.append((path, i)) or read(i)
        return inner(path, x)

    spy.by_layer = True
    loaded = flatten(load(tmp_path, leaf_fn=spy).params)
    assert seen["layers/mlp/up_proj/w"] is Layers and issubclass(seen["embed/w"], np.ndarray)
    assert reads[:3] == [(reads[0][0], i) for i in range(3)]  # in order, each once
    assert len(reads) == len(set(reads)) == 3 * sum(p.startswith("layers/") for p in seen)
    expected = flatten(quantize_params(f32, "nf4"))
    assert loaded.keys() == expected.keys()
    for p, x in loaded.items():
        assert type(x) is type(expected[p])
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(expected[p]), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    for p, x in flatten(load(tmp_path, dtype=jnp.bfloat16).params).items():
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(jnp.asarray(flatten(f32)[p], jnp.bfloat16)))
    whole = {}
    load(tmp_path, leaf_fn=lambda path, x: whole.setdefault(path, x))
    assert all(isinstance(x, np.ndarray) for x in whole.values())
    assert whole["layers/mlp/up_proj/w"].shape == (3, 128, 192)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16", "BF16"])
def test_gguf_tensor_dequantized_in_chunks(qtype):
    """GGUF tensors are dequantized a few rows at a time (gguf-py's intermediates are several times their
    output): equal to gguf-py dequantizing the whole tensor."""
    import gguf

    from jaxft.checkpoint.gguf import dequantize

    kind = gguf.GGMLQuantizationType[qtype]
    w = np.random.default_rng(0).standard_normal((37, 256)).astype(np.float32)
    data = gguf.quants.quantize(w, kind)
    whole = gguf.quants.dequantize(data, kind)
    chunked = dequantize(data, kind, chunk_bytes=data.nbytes // 5)
    assert chunked.dtype == np.float32 and chunked.shape == (37, 256)
    np.testing.assert_array_equal(chunked, whole)


def test_bad_settings_raise_one_line_errors():
    w = np.zeros((96, 8), np.float32)
    with pytest.raises(ValueError, match="unknown quantization format 'fp8'"):
        quantize(w, "fp8")
    with pytest.raises(ValueError, match="unknown quantization format 'nf3'"):
        leaf_fn("nf3")
    with pytest.raises(ValueError, match="block_size=64 does not divide the in dimension 96"):
        quantize(w, "nf4", block_size=64)
    with pytest.raises(ValueError, match="block_size=0"):
        quantize(w, "int4", block_size=0)
    params = {"layers": {"mlp": {"down_proj": {"w": np.zeros((1, 96, 64), np.float32)}}}}
    with pytest.raises(ValueError, match=r"^layers/mlp/down_proj/w: block_size=64 does not divide") as e:
        quantize_params(params, "nf4")
    assert "\n" not in str(e.value)
