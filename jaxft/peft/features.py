"""Feature-based fine-tuning: the frozen model turns each text into one vector; a small head classifies it.

Features are the hidden states after block `layer` (0-based; the config's negative values count from the end),
read where each family's own output reads them, pooled over the text's real tokens (padding excluded):

  llama  decoder          after the final RMSNorm (what the output head reads; a common scale at any depth)
  bert   encoder          the block's output as it is: BERT's blocks end in a LayerNorm (transformers'
                          hidden_states[layer + 1])
  t5     encoder-decoder  the ENCODER block's output with the encoder's final layer norm applied, as for LLaMA
                          (at the last block: T5EncoderModel's last_hidden_state); the decoder is not run

Pools (`features.pool`): mean over the real tokens (sentence-transformers' choice for BERT), last (the last
real token: the one a decoder has read the whole text into; BERT's [SEP], T5's EOS), cls (the first token:
BERT's [CLS], the usual pooling of encoders; T5 has no [CLS], so the first word's, as Sentence-T5's "first").
A decoder's first token sees only itself: cls is refused there.

Features are computed once (`extract`), cached on disk (`cached`, keyed by `model_key`, the texts and the
settings: `jaxft.tasks.classification.feature_batches`) and the classification task trains the head alone on
them through the common train step. Inference is the model followed by
the head (`predict`, `classify`). The head is a linear map or an MLP with one ReLU hidden layer:

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

from jaxft.models import family_of
from jaxft.models.layers import last_token, mean_pool
from jaxft.peft.method import PeftError

POOLS = ("mean", "last", "cls")
UNMERGEABLE = "feature-based fine-tuning trains a classification head beside the model; the model is unchanged"
HEADS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What inference needs besides the head's arrays."""
    layer: int  # the block whose output is pooled, 0-based (the config's negative values already resolved)
    pool: str  # mean, last or cls
    classes: tuple[str, ...]  # the label of each of the head's outputs
    seq_len: int  # texts are cut to this many tokens, as in training
    method: ClassVar[str] = "features"

    def to_json(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "FeatureSpec":
        return cls(layer=int(d["layer"]), pool=d["pool"], classes=tuple(d["classes"]), seq_len=int(d["seq_len"]))


def expected(spec, flat: dict, base: dict, cfg) -> dict:
    """A features head's leaves (the whole tree, under head/): its first layer reads the model width D."""
    first = "head/hidden/w" if "head/hidden/w" in flat else "head/out/w"
    return {**flat, first: (cfg.dim, flat.get(first, (0, 0))[-1])}


def make_spec(cfg, layer: int, pool: str, classes, seq_len: int) -> FeatureSpec:
    """Checks the settings (named as in the config) for the model of `cfg` (any family's Config) and resolves a
    negative layer (-1: the last block)."""
    _check(cfg, layer, pool)
    if len(classes) < 2:
        raise PeftError(f"features.label_field: the data has {len(classes)} distinct label(s); a classifier needs 2 "
                        f"or more")
    if not 0 < seq_len <= cfg.max_seq_len:
        raise PeftError(f"train.seq_len must be in [1, {cfg.max_seq_len}], got {seq_len}")
    return FeatureSpec(layer=layer % cfg.n_layers, pool=pool, classes=tuple(classes), seq_len=seq_len)


def _check(cfg, layer: int, pool: str) -> None:
    """PeftError naming features.layer / features.pool where the model of `cfg` has no such block or pool."""
    fam, name = family_of(cfg), _family_name(cfg)
    if name not in _HIDDEN:
        raise PeftError(f"peft.method=features: not available for the {name} family (expected one of "
                        f"{', '.join(_HIDDEN)})")
    n = cfg.n_layers
    if not -n <= layer < n:
        stack = "encoder layers" if fam.KIND == "encoder-decoder" else "layers"
        raise PeftError(f"features.layer: {layer} is not a block of this model ({name}, {n} {stack}: 0..{n - 1}, "
                        f"or -1..-{n} from the end)")
    if pool not in POOLS:
        raise PeftError(f"features.pool: {pool!r} is not one of {', '.join(POOLS)}")
    if pool == "cls" and fam.KIND == "decoder":
        raise PeftError(f"features.pool: 'cls' (the first token) is for encoders; a decoder's ({name}) first token "
                        f"sees only itself: use mean or last")


def _family_name(cfg) -> str:
    return family_of(cfg).__name__.rsplit(".", 1)[-1]


def _first(layers: dict, n: int) -> dict:
    """The first n of stacked layers: sliced, so that the blocks after them are not computed and thrown away."""
    return jax.tree.map(lambda x: x[:n], layers)


def _llama_hidden(cfg, base: dict, tokens, segment_ids, n: int, dtype):
    """(B, T, D): the output of block n - 1 through the final RMSNorm."""
    cut = dataclasses.replace(cfg, n_layers=n, layer_windows=cfg.layer_windows[:n])
    hidden, _ = family_of(cfg).forward(cut, {**base, "layers": _first(base["layers"], n)}, tokens,
                                       segment_ids=segment_ids, dtype=dtype, return_hidden=True)
    return hidden


def _bert_hidden(cfg, base: dict, tokens, segment_ids, n: int, dtype):
    """(B, T, D): the output of block n - 1, already layer-normed (BERT's blocks are post-LayerNorm)."""
    cut = dataclasses.replace(cfg, n_layers=n)
    hidden, _ = family_of(cfg).forward(cut, {**base, "layers": _first(base["layers"], n)}, tokens,
                                       segment_ids=segment_ids, dtype=dtype, return_hidden=True)
    return hidden


def _t5_hidden(cfg, base: dict, tokens, segment_ids, n: int, dtype):
    """(B, T, D): the output of encoder block n - 1 through the encoder's final layer norm; no decoder."""
    encoder = {**base["encoder"], "layers": _first(base["encoder"]["layers"], n)}
    return family_of(cfg).encode(dataclasses.replace(cfg, n_layers=n), {**base, "encoder": encoder}, tokens,
                                 segment_ids=segment_ids, dtype=dtype)


# The hidden states that are the features, by family (the module names of `jaxft.models.FAMILIES`).
_HIDDEN = {"llama": _llama_hidden, "bert": _bert_hidden, "t5": _t5_hidden}


@partial(jax.jit, static_argnames=("cfg", "layer", "pool", "dtype"))
def pooled(cfg, base: dict, tokens, segment_ids, *, layer: int, pool: str, dtype=jnp.float32):
    """tokens / segment_ids (B, T), right padded (segment 0) -> features (B, D) float32: the hidden states of the
    model of `cfg` (any family) after block `layer`, pooled by `pool` (see the module docstring).

    Only blocks 0..layer run: the stacked layers are cut, not computed and thrown away.
    """
    _check(cfg, layer, pool)
    n = layer % cfg.n_layers + 1
    hidden = _HIDDEN[_family_name(cfg)](cfg, base, tokens, segment_ids, n, dtype).astype(jnp.float32)
    if pool == "mean":
        return mean_pool(hidden, segment_ids)
    if pool == "last":
        return last_token(hidden, segment_ids)
    return hidden[:, 0]


def extract(cfg, base: dict, texts: list[list[int]], spec: FeatureSpec, batch_size: int = 32,
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


def predict(cfg, base: dict, head: dict, spec: FeatureSpec, tokens, segment_ids, dtype=jnp.float32):
    """The fine-tuned classifier: tokens / segment_ids (B, T) right padded -> class logits (B, C)."""
    return apply_head(head, pooled(cfg, base, tokens, segment_ids, layer=spec.layer, pool=spec.pool, dtype=dtype))


def classify(cfg, base: dict, tokenizer, head: dict, spec: FeatureSpec, texts: list[str],
             batch_size: int = 32, dtype=jnp.float32) -> list[str]:
    """The predicted label of each text."""
    ids = tokenize(tokenizer, texts, spec.seq_len)
    logits = apply_head(head, extract(cfg, base, ids, spec, batch_size, dtype))
    return [spec.classes[i] for i in np.asarray(jnp.argmax(logits, axis=-1))]


def tokenize(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids of each text with the tokenizer's own special tokens (BOS; BERT's [CLS] and [SEP], T5's EOS),
    cut to seq_len as transformers truncates (keeping a closing [SEP] / EOS)."""
    ids = tokenizer(list(texts), truncation=True, max_length=seq_len)["input_ids"]
    return [list(row) or [tokenizer.eos_token_id] for row in ids]


def pad_right(texts: list[list[int]], rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids), each (rows, seq_len) int32: texts left-aligned, missing rows all padding."""
    tokens = np.zeros((rows, seq_len), np.int32)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    for i, ids in enumerate(texts):
        tokens[i, :len(ids)] = ids
        segment_ids[i, :len(ids)] = 1
    return tokens, segment_ids


def model_key(model) -> dict:
    """What tells models apart in the feature cache's key: the family, the architecture, and the checkpoint's
    path with the size and modification time of its files (another checkpoint saved there is another model)."""
    path = Path(model.path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"family": model.cfg.model_type, "config": model.cfg.to_hf(), "model": str(path),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}

