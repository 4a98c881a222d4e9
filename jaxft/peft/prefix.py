"""Prefix tuning (Li & Liang 2021) as HF PEFT computes it (decoder-only models, BERT-style encoders, and T5,
whose decoder self-attention alone gets the prefix, `decoder/layers/self_attn/prefix_k`).

Every layer's attention gets P learned keys and values per key/value head, `layers/attn/prefix_k` and
`prefix_v` (L, P, K*H): one per KV head under grouped-query attention, as PEFT provisions them. Every query of
the text sees them; they carry no position (they are not rotated) and stay outside the KV cache, so a cache of
the text alone serves generation. As in PEFT, where the prefix is a past KV cache of P entries, the text's
positions start at P (`MethodSpec.virtual_tokens`).

With a reparameterization (PEFT's `prefix_projection`) the trainable tree holds instead

  prefix/embedding (P, K*H) -> mlp/in (K*H, E) + b -> tanh -> mlp/out (E, L*2*K*H) + b

whose output, read in PEFT's layout (P, L, 2, K*H) (layer l's key, then its value), gives the prefixes.
`project` computes them; the saved adapter holds them and not the MLP, which only eases optimization.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.models import family_of
from jaxft.models.layers import dense, rms_norm
from jaxft.peft.method import MethodSpec, PeftError, virtual_tokens
from jaxft.tree import overlay

INITS = ("vocab", "random")
SHAPING = ("length", "projection")
UNMERGEABLE = "prefix tuning adds learned keys and values to every attention layer; they are inputs, not weights"


def where(cfg) -> tuple[str, int]:
    """(path of the attention block that gets the prefix, its number of layers) for the model family of `cfg`:
    `layers/attn` (LLaMA, BERT), or T5's `decoder/layers/self_attn` (PEFT prefixes the decoder only)."""
    if family_of(cfg).KIND == "encoder-decoder":
        return "decoder/layers/self_attn", cfg.n_decoder_layers
    return "layers/attn", cfg.n_layers


def init(key, cfg, base: dict, length: int, projection: int = 0, how: str = "vocab") -> dict:
    """The trainable tree of a prefix of `length` virtual tokens (checked by the caller against the context).

    how (without projection): 'vocab' starts from the keys and values the model itself computes for `length`
    sampled vocabulary tokens (real activations, Li & Liang's advice; T5: the decoder's, reading the same tokens
    in the encoder); 'random' from N(0, 1), PEFT's default.
    projection: the MLP's hidden width E, 0 for none; its embedding is N(0, 1) and its linear maps have
    PyTorch's default initialization, as in PEFT (decoder-only and encoder models).
    """
    if how not in INITS:
        raise PeftError(f"prefix.init: {how!r} is not one of {', '.join(INITS)}")
    if projection < 0:
        raise PeftError(f"prefix.projection must be >= 0 (0: no reparameterization), got {projection}")
    path, n_layers = where(cfg)
    kv = cfg.n_kv_heads * cfg.head_dim
    k_emb, k_in, k_out, k_ids = jax.random.split(key, 4)
    if projection:
        if path != "layers/attn":
            raise PeftError(f"prefix.projection: the reparameterization MLP is implemented for decoder-only and "
                            f"encoder models, not {cfg.model_type}; use prefix.projection=0")
        return {"prefix": {"embedding": jax.random.normal(k_emb, (length, kv), jnp.float32),
                           "mlp": {"in": _torch_linear(k_in, kv, projection),
                                   "out": _torch_linear(k_out, projection, n_layers * 2 * kv)}}}
    if how == "random":
        k, v = jax.random.normal(k_emb, (2, n_layers, length, kv), jnp.float32)
    else:
        k, v = _vocab_kv(cfg, base, jax.random.randint(k_ids, (1, length), 0, cfg.vocab_size))
    return tree.unflatten({f"{path}/prefix_k": k, f"{path}/prefix_v": v})


def _vocab_kv(cfg, base: dict, ids):
    """(k, v) (L, P, K*H) float32: each layer's keys and values of the tokens ids (1, P), as the family's
    forward computes them."""
    family = family_of(cfg)
    if family.KIND == "decoder":
        n = ids.shape[1]
        _, cache = family.forward(cfg, base, ids, cache=family.init_cache(cfg, 1, n))
        return tuple(cache[c].reshape(cfg.n_layers, n, -1).astype(jnp.float32) for c in ("k", "v"))
    # Encoders keep no cache: layer l's input is the output of the model cut after l layers.
    layers = base["layers"] if family.KIND == "encoder" else base["decoder"]["layers"]
    ks, vs = [], []
    for l in range(where(cfg)[1]):
        cut = jax.tree.map(lambda x: x[:l], layers)
        if family.KIND == "encoder":
            x, _ = family.forward(cfg, dict(base, layers=cut), ids, return_hidden=True)
            attn = jax.tree.map(lambda x: x[l], layers["attn"])
        else:  # T5, pre-norm: the cut decoder's output normed without scale, then the layer's own norm
            dec = dict(base["decoder"], layers=cut, final_norm={"scale": jnp.ones((cfg.dim,), jnp.float32)})
            x, _ = family.forward(cfg, dict(base, decoder=dec), ids, ids, return_hidden=True)
            here = jax.tree.map(lambda x: x[l], layers)
            x = rms_norm(x, here["self_attn_norm"]["scale"], cfg.norm_eps)
            attn = here["self_attn"]
        ks.append(dense(x, attn["k_proj"])[0])
        vs.append(dense(x, attn["v_proj"])[0])
    return jnp.stack(ks).astype(jnp.float32), jnp.stack(vs).astype(jnp.float32)


def project(trainable: dict) -> dict:
    """The trainable tree with `prefix/...` (embedding and MLP) replaced by the prefixes it computes."""
    p = trainable["prefix"]
    e = p["embedding"]
    h = jnp.tanh(e @ p["mlp"]["in"]["w"] + p["mlp"]["in"]["b"])
    out = h @ p["mlp"]["out"]["w"] + p["mlp"]["out"]["b"]  # (P, L*2*K*H)
    n, kv = e.shape
    out = out.reshape(n, -1, 2, kv).transpose(1, 2, 0, 3)  # (L, 2, P, K*H)
    rest = {name: sub for name, sub in trainable.items() if name != "prefix"}
    return overlay(rest, {"layers": {"attn": {"prefix_k": out[:, 0], "prefix_v": out[:, 1]}}})


def build(key, base: dict, config, cfg, tokenizer=None):
    c = config.prefix
    n = virtual_tokens("prefix.length", c.length, config.train.seq_len, cfg.max_seq_len)
    return init(key, cfg, base, n, c.projection, c.init), MethodSpec("prefix", virtual_tokens=n)


def layout(cfg, length: int, projection: int = 0) -> dict[str, tuple[int, ...]]:
    """path -> shape of the leaves of a prefix of `length` (with the reparameterization MLP of width
    `projection`, while training)."""
    path, n_layers = where(cfg)
    kv = cfg.n_kv_heads * cfg.head_dim
    if projection:
        return {"prefix/embedding": (length, kv), "prefix/mlp/in/w": (kv, projection),
                "prefix/mlp/in/b": (projection,), "prefix/mlp/out/w": (projection, n_layers * 2 * kv),
                "prefix/mlp/out/b": (n_layers * 2 * kv,)}
    return {f"{path}/prefix_k": (n_layers, length, kv), f"{path}/prefix_v": (n_layers, length, kv)}


def expected(spec, flat: dict, base: dict, cfg) -> dict:
    return layout(cfg, spec.virtual_tokens, flat.get("prefix/mlp/in/w", (0, 0))[-1])


def settings(config, spec, flat: dict) -> list:
    """(field, the config's value, the adapter's value[, hint]) that `peft.init_from` compares."""
    projection = flat.get("prefix/mlp/in/w", (0, 0))[-1]
    hint = "" if projection else "; set prefix.projection=0 to train the prefixes themselves"
    return [("prefix.length", config.prefix.length, spec.virtual_tokens),
            ("prefix.projection", config.prefix.projection, projection, hint)]


def prefix_length(spec) -> int:
    return spec.virtual_tokens


def resolve(spec, base: dict, trainable: dict):
    """The `resolve` hook: prefixes computed from the reparameterization MLP, where the tree holds it."""
    return (project(trainable) if "prefix" in trainable else trainable), spec


def finalize(spec, trainable: dict) -> dict:
    return project(trainable) if "prefix" in trainable else trainable


def attention_kv(spec, attn: dict, k, v, mask, q_seg):
    """The `attention_kv` hook: the prefix first, where the attention block holds one (see `extend`)."""
    return extend(attn, k, v, mask, q_seg) if "prefix_k" in attn else (k, v, mask)


def extend(attn: dict, k, v, mask, q_seg):
    """One layer's keys / values (B, S, K, H) and mask (B, T, S) with the P prefix entries put first: every
    query of an example sees them (padding, segment 0, does not)."""
    b, _, n_kv, head_dim = k.shape
    n = attn["prefix_k"].shape[0]
    pk, pv = (jnp.broadcast_to(attn[name].reshape(n, n_kv, head_dim).astype(k.dtype), (b, n, n_kv, head_dim))
              for name in ("prefix_k", "prefix_v"))
    seen = jnp.broadcast_to((q_seg != 0)[:, :, None], (b, q_seg.shape[1], n))
    return jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), jnp.concatenate([seen, mask], -1)


def _torch_linear(key, d_in: int, d_out: int) -> dict:
    """torch.nn.Linear's default initialization: weight and bias uniform in +-1/sqrt(d_in); w is (in, out)."""
    bound = 1.0 / math.sqrt(d_in)
    kw, kb = jax.random.split(key)
    return {"w": jax.random.uniform(kw, (d_in, d_out), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (d_out,), jnp.float32, -bound, bound)}
