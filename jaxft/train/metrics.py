"""Training metrics: one JSON object per line in WORKDIR/metrics.jsonl, and TensorBoard event files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends to WORKDIR/metrics.jsonl and TensorBoard.

    resumed_at: the step a resumed run continues from. The rows of later steps (logged after the checkpoint
    it resumes from, by a run that was then stopped) are dropped first and TensorBoard is told to discard
    them, so that the file keeps one row per step however often the run is resumed.
    """

    def __init__(self, workdir: Path, resumed_at: int | None = None):
        self.path = Path(workdir) / "metrics.jsonl"
        if resumed_at is not None and self.path.exists():
            _keep_until(self.path, resumed_at)
        self.file = self.path.open("a")
        purge = None if resumed_at is None else resumed_at + (resumed_at > 0)  # a run at step 0 redoes step 0
        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, **metrics: float) -> None:
        """Appends {"step": step, **metrics} to metrics.jsonl and each scalar to TensorBoard."""
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a crash is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _keep_until(path: Path, step: int) -> None:
    """Rewrites metrics.jsonl (a temporary file renamed over it) with the rows of steps < `step` kept, and
    those of `step` too unless it is 0 (a run resumed at step 0 evaluates step 0 again)."""
    rows = [r for r in read_rows(path) if r.get("step", 0) < step or (step > 0 and r.get("step") == step)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
