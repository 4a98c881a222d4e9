"""Causal language modelling, the default task: supervised fine-tuning (alpaca, chat messages) and plain text.

The data and its batches are `jaxft.data`'s (packed rows of tokens, shifted targets and a loss mask; see
`jaxft.data.for_training`); the loss is the mean token cross-entropy over the targets that count. No head: the
model's own output layer predicts the next token. Metrics: loss and perplexity.

With `train.loss_chunk` (`Model.loss_chunk`) the forward stops before the output layer and hands the loss its
inputs (`HeadInputs`): the loss runs the head over chunks of tokens (`jaxft.models.loss.chunked_cross_entropy`)
and never holds the (B, T, V) logits. The family provides `output_head` for it.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax

from jaxft import data, metrics
from jaxft.data import vlm_batches
from jaxft.models.loss import chunked_cross_entropy, token_loss
from jaxft.peft import method
from jaxft.tasks import Eval, Model, TaskError, evaluate_batches
from jaxft.tree import overlay

KINDS = ("decoder",)


@partial(jax.tree_util.register_dataclass, data_fields=["hidden", "head"], meta_fields=["tied", "chunk"])
@dataclasses.dataclass(frozen=True)
class HeadInputs:
    """What the chunked loss reads instead of logits: the hidden states (B, T, D) as the output layer reads them,
    its weight ((V, D) when tied, else (D, V)), and the token rows per chunk."""
    hidden: Any
    head: Any
    tied: bool
    chunk: int


def batches(config, tokenizer) -> tuple:
    """`jaxft.data.for_training`: (training iterator, at most train.eval_batches evaluation batches, stats); for
    a vision-language model, image + text records with their images (`jaxft.data.vlm_batches.for_training`)."""
    if vlm_batches.is_vision_language(config.model):
        return vlm_batches.for_training(config, tokenizer)
    return data.for_training(config, tokenizer)


def init_head(key, cfg, config, n_labels: int):
    return None


def forward(model: Model, base: dict, trainable, batch: dict, rng=None):
    """-> next-token logits (B, T, V) float32, or with model.loss_chunk the `HeadInputs` of the loss; in training
    (rng given) a mixture of experts' family (one with `aux_losses`) gives (that, its router losses) instead. A batch
    with images (pixel_values, image_mask) passes them on."""
    router = rng is not None and hasattr(model.family, "aux_losses")
    images = {k: batch[k] for k in ("pixel_values", "image_mask", "image_features") if k in batch}
    out = model.family.forward(model.cfg, base, batch["tokens"], trainable=trainable, **images,
                               positions=batch["positions"], segment_ids=batch["segment_ids"],
                               peft=model.spec, rng=rng, dtype=model.dtype, remat=model.remat,
                               unroll=model.unroll, layout=model.layout, return_hidden=bool(model.loss_chunk),
                               **({"return_aux": True} if router else {}))
    head = head_inputs(model, base, trainable, out[0]) if model.loss_chunk else out[0]
    if router:
        return head, model.family.aux_losses(model.cfg, out[2], batch["segment_ids"])
    return head


def head_inputs(model: Model, base: dict, trainable, hidden) -> HeadInputs:
    """The `HeadInputs` of final-normed hidden states (B, T, D), from the family's `output_head`."""
    if not hasattr(model.family, "output_head"):
        raise TaskError(f"train.loss_chunk={model.loss_chunk}: the {model.cfg.model_type} family has no output_head "
                        f"to run inside the loss (use train.loss_chunk=0)")
    resolved, _ = method.resolve(model.spec, base, trainable)
    hidden, head, tied = model.family.output_head(model.cfg, overlay(base, resolved), hidden, model.dtype)
    return HeadInputs(hidden, head, tied, model.loss_chunk)


def loss(out, batch: dict) -> tuple:
    """(sum of cross-entropy over the counted targets, their number), from logits or `HeadInputs`; with router
    losses, their weighted sum counted once per target, so that the mean the trainer takes is token loss + router
    losses."""
    out, router = out if isinstance(out, tuple) else (out, None)
    if isinstance(out, HeadInputs):
        total, count = chunked_cross_entropy(out.hidden, out.head, batch["targets"], batch["loss_mask"],
                                             tied=out.tied, chunk=out.chunk)
    else:
        total, count = token_loss(out, batch["targets"], batch["loss_mask"])
    if router is not None:
        total = total + router["loss"] * count
    return total, count


def train_metrics(out, batch: dict) -> dict:
    """A mixture of experts' router losses and load in training (`jaxft.models.mixtral.aux_losses`):
    moe_aux_loss (what the loss adds), moe_load_balancing, moe_router_z, and per layer l the max / min token share
    of its experts, moe_expert_ratio_l{l} (inf: an expert got no token; growing: collapse). {} otherwise."""
    if not isinstance(out, tuple):
        return {}
    router = out[1]
    ratios = {f"moe_expert_ratio_l{i}": router["expert_ratio"][i] for i in range(router["expert_ratio"].shape[0])}
    return {"moe_aux_loss": router["loss"], "moe_load_balancing": router["load_balancing"],
            "moe_router_z": router["router_z"], **ratios}


def predict(out, batch: dict):
    return ()  # the loss is the whole evaluation


def evaluate(ev: Eval) -> dict[str, float]:
    """loss (mean per target token) and perplexity."""
    mean_loss, _ = evaluate_batches(ev)
    return {"loss": mean_loss, "perplexity": metrics.perplexity(mean_loss)}
