"""`jaxft plot` and `jaxft runs`: the plotted curves and the table's values equal what the workdirs hold, PNG
files are whole images, bad workdirs are one-line errors; and a real tiny `jaxft train` leaves its plots."""

import json
import logging
import os
import time

import numpy as np
import pytest
from matplotlib import image

import tiny
from jaxft import cli, plots, runs
from jaxft.train.metrics import MetricsWriter

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")


def _workdir(path, *, method="lora", task="causal_lm", steps=6, planned=6, eval_every=3, metrics=("perplexity",),
             status="completed", quant="none", seed=0):
    """A workdir as the trainer writes it (config.json, metrics.jsonl via its MetricsWriter, summary.json; no
    summary when status is None), with random but plausible numbers; returns the metrics rows written."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    config = {"task": task, "model": "/models/SmolLM2-135M", "peft": {"method": method, "init_from": ""},
              "quant": {"format": quant, "block_size": 64}, "train": {"steps": planned, "eval_every": eval_every}}
    (path / "config.json").write_text(json.dumps(config, indent=1))

    def evaluation():
        return {"loss": float(rng.uniform(1, 3)), **{m: float(rng.uniform(0, 1)) for m in metrics}}

    writer, rows, history, last = MetricsWriter(path), [], [], None
    for step in range(steps + 1):
        row = {} if step == 0 else {"loss": float(rng.uniform(1, 3)), "learning_rate": 1e-4 * step / steps,
                                    "tokens_per_s": float(rng.uniform(500, 900)),
                                    "grad_norm": float(rng.uniform(0.1, 2))}
        if step % eval_every == 0 or step == steps:
            last = evaluation()
            row.update({f"eval_{k}": v for k, v in last.items()})
            history.append((step, last["loss"]))
        writer.write(step, **row)
        rows.append({"step": step, **row})
    writer.close()
    if status is not None:
        summary = {"status": status, "step": steps, "task": task, "eval_loss": last["loss"], "eval_metrics": last,
                   "eval_history": history, "adapter": str(path / "adapter"), "data": {}}
        (path / "summary.json").write_text(json.dumps(summary, indent=1))
    return rows


def _lines(fig):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}


def _series(rows, key):
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


def test_figures_plot_each_runs_metrics(tmp_path):
    a = _workdir(tmp_path / "lm" / "lora", seed=1)
    b = _workdir(tmp_path / "cls" / "lora", task="classification", metrics=("accuracy", "f1"), steps=7, seed=2)
    read = [runs.read(tmp_path / "lm" / "lora"), runs.read(tmp_path / "cls" / "lora")]
    names = runs.names([r.path for r in read])
    assert names == ["lm/lora", "cls/lora"]  # the last components alone are equal
    figs = plots.figures(read, names)
    assert set(figs) == {"loss.png", "learning_rate.png", "grad_norm.png", "tokens_per_s.png", "eval_accuracy.png",
                         "eval_f1.png", "eval_perplexity.png", "overview.png"}
    lines = _lines(figs["loss.png"])
    assert lines == {"lm/lora (train)": _series(a, "loss"), "lm/lora (eval)": _series(a, "eval_loss"),
                     "cls/lora (train)": _series(b, "loss"), "cls/lora (eval)": _series(b, "eval_loss")}
    for key in ("learning_rate", "grad_norm", "tokens_per_s"):
        assert _lines(figs[f"{key}.png"]) == {"lm/lora": _series(a, key), "cls/lora": _series(b, key)}
    assert _lines(figs["eval_accuracy.png"]) == {"cls/lora": _series(b, "eval_accuracy")}
    assert _lines(figs["eval_perplexity.png"]) == {"lm/lora": _series(a, "eval_perplexity")}
    assert [ax.get_title() for ax in figs["overview.png"].axes] == [
        "loss", "learning rate", "gradient norm", "tokens / s", "accuracy (eval)", "f1 (eval)", "perplexity (eval)"]


def test_a_long_training_loss_is_also_drawn_smoothed(tmp_path):
    rows = _workdir(tmp_path / "long", steps=60, eval_every=30)
    steps, loss = _series(rows, "loss")
    loss[7] = float("nan")  # kept where it is, left out of the average
    (tmp_path / "long" / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "loss": loss[r["step"] - 1]} if "loss" in r else r) + "\n" for r in rows))
    expected, average, n = [], 0.0, 0
    for x in loss:
        if x == x:
            average, n = 0.9 * average + 0.1 * x, n + 1
        expected.append(average / (1 - 0.9 ** n) if x == x else x)
    lines = _lines(plots.figures([runs.read(tmp_path / "long")], ["long"])["loss.png"])
    assert set(lines) == {"_long (train), raw", "long (train, smoothed)", "long (eval)"}
    np.testing.assert_array_equal(lines["_long (train), raw"][1], loss)
    assert lines["long (train, smoothed)"][0] == steps
    np.testing.assert_allclose(lines["long (train, smoothed)"][1], expected, rtol=1e-12)
    assert expected[0] == pytest.approx(loss[0]) and np.isnan(expected[7])


def test_write_makes_whole_pngs_atomically(tmp_path):
    _workdir(tmp_path / "a", seed=1)
    _workdir(tmp_path / "b", method="ia3", seed=2)
    written = plots.write([tmp_path / "a", tmp_path / "b"])
    assert [p.parent for p in written] == [tmp_path / "a" / "plots"] * 6  # several runs: the first one's plots/
    assert sorted(os.listdir(tmp_path / "a" / "plots")) == sorted(p.name for p in written)  # no temporary left
    for path in written:
        pixels = image.imread(path)  # a PNG decoder: a truncated file fails here
        assert pixels.shape[2] == 4 and pixels.std() > 0.01, path
    assert image.imread(tmp_path / "a" / "plots" / "loss.png").shape[:2] == (450, 700)  # 7 x 4.5 in, 100 dpi
    out = plots.write([tmp_path / "b"], tmp_path / "elsewhere")
    assert {p.parent for p in out} == {tmp_path / "elsewhere"}


def test_plot_command(tmp_path, capsys):
    _workdir(tmp_path / "a", seed=1)
    _workdir(tmp_path / "b", seed=2)
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "cmp" / name) for name in os.listdir(tmp_path / "cmp"))
    assert len(printed) == 6


def test_a_step_written_twice_plots_its_last_row(tmp_path):
    rows = _workdir(tmp_path / "r", steps=4, planned=8)
    again = {"step": 3, "loss": 0.5, "learning_rate": 1e-5, "tokens_per_s": 1.0, "grad_norm": 1.0}
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:  # a resume from step 2 writes step 3 again
        f.write(json.dumps(again) + "\n" + '{"step": 4, "lo')  # and a line being written
    read = runs.read(tmp_path / "r")
    assert [r["step"] for r in read.rows] == [0, 1, 2, 3, 4]
    assert read.rows[3] == again and read.rows[4] == rows[4]


def test_bad_workdirs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(runs.RunError, match=r"empty/metrics.jsonl: no such file"):
        plots.write([tmp_path / "empty"])
    _workdir(tmp_path / "bad")
    with (tmp_path / "bad" / "metrics.jsonl").open("a") as f:
        f.write("{oops\n{}\n")
    with pytest.raises(runs.RunError, match=r"bad/metrics.jsonl:8: not a JSON object"):
        runs.read(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(runs.RunError, match=r'metrics.jsonl:2: expected an object with an integer "step"'):
        runs.read(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(runs.RunError, match=r"bad/metrics.jsonl: no metrics yet"):
        plots.write([tmp_path / "bad"])
    assert cli.main(["plot", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxft plot: error: ") and "empty/metrics.jsonl" in err
    assert cli.main(["runs", str(tmp_path / "empty")]) == 1
    assert "no runs found" in capsys.readouterr().err
    # One unreadable run among others: its line on stderr, the others in the table, exit code 1.
    _workdir(tmp_path / "good")
    (tmp_path / "bad" / "summary.json").write_text('{"status": ')
    assert cli.main(["runs", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "bad/summary.json: not valid JSON" in err
    assert [line.split()[0] for line in out.splitlines()] == ["run", "good"]


def test_a_failed_plot_never_fails_the_run(tmp_path, caplog):
    _workdir(tmp_path / "r")
    (tmp_path / "r" / "plots").write_text("a file where the folder goes")
    with caplog.at_level(logging.INFO, "jaxft.plots"):
        plots.after_run(tmp_path / "r")
    [record] = caplog.records
    assert record.levelname == "WARNING" and record.getMessage().startswith("plots: not written (FileExistsError")
    plots.after_run(tmp_path / "no-metrics")  # another process of a multi-host run: nothing to do, no error


def test_runs_table_equals_the_files(tmp_path, capsys):
    done = _workdir(tmp_path / "sweep" / "lora", seed=1)
    qlora = _workdir(tmp_path / "sweep" / "qlora", quant="nf4", status="early_stopped", steps=3, seed=2)
    _workdir(tmp_path / "sweep" / "prompt", method="prompt", status="preempted", steps=2, seed=3)
    _workdir(tmp_path / "sweep" / "ia3", method="ia3", status="diverged", steps=2, seed=4)
    live = _workdir(tmp_path / "sweep" / "live", status=None, steps=2, seed=5)
    _workdir(tmp_path / "sweep" / "killed", status=None, steps=2, seed=6)
    old = time.time() - 2 * runs.STALE_S
    for name in ("config.json", "metrics.jsonl"):
        os.utime(tmp_path / "sweep" / "killed" / name, (old, old))
    _workdir(tmp_path / "sweep" / "lora" / "adapter" / "inner", seed=7)  # inside a workdir's own folder: skipped
    found = runs.find(tmp_path)
    assert [p.relative_to(tmp_path / "sweep").as_posix() for p in found] == [
        "ia3", "killed", "live", "lora", "prompt", "qlora"]
    rows = {r["run"]: r for r in (runs.describe(runs.read(p), p.name) for p in found)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "ia3": "failed", "killed": "interrupted", "live": "running", "lora": "completed", "prompt": "interrupted",
        "qlora": "early-stopped"}
    lora = rows["lora"]
    assert (lora["model"], lora["method"], lora["task"], lora["steps"], lora["planned"]) == (
        "SmolLM2-135M", "lora", "causal_lm", 6, 6)
    assert lora["train_loss"] == done[-1]["loss"]
    assert lora["eval"] == {"eval_loss": done[-1]["eval_loss"], "eval_perplexity": done[-1]["eval_perplexity"]}
    assert (rows["qlora"]["method"], rows["qlora"]["steps"], rows["qlora"]["planned"]) == ("lora (nf4)", 3, 6)
    assert rows["qlora"]["eval"]["eval_loss"] == qlora[-1]["eval_loss"]
    assert rows["live"]["eval"]["eval_loss"] == live[-1]["eval_loss"] and rows["live"]["steps"] == 2

    # A run resumed after it wrote summary.json is running again.
    future = time.time() + 5
    os.utime(tmp_path / "sweep" / "lora" / "metrics.jsonl", (future, future))
    assert runs.status(runs.read(tmp_path / "sweep" / "lora")) == "running"

    with open(tmp_path / "sweep" / "ia3" / "metrics.jsonl", "a") as f:  # the step that diverged: a NaN loss
        f.write(json.dumps({"step": 3, "loss": float("nan")}) + "\n")
    assert cli.main(["runs", str(tmp_path / "sweep"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out  # strict JSON, which every JSON reader takes
    listed = {r["run"]: r for r in json.loads(out)}
    assert listed["ia3"]["train_loss"] is None
    assert listed["qlora"] == {**rows["qlora"], "run": "qlora"} and listed["lora"]["train_loss"] == done[-1]["loss"]
    assert cli.main(["runs", str(tmp_path / "sweep")]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["run", "model", "method", "task", "steps", "train", "loss", "eval_loss",
                               "eval_perplexity", "status"]
    assert text[4].split() == ["lora", "SmolLM2-135M", "lora", "causal_lm", "6/6", f"{done[-1]['loss']:.4g}",
                               f"{done[-1]['eval_loss']:.4g}", f"{done[-1]['eval_perplexity']:.4g}", "running"]


def test_a_real_run_leaves_plots_and_a_row(tmp_path, capsys):
    model, data = tiny.llama_dir(tmp_path / "model"), tiny.alpaca_file(tmp_path / "train.jsonl", 40)
    workdir = tmp_path / "runs" / "lora"
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), f"--config.model={model}",
                     f"--config.data.train={data}", "--config.dtype=float32", "--config.param_dtype=float32",
                     "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.steps=4",
                     "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.lora.rank=2"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(os.listdir(workdir / "plots")) == ["eval_perplexity.png", "grad_norm.png", "learning_rate.png",
                                                     "loss.png", "overview.png", "tokens_per_s.png"]
    figs = plots.figures([runs.read(workdir)], ["lora"])
    assert _lines(figs["loss.png"]) == {"lora (train)": _series(rows, "loss"),
                                        "lora (eval)": _series(rows, "eval_loss")}
    assert _lines(figs["tokens_per_s.png"]) == {"lora": _series(rows, "tokens_per_s")}
    summary = json.loads((workdir / "summary.json").read_text())
    [row] = [runs.describe(runs.read(p), p.name) for p in runs.find(tmp_path / "runs")]
    assert (row["method"], row["task"], row["steps"], row["planned"], row["status"]) == (
        "lora", "causal_lm", 4, 4, "completed")
    assert row["eval"] == {f"eval_{k}": v for k, v in summary["eval_metrics"].items()}
    assert row["train_loss"] == rows[-1]["loss"]
