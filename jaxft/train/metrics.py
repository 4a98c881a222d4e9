"""Training metrics: one JSON object per line in WORKDIR/metrics.jsonl, and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: Path):
        self.path = Path(workdir) / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

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
