"""Building blocks shared by the model families: norms, rotary embeddings, the attention mask rule and the
adaptable linear map (attention itself: `jaxft.models.attention`).

Axis letters, used in every einsum, shape comment and sharding name of jaxft:
  B batch, T time (queries), S time (keys / cache slots), D model width, N query heads, K key/value heads,
  G query heads per key/value head (N // K), H head dim, F mlp width, V vocab, L layers, R LoRA rank.
"""

from __future__ import annotations

import contextvars
import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxft.quant import as_dense
from jaxft.tree import overlay

# Set while a rematerialized layer (`remat_layer`, scanned) is traced: its backward pass recomputes the whole
# layer, so a quantized weight's own rematerialization (`dense`) would only add to memory.
_IN_REMAT_LAYER = contextvars.ContextVar("in_remat_layer", default=False)
NEG_INF = -1e30  # finite, so that a fully masked row (padding) gives a uniform softmax instead of NaN


def einsum(spec: str, a, b):
    """jnp.einsum of two operands accumulating in float32, with a float32 result.

    Where both operands are bfloat16 (or float16), its backward pass is also computed in their dtype: the
    incoming float32 gradient is cast to it, and each operand's gradient is one einsum of that dtype
    accumulating in float32. (JAX's own transpose of a mixed-precision einsum promotes the other operand to
    float32 instead: on CPUs that runs the backward matmuls at float32 speed and converts every frozen weight to
    float32 on every step.) Every index of `spec` must appear in both operands or in the output.
    For products with a weight (linear maps, LoRA factors, output heads): attention's batched products keep
    `jnp.einsum`, as XLA:CPU has no bf16 x bf16 -> f32 fallback for some of the batched dots their backward
    pass would need (T5's cross-attention hits it).
    """
    if a.dtype != b.dtype or a.dtype == jnp.float32 or not jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _low_precision_einsum(spec, a, b)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_fwd(spec, a, b):
    return _low_precision_einsum(spec, a, b), (a, b)


def _low_precision_bwd(spec, residuals, g):
    a, b = residuals
    operands, out = spec.replace(" ", "").split("->")
    sa, sb = operands.split(",")
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_low_precision_einsum.defvjp(_low_precision_fwd, _low_precision_bwd)


def rms_norm(x, scale, eps: float):
    """(..., D) -> (..., D); statistics in float32, as transformers computes them."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def linear(x, p: dict):
    """y = x @ w (+ b) in x's dtype. x: (..., in); p["w"]: (in, out), dense or quantized (dequantized here,
    inside the jitted computation); p["b"]: (out,). Matmuls accumulate in float32 (`preferred_element_type`),
    which is also what makes bf16 fast on CPUs."""
    y = einsum("...i,io->...o", x, as_dense(p["w"], x.dtype))
    if "b" in p:
        y = y + p["b"].astype(jnp.float32)
    return y.astype(x.dtype)


def dense(x, p: dict, hooks=None, rng=None):
    """A linear projection through the method's `linear` hook (`jaxft.models.hooks`): x (..., in) -> (..., out).

    p: the module's subtree, {w, b} and whatever the method put beside them; rng: for the method's dropout.
    """
    fn = (lambda x, p, rng: linear(x, p)) if hooks is None else hooks.linear
    if hasattr(p["w"], "dequantize") and not _IN_REMAT_LAYER.get():  # a QuantizedWeight (QLoRA)
        return _rematerialized(fn)(x, p, rng)
    return fn(x, p, rng)


def _rematerialized(fn):
    """`fn` rematerialized: differentiated, the backward pass dequantizes the weight again instead of keeping its
    dense copy as a residual, which inside the layer scan would stack a dense copy of every layer (a full bf16
    copy of the base) between the forward and the backward pass. (A custom VJP that dequantizes only once the
    output's gradient exists, tried unrolled on the default model, kept more memory: 1320 against 1029 MB of
    temporaries.) Inside a scanned `remat_layer` it is left out: the layer is recomputed whole, and the nested
    checkpoint cost memory there (Llama-3-8B shapes with 4 layers, QLoRA at 4k tokens compiled for a TPU v5e
    2x2 slice: 6.16 against 5.56 GiB of temporaries per chip, bench/long_context.py)."""
    return jax.checkpoint(fn)


def layer_loop(body, x, base_layers, train_layers, *xs, shared: tuple = (), remat: bool = False,
               unroll: bool = False):
    """The one layer loop of every family: body(x, params_l, *xs_l, *shared) -> (x, y_l) over the L layers
    stacked on the leading axis of `base_layers` (params_l: layer l's weights with the trainable leaves of
    `train_layers`, a tree of the same stacked paths or {}, overlaid; xs: per-layer stacked arrays or None, e.g.
    dropout keys and cache slices; shared: what every layer reads, e.g. an encoder's output: passed, not closed
    over, so that the rematerialized layer differentiates it). `remat`: each layer rematerialized in the
    backward pass (`remat_layer`); `unroll`: the scan as straight-line code (the backend policy's choice,
    `jaxft.backend`). -> (x, the y_l stacked)."""
    if remat:
        body = remat_layer(body, unroll)

    def step(x, layer):
        base_l, train_l, *rest = layer
        return body(x, overlay(base_l, train_l), *rest, *shared)

    return jax.lax.scan(step, x, (base_layers, train_layers, *xs), unroll=unroll)


def remat_layer(body, unroll: bool):
    """`body(x, ...)` (one layer) rematerialized: the backward pass recomputes the layer from its inputs instead
    of keeping its activations. In a scan the loop orders the recomputation after the gradient of the layer's
    output. Unrolled, `jax.checkpoint` does not: its recomputation depends only on the layer's inputs, and
    XLA:CPU's scheduler runs it early, keeping what it recomputed until the backward pass (measured on the
    default model: no memory saved at all; an optimization barrier over the inputs and the gradient did not
    change that either). Unrolled, the layer is `_recompute_after_grad`."""
    if not unroll:
        return jax.checkpoint(_marked(body), prevent_cse=False)
    return _recompute_after_grad(body)


def _marked(body):
    """`body`, traced with `_IN_REMAT_LAYER` set (each trace: the forward pass and the recomputation)."""
    def run(*args, **kwargs):
        token = _IN_REMAT_LAYER.set(True)
        try:
            return body(*args, **kwargs)
        finally:
            _IN_REMAT_LAYER.reset(token)
    return run


def _recompute_after_grad(body):
    """`body(x, ...)` with its backward pass written out (`custom_vjp`): the forward pass keeps only the
    arguments; the backward pass recomputes `body` once the gradient of its output exists, from x plus 0 x one
    element of that gradient, a data dependence XLA keeps (it does not fold x * 0 for floats: NaN * 0 is NaN).
    The arrays a `functools.partial` binds (masks, positions) become arguments, as custom_vjp cannot close over
    traced values; its keywords and other arguments stay static."""
    func, bound, keywords = (body.func, body.args, body.keywords) if isinstance(body, partial) else (body, (), {})
    leaves, treedef = jax.tree.flatten(bound)
    traced = [isinstance(leaf, jax.Array) for leaf in leaves]

    def call(arrays, *args):
        arrays = iter(arrays)
        bound = jax.tree.unflatten(treedef, [next(arrays) if t else leaf for leaf, t in zip(leaves, traced)])
        return func(*bound, *args, **keywords)

    @jax.custom_vjp
    def recomputed(arrays, x, *rest):
        return call(arrays, x, *rest)

    def forward(arrays, x, *rest):
        return call(arrays, x, *rest), (arrays, x, rest)

    def backward(saved, grad):
        arrays, x, rest = saved
        zero = jax.tree.leaves(grad)[0].reshape(-1)[0].astype(x.dtype) * 0
        # the integer arguments too (dropout keys): else XLA merges the recomputed dropout bits with the forward
        # pass's and keeps every layer's bits until its backward pass (the default model at 4k tokens: 150 MB
        # a layer)
        rest = jax.tree.map(lambda a: _after(a, zero), rest)
        return jax.vjp(call, arrays, x + zero, *rest)[1](grad)

    recomputed.defvjp(forward, backward)
    return lambda *args: recomputed([leaf for leaf, t in zip(leaves, traced) if t], *args)


def _after(a, zero):
    """An integer array `a` unchanged, made to depend on the float `zero` (x * 0; 0 unless NaN)."""
    if not isinstance(a, jax.Array) or not jnp.issubdtype(a.dtype, jnp.integer):
        return a
    return a + (zero != zero).astype(a.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None):
    """(H/2,) inverse frequencies, with Llama-3 or linear scaling applied as transformers does."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling[0] == "linear":
        return inv / scaling[1]
    _, factor, low, high, orig = scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """x: (B, T, heads, H), positions: (B, T) -> x rotated (the 'rotate half' layout of HF checkpoints).

    Computed in float32 whatever x's dtype, rounded once at the end (transformers rounds a bf16 x after each
    product; XLA:CPU emulates every bf16 elementwise op with a float32 op and a rounding, which made a bf16
    rotation several times slower than this one)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, H/2)
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_seg, q_pos, q_idx, k_seg, k_pos, k_idx, window, causal: bool = True):
    """(B, T, S) bool: a query sees a key of its own segment (0 = padding), not later, within the window.

    Segment ids keep packed examples apart; `*_idx` are slots in the sequence or KV cache (causality);
    `*_pos` are positions within an example (sliding window). `window` 0 means no window (a traced scalar).
    Negative ids are shared: a negative key is seen by every query outside padding (a soft prompt before packed
    examples), and a negative query sees every key outside padding (the soft prompt of an encoder reads the
    whole input; under causality, a prompt placed first sees only itself).
    """
    shared = ((k_seg[:, None, :] < 0) & (q_seg[:, :, None] != 0)) | (q_seg[:, :, None] < 0)
    mask = ((q_seg[:, :, None] == k_seg[:, None, :]) | shared) & (k_seg[:, None, :] != 0)
    if causal:
        mask &= k_idx[:, None, :] <= q_idx[:, :, None]
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    return mask & ((window <= 0) | (dist < window))


def last_token(h, segment_ids):
    """h (B, T, D) -> (B, D) at the rightmost non-padding position of each row (transformers' rule)."""
    t = jnp.arange(h.shape[1], dtype=jnp.int32)
    idx = jnp.max(jnp.where(segment_ids != 0, t, 0), axis=1)
    return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]


def mean_pool(h, segment_ids):
    """h (B, T, D) -> (B, D), the mean over non-padding positions (float32; all-padding rows give 0)."""
    m = (segment_ids != 0).astype(jnp.float32)[..., None]
    return jnp.sum(h.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
