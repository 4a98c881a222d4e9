"""The training entry point: the run (`jaxft.train.run.build_run`: model, method, data, state, jitted step)
-> the loop -> checkpoints, metrics and the adapter in the workdir.

Read top to bottom, this is the whole life of a run after it is built: evaluation at step 0 and every
train.eval_every steps, the divergence guard, checkpoints and exact resume, preemption, early stopping, and the
summary. (`peft.method=features` is the classification task on cached features: the same loop trains its head.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import jax
from tqdm import tqdm

from jaxft import config as config_lib, parallel, peft, plots, tree
from jaxft.peft import io as adapter_io
from jaxft.train import workdir as workdir_lib
from jaxft.train.checkpoints import CheckpointError, Checkpoints
from jaxft.train.guard import Guard, all_finite
from jaxft.train.metrics import MetricsWriter, read_rows
from jaxft.train.build import TASK_FILE, tokens_per_device
from jaxft.train.run import build_run

log = logging.getLogger("jaxft.train")
FEATURES = "features"  # WORKDIR/features: the pooled features of peft.method=features, computed once


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, unusable workdir); the message says what to do."""


def train(config, workdir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Runs the training described by `config` in `workdir`; returns a summary (steps, losses, paths).

    resume: continue the run in `workdir` from its last complete checkpoint (from step 0 if none completed).
    overwrite: move a run already in `workdir` aside (to WORKDIR.replaced-TIME) and start afresh. Without
    either, a workdir holding a run is refused (`jaxft.train.workdir`).
    """
    workdir = Path(workdir)
    config_lib.validate(config, jax.device_count())  # a bad value fails in milliseconds, before anything loads
    for line in config_lib.describe(config):  # the settings in force, and where each comes from
        log.info("config: %s", line)
    workdir_lib.check(workdir, config, resume=resume, overwrite=overwrite)  # writes nothing
    run = build_run(config, cache_dir=workdir / FEATURES)  # model, method, data, state and the jitted steps
    task_name, spec, m, base, train_data = run.task_name, run.spec, run.model, run.base, run.train_data
    state, train_step, evaluate, info, lr_schedule = run.state, run.train_step, run.evaluate, run.info, run.lr_schedule
    log.info("data: %s", info)
    meta = {"model": run.model_path, "peft": peft.describe(config), "lora_paths": sorted(tree.flatten(run.trainable)),
            "quant": {"format": config.quant.format, "block_size": config.quant.block_size}}
    if task_name != "causal_lm":  # (checkpoints of runs from before tasks have no such entry)
        meta["task"] = {"name": task_name, "labels": info.get("labels")}
    log.info("layers: %s, %s (train.layer_loop=%s, train.remat=%s; %s compute on %s, %d tokens a device%s)",
             "unrolled" if m.unroll else "scanned", "rematerialized" if m.remat else "not rematerialized",
             config.train.layer_loop, config.train.remat, config.dtype, jax.default_backend(),
             tokens_per_device(config, run.layout),
             "" if config.quant.format == "none" else f", {config.quant.format} base")

    # Only now that model, data and method are known to work does the run write into the workdir.
    main = jax.process_index() == 0  # with several processes, the first one writes metrics and files
    if main:
        aside = workdir_lib.commit(workdir, config, resume=resume, overwrite=overwrite)
        if aside is not None:
            log.warning("moved the earlier run in %s aside to %s", workdir, aside)
            if (aside / FEATURES).is_dir():  # the features this run just cached (peft.method=features) stay
                os.replace(aside / FEATURES, workdir / FEATURES)
    parallel.any_process(False)  # the others wait for the workdir to exist
    ckpts = Checkpoints(workdir, config.train.keep_checkpoints)
    earlier, changed = {}, {}  # the summary of the run this one continues, the settings changed since
    if resume:
        state, data_state = ckpts.restore(state, meta)
        if data_state is not None:
            train_data.set_state(data_state)
        if main:
            changed = workdir_lib.record_resume(workdir, config, int(state["step"]))
        earlier = _read_summary(workdir)  # on every process: early stopping must decide alike everywhere
        log.info("resumed at step %d", int(state["step"]))
        if changed:  # allowed (FIXED settings were checked), but a reader of the metrics should know
            log.warning("settings changed since the run started (in %s): %s", workdir_lib.HISTORY,
                        ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))

    start = int(state["step"])
    metrics = MetricsWriter(workdir, resumed_at=start if resume else None) if main else _NoMetrics()
    # The guard compares with the run's first loss; every process reads it, so that all stop alike.
    first_loss = next((r["loss"] for r in read_rows(workdir / "metrics.jsonl") if r.get("step") == 1
                       and "loss" in r), None) if start > 0 else None
    guard = Guard(config.guard, first_loss)
    stop = _StopFlag()
    steps = config.train.steps
    history = [h for h in earlier.get("eval_history") or [] if h[0] <= start]
    eval_metrics, eval_loss = earlier.get("eval_metrics"), earlier.get("eval_loss")
    best = min([loss for _, loss in history], default=math.inf)
    since_best = 0
    if start == 0:
        eval_metrics = evaluate(state["trainable"])
        eval_loss = eval_metrics["loss"]
        metrics.write(0, **_prefixed(eval_metrics))
        history = [(0, eval_loss)]
        best = eval_loss
        log.info("step 0: %s", _table(eval_metrics))

    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    last_saved, step, status = start, start, "completed"
    tokens_seen, t0 = 0, time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            batch = next(train_data)
            state, out = train_step(state, base, run.put(batch))
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            why = guard.check(step, loss, grad_norm, bool(all_finite(state["trainable"])))
            if why is not None:
                # `state` is not saved: the checkpoints kept were all checked finite before they were written.
                status = "diverged"
                if main:
                    _write_summary(workdir, {"status": status, "step": step, "reason": why, "task": task_name,
                                             "eval_loss": eval_loss, "eval_metrics": eval_metrics,
                                             "eval_history": history, "adapter": None, "data": info})
                    plots.after_run(workdir)  # the curves that led here
                raise TrainingError(f"{why}; stopped. The last good checkpoint ({_saved(ckpts)}) "
                                    f"is kept in {ckpts.dir}. Lower train.learning_rate, then --resume, or "
                                    f"start again with --overwrite")
            # (rows of cached features, for peft.method=features: they have no tokens)
            tokens_seen += int(batch["segment_ids"].astype(bool).sum()) if "segment_ids" in batch else len(
                batch["labels"])
            tok_s = tokens_seen / (time.perf_counter() - t0)
            lr = float(lr_schedule(step - 1))
            moe = {k: float(v) for k, v in out.items() if k.startswith("moe_")}  # router losses and expert load
            ratio = max((v for k, v in moe.items() if k.startswith("moe_expert_ratio")), default=0.0)
            shown = {"aux": f"{moe['moe_aux_loss']:.4f}", "expert_max/min": f"{ratio:.1f}"} if moe else {}
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", **shown)
            bar.update(1)
            row = {"loss": loss, "learning_rate": lr, "tokens_per_s": tok_s, "grad_norm": grad_norm, **moe}
            is_eval = (config.train.eval_every and step % config.train.eval_every == 0) or step == steps
            if is_eval:
                eval_metrics = evaluate(state["trainable"])
                eval_loss = eval_metrics["loss"]
                row.update(_prefixed(eval_metrics))
                history.append((step, eval_loss))
                if eval_loss < best - 1e-6:
                    best, since_best = eval_loss, 0
                else:
                    since_best += 1
            if is_eval or step % config.train.log_every == 0:
                metrics.write(step, **row)
            if step % config.train.save_every == 0 or step == steps:
                ckpts.save(step, state, train_data.get_state(), meta)
                last_saved = step
            patience = config.train.early_stopping_patience
            if is_eval and patience and since_best >= patience:
                status = "early_stopped"
                log.info("early stopping at step %d: no improvement in %d evaluations", step, patience)
                break
            if parallel.any_process(stop.raised):  # every process stops at the same step
                status = stop.status or "preempted"  # (the signal may have reached another process)
                break
        bar.close()
        if last_saved != step and step > start:
            ckpts.save(step, state, train_data.get_state(), meta)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    finally:
        stop.restore()
        ckpts.close()
        metrics.close()
    adapter_dir = None
    if status not in ("preempted", "interrupted"):
        trainable = parallel.to_host(state["trainable"])  # gathered on every process (a collective)
        adapter_dir = workdir / "adapter"
        if main:
            adapter_io.save(adapter_dir, peft.finalize(spec, trainable), spec, config, run.model_path)
            if task_name != "causal_lm":  # what `jaxft eval` and readers of the head need besides the arrays
                (adapter_dir / TASK_FILE).write_text(json.dumps(
                    {"task": task_name, "labels": info.get("labels"), "pool": m.pool}, indent=1))
    summary = {"status": status, "step": step, "task": task_name, "eval_loss": eval_loss,
               "eval_metrics": eval_metrics, "eval_history": history,
               "adapter": str(adapter_dir) if adapter_dir else None, "data": info}
    if run.feature_cache is not None:  # vision.cache_features: images through the tower, images read back
        summary["feature_cache"] = {"computed": run.feature_cache.misses, "reused": run.feature_cache.hits}
        log.info("feature cache: %(computed)d image(s) through the tower, %(reused)d read back",
                 summary["feature_cache"])
    if main:
        _write_summary(workdir, summary)
        plots.after_run(workdir)  # WORKDIR/plots/*.png; a failure to plot is logged, never raised
    return summary


def _read_summary(workdir: Path) -> dict:
    """WORKDIR/summary.json of an earlier invocation, or {} (none, or unreadable: it is rewritten at the end)."""
    try:
        summary = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _write_summary(workdir: Path, summary: dict) -> None:
    tmp = workdir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, workdir / "summary.json")


def _saved(ckpts: Checkpoints) -> str:
    step = ckpts.latest_step()
    return f"step {step}" if step is not None else "none yet: --resume starts at step 0"


def _prefixed(metrics: dict) -> dict:
    return {f"eval_{k}": v for k, v in metrics.items()}


def _table(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class _NoMetrics:
    """The metrics of processes other than the first: they are the same numbers, written once."""

    def write(self, step: int, **metrics: float) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
    """SIGTERM (TPU preemption) or a first Ctrl-C (SIGINT): the loop finishes its step, saves a checkpoint and
    returns normally. A second Ctrl-C ends the process at once (the default action: checkpoints are crash-safe)."""

    def __init__(self):
        self.raised, self.status, self.before = False, None, {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.before[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handler
                pass

    def _handle(self, sig, _frame):
        self.raised = True
        self.status = self.status or ("interrupted" if sig == signal.SIGINT else "preempted")
        if sig == signal.SIGINT:
            log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)")
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def restore(self) -> None:
        for sig, handler in self.before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
