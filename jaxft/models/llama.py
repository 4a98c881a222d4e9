"""Decoder-only transformers of the LLaMA family (Llama 2/3, Mistral, Qwen2, SmolLM2) as pure functions.

Parameters are a nested dict; the L layers are stacked on a leading axis and run with `jax.lax.scan`:

  embed/w                      (V, D)
  layers/attn_norm/scale       (L, D)
  layers/attn/{q,k,v}_proj/w   (L, D, N*H) | (L, D, K*H)      (+ b for Qwen2)
  layers/attn/o_proj/w         (L, N*H, D)
  layers/attn/{q,k}_norm/scale (L, H) | (L, N*H), (L, K*H)    (with cfg.qk_norm: "head" | "all")
  layers/mlp_norm/scale        (L, D)
  layers/mlp/{gate,up}_proj/w  (L, D, F)
  layers/mlp/down_proj/w       (L, F, D)
  final_norm/scale             (D,)
  lm_head/w                    (D, V)                         (absent with tied embeddings)

`forward` takes the frozen base and, separately, the trainable tree (LoRA, or replaced weights), and
overlays them layer by layer inside the scan.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxft.models.attention import attention, prefix_of
from jaxft.models.config import LlamaConfig
from jaxft.models.hooks import hooks_of
from jaxft.models.layers import apply_rope, dense, einsum, layer_loop, remat_layer, rms_norm, rope_frequencies
from jaxft.models.table import Entry
from jaxft.parallel.rules import constrain
from jaxft.quant import as_dense
from jaxft.tree import overlay, unflatten

# The logical axes of every parameter, by path (first full regex match), for sharding (see `jaxft.parallel`;
# the config's rules map these names onto the mesh). Norm scales are small and stay replicated.
PARAM_AXES = (
    (r"embed/w", ("vocab", "embed")),
    (r"layers/attn/q_proj/w", ("layers", "embed", "heads")),
    (r"layers/attn/(k|v)_proj/w", ("layers", "embed", "kv_heads")),
    (r"layers/attn/o_proj/w", ("layers", "heads", "embed")),
    (r"layers/attn/q_proj/b", ("layers", "heads")),
    (r"layers/attn/(k|v)_proj/b", ("layers", "kv_heads")),
    (r"layers/attn/o_proj/b", ("layers", "embed")),
    (r"layers/mlp/(gate|up)_proj/w", ("layers", "embed", "mlp")),
    (r"layers/mlp/down_proj/w", ("layers", "mlp", "embed")),
    (r"layers/(attn|mlp)_norm/scale", ("layers", None)),
    (r"layers/attn/(q|k)_norm/scale", ("layers", None)),
    (r"final_norm/scale", (None,)),
    (r"lm_head/w", ("embed", "vocab")),
)

Config = LlamaConfig
# Hugging Face tensor name <-> jaxft path (see `jaxft.models.table`).
TABLE = (
    Entry("model.embed_tokens.weight", "embed/w", False),
    Entry("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", False),
    Entry("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/q_proj/w", True),
    Entry("model.layers.{i}.self_attn.q_proj.bias", "layers/attn/q_proj/b", False),
    Entry("model.layers.{i}.self_attn.k_proj.weight", "layers/attn/k_proj/w", True),
    Entry("model.layers.{i}.self_attn.k_proj.bias", "layers/attn/k_proj/b", False),
    Entry("model.layers.{i}.self_attn.v_proj.weight", "layers/attn/v_proj/w", True),
    Entry("model.layers.{i}.self_attn.v_proj.bias", "layers/attn/v_proj/b", False),
    Entry("model.layers.{i}.self_attn.o_proj.weight", "layers/attn/o_proj/w", True),
    Entry("model.layers.{i}.self_attn.o_proj.bias", "layers/attn/o_proj/b", False),
    Entry("model.layers.{i}.self_attn.q_norm.weight", "layers/attn/q_norm/scale", False),
    Entry("model.layers.{i}.self_attn.k_norm.weight", "layers/attn/k_norm/scale", False),
    Entry("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", False),
    Entry("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/gate_proj/w", True),
    Entry("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/up_proj/w", True),
    Entry("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/down_proj/w", True),
    Entry("model.norm.weight", "final_norm/scale", False),
    Entry("lm_head.weight", "lm_head/w", True),
)
KIND = "decoder"
# PEFT's default LoRA targets for the LLaMA family (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
LORA_TARGETS = r"layers/attn/(q_proj|v_proj)/w"


def init(key, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    """Random parameters (normal, std 0.02; norms at one), in the layout of the module docstring."""
    d, f, L = cfg.dim, cfg.mlp_dim, cfg.n_layers
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "embed/w": (cfg.vocab_size, d),
        "layers/attn/q_proj/w": (L, d, qd), "layers/attn/k_proj/w": (L, d, kd),
        "layers/attn/v_proj/w": (L, d, kd), "layers/attn/o_proj/w": (L, qd, d),
        "layers/mlp/gate_proj/w": (L, d, f), "layers/mlp/up_proj/w": (L, d, f),
        "layers/mlp/down_proj/w": (L, f, d),
    }
    if cfg.qkv_bias:
        shapes.update({"layers/attn/q_proj/b": (L, qd), "layers/attn/k_proj/b": (L, kd),
                       "layers/attn/v_proj/b": (L, kd)})
    if cfg.o_bias:
        shapes["layers/attn/o_proj/b"] = (L, d)
    if not cfg.tie_embeddings:
        shapes["lm_head/w"] = (d, cfg.vocab_size)
    keys = jax.random.split(key, len(shapes))
    flat = {p: (0.02 * jax.random.normal(k, s)).astype(dtype) for k, (p, s) in zip(keys, sorted(shapes.items()))}
    flat["layers/attn_norm/scale"] = jnp.ones((L, d), dtype)
    flat["layers/mlp_norm/scale"] = jnp.ones((L, d), dtype)
    flat["final_norm/scale"] = jnp.ones((d,), dtype)
    if cfg.qk_norm:
        per_head = cfg.qk_norm == "head"
        flat["layers/attn/q_norm/scale"] = jnp.ones((L, cfg.head_dim if per_head else qd), dtype)
        flat["layers/attn/k_norm/scale"] = jnp.ones((L, cfg.head_dim if per_head else kd), dtype)
    return unflatten(flat)


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots: k/v (L, B, S, K, H), per-slot segment ids and positions."""
    kv = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "positions": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def forward(cfg: LlamaConfig, base: dict, tokens, *, trainable: dict | None = None, positions=None,
            segment_ids=None, cache: dict | None = None, peft=None, lora=None, rng=None, dtype=jnp.float32,
            remat: bool = False, unroll: bool = False, return_hidden: bool = False, embeddings=None, layout=None,
            mlp=None, return_aux: bool = False):
    """tokens: (B, T) int -> (logits (B, T, V) float32, updated cache or None).

    positions: (B, T), default 0..T-1; segment_ids: (B, T), 0 marks padding, distinct ids keep packed
    examples apart (default all ones). With `cache`, the T new tokens are written at `cache["index"]` and
    attend to everything cached before them. `rng` enables LoRA dropout. `embeddings` (B, T, D) replaces the
    token lookup. With `return_hidden`, returns the final normed hidden states (B, T, D).
    `peft` is the static spec of the method whose arrays `trainable` holds (`jaxft.models.hooks`; `lora=` is
    its old name). Embeddings the method puts before the text (prompt tuning) have their outputs dropped; with a
    cache, pass them with the first call of a sequence only (then they are cached).
    `layout` (a `jaxft.parallel.Layout`) constrains the activations to their logical axes on its mesh.
    `unroll` runs the layer scan as straight-line code (`jax.lax.scan(unroll=True)`): a compilation that grows
    with the depth, but XLA then optimizes across layers; on CPUs that makes bfloat16 training steps 1.4-1.9x
    faster (XLA:CPU converts every bf16 array a loop slices to float32 outside the loop: the frozen weights and
    the residuals the backward pass keeps). See `jaxft.train.build.policy_of`.
    `mlp(cfg, hooks, p, h, rngs, layout) -> (out, aux)` replaces each block's MLP (default `mlp_block`); a
    mixture-of-experts family passes its own (`jaxft.models.mixtral`) and `return_aux`, which adds the layers'
    stacked side outputs as a third result.
    """
    trainable, hooks = hooks_of(peft if peft is not None else lora).resolve(base, trainable)
    params = overlay(base, trainable)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    packed = segment_ids is not None  # without segment ids, one example per row: what every kernel expresses
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    x = embeddings if embeddings is not None else as_dense(params["embed"]["w"], dtype)[tokens]
    x = constrain(x.astype(dtype), ("batch", "seq", "embed"), layout)
    if hooks.virtual_tokens:  # as PEFT: the text's positions start after P virtual tokens
        positions = positions + jnp.int32(hooks.virtual_tokens)
    x, positions, segment_ids = hooks.input_embeddings(trainable, x, positions, segment_ids)
    n_soft, t = x.shape[1] - t, x.shape[1]

    # The mask in pieces (`jaxft.models.attention.attention`): segments, positions, and cache slots if any.
    segments = segment_ids if packed or n_soft else None
    mask = dict(q_segments=segments, k_segments=segments, q_positions=positions, k_positions=positions,
                segment_kind="shared" if n_soft else "packed")
    if cache is None:
        layer_cache, new_meta = None, None
    else:
        index = cache["index"]
        q_idx = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
        k_pos = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, index))
        s = cache["segment_ids"].shape[1]
        mask.update(q_segments=segment_ids, k_segments=k_seg, k_positions=k_pos, q_index=q_idx,
                    k_index=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
        layer_cache = (cache["k"], cache["v"])
        new_meta = {"segment_ids": k_seg, "positions": k_pos, "index": index + t}

    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    layer_rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)
    body = partial(_layer, cfg, hooks, inv_freq, segment_ids, mask, None if cache is None else cache["index"],
                   layout=layout, mlp=mlp or mlp_block)
    train_layers = (trainable or {}).get("layers", {})
    if isinstance(base["layers"], (list, tuple)):  # decoding over per-layer trees from `split_layers` (policy)
        step = remat_layer(body, True) if remat else body
        x, (new_kv, aux) = _unrolled(lambda x, xs: step(x, overlay(xs[0], xs[1]), *xs[2:]), x, base["layers"],
                                     train_layers, windows, layer_rngs, layer_cache)
    else:
        x, (new_kv, aux) = layer_loop(body, x, base["layers"], train_layers, windows, layer_rngs, layer_cache,
                                      remat=remat, unroll=unroll)

    x = rms_norm(x[:, n_soft:], params["final_norm"]["scale"], cfg.norm_eps)  # without the soft prompt's outputs
    new_cache = None if cache is None else {"k": new_kv[0], "v": new_kv[1], **new_meta}
    if return_hidden:
        return (x, new_cache, aux) if return_aux else (x, new_cache)
    x, head, tied = output_head(cfg, params, x, dtype)
    logits = einsum("btd,vd->btv", x, head) if tied else einsum("btd,dv->btv", x, head)
    logits = constrain(logits, ("batch", "seq", "vocab"), layout)
    return (logits, new_cache, aux) if return_aux else (logits, new_cache)


def output_head(cfg: LlamaConfig, params: dict, hidden, dtype=jnp.float32):
    """The output layer as `forward` applies it to final-normed hidden states (..., D): (hidden, weight, tied),
    the weight the (V, D) embedding table when tied, else the (D, V) lm_head. For a loss that runs the head
    itself (`jaxft.models.loss.chunked_cross_entropy`)."""
    if cfg.tie_embeddings:
        return hidden, as_dense(params["embed"]["w"], dtype), True
    return hidden, as_dense(params["lm_head"]["w"], dtype), False


def decode_logits(cfg: LlamaConfig, base: dict, trainable, hidden, dtype, policy=None):
    """hidden (B, D) final-normed -> logits (B, V) float32: the output head of `forward`, for one position of a
    decoding step (`jaxft.generate`). A `jaxft.backend.Policy` may ask for the tied (V, D) table as the left
    operand of the product."""
    params = overlay(base, trainable)
    if cfg.tie_embeddings and policy is not None and policy.tied_head_table_first:
        head = as_dense(params["embed"]["w"], dtype)
        return jnp.einsum("vd,bd->vb", head, hidden.astype(dtype), preferred_element_type=jnp.float32).T
    if cfg.tie_embeddings:
        head, spec = params["embed"]["w"], "bd,vd->bv"
    else:
        head, spec = params["lm_head"]["w"], "bd,dv->bv"
    return jnp.einsum(spec, hidden, as_dense(head, dtype), preferred_element_type=jnp.float32)


def split_layers(params: dict) -> dict:
    """params with its stacked `layers` tree split into a tuple of L per-layer trees (any tree holding a
    `layers` key: a base or a trainable tree). `forward` then runs the layers as an unrolled Python loop instead
    of a scan: each layer reads its own buffers, where a scan's loop slices every weight out of the stack
    again on each call. That matters when one call is cheap and called often (token-by-token decoding, where
    the slicing copies as many bytes as the matmuls read); it costs a longer compilation. Split once, outside
    the loop that calls `forward` (the split copies the weights once).
    """
    if not params or "layers" not in params or isinstance(params["layers"], (list, tuple)):
        return params
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n))}


def split_cache(cache: dict) -> dict:
    """A stacked KV cache (`init_cache`) with k and v split into tuples of L per-layer arrays, for `forward`
    over a `split_layers` base: each decoding step then writes its new key and value into that layer's own
    buffer in place, instead of re-stacking the whole cache."""
    return {**cache, "k": tuple(cache["k"]), "v": tuple(cache["v"])}


def _unrolled(step, x, base_layers, train_layers, windows, rngs, cache):
    """The layer scan as a Python loop over per-layer trees: (x, (new (k, v) or None, stacked side outputs of
    the MLPs or None)). A cache whose k and v are tuples of per-layer arrays (`split_cache`) comes back as
    tuples, each updated in place; a stacked one comes back stacked (a copy of the whole cache)."""
    if isinstance(train_layers, dict) and train_layers:  # a stacked trainable tree next to a split base
        train_layers = tuple(jax.tree.map(lambda a, i=i: a[i], train_layers) for i in range(len(base_layers)))
    kvs, auxs = [], []
    for i, base_l in enumerate(base_layers):
        train_l = train_layers[i] if isinstance(train_layers, (list, tuple)) else {}
        xs = (base_l, train_l, windows[i], None if rngs is None else rngs[i],
              None if cache is None else (cache[0][i], cache[1][i]))
        x, (kv, aux) = step(x, xs)
        kvs.append(kv)
        auxs.append(aux)
    aux = None if auxs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxs)
    if cache is None:
        return x, (None, aux)
    join = tuple if isinstance(cache[0], (list, tuple)) else jnp.stack
    return x, ((join([kv[0] for kv in kvs]), join([kv[1] for kv in kvs])), aux)


def mlp_block(cfg: LlamaConfig, hooks, p: dict, h, rngs, layout=None):
    """The gated MLP of a block: h (B, T, D), normed -> (output (B, T, D) before the residual, None)."""
    mlp = p["mlp"]
    gate = jax.nn.silu(dense(h, mlp["gate_proj"], hooks, rngs[0])) * dense(h, mlp["up_proj"], hooks, rngs[1])
    gate = constrain(gate, ("batch", "seq", "mlp"), layout)
    return hooks.block_output(mlp, dense(gate, mlp["down_proj"], hooks, rngs[2])), None


def chunked_mlp(cfg: LlamaConfig, hooks, p: dict, h, rngs, layout=None, chunk: int = 0):
    """`mlp_block` over chunks of `chunk` tokens of each row (h (B, T, D) -> (B, T, D), None), one chunk at a
    time under its own checkpoint: the (B, T, F) intermediates (and float32 partial products) of a long row
    become (B, chunk, F), for recomputing each chunk's MLP once more in the backward pass (the tiled MLP of
    long-sequence training, e.g. Arctic's ALST). Equal to `mlp_block` (the MLP is per token); dropout draws
    each chunk's mask from the layer's key folded with the chunk's index. Chunk i holds the positions i, i + n,
    i + 2n, ... (n = T / chunk), so a row split over devices along T (`mesh.context`) stays split in every chunk."""
    b, t, d = h.shape
    n = t // chunk
    hs = jnp.moveaxis(h.reshape(b, chunk, n, d), 2, 0)  # (n, B, chunk, D)

    @jax.checkpoint
    def body(carry, xs):
        hc, i = xs
        keys = [None if k is None else jax.random.fold_in(k, i) for k in rngs]
        return carry, mlp_block(cfg, hooks, p, hc, keys, layout)[0]

    _, out = jax.lax.scan(body, None, (hs, jnp.arange(n)))
    return jnp.moveaxis(out, 0, 2).reshape(b, t, d), None


def _layer(cfg: LlamaConfig, hooks, inv_freq, q_seg, mask, index, x, p, window, rng, kv, *, layout=None,
           mlp=mlp_block):
    """One transformer block: x (B, T, D) -> (x, ((k, v) cache of this layer or None, the MLP's side output)).
    q_seg (B, T): the queries' segment ids; mask: the mask's pieces, `attention`'s keywords; window: this layer's
    (traced)."""
    b, t, _ = x.shape
    q_pos = mask["q_positions"]
    rngs = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
    attn = p["attn"]

    h = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
    q, k = dense(h, attn["q_proj"], hooks, rngs[0]), dense(h, attn["k_proj"], hooks, rngs[1])
    if cfg.qk_norm == "all":  # OLMoE: over the whole projection
        q, k = rms_norm(q, attn["q_norm"]["scale"], cfg.norm_eps), rms_norm(k, attn["k_norm"]["scale"], cfg.norm_eps)
    q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3: over each head's H
        q, k = rms_norm(q, attn["q_norm"]["scale"], cfg.norm_eps), rms_norm(k, attn["k_norm"]["scale"], cfg.norm_eps)
    v = dense(h, attn["v_proj"], hooks, rngs[2]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q = constrain(apply_rope(q, q_pos, inv_freq), ("batch", "seq", "heads", "head_dim"), layout)
    k = constrain(apply_rope(k, q_pos, inv_freq), ("batch", "seq", "kv_heads", "head_dim"), layout)
    if kv is not None:
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
        kv = (k, v)
        k, v = k.astype(x.dtype), v.astype(x.dtype)
    prefix = prefix_of(hooks, attn, k, v, q_seg)  # after the cache: what the method adds is not cached
    if len(set(cfg.layer_windows)) == 1:  # one window for every layer: a static one, which kernels take
        window = cfg.layer_windows[0]
    o = attention(q, k, v, window=window, prefix=prefix, layout=layout, **mask)
    o = o.reshape(b, t, cfg.n_heads * cfg.head_dim)
    x = x + hooks.block_output(attn, dense(o, attn["o_proj"], hooks, rngs[3]))

    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
    chunk = getattr(layout, "mlp_chunk", 0)
    if mlp is mlp_block and chunk and chunk < t and t % chunk == 0 and kv is None:  # (training's long rows)
        out, aux = chunked_mlp(cfg, hooks, p, h, rngs[4:], layout, chunk)
    else:
        out, aux = mlp(cfg, hooks, p, h, rngs[4:], layout)
    return constrain(x + out, ("batch", "seq", "embed"), layout), (kv, aux)
