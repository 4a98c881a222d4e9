"""The trainer end to end on a tiny checkpoint: metrics, adapter, exact resume, preemption, divergence and
the workdir rules that keep a user's checkpoints safe."""

import json
import os
import signal
import threading

import numpy as np
import pytest

import tiny
from jaxft import config as config_lib, tree
from jaxft.peft import io as adapter_io
from jaxft.train.workdir import WorkdirError
from jaxft.train.loop import TrainingError, train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny.llama_dir(root / "model"), tiny.alpaca_file(root / "train.jsonl", 80)


def _config(setup, *extra):
    model, data = setup
    return config_lib.load(CONFIG, [f"model={model}", f"data.train={data}", "dtype=float32", "param_dtype=float32",
                                    "train.batch_size=4", "train.seq_len=32", "train.steps=10",
                                    "train.eval_every=5", "train.save_every=5", "train.eval_batches=2",
                                    "train.learning_rate=1e-2", "train.warmup_steps=0", "lora.rank=4",
                                    "lora.dropout=0.1", *extra])


def _adapter(workdir):
    return tree.flatten(adapter_io.load(workdir / "adapter")[0])


def test_metrics_adapter_and_exact_resume(setup, tmp_path):
    constant = "train.schedule=constant"  # so that a 5-step run is the first half of a 10-step one
    straight = train(_config(setup, constant), tmp_path / "a")
    assert straight["status"] == "completed" and straight["step"] == 10
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 5, 10]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "a" / "tensorboard").iterdir())
    a = _adapter(tmp_path / "a")

    # 5 steps, then --resume to 10: the same adapter as 10 straight steps (data order and dropout included).
    assert train(_config(setup, constant, "train.steps=5"), tmp_path / "b")["step"] == 5
    assert train(_config(setup, constant), tmp_path / "b", resume=True)["step"] == 10
    # SIGTERM (preemption) mid-run: a checkpoint is saved, the run returns normally, --resume finishes it.
    part = _run_until(_config(setup, constant), tmp_path / "c", 3)
    assert part["status"] == "preempted" and 3 <= part["step"] < 10
    assert str(part["step"]) in {p.name for p in (tmp_path / "c" / "checkpoints").iterdir()}
    assert train(_config(setup, constant), tmp_path / "c", resume=True)["step"] == 10
    for other in ("b", "c"):
        b = _adapter(tmp_path / other)
        for path in a:
            np.testing.assert_allclose(a[path], b[path], atol=1e-6, err_msg=f"{other}: {path}")


def _run_until(config, workdir, step):
    """Runs `train`, sending SIGTERM to this process once metrics.jsonl shows `step`."""
    done = threading.Event()

    def watch():
        path = workdir / "metrics.jsonl"
        while not done.is_set():
            if path.exists() and any(json.loads(x).get("step") == step and "loss" in json.loads(x)
                                     for x in path.read_text().splitlines()):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return train(config, workdir)
    finally:
        done.set()
        watcher.join()


def test_existing_checkpoints_are_never_overwritten(setup, tmp_path):
    train(_config(setup, "train.steps=2"), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(WorkdirError, match="already holds a run .*checkpoints/.*--resume.*--overwrite"):
        train(_config(setup, "train.steps=2"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    with pytest.raises(WorkdirError, match="lora.rank=4 but this one has lora.rank=8"):
        train(_config(setup, "train.steps=4", "lora.rank=8"), tmp_path, resume=True)
    with pytest.raises(WorkdirError, match="no run to resume"):
        train(_config(setup), tmp_path / "empty", resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        train(_config(setup, "train.learning_rate=1e30", "train.save_every=1", "train.max_grad_norm=0.0"),
              tmp_path)
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved  # the good steps before the blow-up are still there


def test_config_errors_name_the_key(setup):
    with pytest.raises(config_lib.ConfigFileError, match="lora.rnak.*did you mean lora.rank"):
        _config(setup, "lora.rnak=3")
    with pytest.raises(config_lib.ConfigFileError, match="train.steps"):
        _config(setup, "train.steps=ten")


def test_bad_layer_loop_fails_before_anything_is_written(setup, tmp_path):
    with pytest.raises(ValueError, match="train.layer_loop: 'rolled' is not one of auto, scan, unroll"):
        train(_config(setup, "train.layer_loop=rolled"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_qlora_through_the_trainer_and_format_checked_on_resume(setup, tmp_path):
    qlora = ("quant.format=nf4", "quant.block_size=16", "train.steps=6", "train.eval_every=3")
    summary = train(_config(setup, *qlora), tmp_path)
    history = [loss for _, loss in summary["eval_history"]]
    assert summary["status"] == "completed" and history[-1] < history[0]
    with pytest.raises(WorkdirError, match="quant.format='nf4' but this one has quant.format='int4'"):
        train(_config(setup, "quant.format=int4", "quant.block_size=16", "train.steps=8"), tmp_path, resume=True)
    with pytest.raises(ValueError, match="block_size=64 does not divide"):
        train(_config(setup, "quant.format=nf4", "train.steps=1"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written for a run that could not start
