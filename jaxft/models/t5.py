"""T5-style encoder-decoders (T5 v1.0, T5 v1.1, flan-T5) as pure functions over a parameter pytree.

Pre-norm blocks with T5's LayerNorm (RMS, no mean, no bias), no scaling of the attention scores, and a learned
relative position bias: one (buckets, heads) table per stack, read in its first layer and added in every layer
(bidirectional buckets in the encoder, causal in the decoder; none in cross-attention). Each stack's layers are
stacked on a leading axis (Le encoder, Ld decoder layers) and run with `jax.lax.scan`:

  shared/w                                     (V, D)        the token embedding of both stacks
  encoder/rel_bias/w, decoder/rel_bias/w       (NB, N)       relative position buckets x heads
  encoder/layers/self_attn_norm/scale          (Le, D)
  encoder/layers/self_attn/{q,k,v}_proj/w      (Le, D, N*H)
  encoder/layers/self_attn/o_proj/w            (Le, N*H, D)
  encoder/layers/mlp_norm/scale                (Le, D)
  encoder/layers/mlp/gate_proj/w, up_proj/w    (Le, D, F)    gated (v1.1: wi_0 activated, wi_1 linear)
  encoder/layers/mlp/in_proj/w                 (Le, D, F)    not gated (v1.0: wi)
  encoder/layers/mlp/down_proj/w               (Le, F, D)    (wo)
  encoder/final_norm/scale                     (D,)
  decoder/layers/...                           the same, (Ld, ...), and between self-attention and the MLP
  decoder/layers/cross_attn_norm/scale         (Ld, D)
  decoder/layers/cross_attn/{q,k,v,o}_proj/w   (Ld, D, N*H), o: (Ld, N*H, D)
  decoder/final_norm/scale                     (D,)
  lm_head/w                                    (D, V)        absent when tied to shared/w

v1.0 ties the output head to the embedding and scales the decoder output by D**-0.5 first; v1.1 / flan-T5 have
their own lm_head and no scaling (transformers' `scale_decoder_outputs`). Segment ids follow jaxft's convention
(0 = padding; distinct ids keep packed examples apart, decoder segment i reading encoder segment i).
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import ConfigError
from jaxft.models.hooks import hooks_of
from jaxft.models.attention import attention, prefix_of
from jaxft.models.layers import dense, einsum, layer_loop, rms_norm
from jaxft.models.loss import token_loss
from jaxft.models.table import Entry
from jaxft.parallel.rules import constrain
from jaxft.quant import as_dense
from jaxft.tree import overlay, unflatten

KIND = "encoder-decoder"
# PEFT's default LoRA targets for T5 (q, v: self-attention of both stacks and the decoder's cross-attention).
LORA_TARGETS = r"(encoder|decoder)/layers/(self_attn|cross_attn)/(q_proj|v_proj)/w"
# PEFT's default IA3 targets for T5 (k, v, wo; wo scaled at its input).
IA3_TARGETS = r"(encoder|decoder)/layers/((self_attn|cross_attn)/(k_proj|v_proj)|mlp/down_proj)/w"
IA3_FEEDFORWARD = r"(encoder|decoder)/layers/mlp/down_proj/w"

# transformers' ACT2FN names that T5 configs use (feed_forward_proj "[gated-]<act>"; "gated-gelu" is gelu_new).
_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": partial(jax.nn.gelu, approximate=False),
                "gelu_new": partial(jax.nn.gelu, approximate=True),
                "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True), "silu": jax.nn.silu,
                "swish": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    dim: int  # D (d_model)
    n_layers: int  # Le, encoder layers (num_layers)
    n_decoder_layers: int  # Ld (num_decoder_layers)
    n_heads: int  # N
    head_dim: int  # H (d_kv; N*H need not equal D)
    mlp_dim: int  # F (d_ff)
    num_buckets: int = 32  # NB, relative position buckets
    max_distance: int = 128  # distances from here on share the last bucket
    norm_eps: float = 1e-6
    act: str = "relu"  # the MLP's non-linearity (an _ACTIVATIONS name)
    gated: bool = False  # act(x @ gate) * (x @ up) (v1.1) instead of act(x @ in) (v1.0)
    tie_embeddings: bool = True  # the output head is shared/w (no lm_head/w)
    scale_decoder_outputs: bool = True  # decoder output * D**-0.5 before the head (v1.0)
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    max_seq_len: int = 512  # no position table limits T5; the length its tasks and generation assume
    model_type: str = "t5"

    def __post_init__(self):
        if self.act not in _ACTIVATIONS:
            raise ConfigError(f"activation {self.act!r} is not supported (expected one of {', '.join(_ACTIVATIONS)})")

    @property
    def n_kv_heads(self) -> int:  # no grouped-query attention; named for the methods that read it
        return self.n_heads

    @property
    def n_params(self) -> int:
        d, f, nh = self.dim, self.mlp_dim, self.n_heads * self.head_dim
        mlp = (3 if self.gated else 2) * d * f
        enc = self.n_layers * (4 * d * nh + mlp + 2 * d)
        dec = self.n_decoder_layers * (8 * d * nh + mlp + 3 * d)
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + head + enc + dec + 2 * d + 2 * self.num_buckets * self.n_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        """The config of a Hugging Face T5 `config.json` dict (transformers 4 or 5).

        Whether the head is tied is read from the checkpoint itself by `checkpoint_names`: transformers 5
        writes tie_word_embeddings=true whatever the model, and keeps `scale_decoder_outputs` apart.
        """
        if hf.get("model_type") != "t5":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not a T5 model")
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r}")
        proj = hf.get("feed_forward_proj", "relu")
        parts = proj.split("-") if isinstance(proj, str) else []
        gated = len(parts) == 2 and parts[0] == "gated"
        act = "gelu_new" if proj == "gated-gelu" else (parts[-1] if parts else None)
        if not (len(parts) == 1 or gated) or act not in _ACTIVATIONS:
            raise ConfigError(f"{source}: feed_forward_proj {proj!r} is not supported (expected '<act>' or "
                              f"'gated-<act>' with <act> one of {', '.join(_ACTIVATIONS)})")
        if hf.get("is_encoder_decoder") is False or hf.get("is_decoder"):
            raise ConfigError(f"{source}: is_encoder_decoder=false / is_decoder=true is not supported (jaxft runs "
                              f"T5 as an encoder-decoder)")
        tie = hf.get("tie_word_embeddings", True) is not False
        start = hf.get("decoder_start_token_id")
        pad = hf.get("pad_token_id")
        eos = hf.get("eos_token_id")
        return cls(vocab_size=hf["vocab_size"], dim=hf["d_model"], n_layers=hf["num_layers"],
                   n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], n_heads=hf["num_heads"],
                   head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
                   num_buckets=hf.get("relative_attention_num_buckets", 32),
                   max_distance=hf.get("relative_attention_max_distance", 128),
                   norm_eps=hf.get("layer_norm_epsilon", 1e-6), act=act, gated=gated, tie_embeddings=tie,
                   scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tie)),
                   pad_token_id=0 if pad is None else pad,
                   decoder_start_token_id=(0 if pad is None else pad) if start is None else start,
                   eos_token_id=1 if eos is None else (eos[0] if isinstance(eos, list) else eos),
                   max_seq_len=hf.get("n_positions", 512))

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf`: a `config.json` dict that transformers 4 and 5 load."""
        act = "gated-gelu" if self.gated and self.act == "gelu_new" else ("gated-" if self.gated else "") + self.act
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": self.vocab_size,
                "d_model": self.dim, "d_kv": self.head_dim, "d_ff": self.mlp_dim, "num_layers": self.n_layers,
                "num_decoder_layers": self.n_decoder_layers, "num_heads": self.n_heads,
                "relative_attention_num_buckets": self.num_buckets,
                "relative_attention_max_distance": self.max_distance, "layer_norm_epsilon": self.norm_eps,
                "feed_forward_proj": act, "is_encoder_decoder": True, "tie_word_embeddings": self.tie_embeddings,
                "scale_decoder_outputs": self.scale_decoder_outputs,
                "decoder_start_token_id": self.decoder_start_token_id, "pad_token_id": self.pad_token_id,
                "eos_token_id": self.eos_token_id, "n_positions": self.max_seq_len}


def _table() -> tuple[Entry, ...]:
    rows = [Entry("shared.weight", "shared/w", False), Entry("lm_head.weight", "lm_head/w", True)]
    for stack in ("encoder", "decoder"):
        blk = f"{stack}.block.{{i}}.layer."
        sub = [("0", "SelfAttention", "self_attn")] + ([("1", "EncDecAttention", "cross_attn")] * (stack == "decoder"))
        rows.append(Entry(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          f"{stack}/rel_bias/w", False))
        for idx, hf_name, ours in sub:
            rows.append(Entry(f"{blk}{idx}.layer_norm.weight", f"{stack}/layers/{ours}_norm/scale", False))
            rows += [Entry(f"{blk}{idx}.{hf_name}.{m}.weight", f"{stack}/layers/{ours}/{m}_proj/w", True)
                     for m in "qkvo"]
        ff = "2" if stack == "decoder" else "1"
        rows.append(Entry(f"{blk}{ff}.layer_norm.weight", f"{stack}/layers/mlp_norm/scale", False))
        rows += [Entry(f"{blk}{ff}.DenseReluDense.{hf_name}.weight", f"{stack}/layers/mlp/{ours}/w", True)
                 for hf_name, ours in (("wi", "in_proj"), ("wi_0", "gate_proj"), ("wi_1", "up_proj"),
                                       ("wo", "down_proj"))]
        rows.append(Entry(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale", False))
    return tuple(rows)


TABLE = _table()

# Tensors T5 checkpoints carry that the model does not read: the embedding's copies in each stack (written by
# transformers 4), and a cross-attention bias table some early checkpoints hold but never used.
_UNUSED = re.compile(r"(encoder|decoder)\.embed_tokens\.weight"
                     r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")


def checkpoint_names(cfg: Config, names) -> tuple[Config, dict[str, str]]:
    """(cfg, TABLE name -> name in the file) for the tensor names of one checkpoint.

    Drops the tensors of _UNUSED; the head is untied exactly when the checkpoint holds lm_head.weight (a copy of
    the embedding computes the same as tying; transformers 5 writes tie_word_embeddings=true beside a separate
    flan-T5 head). Any other tensor keeps its name and is reported as unexpected by the loader.
    """
    present = {name: name for name in names if not _UNUSED.fullmatch(name)}
    return dataclasses.replace(cfg, tie_embeddings="lm_head.weight" not in present), present


# The logical axes of every parameter, by path (first full regex match), for sharding (see `jaxft.parallel`).
PARAM_AXES = (
    (r"shared/w", ("vocab", "embed")),
    (r"(encoder|decoder)/rel_bias/w", (None, None)),
    (r"(encoder|decoder)/layers/(self|cross)_attn/(q|k|v)_proj/w", ("layers", "embed", "heads")),
    (r"(encoder|decoder)/layers/(self|cross)_attn/o_proj/w", ("layers", "heads", "embed")),
    (r"(encoder|decoder)/layers/mlp/(gate|up|in)_proj/w", ("layers", "embed", "mlp")),
    (r"(encoder|decoder)/layers/mlp/down_proj/w", ("layers", "mlp", "embed")),
    (r"(encoder|decoder)/layers/(self_attn|cross_attn|mlp)_norm/scale", ("layers", None)),
    (r"(encoder|decoder)/final_norm/scale", (None,)),
    (r"lm_head/w", ("embed", "vocab")),
)


def init(key, cfg: Config, dtype=jnp.float32) -> dict:
    """Random parameters, scaled as transformers initializes T5 (initializer_factor 1); norms at one."""
    d, f, nh = cfg.dim, cfg.mlp_dim, cfg.n_heads * cfg.head_dim
    shapes = {"shared/w": ((cfg.vocab_size, d), 1.0)}
    if not cfg.tie_embeddings:
        shapes["lm_head/w"] = ((d, cfg.vocab_size), 1.0)
    flat = {}
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        shapes[f"{stack}/rel_bias/w"] = ((cfg.num_buckets, cfg.n_heads), d ** -0.5)
        for attn in ("self_attn", "cross_attn") if stack == "decoder" else ("self_attn",):
            shapes[f"{stack}/layers/{attn}/q_proj/w"] = ((n, d, nh), (d * cfg.head_dim) ** -0.5)
            shapes[f"{stack}/layers/{attn}/k_proj/w"] = ((n, d, nh), d ** -0.5)
            shapes[f"{stack}/layers/{attn}/v_proj/w"] = ((n, d, nh), d ** -0.5)
            shapes[f"{stack}/layers/{attn}/o_proj/w"] = ((n, nh, d), nh ** -0.5)
            flat[f"{stack}/layers/{attn}_norm/scale"] = jnp.ones((n, d), dtype)
        for name in ("gate_proj", "up_proj") if cfg.gated else ("in_proj",):
            shapes[f"{stack}/layers/mlp/{name}/w"] = ((n, d, f), d ** -0.5)
        shapes[f"{stack}/layers/mlp/down_proj/w"] = ((n, f, d), f ** -0.5)
        flat[f"{stack}/layers/mlp_norm/scale"] = jnp.ones((n, d), dtype)
        flat[f"{stack}/final_norm/scale"] = jnp.ones((d,), dtype)
    keys = jax.random.split(key, len(shapes))
    for k, (path, (shape, std)) in zip(keys, sorted(shapes.items())):
        flat[path] = (std * jax.random.normal(k, shape)).astype(dtype)
    return unflatten(flat)


def init_cache(cfg: Config, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty decoder cache of `length` slots: self-attention k/v (Ld, B, S, N, H), per-slot segment ids.

    The first `forward` with it also stores the cross-attention keys and values of the encoder output
    (`cross_k`, `cross_v`, (Ld, B, Se, N, H)) and its segment ids, so that later steps need no `encoded`.
    """
    kv = (cfg.n_decoder_layers, batch, length, cfg.n_heads, cfg.head_dim)
    return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def encode(cfg: Config, base: dict, tokens, *, segment_ids=None, trainable: dict | None = None, peft=None,
           rng=None, dtype=jnp.float32, layout=None, unroll: bool = False, remat: bool = False):
    """tokens (B, S) int -> the encoder's final-normed hidden states (B, S, D) in `dtype`; with prompt tuning
    (B, P + S, D): the P soft-prompt positions first, which the decoder reads too (see `encoder_segments`).

    segment_ids (B, S): 0 marks padding (default all ones). `trainable` / `peft` as in `forward`.
    """
    trainable, hooks = hooks_of(peft).resolve(base, trainable)
    params = overlay(base, trainable)
    b, s = tokens.shape
    segment_ids = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
    x = as_dense(params["shared"]["w"], dtype)[tokens]
    # As PEFT for SEQ_2_SEQ_LM: embeddings a method puts first (a soft prompt) go before the encoder input.
    x, _, segment_ids = hooks.input_embeddings(trainable, x, jnp.zeros((b, s), jnp.int32), segment_ids)
    s = x.shape[1]
    x = constrain(x, ("batch", "seq", "embed"), layout)
    # the mask's pieces (`jaxft.models.attention`); a soft prompt (negative ids) sees the whole input
    mask = dict(q_segments=segment_ids, k_segments=segment_ids, causal=False)
    bias = position_bias(params["encoder"]["rel_bias"]["w"], jnp.arange(s), jnp.arange(s), cfg, bidirectional=True)
    layer = partial(_encoder_layer, cfg, hooks, bias.astype(dtype), mask, segment_ids, layout=layout)
    layer_rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)
    x, _ = layer_loop(lambda x, p, r: (layer(x, p, r), None), x, base["encoder"]["layers"],
                      (trainable or {}).get("encoder", {}).get("layers", {}), layer_rngs, remat=remat, unroll=unroll)
    return rms_norm(x, params["encoder"]["final_norm"]["scale"], cfg.norm_eps)


def encoder_segments(cfg: Config, segment_ids, trainable: dict | None, peft=None):
    """The segment ids (B, S) of the encoder input -> those of `encode`'s output: with prompt tuning, the soft
    prompt's P positions first, in the shared segment that every decoder query sees. (The embeddings the hook
    is given are placeholders, which XLA drops.)"""
    b, s = segment_ids.shape
    placeholder = jnp.zeros((b, s, cfg.dim), jnp.float32)
    return hooks_of(peft).input_embeddings(trainable, placeholder, jnp.zeros((b, s), jnp.int32), segment_ids)[2]


def forward(cfg: Config, base: dict, enc_tokens, dec_tokens, *, enc_segment_ids=None, dec_segment_ids=None,
            trainable: dict | None = None, peft=None, rng=None, dtype=jnp.float32, cache: dict | None = None,
            encoded=None, return_hidden: bool = False, layout=None, unroll: bool = False, remat: bool = False):
    """enc_tokens (B, S), dec_tokens (B, T) int -> (logits (B, T, V) float32, updated cache or None).

    enc_segment_ids (B, S) / dec_segment_ids (B, T): 0 marks padding (default all ones). `encoded` (B, S, D),
    the output of `encode`, skips the encoder (enc_tokens may then be None); so does a cache that already holds
    the cross-attention keys. With `cache` (see `init_cache`), the T decoder tokens are written at
    `cache["index"]` and attend to everything cached before them. `trainable` / `peft` as in
    `jaxft.models.llama.forward` (LoRA, IA3, bottleneck adapters, full or partial; `rng` enables LoRA dropout),
    and as HF PEFT runs T5: prompt tuning (the soft prompt before the encoder input, `encode`) and prefix tuning
    (`decoder/layers/self_attn/prefix_k`, `prefix_v` (Ld, P, N*H): P keys and values before the decoder's, at
    relative positions 0..P-1, the decoder text from P on; the encoder and cross-attention get none).
    enc_segment_ids are always those of enc_tokens (the prompt's are added here).
    With `return_hidden`, returns the decoder's final-normed hidden states (B, T, D) instead of logits.
    `unroll` runs both layer scans as straight-line code (see `jaxft.models.llama.forward`); `remat`
    rematerializes each layer of both stacks in the backward pass.
    """
    trainable, hooks = hooks_of(peft).resolve(base, trainable)
    params = overlay(base, trainable)
    enc_rng, dec_rng = (None, None) if rng is None else jax.random.split(rng)
    cross_cached = cache is not None and "cross_k" in cache
    if cross_cached:
        enc_segment_ids = cache["enc_segment_ids"]
    else:
        if encoded is None:
            encoded = encode(cfg, base, enc_tokens, segment_ids=enc_segment_ids, trainable=trainable, peft=hooks,
                             rng=enc_rng, dtype=dtype, layout=layout, unroll=unroll, remat=remat)
        if enc_segment_ids is not None:
            enc_segment_ids = encoder_segments(cfg, enc_segment_ids, trainable, hooks)
    if enc_segment_ids is None:
        enc_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
    b, t = dec_tokens.shape
    dec_segment_ids = jnp.ones((b, t), jnp.int32) if dec_segment_ids is None else dec_segment_ids
    x = constrain(as_dense(params["shared"]["w"], dtype)[dec_tokens], ("batch", "seq", "embed"), layout)

    index = jnp.int32(0) if cache is None else cache["index"]
    q_idx = index + jnp.arange(t, dtype=jnp.int32)
    if cache is None:
        k_seg, k_idx = dec_segment_ids, q_idx
    else:
        k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], dec_segment_ids.astype(jnp.int32), (0, index))
        k_idx = jnp.arange(k_seg.shape[1], dtype=jnp.int32)
    bq, bk = jnp.broadcast_to(q_idx, (b, t)), jnp.broadcast_to(k_idx, (b, k_idx.shape[0]))
    # the masks' pieces (`jaxft.models.attention`): cache slots only where there is a cache
    self_mask = dict(q_segments=dec_segment_ids, k_segments=k_seg, segment_kind="packed")
    if cache is not None:
        self_mask.update(q_index=bq, k_index=bk)
    cross_mask = dict(q_segments=dec_segment_ids, k_segments=enc_segment_ids, causal=False)
    n_prefix = hooks.prefix_length  # keys and values `attention_kv` puts first
    if n_prefix:  # as PEFT: P past keys and values at positions 0..P-1 of the decoder; the text from P on
        bias = position_bias(params["decoder"]["rel_bias"]["w"], q_idx + n_prefix,
                             jnp.concatenate([jnp.arange(n_prefix, dtype=jnp.int32), k_idx + n_prefix]), cfg,
                             bidirectional=False)
    else:
        bias = position_bias(params["decoder"]["rel_bias"]["w"], q_idx, k_idx, cfg, bidirectional=False)
    layer = partial(_decoder_layer, cfg, hooks, bias.astype(dtype), self_mask, cross_mask,
                    None if cache is None else index, dec_segment_ids, layout=layout)
    layer_rngs = None if dec_rng is None else jax.random.split(dec_rng, cfg.n_decoder_layers)
    kv = None if cache is None else (cache["k"], cache["v"])
    cross = (cache["cross_k"], cache["cross_v"]) if cross_cached else None
    train_layers = (trainable or {}).get("decoder", {}).get("layers", {})
    x, (new_kv, new_cross) = layer_loop(layer, x, base["decoder"]["layers"], train_layers, layer_rngs, kv, cross,
                                        shared=(encoded,), remat=remat, unroll=unroll)
    x = rms_norm(x, params["decoder"]["final_norm"]["scale"], cfg.norm_eps)

    new_cache = None
    if cache is not None:
        if cross_cached:
            new_cross = (cache["cross_k"], cache["cross_v"])
        new_cache = {**cache, "k": new_kv[0], "v": new_kv[1], "segment_ids": k_seg, "index": index + t,
                     "cross_k": new_cross[0], "cross_v": new_cross[1], "enc_segment_ids": enc_segment_ids}
    if return_hidden:
        return x, new_cache
    return constrain(lm_logits(cfg, params, x), ("batch", "seq", "vocab"), layout), new_cache


def prefill(cfg: Config, base: dict, trainable: dict | None, tokens, segment_ids, positions=None, *, length: int,
            peft=None, dtype=jnp.float32, extras: dict | None = None):
    """Generation's prefill (`jaxft.generate`): the encoder over tokens (B, S) (right-padded, segment_ids 0 there;
    positions unused: T5's are relative), then the decoder's first step from decoder_start_token_id into a fresh
    cache of `length` slots that also keeps the cross-attention keys -> (hidden (B, D), cache). `extras`: more
    arguments of `forward`."""
    b = tokens.shape[0]
    start = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
    hidden, cache = forward(cfg, base, tokens, start, enc_segment_ids=segment_ids, trainable=trainable, peft=peft,
                            dtype=dtype, cache=init_cache(cfg, b, length, dtype), return_hidden=True,
                            **(extras or {}))
    return hidden[:, -1], cache


def decode_step(cfg: Config, base: dict, trainable: dict | None, tokens, cache: dict, *, peft=None,
                dtype=jnp.float32):
    """One decoder step over the cache of `prefill`: tokens (B, 1) -> (hidden (B, D), cache)."""
    hidden, cache = forward(cfg, base, None, tokens, trainable=trainable, peft=peft, dtype=dtype, cache=cache,
                            return_hidden=True)
    return hidden[:, 0], cache


def decode_logits(cfg: Config, base: dict, trainable: dict | None, hidden, dtype=jnp.float32, policy=None):
    """hidden (B, D) final-normed decoder states -> logits (B, V) float32, for `jaxft.generate`."""
    return lm_logits(cfg, overlay(base, trainable), hidden)


def lm_logits(cfg: Config, params: dict, hidden):
    """hidden (..., D) final-normed decoder states -> logits (..., V) float32 (scaled by D**-0.5 first in v1.0)."""
    hidden, head, tied = output_head(cfg, params, hidden)
    return einsum("...d,vd->...v", hidden, head) if tied else einsum("...d,dv->...v", hidden, head)


def output_head(cfg: Config, params: dict, hidden, dtype=None):
    """The output layer as `lm_logits` applies it to final-normed decoder states (..., D): (hidden, scaled by
    D**-0.5 in v1.0, the weight in the hidden states' dtype, tied): the (V, D) shared table when tied, else the
    (D, V) lm_head. For a loss that runs the head itself (`jaxft.models.loss.chunked_cross_entropy`)."""
    if cfg.scale_decoder_outputs:
        hidden = hidden * jnp.asarray(cfg.dim ** -0.5, hidden.dtype)
    if cfg.tie_embeddings:
        return hidden, as_dense(params["shared"]["w"], hidden.dtype), True
    return hidden, as_dense(params["lm_head"]["w"], hidden.dtype), False


def shift_right(targets, cfg: Config):
    """targets (B, T) int -> the decoder inputs (B, T): decoder_start_token_id, then targets[:, :-1], with
    -100 (transformers' ignored label) read as padding, as `T5ForConditionalGeneration._shift_right`."""
    targets = jnp.asarray(targets)
    start = jnp.full(targets.shape[:-1] + (1,), cfg.decoder_start_token_id, targets.dtype)
    shifted = jnp.concatenate([start, targets[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, cfg.pad_token_id, shifted)


def loss(cfg: Config, base: dict, enc_tokens, targets, target_mask, *, enc_segment_ids=None,
         trainable: dict | None = None, peft=None, rng=None, dtype=jnp.float32, layout=None):
    """The seq2seq training loss: (sum of the cross-entropy of the masked targets, their number), float32.

    enc_tokens (B, S), targets (B, T) int, target_mask (B, T) (0 = not counted: padding). The decoder reads
    `shift_right(targets)` (teacher forcing); sum / count is transformers' `labels=` loss (-100 off the mask).
    """
    targets = jnp.where(target_mask != 0, targets, cfg.pad_token_id)
    logits, _ = forward(cfg, base, enc_tokens, shift_right(targets, cfg), enc_segment_ids=enc_segment_ids,
                        trainable=trainable, peft=peft, rng=rng, dtype=dtype, layout=layout)
    return token_loss(logits, targets, target_mask)


def bucket_table(cfg: Config, bidirectional: bool) -> np.ndarray:
    """(2 * max_distance + 1,) int32: the bucket of each relative position (key - query) from -max_distance to
    max_distance; beyond, the end buckets repeat. transformers' `_relative_position_bucket`, on the host in
    float64 so that buckets at exact boundaries (distance 16, 32, 64 by default) do not hang on a log's last bit.
    """
    rel = np.arange(-cfg.max_distance, cfg.max_distance + 1)
    n = cfg.num_buckets
    out = np.zeros_like(rel)
    if bidirectional:
        n //= 2
        out += (rel > 0) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = n // 2
    with np.errstate(divide="ignore"):
        large = exact + (np.log(np.maximum(rel, 1) / exact) / math.log(cfg.max_distance / exact)
                         * (n - exact)).astype(np.int64)
    out += np.where(rel < exact, rel, np.minimum(large, n - 1))
    return out.astype(np.int32)


def position_bias(w, q_idx, k_idx, cfg: Config, *, bidirectional: bool):
    """w (NB, N), q_idx (T,), k_idx (S,) slots -> (N, T, S) float32, the bias added to the attention scores."""
    table = jnp.asarray(bucket_table(cfg, bidirectional))
    rel = jnp.clip(k_idx[None, :] - q_idx[:, None], -cfg.max_distance, cfg.max_distance) + cfg.max_distance
    return jnp.transpose(as_dense(w, jnp.float32)[table[rel]], (2, 0, 1))


def _attend(q, k, v, bias, mask: dict, prefix=None, layout=None):
    """q (B, T, N, H), k/v (B, S, N, H), bias (N, T, S) or None, mask: the pieces of `attention`'s mask
    -> (B, T, N*H). T5's scores are not scaled."""
    out = attention(q, k, v, bias=bias, prefix=prefix, scale=1.0, layout=layout, **mask)
    return out.reshape(*out.shape[:2], -1)


def _mlp(cfg: Config, p: dict, h, hooks, rngs, layout):
    act = _ACTIVATIONS[cfg.act]
    if cfg.gated:
        up = act(dense(h, p["gate_proj"], hooks, rngs[0])) * dense(h, p["up_proj"], hooks, rngs[1])
    else:
        up = act(dense(h, p["in_proj"], hooks, rngs[0]))
    return dense(constrain(up, ("batch", "seq", "mlp"), layout), p["down_proj"], hooks, rngs[2])


def _heads(x, cfg: Config):
    return x.reshape(*x.shape[:2], cfg.n_heads, cfg.head_dim)


def _encoder_layer(cfg: Config, hooks, bias, mask, segment_ids, x, p, rng, *, layout=None):
    """One encoder block: x (B, S, D) -> x."""
    rngs = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
    attn = p["self_attn"]
    h = rms_norm(x, p["self_attn_norm"]["scale"], cfg.norm_eps)
    q, k, v = (_heads(dense(h, attn[f"{m}_proj"], hooks, r), cfg) for m, r in zip("qkv", rngs))
    o = _attend(q, k, v, bias, mask, prefix_of(hooks, attn, k, v, segment_ids), layout)
    x = x + hooks.block_output(attn, dense(o, attn["o_proj"], hooks, rngs[3]))
    out = _mlp(cfg, p["mlp"], rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps), hooks, rngs[4:], layout)
    return constrain(x + hooks.block_output(p["mlp"], out), ("batch", "seq", "embed"), layout)


def _decoder_layer(cfg: Config, hooks, bias, self_mask, cross_mask, index, segment_ids, x, p, rng, kv, cross,
                   encoded, *, layout=None):
    """One decoder block: x (B, T, D) -> (x, (kv, new cross)).

    kv: this layer's self-attention cache slots (k, v), written at `index`, or None without a cache (the prefix of
    prefix tuning stays outside it, as in `jaxft.models.llama`); segment_ids (B, T): the queries'; cross: the
    cached cross-attention keys and values, or None to compute them from `encoded` (B, S, D). The new cross
    keys and values are returned only where a cache is being filled (else None, so no scan output stacks them).
    """
    rngs = [None] * 11 if rng is None else list(jax.random.split(rng, 11))
    attn = p["self_attn"]
    h = rms_norm(x, p["self_attn_norm"]["scale"], cfg.norm_eps)
    q, k, v = (_heads(dense(h, attn[f"{m}_proj"], hooks, r), cfg) for m, r in zip("qkv", rngs))
    if kv is not None:
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
        kv = (k, v)
        k, v = k.astype(x.dtype), v.astype(x.dtype)
    o = _attend(q, k, v, bias, self_mask, prefix_of(hooks, attn, k, v, segment_ids), layout)  # prefix: not cached
    x = x + hooks.block_output(attn, dense(o, attn["o_proj"], hooks, rngs[3]))

    attn = p["cross_attn"]
    h = rms_norm(x, p["cross_attn_norm"]["scale"], cfg.norm_eps)
    q = _heads(dense(h, attn["q_proj"], hooks, rngs[4]), cfg)
    new_cross = None
    if cross is None:
        cross = tuple(_heads(dense(encoded.astype(x.dtype), attn[f"{m}_proj"], hooks, r), cfg)
                      for m, r in zip("kv", rngs[5:7]))
        new_cross = None if kv is None else cross
    o = dense(_attend(q, cross[0].astype(x.dtype), cross[1].astype(x.dtype), None, cross_mask, layout=layout),
              attn["o_proj"], hooks, rngs[7])
    x = x + hooks.block_output(attn, o)

    out = _mlp(cfg, p["mlp"], rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps), hooks, rngs[8:], layout)
    return constrain(x + hooks.block_output(p["mlp"], out), ("batch", "seq", "embed"), layout), (kv, new_cross)
