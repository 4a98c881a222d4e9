"""Token classification end to end on a tiny BERT: CoNLL (IOB1) files, QLoRA (nf4 base + LoRA) and the head,
entity-level metrics in metrics.jsonl at the evaluation steps, and `jaxft eval` on a separate CoNLL file."""

import json
import os

import numpy as np
import pytest

from jaxft import cli, config as config_lib, tree
from jaxft.peft import io as adapter_io
from jaxft.train.loop import train
from test_tasks import bert_dir

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "minilm_conll_lora.py")
TAGS = {"fox": "I-PER", "dog": "I-PER", "owl": "I-LOC", "night": "I-MISC"}  # IOB1: I- opens an entity
OTHER = "the quick brown jump over a lazy seven wise count star at while".split()


def conll_file(path, n, seed):
    rng = np.random.RandomState(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        words = list(rng.choice(OTHER, 5)) + [rng.choice(list(TAGS))]
        rng.shuffle(words)
        lines += [f"{w} NN I-NP {TAGS.get(w, 'O')}" for w in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    model, _ = bert_dir(root / "model")
    return model, conll_file(root / "eng.train", 64, 0), conll_file(root / "eng.testa", 16, 1)


def test_token_classification_qlora_run_and_eval(setup, tmp_path, capsys):
    model, train_file, eval_file = setup
    overrides = [f"model={model}", f"data.train={train_file}", "dtype=float32", "param_dtype=float32",
                 "train.steps=16", "train.eval_every=8", "train.batch_size=8", "train.seq_len=12",
                 "train.learning_rate=2e-2", "train.warmup_steps=0", "lora.rank=4", "quant.format=nf4",
                 "quant.block_size=16", "data.eval_fraction=0.25", "eval.batch_size=8"]
    summary = train(config_lib.load(CONFIG, overrides), tmp_path)
    assert summary["data"]["labels"] == ["O", "B-LOC", "B-MISC", "B-PER"]  # IOB1 read as IOB2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    for r in evals:
        assert {"eval_entity_precision", "eval_entity_recall", "eval_entity_f1", "eval_token_accuracy"} <= set(r)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_entity_f1"] > evals[0]["eval_entity_f1"]
    trained = tree.flatten(adapter_io.load(tmp_path / "adapter")[0])
    assert trained["head/classifier/w"].shape == (32, 4) and trained["head/classifier/b"].shape == (4,)

    assert cli.main(["eval", "--config", CONFIG, "--workdir", str(tmp_path), f"--config.data.eval={eval_file}"]
                    + [f"--config.{o}" for o in overrides]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"loss", "entity_precision", "entity_recall", "entity_f1", "token_accuracy"}
    assert "entity_f1" in capsys.readouterr().out
