"""Chaos: runs killed with SIGKILL anywhere (inside checkpoint saves too) resume to the adapter an uninterrupted
run trains; a checkpoint save that fails (full disk, by injection) ends in one line and keeps the last complete
checkpoint; the workdir keeps every earlier run's files; the divergence guard stops a collapsed run."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from jaxft import config as config_lib, tree
from jaxft.peft import io as adapter_io
from jaxft.train import checkpoints, loop
from jaxft.train.guard import Guard
from jaxft.train.loop import TrainingError, train
from jaxft.train.workdir import WorkdirError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "default_lora.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny.llama_dir(root / "model"), tiny.alpaca_file(root / "train.jsonl", 80)


def overrides(setup, *extra):
    model, data = setup
    return [f"model={model}", f"data.train={data}", "dtype=float32", "param_dtype=float32", "train.batch_size=4",
            "train.seq_len=32", "train.steps=6", "train.eval_every=3", "train.save_every=2", "train.eval_batches=1",
            "train.learning_rate=1e-2", "train.warmup_steps=0", "train.schedule=constant", "lora.rank=4",
            "lora.dropout=0.1", *extra]


def config(setup, *extra):
    return config_lib.load(CONFIG, overrides(setup, *extra))


def adapter(workdir):
    return tree.flatten(adapter_io.load(Path(workdir) / "adapter")[0])


def hashes(root) -> dict:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def metrics_steps(workdir, key):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if key in r]


# Started in each subprocess (as sitecustomize): orbax's last act of a save, renaming its temporary directory to
# the step's, waits 0.5 s, so that a save is seen in progress, and killed there, on any machine.
SLOW_COMMIT = """
import os, time
_rename = os.rename
def rename(src, dst, *args, **kwargs):
    if "orbax-checkpoint-tmp" in os.fspath(src):
        time.sleep(0.5)
    return _rename(src, dst, *args, **kwargs)
os.rename = rename
"""


def test_kill9_anywhere_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(SLOW_COMMIT)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hooks'}{os.pathsep}{ROOT}",
           "JAXFT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "chaos"
    ckpt = work / "checkpoints"

    def start(resume, workdir=work):
        cmd = [sys.executable, "-m", "jaxft.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
               *(["--resume"] if resume else []), *[f"--config.{o}" for o in overrides(setup)]]
        with open(tmp_path / "log.txt", "ab") as log:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)

    def kill_when(proc, ready) -> bool:
        while proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.0005)
        return False

    def saving(stale=()):
        """Whether a save is in progress (or was cut): orbax's temporary directory, other than `stale`."""
        return ckpt.is_dir() and any(".orbax-checkpoint-tmp" in p.name and p.name not in stale
                                     for p in ckpt.iterdir())

    def logged(step):
        return (work / "metrics.jsonl").exists() and step in metrics_steps(work, "loss")

    # The reference, uninterrupted (its compiled programs are cached for the runs below, in JAXFT_CACHE).
    assert start(False, tmp_path / "straight").wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    # 1: killed inside the first checkpoint save: nothing complete, only orbax's temporary directory.
    assert kill_when(start(False), saving)
    assert saving() and not [p for p in ckpt.iterdir() if p.name.isdigit()]
    with pytest.raises(WorkdirError, match="already holds a run"):  # a fresh run is refused, --resume is not
        train(config(setup), work)
    # 2: --resume starts again at step 0 (nothing completed) and is killed at a random moment after step k.
    rng = random.Random(0)
    k, delay = rng.randint(2, 4), rng.uniform(0, 0.3)
    assert kill_when(start(True), lambda: logged(k) and (time.sleep(delay) or True))
    # 3: --resume from the last complete checkpoint, killed inside a later save (not one that run 2 left).
    stale = {p.name for p in ckpt.iterdir()}
    assert kill_when(start(True), lambda: saving(stale))
    # 4: --resume to the end.
    assert start(True).wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]

    assert not saving()  # the leftovers of interrupted saves were removed
    a, b = adapter(tmp_path / "straight"), adapter(work)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    assert metrics_steps(work, "loss") == [1, 2, 3, 4, 5, 6]  # one row per step after three resumes
    assert metrics_steps(work, "eval_loss") == [0, 3, 6]
    assert len((work / "config_history.jsonl").read_text().splitlines()) == 3


def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_last_complete_one(setup, tmp_path, monkeypatch):
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 4:  # as orbax does when the disk fills: a temporary directory left half-written
            (Path(self.directory) / "4.orbax-checkpoint-tmp-123").mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(TrainingError) as info:
        train(config(setup), tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "checkpoints") in message
    assert "no space left on device for the checkpoint of step 4: it needs about" in message
    assert "last complete checkpoint (step 2) is kept" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("_")) == ["2"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)

    # Too little free space is seen before orbax writes anything.
    usage = checkpoints.shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: usage(p)._replace(free=1000))
    with pytest.raises(TrainingError, match=r"it needs about \d+ bytes, 1000 are free; the last complete "
                                            r"checkpoint \(step 2\) is kept"):
        train(config(setup), tmp_path, resume=True)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", usage)
    assert train(config(setup), tmp_path, resume=True)["status"] == "completed"
    assert metrics_steps(tmp_path, "loss") == [1, 2, 3, 4, 5, 6]


def test_workdir_keeps_every_run(setup, tmp_path):
    train(config(setup, "train.steps=2", "train.keep_checkpoints=1"), tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a finished run whose checkpoints were deleted
    before = hashes(tmp_path / "run")
    with pytest.raises(WorkdirError, match=r"already holds a run \(config.json, metrics.jsonl, summary.json, "
                                           r"adapter/, tensorboard/\); nothing was changed"):
        train(config(setup, "train.steps=2"), tmp_path / "run")
    with pytest.raises(WorkdirError, match="model="):  # a refused --resume leaves config.json as it was
        train(config(setup, "model=default"), tmp_path / "run", resume=True)
    assert hashes(tmp_path / "run") == before

    # --resume of the completed run (no checkpoint left: from step 0 with more steps) and of a finished one.
    again = train(config(setup, "train.steps=2", "train.keep_checkpoints=1", "train.learning_rate=5e-3"),
                  tmp_path / "run", resume=True)
    assert again["status"] == "completed" and metrics_steps(tmp_path / "run", "loss") == [1, 2]
    history = [json.loads(x) for x in (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["changes"] == {"train.learning_rate": [1e-2, 5e-3]}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["learning_rate"] == 1e-2
    kept = train(config(setup, "train.steps=2"), tmp_path / "run", resume=True)  # nothing left to train
    assert json.dumps(kept["eval_metrics"]) == json.dumps(again["eval_metrics"])
    assert json.dumps(kept["eval_history"]) == json.dumps(again["eval_history"])

    before = hashes(tmp_path / "run")
    train(config(setup, "train.steps=1"), tmp_path / "run", overwrite=True)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert hashes(aside) == before  # moved, not deleted
    assert metrics_steps(tmp_path / "run", "loss") == [1]


def test_sigint_saves_a_checkpoint_like_sigterm(setup, tmp_path):
    done = threading.Event()
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN in a background job

    def watch():
        while not done.is_set():
            if (tmp_path / "metrics.jsonl").exists() and 1 in metrics_steps(tmp_path, "loss"):
                os.kill(os.getpid(), signal.SIGINT)
                return
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = train(config(setup), tmp_path)
    finally:
        done.set()
        watcher.join()
    assert summary["status"] == "interrupted" and summary["step"] < 6
    assert str(summary["step"]) in {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert signal.getsignal(signal.SIGINT) is before  # given back as it was


def test_divergence_guard_stops_a_collapsed_run(setup, tmp_path):
    with pytest.raises(TrainingError) as info:
        train(config(setup, "train.learning_rate=1e30", "train.max_grad_norm=0.0", "train.save_every=1",
                     "train.steps=30", "guard.patience=3"), tmp_path)
    message = str(info.value)
    assert "\n" not in message and "stopped. The last good checkpoint" in message
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["reason"] in message
    saved = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved  # the steps before the blow-up
    for step in saved:
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        state = checkpoints.Checkpoints(tmp_path, 2).manager.restore(int(step.name), args=args)["state"]
        assert all(np.isfinite(x).all() for x in tree.flatten(state["trainable"]).values()), step


def test_divergence_guard_stops_a_run_whose_gradient_vanished(setup, tmp_path):
    """The case of the issue: learning rate 1e6 never gives a NaN; from step 2 the gradient norm is exactly 0."""
    with pytest.raises(TrainingError, match=r"step 4: the gradient norm has been exactly 0 for 3 steps"):
        train(config(setup, "train.learning_rate=1e6", "train.steps=15", "guard.patience=3"), tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows if "grad_norm" in r][1:] == [0.0, 0.0]  # steps 2 and 3 (4 not logged)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_guard_rules():
    cfg = config_lib.load(CONFIG).guard
    g = Guard(cfg)
    assert g.check(1, 2.0, 1.0, True) is None
    assert "loss is nan" in g.check(2, float("nan"), 1.0, True)
    assert "parameters hold NaN or Inf" in Guard(cfg).check(1, 2.0, 1.0, False)
    g = Guard(cfg, first_loss=2.0)
    assert [g.check(s, 5.0, 0.0, True) for s in range(1, 10)] == [None] * 9  # 9 < patience 10
    assert "exactly 0 for 10 steps" in g.check(10, 5.0, 0.0, True)
    g = Guard(cfg, first_loss=2.0)
    for s in range(1, 10):
        assert g.check(s, 8.5, 1.0, True) is None
    assert g.check(10, 7.9, 1.0, True) is None  # back under 4 x 2.0: the count starts again
    assert [g.check(s, 8.5, 1.0, True) for s in range(11, 20)] == [None] * 9
    assert "above 4 x the first step's (2.0000) for 10 steps" in g.check(20, 8.5, 1.0, True)
    off = Guard(config_lib.load(CONFIG, ["guard.enabled=False"]).guard, first_loss=1.0)
    assert all(off.check(s, 50.0, 0.0, True) is None for s in range(1, 30))
    assert off.check(30, float("inf"), 0.0, True) is not None  # non-finite always stops


def test_a_second_ctrl_c_quits_at_once():
    before = signal.getsignal(signal.SIGINT)
    flag = loop._StopFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a flag the loop reads after its step
        assert flag.raised and flag.status == "interrupted"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # the second: the OS ends the process
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is before
