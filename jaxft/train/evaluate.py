"""Evaluation of a run after training (`jaxft eval`): the task's metrics on its evaluation data.

The weights are the run's adapter and head (WORKDIR/adapter); a workdir without one evaluates what training
would start from: the base model (or peft.init_from's adapter) with the task's freshly initialized head, the
numbers of the run's step 0. Results go to WORKDIR/eval.json as {metric: value}.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from jaxft.data import DataError
from jaxft.peft import io as adapter_io
from jaxft.peft.features import FeatureSpec
from jaxft.peft.method import as_method
from jaxft.train.build import TASK_FILE
from jaxft.train.run import build_run

log = logging.getLogger("jaxft.eval")
RESULTS = "eval.json"


def evaluate(config, workdir: str | Path) -> tuple[dict[str, float], str]:
    """(metrics, what was evaluated) for `config`'s task, model and evaluation data, with the weights of
    `workdir` (see the module docstring); writes WORKDIR/eval.json."""
    workdir = Path(workdir)
    adapter = workdir / "adapter"
    has_ckpt = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    if has_ckpt and not (adapter / "adapter.json").is_file():
        raise ValueError(f"{workdir}: holds checkpoints but no adapter yet; finish the run with "
                         f"`jaxft train --resume` first")
    run = build_run(config, training=False, cache_dir=workdir / "features")  # (peft.method=features' cache)
    batches, info, name = run.eval_batches, run.info, run.task_name
    if not batches:
        raise DataError(f"{config.data.train}: no evaluation data (set data.eval, or data.eval_fraction > 0)")
    labels = info.get("labels")

    if (adapter / "adapter.json").is_file():
        trainable, spec, _ = adapter_io.load(adapter)
        if isinstance(spec, FeatureSpec) != (config.peft.method == "features"):
            what = "peft.method=features head" if isinstance(spec, FeatureSpec) else "language-model adapter"
            raise ValueError(f"{adapter}: a {what}, but the config's peft.method is {config.peft.method!r}")
        spec = spec if isinstance(spec, FeatureSpec) else as_method(spec)
        saved = json.loads((adapter / TASK_FILE).read_text()) if (adapter / TASK_FILE).is_file() else {}
        if saved.get("task", "causal_lm") != name:
            raise ValueError(f"{adapter}: trained for task {saved.get('task', 'causal_lm')!r}, but the config's task "
                             f"is {name!r}")
        if labels is not None and saved.get("labels") != labels:
            raise DataError(f"{adapter}: trained with labels {saved.get('labels')}, but the config's data gives "
                            f"{labels} (set data.labels as in training)")
        if saved.get("pool", run.model.pool) != run.model.pool:
            raise ValueError(f"{adapter}: trained with head.pool={saved['pool']!r}, but the config has "
                             f"{run.model.pool!r}")
        source, evaluator = str(adapter), run.evaluator(spec)
    else:
        trainable, evaluator = run.init_trainable(), run.evaluator(run.spec)
        source = f"{config.peft.init_from or 'the base model'}" + (" with an untrained head" if "head" in trainable
                                                                  else "")
    results = evaluator(trainable)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    log.info("%s: %s", source, results)
    return results, source


def table(results: dict[str, float]) -> str:
    """The metrics as a two-column text table."""
    width = max(len("metric"), *(len(k) for k in results))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in results.items()]
    return "\n".join(lines)
