"""Contrastive embedding training (IA3, in-batch negatives) and masked-LM training (LoRA, a fresh MLM head) end
to end on a tiny BERT: the losses go down, the task metrics reach metrics.jsonl and eval.json."""

import json
import os

import numpy as np
import pytest

from jaxft import cli, config as config_lib
from jaxft.train.loop import train
from test_tasks import BERT_WORDS, bert_dir

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
WORDS = BERT_WORDS[5:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    model, _ = bert_dir(root / "model")
    rng = np.random.RandomState(0)
    pairs = []
    for i in range(64):  # a text and its pair share their two rarest words
        key = [WORDS[i % 20], WORDS[(i * 3 + 1) % 20]]
        pairs.append({"question": " ".join(key + list(rng.choice(WORDS, 3))),
                      "answer": " ".join(list(rng.choice(WORDS, 2)) + key), "score": str(i % 5)})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sentences = [" ".join(rng.choice(WORDS, 10)) for _ in range(4)]  # a few sentences: context predicts a token
    (root / "text.jsonl").write_text("".join(json.dumps({"text": sentences[i % 4]}) + "\n" for i in range(64)))
    return model, root


def _common(model):
    return [f"model={model}", "dtype=float32", "param_dtype=float32", "train.steps=12", "train.eval_every=6",
            "train.batch_size=8", "train.seq_len=12", "train.warmup_steps=0", "data.eval_fraction=0.25"]


def test_embedding_run_and_eval(setup, tmp_path):
    model, root = setup
    overrides = _common(model) + [f"data.train={root / 'pairs.jsonl'}", "data.text_field=question",
                                  "data.pair_field=answer", "data.score_field=score", "peft.method=ia3",
                                  "train.learning_rate=5e-2", "eval.batch_size=8"]
    config = config_lib.load(os.path.join(CONFIGS, "minilm_embed.py"), overrides)
    train(config, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all({"eval_retrieval_accuracy", "eval_spearman"} <= set(r) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert cli.main(["eval", "--config", os.path.join(CONFIGS, "minilm_embed.py"), "--workdir", str(tmp_path)]
                    + [f"--config.{o}" for o in overrides]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"loss", "retrieval_accuracy", "spearman"}
    np.testing.assert_allclose(results["loss"], evals[-1]["eval_loss"], rtol=1e-5)


def test_mlm_run_lowers_the_loss(setup, tmp_path):
    model, root = setup
    overrides = _common(model) + [f"data.train={root / 'text.jsonl'}", "task=mlm", "train.learning_rate=2e-2",
                                  "lora.rank=4"]
    summary = train(config_lib.load(os.path.join(CONFIGS, "default_lora.py"), overrides), tmp_path)
    history = [loss for _, loss in summary["eval_history"]]
    assert history[-1] < history[0]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"eval_perplexity", "eval_masked_accuracy"} <= set(rows[-1])
