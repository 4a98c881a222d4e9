"""Sentence embeddings: mean-pooled, L2-normalized vectors, fine-tuned contrastively on pairs.

Records hold a text (data.text_field) and a text that should embed close to it (data.pair_field): a question
and its answer, a sentence and its paraphrase. The vector of a text is the mean of the backbone's last hidden
states over its non-padding tokens, L2-normalized (sentence-transformers' recipe for all-MiniLM-L6-v2; head.pool
may pick last or cls instead). No head: the backbone's adapter is what trains.

Loss: in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss): for a batch of B pairs
(a_i, p_i), the cross-entropy of picking p_i among all p_j with logits SCALE * cos(a_i, p_j), averaged over i.
Metrics: the loss, and `retrieval_accuracy`, how often p_i is the nearest of the evaluation batch's p_j to a_i
(so it depends on eval.batch_size); with data.score_field (a similarity score per evaluation pair, STS-style),
also `spearman`, the Spearman correlation of cos(a_i, p_i) with the scores.
Batch keys: tokens, segment_ids, positions and pair_tokens, pair_segment_ids, pair_positions (B, T) int32;
evaluation batches with scores also `scores` (B,) float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxft.models.loss import token_loss
from jaxft.data import rows
from jaxft.tasks import Eval, Model, evaluate_batches, heads
from jaxft.tasks.classification import encode

KINDS = ("encoder", "decoder")
SCALE = 20.0  # MultipleNegativesRankingLoss's default: cosine similarities times 20 are the logits
_SIDES = (("", "data.text_field"), ("pair_", "data.pair_field"))


def batches(config, tokenizer) -> tuple:
    """(training iterator, evaluation batches, info) as `jaxft.tasks` describes."""
    from jaxft.tasks.classification import split
    train, held = split(config)
    arrays = _arrays(train, config, tokenizer)
    info = {"train_pairs": len(train), "eval_pairs": len(held)}
    eval_list = []
    if held:
        eval_arrays = _arrays(held, config, tokenizer)
        fill = {k: 0 for k in eval_arrays}
        score_field = config.data.score_field
        if score_field:
            values = rows.column(held, score_field, "data.score_field")
            eval_arrays["scores"] = np.asarray([_number(v, r.where, score_field) for v, r in zip(values, held)],
                                               np.float32)
            fill["scores"] = 0.0
        eval_list = rows.eval_batches(eval_arrays, rows.eval_settings(config)[0], fill)
    return rows.stream(arrays, config.train.batch_size, config.seed), eval_list, info


def _arrays(recs, config, tokenizer) -> dict[str, np.ndarray]:
    out = {}
    fields = {"": config.data.text_field, "pair_": config.data.pair_field}
    for prefix, key in _SIDES:
        enc = encode(tokenizer, rows.column(recs, fields[prefix], key), config.train.seq_len)
        out.update({prefix + k: v for k, v in enc.items()})
    return out


def _number(text: str, where: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        from jaxft.data import DataError
        raise DataError(f"{where}: {field!r} (data.score_field) is {text!r}, not a number") from None


def init_head(key, cfg, config, n_labels: int):
    return None


def embed(model: Model, base: dict, trainable, batch: dict, rng=None):
    """(B, D) float32 unit vectors of batch tokens / segment_ids / positions."""
    h = heads.hidden(model, base, trainable, batch, rng)
    pool = "mean" if model.pool == "default" else model.pool
    v = heads.pooled(model, base, trainable, h, batch["segment_ids"], pool)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def forward(model: Model, base: dict, trainable, batch: dict, rng=None) -> dict:
    """-> {"a": (B, D), "p": (B, D)}: both sides embedded in one pass of the backbone (2B rows)."""
    both = {k: jnp.concatenate([batch[k], batch["pair_" + k]]) for k in ("tokens", "segment_ids", "positions")
            if k in batch}
    v = embed(model, base, trainable, both, rng)
    b = batch["tokens"].shape[0]
    return {"a": v[:b], "p": v[b:]}


def loss(out: dict, batch: dict) -> tuple:
    """(sum over the pairs of the in-batch-negatives cross-entropy, the number of pairs); padding rows (no
    tokens) are neither anchors nor candidates."""
    scores, keep = _scores(out, batch)
    return token_loss(scores, jnp.arange(scores.shape[0]), keep)  # a_i's class is p_i


def _scores(out: dict, batch: dict):
    keep = jnp.any(batch["segment_ids"] != 0, axis=-1) & jnp.any(batch["pair_segment_ids"] != 0, axis=-1)
    scores = SCALE * jnp.einsum("id,jd->ij", out["a"], out["p"])
    return jnp.where(keep[None, :], scores, -1e30), keep


def predict(out: dict, batch: dict) -> dict:
    """hit (B,): p_i is the nearest candidate to a_i; cos (B,): cos(a_i, p_i)."""
    scores, _ = _scores(out, batch)
    hit = jnp.argmax(scores, axis=-1) == jnp.arange(scores.shape[0])
    return {"hit": hit, "cos": jnp.sum(out["a"] * out["p"], axis=-1)}


def evaluate(ev: Eval) -> dict[str, float]:
    """loss, retrieval_accuracy (and spearman where the evaluation pairs have scores)."""
    mean_loss, outs = evaluate_batches(ev)
    hits, cos, scores = [], [], []
    for batch, p in outs:
        keep = np.any(batch["segment_ids"] != 0, axis=-1)
        hits += p["hit"][keep].tolist()
        cos += p["cos"][keep].tolist()
        if "scores" in batch:
            scores += batch["scores"][keep].tolist()
    if not hits:
        return {"loss": mean_loss}
    out = {"loss": mean_loss, "retrieval_accuracy": float(np.mean(hits))}
    if scores:
        from scipy.stats import spearmanr
        out["spearman"] = float(spearmanr(cos, scores).statistic)
    return out
