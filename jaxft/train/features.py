"""Training for `peft.method = features`: features computed once by the frozen model, then the head alone.

Texts and labels come from data.train (`features.text_field`, `features.label_field`); the held-out part is
data.eval, or a seeded data.eval_fraction of the records. Any family of `jaxft.models` runs (LLaMA, BERT, T5's
encoder: `jaxft.peft.features` says which hidden states each gives). Each part's pooled hidden states are
computed once and cached in WORKDIR/features: a later run with the same model, texts and settings reads them
back; another model, family or checkpoint computes its own. The head is then trained on them with the trainer's
optimizer and schedule (train.steps, train.batch_size, train.learning_rate, ...). Writes metrics.jsonl,
WORKDIR/adapter (the head and its FeatureSpec) and summary.json, like the language-model trainer, under the same
workdir rules (`jaxft.train.workdir`). There is no checkpoint to resume: `--resume` over a finished features run
(same model and settings) reads the cached features back and trains the head again, which takes seconds.
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
from jaxft.dtypes import DTYPES
from jaxft.peft import features
from jaxft.peft import io as adapter_io
from jaxft.train import workdir as workdir_lib
from jaxft.train.metrics import MetricsWriter
from jaxft.train.optim import make_optimizer

log = logging.getLogger("jaxft.train")


def train(config, workdir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Runs the feature-based fine-tuning described by `config` in `workdir` (checked by the caller with
    `workdir.check`); returns a summary. resume: retrain the head of the features run in `workdir` on its
    cached features; overwrite: move the run in `workdir` aside first."""
    workdir = Path(workdir)
    c, t = config.features, config.train
    model = checkpoint.load(config.model, dtype=DTYPES[config.param_dtype])
    cfg = model.cfg

    texts, labels, eval_texts, eval_labels = _split(config)
    classes = sorted(set(labels) | set(eval_labels))
    spec = features.make_spec(cfg, c.layer, c.pool, classes, t.seq_len)
    head = features.init_head(jax.random.PRNGKey(config.seed), cfg.dim, len(classes), c.head, c.hidden)
    if config.peft.init_from:
        head = _init_from(config.peft.init_from, head, spec)

    workdir_lib.commit(workdir, config, resume=resume, overwrite=overwrite)  # the first write
    t0 = time.perf_counter()
    x_train = _features(config, workdir, model, spec, "train", texts)
    x_eval = _features(config, workdir, model, spec, "eval", eval_texts) if eval_texts else None
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

    metrics = MetricsWriter(workdir, resumed_at=0 if resume else None)  # the head trains again from step 0
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
    workdir_lib.write_atomic(workdir / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def evaluate(config, workdir: str | Path) -> dict[str, float]:
    """`jaxft eval` of a features run: the saved head (WORKDIR/adapter) on the held-out texts that training
    held out (the same data.eval or the same seeded split), its features read from the run's cache or computed;
    {eval_loss, accuracy, precision, recall, f1} (macro, scikit-learn) written to WORKDIR/eval.json."""
    from jaxft.metrics import classification

    workdir = Path(workdir)
    adapter = workdir / "adapter"
    if not (adapter / "adapter.json").is_file():
        raise ValueError(f"{workdir}: no trained features head (adapter/adapter.json); run `jaxft train` first")
    head, spec, _ = adapter_io.load(adapter)
    if not isinstance(spec, features.FeatureSpec):
        raise ValueError(f"{adapter}: not a peft.method=features head, but the config's peft.method is features")
    _, _, eval_texts, eval_labels = _split(config)
    if not eval_texts:
        raise DataError(f"{config.data.train}: no evaluation data (set data.eval, or data.eval_fraction > 0)")
    unknown = sorted(set(eval_labels) - set(spec.classes))
    if unknown:
        raise DataError(f"{config.data.eval or config.data.train}: label {unknown[0]!r} is not one of the head's "
                        f"classes {', '.join(spec.classes)}")
    model = checkpoint.load(config.model, dtype=DTYPES[config.param_dtype])
    x_eval = _features(config, workdir, model, spec, "eval", eval_texts)
    index = {name: i for i, name in enumerate(spec.classes)}
    gold = np.asarray([index[y] for y in eval_labels], np.int32)
    logits = features.apply_head(head, jnp.asarray(x_eval))
    pred = np.asarray(jnp.argmax(logits, -1))
    results = {"eval_loss": float(_cross_entropy(logits, gold)),
               **classification(pred, gold, labels=list(range(len(spec.classes))))}
    (workdir / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _init_from(path: str, fresh: dict, spec) -> dict:
    """The head of the features run at `path` (a workdir or its adapter/), to continue training: it must have
    been trained on the same features (layer, pool, sequence length) with the same classes as `spec`."""
    where = Path(path) / "adapter" if (Path(path) / "adapter" / "adapter.json").is_file() else Path(path)
    try:
        head, saved, _ = adapter_io.load(where)
    except (OSError, ValueError) as e:
        raise ValueError(f"peft.init_from: {e}") from None
    if not isinstance(saved, features.FeatureSpec):
        raise ValueError(f"peft.init_from: {where} is not a peft.method=features head")
    if saved != spec:
        raise ValueError(f"peft.init_from: {where} was trained with {saved}, but this run has {spec}")
    if jax.tree.map(np.shape, head) != jax.tree.map(np.shape, fresh):
        raise ValueError(f"peft.init_from: {where} holds a head of another shape (features.head / features.hidden)")
    return head


def _split(config) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train texts, train labels, held-out texts, held-out labels): data.eval, or a seeded data.eval_fraction
    of data.train's records (the same split on every call with the same config)."""
    c = config.features
    texts, labels = _columns(read_records(config.data.train), c.text_field, c.label_field)
    if config.data.eval:
        eval_texts, eval_labels = _columns(read_records(config.data.eval), c.text_field, c.label_field)
        return texts, labels, eval_texts, eval_labels
    order = np.random.default_rng(config.seed).permutation(len(texts))
    n = min(round(config.data.eval_fraction * len(texts)), len(texts) - 1)
    held, kept = set(order[:n].tolist()), np.sort(order[n:])
    return ([texts[i] for i in kept], [labels[i] for i in kept],
            [texts[i] for i in sorted(held)], [labels[i] for i in sorted(held)])


def _features(config, workdir: Path, model, spec, name: str, part: list[str]) -> np.ndarray:
    """The pooled features of `part` (WORKDIR/features/NAME.npy, computed once per model, texts and settings)."""
    key = {**_model_key(model), "layer": spec.layer, "pool": spec.pool, "seq_len": spec.seq_len,
           "dtype": config.dtype, "param_dtype": config.param_dtype,
           "texts": hashlib.sha256("\0".join(part).encode()).hexdigest()}
    return features.cached(workdir / "features" / f"{name}.npy", key, lambda: features.extract(
        model.cfg, model.params, features.tokenize(model.tokenizer, part, spec.seq_len), spec,
        config.train.batch_size, DTYPES[config.dtype]))


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
