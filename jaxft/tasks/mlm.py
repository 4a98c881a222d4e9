"""Masked-language-model training for encoders (domain adaptation of BERT / MiniLM), as BERT was pretrained.

Each non-special, non-padding token is chosen with probability `rate` (15%); a chosen token becomes [MASK] 80%
of the time, a uniformly random token 10%, and stays itself 10% (transformers' DataCollatorForLanguageModeling).
The loss is the cross-entropy of the original token at the chosen positions only. Masking runs on the host with
numpy, seeded, so that a batch's masking is the same on every process and after resuming; training batches are
masked afresh at every step (dynamic masking, as RoBERTa), evaluation batches once.

Batches: tokens (B, T) the masked inputs, targets (B, T) the original tokens, loss_mask (B, T) the chosen
positions, segment_ids (B, T) (0 = padding).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxft import tree
from jaxft.data import rows
from jaxft.models.loss import token_loss

KINDS = ("encoder",)
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest (0.1) are kept as they are


def mask_tokens(tokens, segment_ids, rng, mask_id: int, vocab_size: int, special_ids=(), rate: float = 0.15):
    """(inputs, targets, loss_mask), each (B, T), for tokens and segment_ids (B, T) (0 = padding).

    rng: a seed (int or sequence of ints) or a numpy Generator; the same seed gives the same masking.
    special_ids: token ids never chosen ([CLS], [SEP], [PAD], ...). inputs: tokens with the chosen ones
    replaced (80% mask_id, 10% a random id in [0, vocab_size), 10% unchanged); targets: the original tokens;
    loss_mask: bool, the chosen positions.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mlm masking rate must be in (0, 1), got {rate}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    tokens = np.asarray(tokens)
    eligible = (np.asarray(segment_ids) != 0) & ~np.isin(tokens, np.asarray(list(special_ids), tokens.dtype))
    chosen = eligible & (gen.random(tokens.shape) < rate)
    u = gen.random(tokens.shape)
    random_ids = gen.integers(0, vocab_size, tokens.shape).astype(tokens.dtype)
    inputs = np.where(chosen & (u < MASK_SHARE), np.asarray(mask_id, tokens.dtype), tokens)
    inputs = np.where(chosen & (u >= MASK_SHARE) & (u < MASK_SHARE + RANDOM_SHARE), random_ids, inputs)
    return inputs, tokens.copy(), chosen


def mask_batch(batch: dict, rng, tokenizer_ids: dict, rate: float = 0.15) -> dict:
    """The batch (tokens, segment_ids, ...) with tokens masked and targets / loss_mask added; tokenizer_ids:
    mask_id, vocab_size, special_ids (see `special_ids`)."""
    inputs, targets, chosen = mask_tokens(batch["tokens"], batch["segment_ids"], rng, rate=rate, **tokenizer_ids)
    return {**batch, "tokens": inputs.astype(np.int32), "targets": targets.astype(np.int32),
            "loss_mask": chosen.astype(np.int32)}


def special_ids(tokenizer) -> dict:
    """mask_id, vocab_size and special_ids of a transformers tokenizer, for `mask_batch`."""
    if tokenizer.mask_token_id is None:
        raise ValueError("task mlm needs a tokenizer with a mask token ([MASK])")
    return {"mask_id": int(tokenizer.mask_token_id), "vocab_size": len(tokenizer),
            "special_ids": tuple(sorted(set(tokenizer.all_special_ids)))}


def loss(out, batch: dict):
    """(sum of the cross-entropy of the original tokens at the chosen positions, number of chosen positions);
    out: the masked-LM logits (B, T, V)."""
    return token_loss(out, batch["targets"], batch["loss_mask"])


# --- the task interface (jaxft.tasks) ---

def batches(config, tokenizer) -> tuple:
    """(endless training iterator, evaluation batches, info): texts of data.text_field, tokenized with the
    special tokens, cut to train.seq_len; the evaluation rows (at most train.eval_batches batches) masked once
    with a fixed seed."""
    ids = special_ids(tokenizer)
    t = config.train
    recs = rows.records(config.data.train)
    if config.data.eval:
        train, held = recs, rows.records(config.data.eval)
    else:
        keep, out = rows.held_out(len(recs), config.data.eval_fraction, config.seed)
        train, held = [recs[i] for i in keep], [recs[i] for i in out]
    arrays = _arrays(train, config, tokenizer)
    eval_list = []
    if held:
        eval_arrays = _arrays(held, config, tokenizer)
        plain = rows.eval_batches(eval_arrays, t.batch_size, {k: 0 for k in eval_arrays})[:t.eval_batches]
        eval_list = [mask_batch(b, [config.seed, 1, k], ids) for k, b in enumerate(plain)]
    info = {"train_examples": len(train), "eval_examples": len(held), "mask_id": ids["mask_id"]}
    return _Masked(rows.stream(arrays, t.batch_size, config.seed), ids, config.seed), eval_list, info


def init_head(key, cfg, config, n_labels):
    """None when the checkpoint has its masked-LM head; else a fresh one (all-MiniLM-L6-v2 has none)."""
    if cfg.mlm_head:
        return None
    from jaxft.models import bert
    return bert.init_mlm_head(key, cfg)["mlm"]


def forward(model, base: dict, trainable: dict | None, batch: dict, rng=None):
    """The masked-LM logits (B, T, V) float32; a trained head (trainable["head"]) replaces the checkpoint's."""
    from jaxft.tasks.heads import backbone, hidden
    h = hidden(model, base, trainable, batch, rng)
    params = tree.overlay(base, backbone(trainable))
    if trainable and "head" in trainable:
        params = {**params, "mlm": trainable["head"]}
    return model.family.mlm_logits(model.cfg, params, h)


def predict(out, batch: dict):
    """The predicted token at every position (B, T)."""
    return jnp.argmax(out, axis=-1).astype(jnp.int32)


def evaluate(ev) -> dict[str, float]:
    """loss, perplexity and the accuracy of the predictions at the chosen positions."""
    from jaxft import metrics
    from jaxft.tasks import evaluate_batches
    mean_loss, outs = evaluate_batches(ev)
    hit = sum(float(np.sum((p == b["targets"]) * b["loss_mask"])) for b, p in outs)
    n = sum(float(np.sum(b["loss_mask"])) for b, _ in outs)
    return {"loss": mean_loss, "perplexity": metrics.perplexity(mean_loss), "masked_accuracy": hit / max(n, 1.0)}


def _arrays(recs, config, tokenizer) -> dict[str, np.ndarray]:
    texts = rows.column(recs, config.data.text_field, "data.text_field")
    enc = tokenizer(texts, truncation=True, max_length=config.train.seq_len)["input_ids"]
    n = config.train.seq_len
    return {"tokens": rows.pad(enc, n, tokenizer.pad_token_id or 0),
            "segment_ids": rows.pad([[1] * len(e) for e in enc], n, 0)}


class _Masked:
    """The training stream with each batch masked from (seed, batch number): resumable like the stream."""

    def __init__(self, inner, ids: dict, seed: int):
        self.inner, self.ids, self.seed, self.count = inner, ids, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = mask_batch(next(self.inner), [self.seed, 0, self.count], self.ids)
        self.count += 1
        return batch

    def get_state(self) -> dict:
        return {"stream": self.inner.get_state(), "batches": self.count}

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state["stream"])
        self.count = int(state["batches"])
