"""The metric wrappers on inputs whose values are worked out by hand."""

import math

import pytest

from jaxft import metrics


def test_classification_macro_by_hand():
    # class 0: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8;  class 1: tp 1, fp 1, fn 0 -> P 1/2, R 1, F1 2/3
    m = metrics.classification([0, 1, 1, 0], [0, 1, 0, 0])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx((1 + 0.5) / 2)
    assert m["recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_classification_never_predicted_class_counts_zero():
    m = metrics.classification([0, 0, 0, 0], [0, 1, 0, 1], labels=[0, 1])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.25)  # class 0: 2/4, class 1: 0
    assert m["recall"] == pytest.approx(0.5)


def test_entities_strict_iob2():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]
    m = metrics.entities(pred, gold)
    assert m["entity_precision"] == pytest.approx(1.0)
    assert m["entity_recall"] == pytest.approx(2 / 3)
    assert m["entity_f1"] == pytest.approx(0.8)
    assert m["token_accuracy"] == pytest.approx(5 / 6)


def test_entities_boundary_error_is_a_miss():
    m = metrics.entities([["B-PER", "O"]], [["B-PER", "I-PER"]])
    assert m["entity_f1"] == 0.0


def test_entities_length_mismatch():
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags for 2 gold tags"):
        metrics.entities([["O"]], [["O", "O"]])


def test_rouge_by_hand():
    m = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1_precision"] == pytest.approx(1.0)
    assert m["rouge1_recall"] == pytest.approx(0.5)
    assert m["rouge1_f1"] == pytest.approx(2 / 3)
    assert m["rouge2_precision"] == pytest.approx(1.0)
    assert m["rouge2_recall"] == pytest.approx(2 / 5)
    assert m["rougeL_recall"] == pytest.approx(0.5)


def test_bleu_chrf_extremes_and_brevity():
    assert metrics.bleu_chrf(["a man rides a red bike ."], ["a man rides a red bike ."]) == \
        pytest.approx({"bleu": 100.0, "chrf": 100.0})
    m = metrics.bleu_chrf(["zzz qqq"], ["a man rides a red bike ."])
    assert m["bleu"] == pytest.approx(0.0)
    # every n-gram precision 1, but 4 of 7 tokens: BLEU = 100 * exp(1 - 7/4)
    m = metrics.bleu_chrf(["a man rides a"], ["a man rides a red bike ."])
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 4), rel=1e-6)


def test_perplexity():
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == math.inf


def test_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.classification([0, 1], [0])
