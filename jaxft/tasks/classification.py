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
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxft import metrics
from jaxft.models import family_of
from jaxft.data import rows
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
    """-> logits (B, C) float32."""
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
