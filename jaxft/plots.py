"""PNG plots of training runs, read from their workdirs: training and evaluation loss, learning rate, gradient
norm, tokens/s and each evaluation metric of the task, one file per quantity with every run overlaid (the
legend names the runs), and `overview.png` with all of them side by side.

matplotlib is imported when a figure is drawn, not with this module, so the command line stays quick to start
and a missing matplotlib costs a finished run its plots only. Figures are drawn on matplotlib's Agg canvas
without pyplot: no global backend or figure registry is touched.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from jaxft import runs as runs_lib

log = logging.getLogger("jaxft.plots")

DIR = "plots"  # WORKDIR/plots/
# (file stem, title, ((metrics.jsonl key, what the legend calls it or None), ...)); evaluation metrics follow
PANELS = (("loss", "loss", (("loss", "train"), ("eval_loss", "eval"))),
          ("learning_rate", "learning rate", (("learning_rate", None),)),
          ("grad_norm", "gradient norm", (("grad_norm", None),)),
          ("tokens_per_s", "tokens / s", (("tokens_per_s", None),)))
# A training loss logged at this many steps or more is also drawn smoothed (moving average with this weight).
SMOOTH_FROM, SMOOTHING = 50, 0.9


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """An exponential moving average, debiased as TensorBoard's (the first values are not pulled towards 0); a
    non-finite value is kept as it is and left out of the average."""
    out, average, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        average, n = weight * average + (1 - weight) * v, n + 1
        out.append(average / (1 - weight ** n))
    return out


def panels(runs: list[runs_lib.Run]) -> list[tuple]:
    """The entries of PANELS some run has values for, then one panel per evaluation metric but the loss."""
    keys = {k for run in runs for row in run.rows for k in row}
    found = [p for p in PANELS if any(key in keys for key, _ in p[2])]
    for key in sorted(k for k in keys if k.startswith("eval_") and k != "eval_loss"):
        found.append((key, f"{key.removeprefix('eval_').replace('_', ' ')} (eval)", ((key, None),)))
    return found


def draw(ax, runs: list[runs_lib.Run], names: list[str], panel: tuple, legend: bool = True) -> None:
    """Draws one panel on the matplotlib Axes `ax`: a line per run and key, in the run's colour (evaluations:
    dashed, with a marker at each evaluated step)."""
    _, title, series = panel
    for i, (run, name) in enumerate(zip(runs, names)):
        for key, which in series:
            steps, values = run.series(key)
            if not steps:
                continue
            evaluated = key.startswith("eval_")
            label = f"{name} ({which})" if which else name
            if key == "loss" and len(values) >= SMOOTH_FROM:  # noisy: faint as logged, and a smoothed line
                ax.plot(steps, values, color=f"C{i % 10}", alpha=0.25, linewidth=0.8, label=f"_{label}, raw")
                values, label = smooth(values), f"{name} (train, smoothed)"
            ax.plot(steps, values, color=f"C{i % 10}", linestyle="--" if evaluated and which else "-",
                    marker="o" if evaluated or len(steps) == 1 else None, markersize=3, label=label)
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if panel[0] == "grad_norm" and ys and min(ys) > 0 and max(ys) > 100 * min(ys):
        ax.set_yscale("log")  # methods' gradient norms differ by orders of magnitude (IA3 vs LoRA vs full)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def figures(runs: list[runs_lib.Run], names: list[str]) -> dict:
    """{file name: matplotlib Figure}: one per panel, and overview.png with every panel."""
    from matplotlib.figure import Figure

    chosen = panels(runs)
    figs = {}
    for panel in chosen:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        draw(fig.add_subplot(), runs, names, panel)
        figs[f"{panel[0]}.png"] = fig
    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    overview = Figure(figsize=(5 * columns, 3.6 * rows), layout="constrained")
    for i, panel in enumerate(chosen):
        draw(overview.add_subplot(rows, columns, i + 1), runs, names, panel, legend=i == 0)
    overview.suptitle(", ".join(names))
    figs["overview.png"] = overview
    return figs


def write(workdirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Plots the runs in `workdirs` (overlaid) into `out` (default: the first workdir's plots/); returns the
    files written. RunError, naming the file, for a workdir without metrics."""
    if not workdirs:
        raise runs_lib.RunError("no workdir given")
    paths = [Path(w) for w in workdirs]
    runs = []
    for path in paths:
        run = runs_lib.read(path)
        if not any(len(row) > 1 for row in run.rows):
            runs_lib.read_metrics(path / runs_lib.METRICS)  # a missing file: that error
            raise runs_lib.RunError(f"{path / runs_lib.METRICS}: no metrics yet (nothing to plot)")
        runs.append(run)
    out = Path(out) if out is not None else paths[0] / DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(runs, runs_lib.names(paths)).items():
        written.append(_save(fig, out / name))
    return written


def after_run(workdir: str | Path) -> None:
    """WORKDIR/plots/ at the end of a training run. Never raises: a failure to plot is logged as one line, and
    the run stays finished. A process without the run's metrics (not the first of several) plots nothing."""
    workdir = Path(workdir)
    if not (workdir / runs_lib.METRICS).is_file():
        return
    try:
        written = write([workdir])
        log.info("plots: %s (%d files)", written[0].parent, len(written))
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the trained adapter is already saved
        log.warning("plots: not written (%s: %s)", type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def _save(fig, path: Path) -> Path:
    """Writes `fig` as a PNG under a temporary name and renames it into place, so a reader never sees half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
