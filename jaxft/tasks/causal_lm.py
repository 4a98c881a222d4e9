"""Causal language modelling, the default task: supervised fine-tuning (alpaca, chat messages) and plain text.

The data and its batches are `jaxft.data`'s (packed rows of tokens, shifted targets and a loss mask; see
`jaxft.data.for_training`); the loss is the mean token cross-entropy over the targets that count. No head: the
model's own output layer predicts the next token. Metrics: loss and perplexity.
"""

from __future__ import annotations

from jaxft import data, metrics
from jaxft.data import vlm_batches
from jaxft.tasks import Eval, Model, evaluate_batches
from jaxft.train.step import token_loss

KINDS = ("decoder",)


def batches(config, tokenizer) -> tuple:
    """`jaxft.data.for_training`: (training iterator, at most train.eval_batches evaluation batches, stats); for
    a vision-language model, image + text records with their images (`jaxft.data.vlm_batches.for_training`)."""
    if vlm_batches.is_vision_language(config.model):
        return vlm_batches.for_training(config, tokenizer)
    return data.for_training(config, tokenizer)


def init_head(key, cfg, config, n_labels: int):
    return None


def forward(model: Model, base: dict, trainable, batch: dict, rng=None):
    """-> next-token logits (B, T, V) float32. A batch with images (pixel_values, image_mask) passes them on."""
    images = {k: batch[k] for k in ("pixel_values", "image_mask") if k in batch}
    logits, _ = model.family.forward(model.cfg, base, batch["tokens"], trainable=trainable, **images,
                                     positions=batch["positions"], segment_ids=batch["segment_ids"],
                                     peft=model.spec, rng=rng, dtype=model.dtype, remat=model.remat,
                                     unroll=model.unroll, layout=model.layout)
    return logits


def loss(logits, batch: dict) -> tuple:
    """(sum of cross-entropy over the counted targets, their number)."""
    return token_loss(logits, batch["targets"], batch["loss_mask"])


def predict(logits, batch: dict):
    return ()  # the loss is the whole evaluation


def evaluate(ev: Eval) -> dict[str, float]:
    """loss (mean per target token) and perplexity."""
    mean_loss, _ = evaluate_batches(ev)
    return {"loss": mean_loss, "perplexity": metrics.perplexity(mean_loss)}
