"""What a training workdir holds, read back: the run's config, its metrics by step, its summary and status.

A workdir is a directory with `metrics.jsonl` or `summary.json` (what `jaxft train` writes; see
`jaxft.train.metrics`). `find` lists the workdirs under a directory, `read` loads one, `describe` makes the row
`jaxft runs` prints for it, and `jaxft.plots` draws the curves of `Run.series`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

METRICS, SUMMARY, CONFIG, EVAL = "metrics.jsonl", "summary.json", "config.json", "eval.json"
# A run without summary.json whose files have not changed for this long (or for 5 of its usual intervals
# between metrics rows, if longer) is taken to have stopped: killed, crashed, or out of memory.
STALE_S = 600.0
# The folders a workdir itself holds: never runs of their own, and too big to walk (checkpoints).
_PARTS = {"adapter", "checkpoints", "tensorboard", "plots"}
# summary.json's status (written by the trainer) -> what the table says
_STATUS = {"completed": "completed", "early_stopped": "early-stopped", "preempted": "interrupted",
           "interrupted": "interrupted", "diverged": "failed", "failed": "failed"}


class RunError(ValueError):
    """A workdir that cannot be read as a run; the message names the file and what was expected."""


@dataclasses.dataclass
class Run:
    path: Path
    config: dict | None  # config.json (None when absent)
    rows: list[dict]  # metrics.jsonl, one dict per step sorted by step (a step written twice: the last row)
    summary: dict | None  # summary.json, None until the run has ended
    eval: dict | None  # eval.json, from `jaxft eval`
    mtime: float  # when metrics.jsonl (or summary.json) last changed, seconds since the epoch

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps whose rows hold `key`, and its values there."""
        rows = [r for r in self.rows if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def setting(self, *keys: str):
        """config.json's value at keys (e.g. "train", "steps"), or None when the config or the key is absent."""
        value = self.config
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return value


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, one per step (the last one written for a step, as after a resume), by step."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such file (a training run's workdir holds metrics.jsonl)")
    text = path.read_text()
    lines = text.splitlines()
    by_step = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # the line a running (or killed) trainer is writing
            raise RunError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise RunError(f"{path}:{i}: expected an object with an integer \"step\", got {line[:80]}")
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def read(workdir: str | Path) -> Run:
    """The run in `workdir`; RunError if it has neither metrics.jsonl nor summary.json, or one is unreadable."""
    workdir = Path(workdir)
    metrics, summary = workdir / METRICS, workdir / SUMMARY
    if not metrics.is_file() and not summary.is_file():
        raise RunError(f"{metrics}: no such file (a training run's workdir holds metrics.jsonl)")
    rows = read_metrics(metrics) if metrics.is_file() else []
    mtime = max(p.stat().st_mtime for p in (metrics, summary) if p.is_file())
    return Run(workdir, _json(workdir / CONFIG), rows, _json(summary), _json(workdir / EVAL), mtime)


def find(root: str | Path) -> list[Path]:
    """The workdirs under `root` (itself included), sorted; a workdir's own folders are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: not a directory")
    found = []
    for here, dirs, files in os.walk(root):
        if METRICS in files or SUMMARY in files:
            found.append(Path(here))
            dirs[:] = [d for d in dirs if d not in _PARTS]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def status(run: Run, now: float | None = None) -> str:
    """running, completed, early-stopped, interrupted (stopped before the end: preempted, killed, crashed) or
    failed (the trainer gave up: a diverged loss), from what the workdir holds."""
    metrics = run.path / METRICS
    # A summary older than metrics.jsonl belongs to an earlier invocation: the run was resumed since.
    resumed = run.summary is not None and metrics.is_file() and \
        metrics.stat().st_mtime > (run.path / SUMMARY).stat().st_mtime + 1
    if run.summary is not None and not resumed:
        said = str(run.summary.get("status", "completed"))
        return _STATUS.get(said, said)
    now = time.time() if now is None else now
    stale = STALE_S
    config = run.path / CONFIG
    if config.is_file() and len(run.rows) > 1:
        stale = max(stale, 5 * (run.mtime - config.stat().st_mtime) / (len(run.rows) - 1))
    return "running" if now - run.mtime < stale else "interrupted"


def describe(run: Run, name: str, now: float | None = None) -> dict:
    """The run's row in `jaxft runs`: name, model, method, task, steps done and planned, the last training loss,
    the last evaluation's metrics ({"eval_loss": ..., ...}), status."""
    trained = [r for r in run.rows if "loss" in r]
    done = trained[-1]["step"] if trained else 0
    if run.summary is not None and isinstance(run.summary.get("step"), int):
        done = max(done, run.summary["step"])
    evals = [r for r in run.rows if any(k.startswith("eval_") for k in r)]
    final_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    if not final_eval and run.summary and isinstance(run.summary.get("eval_metrics"), dict):
        final_eval = {f"eval_{k}": v for k, v in run.summary["eval_metrics"].items()}
    model = run.setting("model")
    quant = run.setting("quant", "format")
    method = run.setting("peft", "method")
    return {"run": name, "path": str(run.path), "model": _short(model) if isinstance(model, str) else None,
            "method": f"{method} ({quant})" if method and quant not in (None, "none") else method,
            "task": run.setting("task") or ("causal_lm" if run.config else None),
            "steps": done, "planned": run.setting("train", "steps"),
            "train_loss": trained[-1]["loss"] if trained else None, "eval": final_eval,
            "evaluated": run.eval, "status": status(run, now)}


def table(rows: list[dict]) -> str:
    """`describe` rows as a text table: one line per run, one column per evaluation metric any run has."""
    metrics = sorted({k for r in rows for k in r["eval"]}, key=lambda k: (k != "eval_loss", k))
    head = ["run", "model", "method", "task", "steps", "train loss", *metrics, "status"]
    lines = [head]
    for r in rows:
        steps = f"{r['steps']}/{r['planned']}" if r["planned"] is not None else str(r["steps"])
        lines.append([r["run"], r["model"] or "-", r["method"] or "-", r["task"] or "-", steps,
                      _number(r["train_loss"]), *(_number(r["eval"].get(k)) for k in metrics), r["status"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def names(paths: list[Path]) -> list[str]:
    """Short distinct names for workdirs: their last path components, as many as it takes to tell them apart."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(map(len, parts), default=1) + 1):
        short = ["/".join(p[-k:]) for p in parts]
        if len(set(short)) == len(short):
            return short
    return [str(p) for p in paths]


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _short(model: str) -> str:
    """A local model directory by its name; a hub id (org/name) as it is."""
    return Path(model).name if model.startswith(("/", ".", "~")) or os.path.isdir(model) else model


def _number(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)
