"""Sequence classification end to end on the tiny Llama with LoRA: the task metrics in metrics.jsonl at the
evaluation steps, the head trained and saved with the adapter, and `jaxft eval` writing eval.json (trained run
and a workdir without one: the base with a fresh head, the run's step 0)."""

import json
import os

import numpy as np
import pytest

import tiny
from jaxft import cli, config as config_lib, tree
from jaxft.peft import io as adapter_io
from jaxft.train.loop import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "minilm_sst2_lora.py")
W = tiny.WORDS


def sst2_file(path, n=96):
    """SST-2-like TSV (a space before each tab): label 1 texts name a fox and owls, label 0 a dog at night."""
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        words = [W[(i * 7 + j) % 10] for j in range(2 + i % 4)] + (["fox", "owls"] if label else ["dog", "night"])
        lines.append(" ".join(words) + " \t" + str(label))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    return tiny.llama_dir(root / "model"), sst2_file(root / "train.tsv")


def _overrides(setup):
    model, data = setup
    return [f"model={model}", f"data.train={data}", "dtype=float32", "param_dtype=float32", "train.steps=16",
            "train.eval_every=8", "train.batch_size=8", "train.seq_len=16", "data.eval_fraction=0.25",
            "train.learning_rate=1e-2", "train.warmup_steps=0", "lora.rank=4", "eval.batch_size=8"]


def test_classification_run_and_eval(setup, tmp_path, capsys):
    config = config_lib.load(CONFIG, _overrides(setup))
    summary = train(config, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    for r in evals:
        assert {"eval_accuracy", "eval_precision", "eval_recall", "eval_f1"} <= set(r)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_accuracy"] >= 0.9
    assert summary["data"]["labels"] == ["0", "1"] and summary["eval_metrics"]["accuracy"] >= 0.9

    trained = tree.flatten(adapter_io.load(tmp_path / "run" / "adapter")[0])
    assert trained["head/score/w"].shape == (32, 2) and "head/score/b" not in trained  # saved with the adapter
    assert any(p.endswith("lora_b") for p in trained)
    task = json.loads((tmp_path / "run" / "adapter" / "task.json").read_text())
    assert task == {"task": "classification", "labels": ["0", "1"], "pool": "default"}

    args = ["eval", "--config", CONFIG, "--workdir", str(tmp_path / "run")] + [f"--config.{o}" for o in
                                                                              _overrides(setup)]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(results) == {"loss", "accuracy", "precision", "recall", "f1"}
    np.testing.assert_allclose(results["loss"], evals[-1]["eval_loss"], rtol=1e-5)
    out = capsys.readouterr().out
    assert "accuracy" in out and f"{results['accuracy']:.4f}" in out

    # No adapter in the workdir: the base with the head as training initializes it, i.e. the run's step 0.
    assert cli.main(["eval", "--config", CONFIG, "--workdir", str(tmp_path / "fresh")]
                    + [f"--config.{o}" for o in _overrides(setup)]) == 0
    fresh = json.loads((tmp_path / "fresh" / "eval.json").read_text())
    np.testing.assert_allclose(fresh["loss"], evals[0]["eval_loss"], rtol=1e-5)
    assert "untrained head" in capsys.readouterr().out


def test_eval_refuses_other_labels(setup, tmp_path, capsys):
    model, data = setup
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter.json").write_text(json.dumps({"format": "jaxft-adapter/2", "method": "lora",
                                                                   "lora": {"rank": 4}}))
    from safetensors.numpy import save_file
    save_file({"head/score/w": np.zeros((32, 2), np.float32)}, str(tmp_path / "adapter" / "adapter.safetensors"))
    (tmp_path / "adapter" / "task.json").write_text(json.dumps({"task": "classification", "labels": ["1", "0"]}))
    args = ["eval", "--config", CONFIG, "--workdir", str(tmp_path)] + [f"--config.{o}" for o in _overrides(setup)]
    assert cli.main(args) == 1
    assert "trained with labels ['1', '0']" in capsys.readouterr().err
