"""`jaxft runs`: the training runs under a directory, side by side."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxft.commands import CommandError

HELP = """List the training runs under DIR (every directory below it holding metrics.jsonl or summary.json) as a
table: model, method, task, steps done / planned, the last training loss, the last evaluation's metrics and the
status: running, completed, early-stopped, interrupted (preempted, or stopped without a summary.json: killed or
crashed; `jaxft train --resume` continues it) or failed (the trainer gave up, e.g. a diverged loss). A run
without summary.json counts as running until its files have been still for 10 minutes (or for 5 of its usual
intervals between metrics rows, if longer). --json prints the same as a JSON list, with each run's path and
its eval.json (`jaxft eval`) as "evaluated"."""


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="a table of the runs under a directory (metrics, status)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=".", metavar="DIR", help="where to look for runs (default: .)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.set_defaults(run=run)


def run(args) -> int:
    from jaxft import runs

    try:
        workdirs = runs.find(args.dir)
    except runs.RunError as e:
        raise CommandError(str(e)) from None
    if not workdirs:
        raise CommandError(f"{args.dir}: no runs found (a run's workdir holds metrics.jsonl or summary.json)")
    root = Path(args.dir)
    rows, failed = [], 0
    for workdir in workdirs:
        name = str(workdir.relative_to(root)) if workdir != root else workdir.resolve().name
        try:
            rows.append(runs.describe(runs.read(workdir), name))
        except runs.RunError as e:  # one unreadable run does not hide the others
            print(f"jaxft runs: {e}", file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps(_finite(rows), indent=1, allow_nan=False))  # strict JSON: NaN / inf become null
    elif rows:
        print(runs.table(rows))
    return 1 if failed else 0


def _finite(value):
    """`value` with every non-finite float (a diverged run's loss) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
