"""Token classification (named entities): one tag per word, predicted on the word's first sub-word token.

Input: CoNLL files (one token a line, its tag in the last column, a blank line between sentences, -DOCSTART-
lines skipped: CoNLL-2003's eng.train), or JSON(L) / Parquet records whose data.text_field holds the list of
words and data.label_field the list of tags. data.tag_scheme says how the tags are written: iob2 (B- starts
every entity) or iob1 (B- only between two adjacent entities of one type, as CoNLL-2003); iob1 is converted
to iob2 on reading, so the classes, the model and the metrics are IOB2 throughout. The classes are data.labels
or the tags of the training file. Errors name the file and line: a line with one column, a record whose word
and tag counts differ, a tag that is not O / B-x / I-x, a tag outside the label set.

Words go through the fast tokenizer as pre-split words; its word_ids() align the tags: the first sub-token of
each word carries the word's tag, the other sub-tokens and the special tokens IGNORE (as transformers' token
classification examples). Words past train.seq_len tokens are cut off (info counts them).
Head: every token's hidden state -> head/classifier (encoders) or head/score (decoders), (D, C) + b, as
BertForTokenClassification / LlamaForTokenClassification. Metrics: entity-level precision / recall / F1
(seqeval, strict IOB2) and token accuracy over the labelled words.
Batch keys: tokens, segment_ids, positions, labels (B, T) int32.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxft import metrics
from jaxft.data import DataError
from jaxft.models import family_of
from jaxft.data import rows
from jaxft.tasks import Eval, Model, TaskError, evaluate_batches, heads

KINDS = ("encoder", "decoder")
SCHEMES = ("iob1", "iob2")
FILL = {"tokens": 0, "segment_ids": 0, "positions": 0, "labels": rows.IGNORE}
_RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")


class Sentence(NamedTuple):
    words: list[str]
    tags: list[str]  # one per word; IOB2 once read
    where: list[str]  # "file:line" of each word (of the record, for JSON records)


def batches(config, tokenizer) -> tuple:
    """(training iterator, evaluation batches, info with "labels") as `jaxft.tasks` describes."""
    d, t = config.data, config.train
    train = read(d.train, config)
    if d.eval:
        held = read(d.eval, config)
    else:
        kept, out = rows.held_out(len(train), d.eval_fraction, config.seed)
        train, held = [train[i] for i in kept], [train[i] for i in out]
    _, most = rows.eval_settings(config)
    held = held[:most] if most else held
    names = rows.label_set(d.labels, [tag for s in train for tag in s[1]])
    if not d.labels.strip() and "O" in names:  # "O" first: class 0 is "no entity"
        names = ["O"] + [n for n in names if n != "O"]
    arrays, cut = encode(tokenizer, train, names, t.seq_len)
    info = {"labels": names, "train_sentences": len(train), "eval_sentences": len(held),
            "train_words_cut": cut, "eval_words_cut": 0}
    eval_list = []
    if held:
        eval_arrays, info["eval_words_cut"] = encode(tokenizer, held, names, t.seq_len)
        eval_list = rows.eval_batches(eval_arrays, rows.eval_settings(config)[0], FILL)
    return rows.stream(arrays, t.batch_size, config.seed), eval_list, info


def read(path, config) -> list[Sentence]:
    """The sentences of a CoNLL file or of JSON(L) / Parquet records, tags converted to IOB2."""
    d = config.data
    scheme = d.tag_scheme
    if scheme not in SCHEMES:
        raise TaskError(f"data.tag_scheme: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if Path(path).suffix.lower() in _RECORD_SUFFIXES:
        sentences = _read_records(path, d.text_field, d.label_field)
    else:
        sentences = read_conll(path)
    if not sentences:
        raise DataError(f"{path}: no sentence")
    for words, tags, where in sentences:
        for tag, w in zip(tags, where):
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                raise DataError(f"{w}: tag {tag!r} is not O, B-<type> or I-<type> (IOB tags)")
    if scheme == "iob1":
        sentences = [Sentence(w, iob1_to_iob2(t), where) for w, t, where in sentences]
    return sentences


def read_conll(path) -> list[Sentence]:
    """CoNLL columns: token first, tag last, blank lines between sentences; -DOCSTART- lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sentences, words, tags, where = [], [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append(Sentence(words, tags, where))
                words, tags, where = [], [], []
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: one column ({line.strip()!r}); a CoNLL line holds a token and, in its "
                            f"last column, the token's tag")
        words.append(parts[0])
        tags.append(parts[-1])
        where.append(f"{path}:{n}")
    if words:
        sentences.append(Sentence(words, tags, where))
    return sentences


def _read_records(path, words_field: str, tags_field: str) -> list[Sentence]:
    out = []
    for r in rows.records(path):
        values = []
        for field, key in ((words_field, "data.text_field"), (tags_field, "data.label_field")):
            v = r.fields.get(field)
            if not isinstance(v, (list, tuple)):
                raise DataError(f"{r.where}: no list {field!r} ({key}: the words and their tags); the record "
                                f"has {', '.join(map(repr, r.fields))}")
            values.append([str(x) for x in v])
        words, tags = values
        if len(words) != len(tags):
            raise DataError(f"{r.where}: {len(words)} words ({words_field!r}) but {len(tags)} tags "
                            f"({tags_field!r})")
        out.append(Sentence(words, tags, [r.where] * len(words)))
    return out


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 tags -> IOB2: an I-x that does not continue an x entity (after O, or after another type) starts
    one, so it becomes B-x; a B-x (IOB1's boundary between two x entities) stays."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def align(word_ids: list, word_labels: list[int]) -> list[int]:
    """Token labels from word labels: the first token of each word gets its label, the word's other tokens and
    the special tokens (word id None) IGNORE."""
    out, prev = [], None
    for w in word_ids:
        out.append(rows.IGNORE if w is None or w == prev else word_labels[w])
        prev = w
    return out


def encode(tokenizer, sentences: list[Sentence], names: list[str], seq_len: int) -> tuple[dict, int]:
    """(tokens, segment_ids, positions, labels (N, seq_len) int32; the number of words cut off by seq_len)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TaskError("task token_classification needs a fast tokenizer (its word_ids align tags to tokens)")
    ids, labels, cut = [], [], 0
    index = {n: i for i, n in enumerate(names)}
    for s in range(0, len(sentences), 1024):
        chunk = sentences[s:s + 1024]
        try:
            enc = tokenizer([w for w, _, _ in chunk], is_split_into_words=True, truncation=True, max_length=seq_len)
        except Exception as e:  # e.g. byte-level BPE tokenizers built without add_prefix_space
            raise TaskError(f"the tokenizer cannot take pre-split words: {e}") from None
        for i, (words, tags, where) in enumerate(chunk):
            word_labels = []
            for tag, w in zip(tags, where):
                if tag not in index:
                    raise DataError(f"{w}: tag {tag!r} is not in the label set [{', '.join(names)}] (data.labels; "
                                    f"empty: the tags of the training file)")
                word_labels.append(index[tag])
            word_ids = enc.word_ids(i)
            ids.append(enc["input_ids"][i])
            labels.append(align(word_ids, word_labels))
            cut += len(words) - len({w for w in word_ids if w is not None})
    arrays = {"tokens": rows.pad(ids, seq_len, rows.pad_id(tokenizer)),
              "segment_ids": rows.pad([[1] * len(x) for x in ids], seq_len, 0),
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (len(ids), seq_len)).copy(),
              "labels": rows.pad(labels, seq_len, rows.IGNORE)}
    return arrays, cut


def init_head(key, cfg, config, n_labels: int) -> dict:
    """head/classifier (encoders) or head/score (decoders): {w (D, C), b (C,)}, float32."""
    name = "classifier" if family_of(cfg).KIND == "encoder" else "score"
    return {name: heads.init_linear(key, cfg.dim, n_labels, bias=True)}


def forward(model: Model, base: dict, trainable: dict, batch: dict, rng=None):
    """-> logits (B, T, C) float32."""
    h = heads.hidden(model, base, trainable, batch, rng)
    return heads.linear(h, trainable["head"][heads.head_name(model)])


def loss(logits, batch) -> tuple:
    """(sum of cross-entropy over the labelled tokens, their number)."""
    return heads.labelled_loss(logits, batch["labels"], rows.IGNORE)


def predict(logits, batch):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def evaluate(ev: Eval) -> dict[str, float]:
    """loss, entity_precision / entity_recall / entity_f1 (seqeval, strict IOB2) and token_accuracy."""
    mean_loss, outs = evaluate_batches(ev)
    names = ev.info["labels"]
    pred, gold = [], []
    for batch, p in outs:
        for row_pred, row_gold in zip(p, batch["labels"]):
            keep = row_gold != rows.IGNORE
            if keep.any():
                pred.append([names[i] for i in row_pred[keep]])
                gold.append([names[i] for i in row_gold[keep]])
    if not gold:
        return {"loss": mean_loss}
    return {"loss": mean_loss, **metrics.entities(pred, gold, scheme="IOB2")}
