"""Training for `peft.method = features`: features computed once by the frozen model, then the head alone.

Texts and labels come from data.train (`features.text_field`, `features.label_field`); the held-out part is
data.eval, or a seeded data.eval_fraction of the records. Any family of `jaxft.models` runs (LLaMA, BERT, T5's
encoder: `jaxft.peft.features` says which hidden states each gives). Each part's pooled hidden states are
computed once and cached in WORKDIR/features: a later run with the same model, texts and settings reads them
back; another model, family or checkpoint computes its own. The head is then trained on them with the trainer's
optimizer and schedule (train.steps, train.batch_size, train.learning_rate, ...). Writes metrics.jsonl,
WORKDIR/adapter (the head and its FeatureSpec) and summary.json, like the language-model trainer. There is no
checkpoint to resume: a second run over the same workdir reads the cached features and retrains only the head,
which takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import checkpoint
from jaxft.data import DataError, read_records
from jaxft.peft import features
from jaxft.peft import io as adapter_io
from jaxft.train.metrics import MetricsWriter
from jaxft.train.optim import make_optimizer

log = logging.getLogger("jaxft.train")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def train(config, workdir: str | Path) -> dict:
    """Runs the feature-based fine-tuning described by `config` in `workdir`; returns a summary."""
    workdir = Path(workdir)
    c, t = config.features, config.train
    dtype = DTYPES[config.dtype]
    model = checkpoint.load(config.model, dtype=DTYPES[config.param_dtype])
    cfg, base, tokenizer = model.cfg, model.params, model.tokenizer

    texts, labels = _columns(read_records(config.data.train), c.text_field, c.label_field)
    if config.data.eval:
        eval_texts, eval_labels = _columns(read_records(config.data.eval), c.text_field, c.label_field)
    else:
        order = np.random.default_rng(config.seed).permutation(len(texts))
        n = min(round(config.data.eval_fraction * len(texts)), len(texts) - 1)
        held, kept = set(order[:n].tolist()), np.sort(order[n:])
        eval_texts, eval_labels = [texts[i] for i in sorted(held)], [labels[i] for i in sorted(held)]
        texts, labels = [texts[i] for i in kept], [labels[i] for i in kept]
    classes = sorted(set(labels) | set(eval_labels))
    spec = features.make_spec(cfg, c.layer, c.pool, classes, t.seq_len)
    head = features.init_head(jax.random.PRNGKey(config.seed), cfg.dim, len(classes), c.head, c.hidden)

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    t0 = time.perf_counter()
    settings = {**_model_key(model), "layer": spec.layer, "pool": spec.pool, "seq_len": spec.seq_len,
                "dtype": config.dtype, "param_dtype": config.param_dtype}

    def feats(name: str, part: list[str]) -> np.ndarray:
        key = {**settings, "texts": hashlib.sha256("\0".join(part).encode()).hexdigest()}
        return features.cached(workdir / "features" / f"{name}.npy", key, lambda: features.extract(
            cfg, base, features.tokenize(tokenizer, part, spec.seq_len), spec, t.batch_size, dtype))

    x_train, x_eval = feats("train", texts), feats("eval", eval_texts) if eval_texts else None
    feature_seconds = time.perf_counter() - t0
    index = {name: i for i, name in enumerate(classes)}
    y_train = np.asarray([index[y] for y in labels], np.int32)
    y_eval = np.asarray([index[y] for y in eval_labels], np.int32)
    log.info("features: %d train, %d eval, %d classes (%.1f s)", len(x_train), len(eval_texts), len(classes),
             feature_seconds)

    optimizer, lr_schedule = make_optimizer(t)
    opt_state = optimizer.init(head)

    @jax.jit
    def step(head, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda h: _cross_entropy(features.apply_head(h, x), y))(head)
        updates, opt_state = optimizer.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    def evaluate(head) -> tuple[float, float]:
        logits = features.apply_head(head, jnp.asarray(x_eval))
        return float(_cross_entropy(logits, y_eval)), float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_eval))

    metrics = MetricsWriter(workdir)
    t1 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    order, at, history, ends = rng.permutation(len(x_train)), 0, [], []
    eval_loss = accuracy = None
    if x_eval is not None:
        eval_loss, accuracy = evaluate(head)
        history.append((0, eval_loss, accuracy))
        metrics.write(0, eval_loss=eval_loss, eval_accuracy=accuracy)
    for s in range(1, t.steps + 1):
        if at + t.batch_size > len(order):  # a new epoch, reshuffled
            order, at = rng.permutation(len(x_train)), 0
        rows = order[at:at + t.batch_size]
        at += t.batch_size
        head, opt_state, loss = step(head, opt_state, jnp.asarray(x_train[rows]), jnp.asarray(y_train[rows]))
        row = {"loss": float(loss), "learning_rate": float(lr_schedule(s - 1))}
        ends.append(time.perf_counter())
        if x_eval is not None and ((t.eval_every and s % t.eval_every == 0) or s == t.steps):
            eval_loss, accuracy = evaluate(head)
            history.append((s, eval_loss, accuracy))
            row.update(eval_loss=eval_loss, eval_accuracy=accuracy)
        metrics.write(s, **row)
    metrics.close()
    train_seconds = time.perf_counter() - t1
    steady = sorted(np.diff(ends[1:]).tolist())  # step times after the first two (compilation)

    adapter_dir = adapter_io.save(workdir / "adapter", head, spec, config, model.path)
    summary = {"status": "completed", "step": t.steps, "eval_loss": eval_loss, "eval_accuracy": accuracy,
               "eval_history": history, "adapter": str(adapter_dir), "feature_seconds": feature_seconds,
               "train_seconds": train_seconds, "step_seconds": steady[len(steady) // 2] if steady else None,
               "data": {"train": len(x_train), "eval": len(eval_texts), "classes": classes}}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _model_key(model) -> dict:
    """What tells models apart in the feature cache's key: the family, the architecture, and the checkpoint's
    path with the size and modification time of its files (another checkpoint saved there is another model)."""
    path = Path(model.path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"family": model.cfg.model_type, "config": model.cfg.to_hf(), "model": str(path),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def _columns(records, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of the records; a missing or empty field is a DataError naming the record."""
    texts, labels = [], []
    for r in records:
        for field in (text_field, label_field):
            value = r.fields.get(field)
            if value is None or str(value).strip() == "":
                raise DataError(f"{r.where}: no {field!r} (features.text_field / features.label_field); it has "
                                f"{', '.join(map(repr, r.fields))}")
        texts.append(str(r.fields[text_field]))
        labels.append(str(r.fields[label_field]).strip())
    return texts, labels


def _cross_entropy(logits, labels):
    """Mean cross-entropy of logits (B, C) against int labels (B,)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))
