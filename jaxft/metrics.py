"""Evaluation metrics, computed by the libraries the field trusts rather than by hand.

Each function takes predictions and references as plain Python lists and returns {metric name: float}, the
form `jaxft eval` writes to WORKDIR/eval.json. Percent-scaled library outputs (sacrebleu) are kept on their
usual 0-100 scale; the others are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence


def classification(pred: Sequence, gold: Sequence, labels: Sequence | None = None) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 (scikit-learn) over `labels` (default: all seen).

    A class never predicted counts as precision 0 (scikit-learn's zero_division=0), so a model that always
    answers one class is not flattered.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    _same_length(pred, gold)
    p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=labels, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(gold, pred)), "precision": float(p), "recall": float(r), "f1": float(f)}


def entities(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]],
             scheme: str = "IOB2") -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval, strict matching of the `scheme`: IOB1 or IOB2)
    and token accuracy, over sentences of tags ("B-PER", "I-LOC", "O", ...)."""
    from seqeval import scheme as schemes
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    _same_length(pred_tags, gold_tags)
    for k, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"sentence {k}: {len(p)} predicted tags for {len(g)} gold tags")
    kind = {"IOB1": schemes.IOB1, "IOB2": schemes.IOB2}[scheme.upper()]
    args = dict(mode="strict", scheme=kind, zero_division=0)
    pred_tags, gold_tags = [list(s) for s in pred_tags], [list(s) for s in gold_tags]
    return {"entity_precision": float(precision_score(gold_tags, pred_tags, **args)),
            "entity_recall": float(recall_score(gold_tags, pred_tags, **args)),
            "entity_f1": float(f1_score(gold_tags, pred_tags, **args)),
            "token_accuracy": float(accuracy_score(gold_tags, pred_tags))}


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L precision, recall and F1 (rouge-score, Porter stemmer), averaged over pairs."""
    from rouge_score import rouge_scorer

    _same_length(preds, refs)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    sums = {f"{k}_{part}": 0.0 for k in kinds for part in ("precision", "recall", "f1")}
    for pred, ref in zip(preds, refs):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in kinds:
            s = scores[k]
            sums[f"{k}_precision"] += s.precision
            sums[f"{k}_recall"] += s.recall
            sums[f"{k}_f1"] += s.fmeasure
    n = max(len(preds), 1)
    return {k: v / n for k, v in sums.items()}


def bleu_chrf(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenization, 0-100 scale), one reference per line."""
    import sacrebleu

    _same_length(preds, refs)
    return {"bleu": float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score),
            "chrf": float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score)}


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token cross-entropy (nats); inf where that overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
