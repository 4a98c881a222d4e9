"""What a run optimizes and measures: one module per task, chosen by `config.task` (default `causal_lm`).

  causal_lm             next-token loss on SFT / plain text (the formats of `jaxft.data`)       decoder
  seq2seq               loss on the target given the source (T5; or prompt + response)          encoder-decoder, decoder
  classification        one label per text: a head on the pooled / last-token hidden state      encoder, decoder
  token_classification  one label per word (NER): a head on every token's hidden state         encoder, decoder
  embedding             mean-pooled, normalized sentence vectors; contrastive loss over pairs   encoder, decoder
  mlm                   masked-language-model loss (15% chosen, 80/10/10)                       encoder

A task module provides:

  KINDS    the model kinds (`family.KIND`) it runs on, e.g. ("encoder", "decoder")
  batches(config, tokenizer) -> (train_iter, eval_batches, info)
           train_iter: an endless iterator of host batches (dicts of numpy arrays whose first axis is this
           process's rows of train.batch_size), with grain-style get_state() -> dict / set_state(dict);
           eval_batches: a list of batches, all of one shape, the last one padded with rows that count nothing
           (segment_ids all 0): the whole evaluation set (at most eval.max_examples), of which the trainer
           evaluates the first train.eval_batches during training and `jaxft eval` all; info: a JSON-able
           dict for summary.json, with "labels" (class names in class-index order) for the tasks whose head
           is over classes (its size and the names the metrics use).
           Keys every task provides: tokens (B, T) int32 and segment_ids (B, T) int32 (0 = padding); decoder
           batches also positions (B, T). Other keys are the task's own (labels, targets, loss_mask, ...).
  init_head(key, cfg, config, n_labels) -> dict | None
           the head's parameters (float32), put in the trainable tree under `head/` whatever the PEFT method:
           always trained, saved and exported with the adapter; None for tasks without a head.
  forward(model, base, trainable, batch, rng) -> out
           the backbone with the trainable tree overlaid, then the head (at trainable["head"]); pure and
           jittable; `model` is a `Model` (below); rng is None in evaluation (no dropout).
  loss(out, batch) -> (sum, count)
           float32 scalars; the trainer minimizes sum / count over the whole accumulation window.
  predict(out, batch) -> pytree of arrays
           what `evaluate` needs of one evaluation batch (class ids, not logits), computed on the device.
  evaluate(ev: Eval) -> dict[str, float]
           the metrics over ev.batches, from `jaxft.metrics`; must include "loss" (the mean eval loss, which
           early stopping watches). The trainer logs each as eval_<name>; `jaxft eval` writes them to
           WORKDIR/eval.json as they are. `evaluate_batches(ev)` runs ev.step over the batches for it.

`get(name)` returns the module; modules are imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

TASKS = {
    "causal_lm": "jaxft.tasks.causal_lm",
    "seq2seq": "jaxft.tasks.seq2seq",
    "classification": "jaxft.tasks.classification",
    "token_classification": "jaxft.tasks.token_classification",
    "embedding": "jaxft.tasks.embedding",
    "mlm": "jaxft.tasks.mlm",
}


class TaskError(ValueError):
    """A task that cannot run as configured (unknown name, a model kind it does not support)."""


def get(name: str) -> ModuleType:
    """The task module of `name` (a key of TASKS); TaskError naming it otherwise."""
    if name not in TASKS:
        raise TaskError(f"task: {name!r} is not one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def name_of(config) -> str:
    """config.task (the base config's default: causal_lm); peft.method=features is a mode of classification."""
    return "classification" if config.peft.method == "features" else config.task


def check_kind(name: str, task: ModuleType, family: ModuleType, model: str) -> None:
    """TaskError when the model's kind (decoder / encoder / encoder-decoder) cannot run the task."""
    if family.KIND not in task.KINDS:
        article = "an" if family.KIND[0] in "aeiou" else "a"
        raise TaskError(f"{model}: {article} {family.KIND} model ({family.__name__.rsplit('.', 1)[-1]}) cannot run "
                        f"task {name!r}, which needs {' or '.join(task.KINDS)} models (config.task, config.model)")


@dataclasses.dataclass(frozen=True)
class Model:
    """The static half of a forward pass: which family, its config, the PEFT spec and how to compute."""
    family: ModuleType  # jaxft.models.llama, .bert, .t5 (see `jaxft.models.family`)
    cfg: Any  # the family's Config
    spec: Any = None  # the jaxft.peft.MethodSpec of the trainable tree, or None
    dtype: Any = jnp.float32  # compute dtype
    layout: Any = None  # a jaxft.parallel.Layout constraining activations, or None
    remat: bool = False  # rematerialize each layer in the backward pass
    unroll: bool = False  # run the layers as straight-line code instead of a scan (`jaxft.train.build.policy_of`)
    pad_id: int = 0  # the tokenizer's padding id (what padded rows hold)
    pool: str = "default"  # head.pool: how a sentence vector is read off the hidden states (jaxft.tasks.heads)
    loss_chunk: int = 0  # train.loss_chunk: token rows per chunk of the cross-entropy (0: the full logits)


@dataclasses.dataclass
class Eval:
    """What a task's `evaluate` receives: the evaluation data and a jitted step with the current weights."""
    batches: list  # host batches (dicts of numpy arrays), as `batches` returned them
    step: Callable  # step(batch) -> (loss sum, count, predict(out, batch)), on the device, jitted
    info: dict  # the info dict of `batches` (labels, ...)
    config: Any  # the run's config
    model: Model | None = None  # for tasks that do more than step (generation)
    base: Any = None
    trainable: Any = None
    tokenizer: Any = None


def evaluate_batches(ev: Eval) -> tuple[float, list[tuple[dict, Any]]]:
    """(mean loss over every counted unit of ev.batches, [(batch, predictions as numpy), ...])."""
    import jax

    total, count, out = 0.0, 0.0, []
    for batch in ev.batches:
        s, n, pred = ev.step(batch)
        total, count = total + float(s), count + float(n)
        out.append((batch, jax.tree.map(np.asarray, pred)))
    return total / max(count, 1.0), out
