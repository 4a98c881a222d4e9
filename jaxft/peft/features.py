"""Feature-based fine-tuning: the frozen model turns each text into one vector; a small head classifies it.

Features are the hidden states after block `layer` (0-based), passed through the model's final RMSNorm (what
the output head reads after the last block; a common scale at any depth), pooled over the text's tokens by
their mean or by taking the last one. They are computed once (`extract`), cached on disk (`cached`) and the
head alone is trained on them (`jaxft.train.features`). Inference is the model followed by the head
(`predict`, `classify`). The head is a linear map or an MLP with one ReLU hidden layer:

  head/out/w (D, C), head/out/b (C,)                                  linear
  head/hidden/w (D, E), head/hidden/b (E,), then head/out (E, C)      mlp
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft.method import PeftError

POOLS = ("mean", "last")
HEADS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What inference needs besides the head's arrays."""
    layer: int  # the block whose output is pooled, 0-based (the config's negative values already resolved)
    pool: str  # mean or last
    classes: tuple[str, ...]  # the label of each of the head's outputs
    seq_len: int  # texts are cut to this many tokens, as in training
    method: ClassVar[str] = "features"

    def to_json(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "FeatureSpec":
        return cls(layer=int(d["layer"]), pool=d["pool"], classes=tuple(d["classes"]), seq_len=int(d["seq_len"]))


def make_spec(cfg: LlamaConfig, layer: int, pool: str, classes, seq_len: int) -> FeatureSpec:
    """Checks the settings (named as in the config) and resolves a negative layer (-1: the last block)."""
    if not -cfg.n_layers <= layer < cfg.n_layers:
        raise PeftError(f"features.layer: {layer} is not a block of this model (0..{cfg.n_layers - 1}, or -1 for the "
                        f"last)")
    if pool not in POOLS:
        raise PeftError(f"features.pool: {pool!r} is not one of {', '.join(POOLS)}")
    if len(classes) < 2:
        raise PeftError(f"features.label_field: the data has {len(classes)} distinct label(s); a classifier needs 2 "
                        f"or more")
    if not 0 < seq_len <= cfg.max_seq_len:
        raise PeftError(f"train.seq_len must be in [1, {cfg.max_seq_len}], got {seq_len}")
    return FeatureSpec(layer=layer % cfg.n_layers, pool=pool, classes=tuple(classes), seq_len=seq_len)


@partial(jax.jit, static_argnames=("cfg", "layer", "pool", "dtype"))
def pooled(cfg: LlamaConfig, base: dict, tokens, segment_ids, *, layer: int, pool: str, dtype=jnp.float32):
    """tokens / segment_ids (B, T), right padded (segment 0) -> features (B, D) float32.

    Only blocks 0..layer run: the stacked layers are cut, not computed and thrown away.
    """
    cut = dataclasses.replace(cfg, n_layers=layer + 1, layer_windows=cfg.layer_windows[:layer + 1])
    layers = jax.tree.map(lambda x: x[:layer + 1], base["layers"])
    hidden, _ = llama.forward(cut, {**base, "layers": layers}, tokens, segment_ids=segment_ids, dtype=dtype,
                              return_hidden=True)
    hidden = hidden.astype(jnp.float32)
    real = (segment_ids != 0).astype(jnp.float32)
    if pool == "mean":
        return jnp.sum(hidden * real[..., None], axis=1) / jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1.0)
    last = jnp.maximum(jnp.sum(segment_ids != 0, axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def extract(cfg: LlamaConfig, base: dict, texts: list[list[int]], spec: FeatureSpec, batch_size: int = 32,
            dtype=jnp.float32) -> np.ndarray:
    """Token lists -> (N, D) float32 features; every batch padded to (batch_size, spec.seq_len): one compilation."""
    out = []
    for lo in range(0, len(texts), batch_size):
        tokens, segment_ids = pad_right(texts[lo:lo + batch_size], batch_size, spec.seq_len)
        feats = pooled(cfg, base, tokens, segment_ids, layer=spec.layer, pool=spec.pool, dtype=dtype)
        out.append(np.asarray(feats)[:len(texts[lo:lo + batch_size])])
    return np.concatenate(out) if out else np.zeros((0, cfg.dim), np.float32)


def cached(path: Path, key: dict, compute) -> np.ndarray:
    """The array saved at `path` (.npy) if it was computed for the same `key` (a JSON-able description of
    model, data and settings), else compute() saved there with its key beside it."""
    path = Path(path)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    stamp = path.with_suffix(".key")
    if path.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return np.load(path)
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.rename(path)
    stamp.write_text(digest)
    return array


def init_head(key, dim: int, n_classes: int, kind: str = "linear", hidden: int = 256) -> dict:
    """The trainable head: PyTorch-default uniform weights, zero output bias (see the module docstring)."""
    if kind not in HEADS:
        raise PeftError(f"features.head: {kind!r} is not one of {', '.join(HEADS)}")
    if kind == "mlp" and hidden <= 0:
        raise PeftError(f"features.hidden must be positive for an mlp head, got {hidden}")
    k1, k2 = jax.random.split(key)

    def linear(k, d_in, d_out):
        bound = 1.0 / np.sqrt(d_in)
        return {"w": jax.random.uniform(k, (d_in, d_out), jnp.float32, -bound, bound),
                "b": jnp.zeros((d_out,), jnp.float32)}

    if kind == "linear":
        return {"head": {"out": linear(k1, dim, n_classes)}}
    return {"head": {"hidden": linear(k1, dim, hidden), "out": linear(k2, hidden, n_classes)}}


def apply_head(params: dict, features):
    """features (B, D) -> class logits (B, C) float32."""
    h = features.astype(jnp.float32)
    head = params["head"]
    if "hidden" in head:
        h = jax.nn.relu(h @ head["hidden"]["w"] + head["hidden"]["b"])
    return h @ head["out"]["w"] + head["out"]["b"]


def predict(cfg: LlamaConfig, base: dict, head: dict, spec: FeatureSpec, tokens, segment_ids, dtype=jnp.float32):
    """The fine-tuned classifier: tokens / segment_ids (B, T) right padded -> class logits (B, C)."""
    return apply_head(head, pooled(cfg, base, tokens, segment_ids, layer=spec.layer, pool=spec.pool, dtype=dtype))


def classify(cfg: LlamaConfig, base: dict, tokenizer, head: dict, spec: FeatureSpec, texts: list[str],
             batch_size: int = 32, dtype=jnp.float32) -> list[str]:
    """The predicted label of each text."""
    ids = tokenize(tokenizer, texts, spec.seq_len)
    logits = apply_head(head, extract(cfg, base, ids, spec, batch_size, dtype))
    return [spec.classes[i] for i in np.asarray(jnp.argmax(logits, axis=-1))]


def tokenize(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids of each text (the tokenizer's own special tokens, e.g. BOS, included), cut to seq_len."""
    return [list(ids[:seq_len]) or [tokenizer.eos_token_id] for ids in tokenizer(list(texts))["input_ids"]]


def pad_right(texts: list[list[int]], rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids), each (rows, seq_len) int32: texts left-aligned, missing rows all padding."""
    tokens = np.zeros((rows, seq_len), np.int32)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    for i, ids in enumerate(texts):
        tokens[i, :len(ids)] = ids
        segment_ids[i, :len(ids)] = 1
    return tokens, segment_ids
