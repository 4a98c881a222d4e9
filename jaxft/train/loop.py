"""The training entry point: config -> model -> data -> trainable state -> loop -> checkpoint and adapter.

Read top to bottom, this is the whole life of a run; every piece it calls lives in its own module.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxft import checkpoint, data, parallel, peft, quant, tree
from jaxft.models import llama
from jaxft.peft import io as adapter_io
from jaxft.train.checkpoints import Checkpoints, ResumeError
from jaxft.train.metrics import MetricsWriter
from jaxft.train.optim import make_optimizer
from jaxft.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger("jaxft.train")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, unusable workdir); the message says what to do."""


def train(config, workdir: str | Path, resume: bool = False) -> dict:
    """Runs the training described by `config` in `workdir`; returns a summary (steps, losses, paths)."""
    workdir = Path(workdir)
    if config.peft.method == "features":  # a head on frozen features: its own short loop (no LM steps)
        from jaxft.train import features
        return features.train(config, workdir)
    _check_workdir(workdir, resume)
    dtype, param_dtype = _dtype(config, "dtype"), _dtype(config, "param_dtype")
    layout = parallel.from_config(config)  # the device mesh, and the rules from logical axes to its axes

    leaf_fn = None
    if config.quant.format != "none":  # QLoRA: the frozen base is quantized tensor by tensor as it is read
        leaf_fn = quant.leaf_fn(config.quant.format, block_size=config.quant.block_size,
                                double_quant=config.quant.double_quant, include=config.quant.include,
                                dense_dtype=param_dtype)
    # Each leaf is created directly in its shards on the mesh (after quantization, if any).
    leaf_fn = parallel.shard_leaf_fn(layout, llama.PARAM_AXES, param_dtype, inner=leaf_fn)
    model = checkpoint.load(config.model, dtype=param_dtype, leaf_fn=leaf_fn)
    cfg, base, tokenizer = model.cfg, model.params, model.tokenizer
    train_data, eval_batches, stats = data.for_training(config, tokenizer)
    log.info("data: %s", stats)
    eval_batches = [parallel.put_batch(b, layout, parallel.BATCH) for b in eval_batches]

    key = jax.random.PRNGKey(config.seed)
    init_key, state_key = jax.random.split(key)
    trainable, spec = parallel.create_trainable(lambda k, b: peft.build(k, b, config, cfg, tokenizer), init_key,
                                                base, layout, llama.PARAM_AXES)
    optimizer, lr_schedule = make_optimizer(config.train)
    state = parallel.create_sharded(lambda t, k: init_state(t, optimizer, k),
                                    lambda abstract: parallel.state_shardings(abstract, trainable, layout),
                                    trainable, state_key)
    meta = {"model": str(model.path), "peft": peft.describe(config), "lora_paths": sorted(tree.flatten(trainable)),
            "quant": {"format": config.quant.format, "block_size": config.quant.block_size}}

    def forward(base_, trainable_, mb, rng):
        logits, _ = llama.forward(cfg, base_, mb["tokens"], trainable=trainable_, positions=mb["positions"],
                                  segment_ids=mb["segment_ids"], peft=spec, rng=rng, dtype=dtype,
                                  remat=config.train.remat, layout=layout)
        return logits

    state_sh, base_sh = parallel.shardings_of(state), parallel.shardings_of(base)
    penalty = peft.penalty(spec, config.train.l2sp)  # L2-SP towards the pretrained weights, or None
    train_step = jax.jit(make_train_step(forward, optimizer, penalty), donate_argnums=(0,),
                         in_shardings=(state_sh, base_sh, layout.sharding(parallel.MICRO_BATCH)),
                         out_shardings=(state_sh, layout.replicated))
    eval_step = jax.jit(make_eval_step(forward),
                        in_shardings=(state_sh["trainable"], base_sh, layout.sharding(parallel.BATCH)))

    # Only now that model, data and method are known to work does the run write into the workdir.
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    ckpts = Checkpoints(workdir, config.train.keep_checkpoints)
    if resume:
        state, data_state = ckpts.restore(state, meta)
        train_data.set_state(data_state)
        log.info("resumed at step %d", int(state["step"]))

    def evaluate(trainable_):
        total, count = 0.0, 0.0
        for batch in eval_batches:
            s, n = eval_step(trainable_, base, batch)
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    main = jax.process_index() == 0  # with several processes, the first one writes metrics and files
    metrics = MetricsWriter(workdir) if main else _NoMetrics()
    stop = _SigtermFlag()
    start = int(state["step"])
    steps = config.train.steps
    best, since_best, eval_loss = math.inf, 0, None
    history = []
    if start == 0:
        eval_loss = evaluate(state["trainable"])
        metrics.write(0, eval_loss=eval_loss)
        history.append((0, eval_loss))
        best = eval_loss
        log.info("step 0: eval_loss %.4f", eval_loss)

    accum = config.train.grad_accum
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    last_saved, step, status = start, start, "completed"
    tokens_seen, t0 = 0, time.perf_counter()
    for step in range(start + 1, steps + 1):
        batch = _stack_micro(next(train_data), accum)
        new_state, m = train_step(state, base, parallel.put_batch(batch, layout))
        loss = float(m["loss"])
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
        row = {"loss": loss, "learning_rate": lr, "tokens_per_s": tok_s, "grad_norm": float(m["grad_norm"])}
        is_eval = (config.train.eval_every and step % config.train.eval_every == 0) or step == steps
        if is_eval:
            eval_loss = evaluate(state["trainable"])
            row["eval_loss"] = eval_loss
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
    summary = {"status": status, "step": step, "eval_loss": eval_loss, "eval_history": history,
               "adapter": str(adapter_dir) if adapter_dir else None, "data": stats}
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _check_workdir(workdir: Path, resume: bool) -> None:
    """Refuses to start a fresh run over existing checkpoints, and to resume from nothing."""
    has_ckpt = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    if has_ckpt and not resume:
        raise ResumeError(f"{workdir}: already holds checkpoints; pass --resume to continue that run "
                          f"or choose another --workdir (nothing was overwritten)")
    if resume and not has_ckpt:
        raise ResumeError(f"{workdir}: --resume given but there is no checkpoint to resume from")


def _dtype(config, key):
    name = config[key]
    if name not in DTYPES:
        raise ValueError(f"{key}: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _stack_micro(batch: dict, accum: int) -> dict:
    """(B, T) rows -> (A, B/A, T) micro-batches for gradient accumulation."""
    b = batch["tokens"].shape[0]
    if b % accum:
        raise ValueError(f"train.batch_size={b} is not a multiple of train.grad_accum={accum}")
    return {k: np.asarray(v).reshape(accum, b // accum, *v.shape[1:]) for k, v in batch.items()}


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
