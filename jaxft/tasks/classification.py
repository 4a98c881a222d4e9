"""Sequence classification: one label per text, from a column of a TSV / CSV / JSON(L) / Parquet file.

Texts are data.text_field, labels data.label_field (stripped: SST-2's TSV has a space before the tab). The
classes are data.labels (comma-separated, in class-index order) or, when that is empty, the distinct labels of
the training file; a label outside them is an error naming its file and line. Each text is one row of at most
train.seq_len tokens (the tokenizer's special tokens included), right-padded.

The head (`jaxft.tasks.heads`): encoders BERT's pooler output -> head/classifier (D, C) + b, as
BertForSequenceClassification; decoders the last non-padding token -> head/score (D, C) without bias, as
LlamaForSequenceClassification; head.pool (where the config has it) picks mean pooling instead. Loss: mean
cross-entropy over the texts; metrics: accuracy and macro precision / recall / F1 (`jaxft.metrics`).
Batch keys: tokens, segment_ids, positions (B, T) int32 and labels (B,) int32 (IGNORE on padding rows).

peft.method=features is a mode of this task: the frozen model's pooled hidden states (`jaxft.peft.features`) are
computed once per model, texts and settings and cached in WORKDIR/features (`feature_batches`); the batches
then hold features (B, D) float32 and labels (B,), `forward` skips the backbone, and the trainable tree is the
head alone (`features_trainable`: head/out, or head/hidden and head/out), trained by the common train step.
Texts and labels are features.text_field / features.label_field; the classes are every label of the training
and held-out texts, sorted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import metrics
from jaxft.data import rows
from jaxft.dtypes import DTYPES
from jaxft.models import family_of
from jaxft.peft import features
from jaxft.peft import io as adapter_io
from jaxft.peft.method import PeftError
from jaxft.tasks import Eval, Model, evaluate_batches, heads

KINDS = ("encoder", "decoder")


def batches(config, tokenizer) -> tuple:
    """(training iterator, evaluation batches, info with "labels") as `jaxft.tasks` describes."""
    d, t = config.data, config.train
    train, held = split(config)
    texts, labels = columns(train, config)
    names = rows.label_set(d.labels, labels)
    arrays = encode(tokenizer, texts, t.seq_len)
    arrays["labels"] = rows.label_ids(labels, [r.where for r in train], names, d.label_field)
    info = {"labels": names, "train_examples": len(texts), "eval_examples": 0}
    eval_list = []
    if held:
        eval_texts, eval_labels = columns(held, config)
        eval_arrays = encode(tokenizer, eval_texts, t.seq_len)
        eval_arrays["labels"] = rows.label_ids(eval_labels, [r.where for r in held], names, d.label_field)
        batch_size, _ = rows.eval_settings(config)
        eval_list = rows.eval_batches(eval_arrays, batch_size, FILL)
        info["eval_examples"] = len(eval_texts)
    return rows.stream(arrays, t.batch_size, config.seed), eval_list, info


FILL = {"tokens": 0, "segment_ids": 0, "positions": 0, "labels": rows.IGNORE}


def split(config) -> tuple[list, list]:
    """(training records, held-out records): data.eval, or a seeded data.eval_fraction of data.train; the
    held-out part cut to eval.max_examples where that is set."""
    d = config.data
    train = rows.records(d.train)
    if d.eval:
        held = rows.records(d.eval)
    else:
        kept, out = rows.held_out(len(train), d.eval_fraction, config.seed)
        train, held = [train[i] for i in kept], [train[i] for i in out]
    _, most = rows.eval_settings(config)
    return train, held[:most] if most else held


def columns(recs, config) -> tuple[list[str], list[str]]:
    d = config.data
    return rows.column(recs, d.text_field, "data.text_field"), rows.column(recs, d.label_field, "data.label_field")


def encode(tokenizer, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """tokens, segment_ids (1 on the text, 0 on padding), positions: (N, seq_len) int32, one text a row."""
    ids = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    return {"tokens": rows.pad(ids, seq_len, rows.pad_id(tokenizer)),
            "segment_ids": rows.pad([[1] * len(x) for x in ids], seq_len, 0),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (len(ids), seq_len)).copy()}


def init_head(key, cfg, config, n_labels: int) -> dict:
    """head/classifier {w (D, C), b (C,)} for encoders, head/score {w (D, C)} for decoders (float32)."""
    if family_of(cfg).KIND == "encoder":
        return {"classifier": heads.init_linear(key, cfg.dim, n_labels, bias=True)}
    return {"score": heads.init_linear(key, cfg.dim, n_labels, bias=False)}


def forward(model: Model, base: dict, trainable: dict, batch: dict, rng=None):
    """-> logits (B, C) float32; from batch features (B, D) alone where the batch has them (peft.method=features)."""
    if "features" in batch:  # the backbone ran once, when the features were cached
        return features.apply_head(trainable, batch["features"])
    h = heads.hidden(model, base, trainable, batch, rng)
    x = heads.pooled(model, base, trainable, h, batch["segment_ids"], model.pool)
    return heads.linear(x, trainable["head"][heads.head_name(model)])


def loss(logits, batch) -> tuple:
    """(sum of cross-entropy over the labelled rows, their number)."""
    return heads.labelled_loss(logits, batch["labels"], rows.IGNORE)


def predict(logits, batch):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def evaluate(ev: Eval) -> dict[str, float]:
    """loss, accuracy, precision, recall, f1 (macro over the declared classes) over the evaluation texts."""
    mean_loss, outs = evaluate_batches(ev)
    pred, gold = [], []
    for batch, p in outs:
        keep = batch["labels"] != rows.IGNORE
        pred += p[keep].tolist()
        gold += batch["labels"][keep].tolist()
    if not gold:
        return {"loss": mean_loss}
    names = ev.info["labels"]
    return {"loss": mean_loss, **metrics.classification([names[i] for i in pred], [names[i] for i in gold],
                                                         labels=names)}


FEATURE_FILL = {"features": 0, "labels": rows.IGNORE}


def feature_batches(config, model, cache_dir) -> tuple:
    """peft.method=features: (training iterator, evaluation batches, info with "labels") of batches
    {features (B, D) float32, labels (B,) int32}; the features of `model` (a `jaxft.checkpoint.Loaded`) are read
    from cache_dir (WORKDIR/features/{train,eval}.npy) when computed there for the same model, texts and settings."""
    c, t = config.features, config.train
    train, held = split(config)
    texts, labels = _feature_columns(train, config)
    eval_texts, eval_labels = _feature_columns(held, config)
    names = sorted(set(labels) | set(eval_labels))
    spec = features.make_spec(model.cfg, c.layer, c.pool, names, t.seq_len)
    index = {n: i for i, n in enumerate(names)}
    arrays = {"features": _cached_features(config, model, spec, cache_dir, "train", texts),
              "labels": np.asarray([index[y] for y in labels], np.int32)}
    info = {"labels": names, "train_examples": len(texts), "eval_examples": len(eval_texts)}
    eval_list = []
    if eval_texts:
        eval_arrays = {"features": _cached_features(config, model, spec, cache_dir, "eval", eval_texts),
                       "labels": np.asarray([index[y] for y in eval_labels], np.int32)}
        eval_list = rows.eval_batches(eval_arrays, rows.eval_settings(config)[0], FEATURE_FILL)
    return rows.stream(arrays, t.batch_size, config.seed), eval_list, info


def features_trainable(key, config, cfg, labels) -> tuple[dict, features.FeatureSpec]:
    """peft.method=features: (the head, {"head": ...} float32, fresh or peft.init_from's; its FeatureSpec)."""
    c = config.features
    spec = features.make_spec(cfg, c.layer, c.pool, labels, config.train.seq_len)
    head = features.init_head(key, cfg.dim, len(labels), c.head, c.hidden)
    if config.peft.init_from:
        head = _head_from(config.peft.init_from, head, spec)
    return head, spec


def _head_from(path: str, fresh: dict, spec) -> dict:
    """The head of the features run at `path` (a workdir or its adapter/), to continue training: it must have
    been trained on the same features (layer, pool, sequence length) with the same classes as `spec`."""
    where = Path(path) / "adapter" if (Path(path) / "adapter" / "adapter.json").is_file() else Path(path)
    try:
        head, saved, _ = adapter_io.load(where)
    except (OSError, ValueError) as e:
        raise PeftError(f"peft.init_from: {e}") from None
    if not isinstance(saved, features.FeatureSpec):
        raise PeftError(f"peft.init_from: {where} is not a peft.method=features head")
    if saved != spec:
        raise PeftError(f"peft.init_from: {where} was trained with {saved}, but this run has {spec}")
    if jax.tree.map(np.shape, head) != jax.tree.map(np.shape, fresh):
        raise PeftError(f"peft.init_from: {where} holds a head of another shape (features.head / features.hidden)")
    return head


def _feature_columns(recs, config) -> tuple[list[str], list[str]]:
    c = config.features
    return (rows.column(recs, c.text_field, "features.text_field"),
            rows.column(recs, c.label_field, "features.label_field"))


def _cached_features(config, model, spec, cache_dir, name: str, texts: list[str]) -> np.ndarray:
    """(N, D) pooled features of `texts` (cache_dir/NAME.npy, computed once per model, texts and settings)."""
    key = {**features.model_key(model), "layer": spec.layer, "pool": spec.pool, "seq_len": spec.seq_len,
           "dtype": config.dtype, "param_dtype": config.param_dtype,
           "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest()}
    compute = lambda: features.extract(model.cfg, model.params, features.tokenize(model.tokenizer, texts, spec.seq_len),
                                       spec, config.train.batch_size, DTYPES[config.dtype])
    return features.cached(Path(cache_dir) / f"{name}.npy", key, compute) if cache_dir else compute()
