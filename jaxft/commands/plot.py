"""`jaxft plot`: PNG plots of one run or of several overlaid (loss, learning rate, gradient norm, tokens/s, the
task's evaluation metrics)."""

from __future__ import annotations

import argparse

from jaxft.commands import CommandError

HELP = """Plot the runs in WORKDIR ... from their metrics.jsonl, overlaid for comparison (the legend names each
run by its directory): loss.png (training loss, and evaluation loss dashed), learning_rate.png, grad_norm.png,
tokens_per_s.png, one eval_METRIC.png per evaluation metric of the task, and overview.png with all of them.
They go to --out, by default the first WORKDIR's plots/ (where `jaxft train` writes them at the end of a run).
Files are written under a temporary name and renamed into place."""


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="PNG plots of runs (loss, learning rate, metrics), several overlaid",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="a training run's workdir (holds metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="where the PNG files go (default: the first WORKDIR/plots)")
    p.set_defaults(run=run)


def run(args) -> int:
    from jaxft import plots, runs

    try:
        written = plots.write(args.workdirs, args.out)
    except (runs.RunError, OSError) as e:
        raise CommandError(str(e)) from None
    for path in written:
        print(path)
    return 0
