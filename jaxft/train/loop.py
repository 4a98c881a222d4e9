"""The training entry point: config -> model -> task data -> trainable state -> loop -> checkpoint and adapter.

Read top to bottom, this is the whole life of a run; every piece it calls lives in its own module. The model
family (`jaxft.models.family_of`) gives the forward pass and the sharding table; the task (`jaxft.tasks`,
config.task) gives the batches, the head, the loss and the evaluation metrics.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
from tqdm import tqdm

from jaxft import config as config_lib, parallel, peft, tasks, tree
from jaxft.peft import io as adapter_io
from jaxft.train.checkpoints import Checkpoints, ResumeError
from jaxft.train.metrics import MetricsWriter
from jaxft.tasks import heads
from jaxft.train.build import (TASK_FILE, Evaluator, batch_shardings, load_model, put_batch, stack_micro, task_model,
                               trainable_builder)
from jaxft.train.optim import make_optimizer
from jaxft.train.step import init_state, make_train_step

log = logging.getLogger("jaxft.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, unusable workdir); the message says what to do."""


def train(config, workdir: str | Path, resume: bool = False) -> dict:
    """Runs the training described by `config` in `workdir`; returns a summary (steps, losses, paths)."""
    workdir = Path(workdir)
    config_lib.validate(config, jax.device_count())  # a bad value fails in milliseconds, before anything loads
    for line in config_lib.describe(config):  # the settings in force, and where each comes from
        log.info("config: %s", line)
    if config.peft.method == "features":  # a head on frozen features: its own short loop (no LM steps)
        from jaxft.train import features
        return features.train(config, workdir)
    _check_workdir(workdir, resume)
    task_name = tasks.name_of(config)
    task = tasks.get(task_name)
    layout = parallel.from_config(config)  # the device mesh, and the rules from logical axes to its axes
    model, fam = load_model(config, layout, task)
    cfg, base, tokenizer = model.cfg, model.params, model.tokenizer
    train_data, eval_batches, info = task.batches(config, tokenizer)
    log.info("data: %s", info)
    eval_batches = eval_batches[:config.train.eval_batches]

    key = jax.random.PRNGKey(config.seed)
    init_key, state_key = jax.random.split(key)
    build = trainable_builder(config, cfg, tokenizer, task, len(info.get("labels", ())), key)
    trainable, spec = parallel.create_trainable(build, init_key, base, layout, fam.PARAM_AXES)
    optimizer, lr_schedule = make_optimizer(config.train)
    state = parallel.create_sharded(lambda t, k: init_state(t, optimizer, k),
                                    lambda abstract: parallel.state_shardings(abstract, trainable, layout),
                                    trainable, state_key)
    meta = {"model": str(model.path), "peft": peft.describe(config), "lora_paths": sorted(tree.flatten(trainable)),
            "quant": {"format": config.quant.format, "block_size": config.quant.block_size}}
    if task_name != "causal_lm":  # (checkpoints of runs from before tasks have no such entry)
        meta["task"] = {"name": task_name, "labels": info.get("labels")}
    m = task_model(config, fam, cfg, spec, tokenizer, layout)
    log.info("layers: %s (train.layer_loop=%s, %s compute on %s%s)", "unrolled" if m.unroll else "scanned",
             config.train.layer_loop, config.dtype, jax.default_backend(),
             "" if config.quant.format == "none" else f", {config.quant.format} base")

    def forward(base_, trainable_, mb, rng):
        return task.forward(m, base_, trainable_, mb, rng)

    state_sh, base_sh = parallel.shardings_of(state), parallel.shardings_of(base)
    penalty = peft.penalty(spec, config.train.l2sp)  # L2-SP towards the pretrained weights, or None
    if penalty is not None:
        penalty = _without_head(penalty)
    accum = config.train.grad_accum
    first = _peek(train_data)
    train_step = jax.jit(make_train_step(forward, optimizer, penalty, loss=task.loss), donate_argnums=(0,),
                         in_shardings=(state_sh, base_sh, batch_shardings(stack_micro(first, accum), layout, True)),
                         out_shardings=(state_sh, layout.replicated))
    evaluate = Evaluator(task, m, config, info, base, eval_batches, layout, tokenizer, state_sh["trainable"])

    # Only now that model, data and method are known to work does the run write into the workdir.
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    ckpts = Checkpoints(workdir, config.train.keep_checkpoints)
    if resume:
        state, data_state = ckpts.restore(state, meta)
        train_data.set_state(data_state)
        log.info("resumed at step %d", int(state["step"]))

    main = jax.process_index() == 0  # with several processes, the first one writes metrics and files
    metrics = MetricsWriter(workdir) if main else _NoMetrics()
    stop = _SigtermFlag()
    start = int(state["step"])
    steps = config.train.steps
    best, since_best, eval_loss = math.inf, 0, None
    history = []
    eval_metrics = None
    if start == 0:
        eval_metrics = evaluate(state["trainable"])
        eval_loss = eval_metrics["loss"]
        metrics.write(0, **_prefixed(eval_metrics))
        history.append((0, eval_loss))
        best = eval_loss
        log.info("step 0: %s", _table(eval_metrics))

    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    last_saved, step, status = start, start, "completed"
    tokens_seen, t0 = 0, time.perf_counter()
    for step in range(start + 1, steps + 1):
        batch = stack_micro(next(train_data), accum)
        new_state, out = train_step(state, base, put_batch(batch, layout, micro=True))
        loss = float(out["loss"])
        if not math.isfinite(loss):
            # `state` was donated: the last good values are in the last checkpoint, which is kept.
            status = "diverged"
            raise TrainingError(f"step {step}: loss is {loss}; stopped. The last good checkpoint "
                                f"(step {last_saved}) is kept in {ckpts.dir}. Lower train.learning_rate?")
        state = new_state
        tokens_seen += int(batch["segment_ids"].astype(bool).sum())
        tok_s = tokens_seen / (time.perf_counter() - t0)
        lr = float(lr_schedule(step - 1))
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
        bar.update(1)
        row = {"loss": loss, "learning_rate": lr, "tokens_per_s": tok_s, "grad_norm": float(out["grad_norm"])}
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
            status = "preempted"
            break
    bar.close()
    if last_saved != step and step > start:
        ckpts.save(step, state, train_data.get_state(), meta)
    ckpts.close()
    metrics.close()
    adapter_dir = None
    if status != "preempted":
        trainable = parallel.to_host(state["trainable"])  # gathered on every process (a collective)
        adapter_dir = workdir / "adapter"
        if main:
            adapter_io.save(adapter_dir, peft.finalize(spec, trainable), spec, config, model.path)
            if task_name != "causal_lm":  # what `jaxft eval` and readers of the head need besides the arrays
                (adapter_dir / TASK_FILE).write_text(json.dumps(
                    {"task": task_name, "labels": info.get("labels"), "pool": m.pool}, indent=1))
    summary = {"status": status, "step": step, "task": task_name, "eval_loss": eval_loss,
               "eval_metrics": eval_metrics, "eval_history": history,
               "adapter": str(adapter_dir) if adapter_dir else None, "data": info}
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _prefixed(metrics: dict) -> dict:
    return {f"eval_{k}": v for k, v in metrics.items()}


def _table(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _check_workdir(workdir: Path, resume: bool) -> None:
    """Refuses to start a fresh run over existing checkpoints, and to resume from nothing."""
    has_ckpt = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    if has_ckpt and not resume:
        raise ResumeError(f"{workdir}: already holds checkpoints; pass --resume to continue that run "
                          f"or choose another --workdir (nothing was overwritten)")
    if resume and not has_ckpt:
        raise ResumeError(f"{workdir}: --resume given but there is no checkpoint to resume from")


def _without_head(penalty):
    """A penalty over the backbone's leaves only: the head has no pretrained value to be pulled towards."""
    return lambda trainable, base: penalty(heads.backbone(trainable), base)


def _peek(data_iter) -> dict:
    """The next batch of a resumable iterator, without consuming it."""
    position = data_iter.get_state()
    batch = next(data_iter)
    data_iter.set_state(position)
    return batch


class _NoMetrics:
    """The metrics of processes other than the first: they are the same numbers, written once."""

    def write(self, step: int, **metrics: float) -> None:
        pass

    def close(self) -> None:
        pass


class _SigtermFlag:
    """On SIGTERM (TPU preemption) the loop finishes its step, saves a checkpoint and returns normally."""

    def __init__(self):
        self.raised = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner thread): no handler
            pass

    def _handle(self, *_):
        self.raised = True
