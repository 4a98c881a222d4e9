"""BERT-style encoders (BERT, MiniLM, all-MiniLM-L6-v2) as pure functions over a parameter pytree.

Parameters (post-LayerNorm blocks; the L layers stacked on a leading axis and run with `jax.lax.scan`):

  embed/word/w                      (V, D)       also the masked-LM decoder (tied)
  embed/position/w, embed/type/w    (P, D), (2, D)
  embed/norm/{scale,bias}           (D,)
  layers/attn/{q,k,v,o}_proj/{w,b}  (L, D, D), (L, D)
  layers/attn_norm/{scale,bias}     (L, D)
  layers/mlp/up_proj/{w,b}          (L, D, F), (L, F)
  layers/mlp/down_proj/{w,b}        (L, F, D), (L, D)
  layers/mlp_norm/{scale,bias}      (L, D)
  pooler/{w,b}                      (D, D), (D,)  where the checkpoint has a pooler (BertModel, not ...ForMaskedLM)
  mlm/transform/{w,b}, mlm/norm/{scale,bias}, mlm/bias (V,)  where it has the masked-LM head

Checkpoints name the encoder with or without a `bert.` prefix (BertFor... vs BertModel) and hold the pooler,
the masked-LM head, both or neither: `checkpoint_names` reads that from the tensor names. Segment ids follow
jaxft's convention (0 = padding); `token_types` are BERT's token_type_ids (sentence A / B).
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.models.config import ConfigError
from jaxft.models.hooks import hooks_of
from jaxft.models.attention import attention, prefix_of
from jaxft.models.layers import dense, einsum, layer_loop
from jaxft.models.table import Entry, module_rows
from jaxft.parallel.rules import constrain
from jaxft.quant import as_dense
from jaxft.tree import overlay, unflatten

KIND = "encoder"
# PEFT's default LoRA targets for BERT (query, value).
LORA_TARGETS = r"layers/attn/(q_proj|v_proj)/w"
# PEFT's default IA3 targets for BERT: key, value and both output.dense layers, the last two scaled at the input.
IA3_TARGETS = r"layers/(attn/(k_proj|v_proj|o_proj)|mlp/down_proj)/w"
IA3_FEEDFORWARD = r"layers/(attn/o_proj|mlp/down_proj)/w"

_ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "gelu_new": partial(jax.nn.gelu, approximate=True),
                "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True), "relu": jax.nn.relu,
                "silu": jax.nn.silu, "swish": jax.nn.silu}
# Head classes whose checkpoints hold the masked-LM head / no pooler (transformers' add_pooling_layer=False).
_MLM_ARCHS = ("BertForMaskedLM", "BertForPreTraining")
_NO_POOLER_ARCHS = ("BertForMaskedLM", "BertForTokenClassification", "BertForQuestionAnswering")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    mlp_dim: int  # F
    max_seq_len: int = 512  # P, rows of the position table
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    act: str = "gelu"  # the MLP's and the masked-LM transform's non-linearity (transformers' hidden_act)
    pooler: bool = True  # has pooler/{w,b}
    mlm_head: bool = False  # has mlm/... (the decoder is the word embedding)
    pad_token_id: int = 0
    model_type: str = "bert"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError(f"hidden_size={self.dim} is not a multiple of num_attention_heads={self.n_heads}")
        if self.act not in _ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.act!r} is not supported (expected one of {', '.join(_ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:  # no grouped-query attention; named for the methods that read it (prefix)
        return self.n_heads

    @property
    def tie_embeddings(self) -> bool:  # the masked-LM decoder is always the word embedding here
        return True

    @property
    def n_params(self) -> int:
        d, f, L = self.dim, self.mlp_dim, self.n_layers
        embed = (self.vocab_size + self.max_seq_len + self.type_vocab_size + 2) * d
        layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
        heads = (d * d + d) * self.pooler + (d * d + 3 * d + self.vocab_size) * self.mlm_head
        return embed + L * layer + heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        """The config of a Hugging Face BERT `config.json` dict. Which heads the weights hold is first guessed
        from `architectures`, then read from the checkpoint itself (`checkpoint_names`)."""
        if hf.get("model_type") != "bert":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not a BERT model")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r}")
        position = hf.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ConfigError(f"{source}: position_embedding_type {position!r} is not supported (expected 'absolute')")
        for key in ("is_decoder", "add_cross_attention"):
            if hf.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported (jaxft runs BERT as an encoder)")
        if hf.get("tie_word_embeddings") is False:
            raise ConfigError(f"{source}: tie_word_embeddings=false is not supported (the masked-LM decoder is "
                              f"the word embedding)")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected one of "
                              f"{', '.join(_ACTIVATIONS)})")
        arch = (hf.get("architectures") or ["BertModel"])[0]
        try:
            return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
                       act=act, pooler=arch not in _NO_POOLER_ARCHS, mlm_head=arch in _MLM_ARCHS,
                       pad_token_id=hf.get("pad_token_id") or 0)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf`: a config.json that transformers loads (BertForMaskedLM with the masked-LM
        head, else BertModel)."""
        return {"architectures": ["BertForMaskedLM" if self.mlm_head else "BertModel"], "model_type": "bert",
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "intermediate_size": self.mlp_dim, "hidden_act": self.act,
                "max_position_embeddings": self.max_seq_len, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.norm_eps, "position_embedding_type": "absolute",
                "pad_token_id": self.pad_token_id, "tie_word_embeddings": True}


_L = "encoder.layer.{i}."
TABLE = (
    Entry("embeddings.word_embeddings.weight", "embed/word/w", False),
    Entry("embeddings.position_embeddings.weight", "embed/position/w", False),
    Entry("embeddings.token_type_embeddings.weight", "embed/type/w", False),
    *module_rows("embeddings.LayerNorm", "embed/norm"),
    *module_rows(_L + "attention.self.query", "layers/attn/q_proj"),
    *module_rows(_L + "attention.self.key", "layers/attn/k_proj"),
    *module_rows(_L + "attention.self.value", "layers/attn/v_proj"),
    *module_rows(_L + "attention.output.dense", "layers/attn/o_proj"),
    *module_rows(_L + "attention.output.LayerNorm", "layers/attn_norm"),
    *module_rows(_L + "intermediate.dense", "layers/mlp/up_proj"),
    *module_rows(_L + "output.dense", "layers/mlp/down_proj"),
    *module_rows(_L + "output.LayerNorm", "layers/mlp_norm"),
    *module_rows("pooler.dense", "pooler"),
    *module_rows("cls.predictions.transform.dense", "mlm/transform"),
    *module_rows("cls.predictions.transform.LayerNorm", "mlm/norm"),
    Entry("cls.predictions.bias", "mlm/bias", False),
)

# Tensors checkpoints carry that the model does not read: buffers (position_ids), the next-sentence head of
# BertForPreTraining, copies of tied weights (the decoder), task heads (jaxft's tasks bring their own).
_UNUSED = re.compile(r"embeddings\.(position_ids|token_type_ids)|cls\.seq_relationship\.(weight|bias)"
                     r"|cls\.predictions\.decoder\.(weight|bias)|classifier\.(weight|bias)")


def checkpoint_names(cfg: Config, names) -> tuple[Config, dict[str, str]]:
    """(cfg, TABLE name -> name in the file) for the tensor names of one checkpoint.

    Strips the `bert.` prefix of BertFor... checkpoints, reads TensorFlow-era LayerNorm gamma/beta names, drops
    the tensors of _UNUSED, and sets `pooler` / `mlm_head` to what the checkpoint holds. Any other tensor keeps
    its own name and is reported as unexpected by the loader.
    """
    present: dict[str, str] = {}
    for name in names:
        hf = name.removeprefix("bert.")
        hf = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", hf))
        if _UNUSED.fullmatch(hf):
            continue
        present[name if hf in present else hf] = name  # a name given twice (with and without prefix): unexpected
    cfg = dataclasses.replace(cfg, pooler="pooler.dense.weight" in present,
                              mlm_head="cls.predictions.transform.dense.weight" in present)
    return cfg, present


# The logical axes of an encoder block's parameters (with biases and LayerNorms; the ViT towers share them).
ENCODER_LAYER_AXES = (
    (r"layers/attn/(q|k|v)_proj/w", ("layers", "embed", "heads")),
    (r"layers/attn/(q|k|v)_proj/b", ("layers", "heads")),
    (r"layers/attn/o_proj/w", ("layers", "heads", "embed")),
    (r"layers/mlp/up_proj/w", ("layers", "embed", "mlp")),
    (r"layers/mlp/up_proj/b", ("layers", "mlp")),
    (r"layers/mlp/down_proj/w", ("layers", "mlp", "embed")),
    (r"layers/(attn/o_proj|mlp/down_proj)/b", ("layers", None)),
    (r"layers/(attn|mlp)_norm/(scale|bias)", ("layers", None)),
)
# The logical axes of every parameter, by path (first full regex match), for sharding (see `jaxft.parallel`).
PARAM_AXES = (
    (r"embed/word/w", ("vocab", "embed")),
    (r"embed/(position|type)/w", (None, "embed")),
    (r"embed/norm/(scale|bias)", (None,)),
    *ENCODER_LAYER_AXES,
    (r"pooler/w", ("embed", None)),
    (r"mlm/transform/w", ("embed", None)),
    (r"(pooler|mlm/transform)/b|mlm/norm/(scale|bias)", (None,)),
    (r"mlm/bias", ("vocab",)),
)


def init(key, cfg: Config, dtype=jnp.float32) -> dict:
    """Random parameters as transformers initializes BERT (normal, std 0.02; zero biases; norms at one)."""
    d, f, L = cfg.dim, cfg.mlp_dim, cfg.n_layers
    shapes = {"embed/word/w": (cfg.vocab_size, d), "embed/position/w": (cfg.max_seq_len, d),
              "embed/type/w": (cfg.type_vocab_size, d)}
    for name, (d_in, d_out) in {"attn/q_proj": (d, d), "attn/k_proj": (d, d), "attn/v_proj": (d, d),
                                "attn/o_proj": (d, d), "mlp/up_proj": (d, f), "mlp/down_proj": (f, d)}.items():
        shapes[f"layers/{name}/w"] = (L, d_in, d_out)
        shapes[f"layers/{name}/b"] = (L, d_out)
    if cfg.pooler:
        shapes.update({"pooler/w": (d, d), "pooler/b": (d,)})
    key, head_key = jax.random.split(key)
    keys = jax.random.split(key, len(shapes))
    flat = {p: (0.02 * jax.random.normal(k, s)).astype(dtype) if p.endswith("/w") else jnp.zeros(s, dtype)
            for k, (p, s) in zip(keys, sorted(shapes.items()))}
    for path, lead in (("embed/norm", ()), ("layers/attn_norm", (L,)), ("layers/mlp_norm", (L,))):
        flat[f"{path}/scale"], flat[f"{path}/bias"] = jnp.ones(lead + (d,), dtype), jnp.zeros(lead + (d,), dtype)
    params = unflatten(flat)
    if cfg.mlm_head:
        params.update(init_mlm_head(head_key, cfg, dtype))
    return params


def init_mlm_head(key, cfg: Config, dtype=jnp.float32) -> dict:
    """{"mlm": ...}: a fresh masked-LM head, for `init` and for checkpoints without one (all-MiniLM-L6-v2)."""
    d = cfg.dim
    return {"mlm": {"transform": {"w": (0.02 * jax.random.normal(key, (d, d))).astype(dtype),
                                  "b": jnp.zeros((d,), dtype)},
                    "norm": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
                    "bias": jnp.zeros((cfg.vocab_size,), dtype)}}


def layer_norm(x, p: dict, eps: float):
    """(..., D) -> (..., D) with p scale and bias; statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def forward(cfg: Config, base: dict, tokens, *, segment_ids=None, token_types=None, positions=None,
            trainable: dict | None = None, peft=None, lora=None, rng=None, dtype=jnp.float32,
            remat: bool = False, unroll: bool = False, return_hidden: bool = False, embeddings=None, layout=None):
    """tokens (B, T) int -> (masked-LM logits (B, T, V) float32, None); with `return_hidden`, the last hidden
    states (B, T, D) in `dtype` instead.

    segment_ids (B, T): 0 marks padding, distinct ids keep packed examples apart (default all ones);
    token_types (B, T): BERT's token_type_ids (default zeros); positions (B, T): default 0..T-1.
    `trainable` / `peft` as in `jaxft.models.llama.forward` (LoRA, IA3, adapters, prefix and prompt tuning,
    full or partial); `embeddings` (B, T, D) replaces the word-embedding lookup. As in PEFT, the text's
    positions start at P after a soft prompt or a prefix of P virtual tokens. `unroll` runs the layer scan as
    straight-line code (see `jaxft.models.llama.forward`).
    """
    trainable, hooks = hooks_of(peft if peft is not None else lora).resolve(base, trainable)
    params = overlay(base, trainable)
    b, t = tokens.shape
    segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    token_types = jnp.zeros((b, t), jnp.int32) if token_types is None else token_types
    x = embeddings if embeddings is not None else as_dense(params["embed"]["word"]["w"], dtype)[tokens]
    x = x.astype(dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if hooks.virtual_tokens:  # as PEFT: the text's positions start after P virtual tokens
        positions = positions + jnp.int32(hooks.virtual_tokens)
    # Embeddings a method puts first (a soft prompt) join the word embeddings, token type 0, as in PEFT.
    x, positions, segment_ids = hooks.input_embeddings(trainable, x, positions, segment_ids)
    n_soft, t = x.shape[1] - t, x.shape[1]
    if n_soft:
        token_types = jnp.concatenate([jnp.zeros((b, n_soft), token_types.dtype), token_types], 1)
    emb = params["embed"]
    x = x + as_dense(emb["position"]["w"], dtype)[positions] + as_dense(emb["type"]["w"], dtype)[token_types]
    x = constrain(layer_norm(x, emb["norm"], cfg.norm_eps), ("batch", "seq", "embed"), layout)

    # As transformers: padding and the soft prompt (negative ids) see every key outside padding: padding
    # queries are given a negative id, which `jaxft.models.layers.attention_mask` reads that way.
    queries = jnp.where(segment_ids == 0, -1, segment_ids)
    layer = partial(_layer, cfg, hooks, queries, segment_ids, layout=layout)
    layer_rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)
    x, _ = layer_loop(lambda x, p, r: (layer(x, p, r), None), x, base["layers"],
                      (trainable or {}).get("layers", {}), layer_rngs, remat=remat, unroll=unroll)
    x = x[:, n_soft:]  # without the soft prompt's outputs
    if return_hidden:
        return x, None
    return constrain(mlm_logits(cfg, params, x), ("batch", "seq", "vocab"), layout), None


def mlm_logits(cfg: Config, params: dict, hidden):
    """hidden (B, T, D) -> (B, T, V) float32: transform, LayerNorm, the tied decoder and its bias."""
    if "mlm" not in params:
        raise ValueError("this BERT checkpoint has no masked-LM head (cls.predictions...): pass "
                         "return_hidden=True, or a head in trainable['mlm'] (see `init_mlm_head`)")
    head = params["mlm"]
    h = _ACTIVATIONS[cfg.act](dense(hidden, head["transform"]))
    h = layer_norm(h, head["norm"], cfg.norm_eps)
    word = as_dense(params["embed"]["word"]["w"], hidden.dtype)
    logits = einsum("btd,vd->btv", h, word)
    return logits + head["bias"].astype(jnp.float32)


def pool(cfg: Config, params: dict, hidden):
    """hidden (B, T, D) -> (B, D): BERT's pooler output, tanh(dense(hidden[:, 0]))."""
    if "pooler" not in params:
        raise ValueError("this BERT checkpoint has no pooler (pooler.dense...)")
    return jnp.tanh(dense(hidden[:, 0], params["pooler"]).astype(jnp.float32))


def embed(cfg: Config, params: dict, tokens, segment_ids, *, token_types=None, trainable=None, peft=None,
          dtype=jnp.float32):
    """tokens, segment_ids (B, T) -> (B, D) float32 sentence vectors: the hidden states averaged over the
    non-padding tokens, L2-normalized (sentence-transformers' recipe for all-MiniLM-L6-v2: mean pooling,
    Normalize)."""
    hidden, _ = forward(cfg, params, tokens, segment_ids=segment_ids, token_types=token_types,
                        trainable=trainable, peft=peft, dtype=dtype, return_hidden=True)
    keep = (segment_ids != 0).astype(jnp.float32)[..., None]
    mean = jnp.sum(hidden.astype(jnp.float32) * keep, 1) / jnp.maximum(jnp.sum(keep, 1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def _layer(cfg: Config, hooks, q_segments, segment_ids, x, p, rng, *, layout=None):
    """One post-LayerNorm block: x (B, T, D) -> x. q_segments / segment_ids (B, T): of queries and keys."""
    b, t, _ = x.shape
    n, h = cfg.n_heads, cfg.head_dim
    rngs = [None] * 6 if rng is None else list(jax.random.split(rng, 6))
    attn = p["attn"]
    q = dense(x, attn["q_proj"], hooks, rngs[0]).reshape(b, t, n, h)
    k = dense(x, attn["k_proj"], hooks, rngs[1]).reshape(b, t, n, h)
    v = dense(x, attn["v_proj"], hooks, rngs[2]).reshape(b, t, n, h)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"), layout)
    o = attention(q, k, v, q_segments=q_segments, k_segments=segment_ids, causal=False,
                  prefix=prefix_of(hooks, attn, k, v, segment_ids), layout=layout)
    o = dense(o.reshape(b, t, n * h), attn["o_proj"], hooks, rngs[3])
    x = layer_norm(x + hooks.block_output(attn, o), p["attn_norm"], cfg.norm_eps)

    mlp = p["mlp"]
    up = constrain(_ACTIVATIONS[cfg.act](dense(x, mlp["up_proj"], hooks, rngs[4])), ("batch", "seq", "mlp"), layout)
    out = hooks.block_output(mlp, dense(up, mlp["down_proj"], hooks, rngs[5]))
    x = layer_norm(x + out, p["mlp_norm"], cfg.norm_eps)
    return constrain(x, ("batch", "seq", "embed"), layout)
