"""Causal language modelling, the default task: supervised fine-tuning (alpaca, chat messages) and plain text.

The data and its batches are `jaxft.data`'s (packed rows of tokens, shifted targets and a loss mask; see
`jaxft.data.for_training`); the loss is the mean token cross-entropy over the targets that count. No head: the
model's own output layer predicts the next token. Metrics: loss and perplexity.
"""

from __future__ import annotations

from jaxft import data, metrics
from jaxft.tasks import Eval, Model, evaluate_batches
from jaxft.train.step import token_loss

KINDS = ("decoder",)


def batches(config, tokenizer) -> tuple:
    """`jaxft.data.for_training`: (training iterator, at most train.eval_batches evaluation batches, stats)."""
    return data.for_training(config, tokenizer)


def init_head(key, cfg, config, n_labels: int):
    return None


def forward(model: Model, base: dict, trainable, batch: dict, rng=None):
    """-> next-token logits (B, T, V) float32; in training (rng given) a mixture of experts' family (one with
    `aux_losses`) gives (logits, its router losses) instead."""
    router = rng is not None and hasattr(model.family, "aux_losses")
    out = model.family.forward(model.cfg, base, batch["tokens"], trainable=trainable,
                               positions=batch["positions"], segment_ids=batch["segment_ids"],
                               peft=model.spec, rng=rng, dtype=model.dtype, remat=model.remat,
                               unroll=model.unroll, layout=model.layout, **({"return_aux": True} if router else {}))
    if router:
        return out[0], model.family.aux_losses(model.cfg, out[2], batch["segment_ids"])
    return out[0]


def loss(out, batch: dict) -> tuple:
    """(sum of cross-entropy over the counted targets, their number); with router losses, their weighted sum
    counted once per target, so that the mean the trainer takes is token loss + router losses."""
    logits, router = out if isinstance(out, tuple) else (out, None)
    total, count = token_loss(logits, batch["targets"], batch["loss_mask"])
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


def predict(logits, batch: dict):
    return ()  # the loss is the whole evaluation


def evaluate(ev: Eval) -> dict[str, float]:
    """loss (mean per target token) and perplexity."""
    mean_loss, _ = evaluate_batches(ev)
    return {"loss": mean_loss, "perplexity": metrics.perplexity(mean_loss)}
