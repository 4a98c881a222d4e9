"""A training workdir as a small transaction log: what a run may write there, and when.

WORKDIR/config.json holds the settings of the run and is written once, when the run first starts; a later
`--resume` never replaces it: it is checked against it (the settings that give the checkpoints their meaning
must match) and appends what it changed to WORKDIR/config_history.jsonl. A fresh run never starts over files
of an earlier one: it is refused, naming them, unless `--overwrite` moves the whole workdir aside first
(nothing is deleted). `check` runs before anything loads and writes nothing; `commit` runs once the model,
data and method are known to work, and is the first write.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

CONFIG, HISTORY = "config.json", "config_history.jsonl"
# What an earlier run leaves: any of these makes the workdir "used".
RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "summary.json", "adapter", "tensorboard")
# Settings a resumed run must share with the run it continues: the base model, the task and the method
# (its shape and its place in the model) give the saved arrays their meaning. Everything else (steps,
# learning rate, intervals, the guard) may change on resume and is recorded in config_history.jsonl.
FIXED = ("task", "model", "param_dtype", "quant", "peft", "lora", "adapter", "prefix", "prompt", "ia3",
         "partial", "features")


class WorkdirError(ValueError):
    """A workdir this run must not use as asked; the message names what was found and the flags to use."""


def check(workdir: Path, config, *, resume: bool, overwrite: bool) -> list[str]:
    """Whether this run may use `workdir`; returns the run files found there. Writes nothing.

    Raises WorkdirError for a fresh run over a used workdir (without --overwrite), a --resume with nothing to
    resume, a resume whose FIXED settings differ from WORKDIR/config.json, or a workdir that cannot be written.
    """
    if resume and overwrite:
        raise WorkdirError("--resume continues the run in the workdir and --overwrite moves it aside: pass one")
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"{workdir}: exists and is not a directory")
    found = used(workdir)
    if not resume and found and not overwrite:
        raise WorkdirError(f"{workdir}: already holds a run ({', '.join(found)}); nothing was changed. Pass "
                           f"--resume to continue it, --overwrite to move it aside and start over, or choose "
                           f"another --workdir")
    if resume and not found:
        raise WorkdirError(f"{workdir}: --resume given but there is no run to resume (no config.json or "
                           f"checkpoint)")
    if resume:
        saved = stored(workdir)
        if saved is not None:
            for key, (old, new) in changes(saved, config).items():
                if key.split(".")[0] in FIXED:
                    raise WorkdirError(f"{workdir / CONFIG}: the run has {key}={old!r} but this one has "
                                       f"{key}={new!r}; resume with the run's setting or use another --workdir")
    existing = workdir if workdir.exists() else _nearest_existing(workdir)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"{existing}: not writable (permission denied or a read-only file system); "
                           f"choose another --workdir")
    return found


def commit(workdir: Path, config, *, resume: bool, overwrite: bool) -> Path | None:
    """The run's first write: moves an old run aside (with --overwrite; returns where it went), creates the
    workdir and, for a fresh run, writes config.json (atomically: a temporary file renamed)."""
    aside = None
    if overwrite and used(workdir):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = workdir.with_name(f"{workdir.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            aside, n = workdir.with_name(f"{workdir.name}.replaced-{stamp}-{n}"), n + 1
        os.rename(workdir, aside)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resume:  # (a resumed run's checkpoints are checked first: `record_resume`)
        write_atomic(workdir / CONFIG, config.to_json_best_effort(indent=1) + "\n")
    return aside


def record_resume(workdir: Path, config, step: int) -> dict:
    """Appends {time, step resumed from, settings changed: {key: [run's, this one's]}} to config_history.jsonl
    (and writes config.json where the workdir has none); returns the changes."""
    saved = stored(workdir)
    if saved is None:  # a workdir of a jaxft that did not write config.json: this run's settings are the record
        write_atomic(workdir / CONFIG, config.to_json_best_effort(indent=1) + "\n")
    changed = {} if saved is None else {k: list(v) for k, v in changes(saved, config).items()}
    entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "resumed_at_step": step,
             "changes": changed}
    with open(workdir / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return changed


def used(workdir: Path) -> list[str]:
    """The run files in `workdir` (an empty checkpoints/ or tensorboard/ does not count)."""
    found = []
    for name in RUN_FILES:
        path = workdir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def stored(workdir: Path) -> dict | None:
    """WORKDIR/config.json as a dict, or None if there is none."""
    file = workdir / CONFIG
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{file}: not valid JSON ({e}); it is the record of the run in this workdir: "
                           f"restore it, or start a new run with --overwrite") from None
    if not isinstance(saved, dict):
        raise WorkdirError(f"{file}: expected a JSON object, got {type(saved).__name__}")
    return saved


def changes(saved: dict, config) -> dict[str, tuple]:
    """{dotted key: (saved value, this config's value)} for every setting that differs."""
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def write_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, file)
