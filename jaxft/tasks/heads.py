"""The task heads over a backbone's hidden states, and the one call that runs any family's backbone for them.

Heads are small trees under `head/` of the trainable tree, named as transformers names the module, so that a
reader (and an export to PEFT's `modules_to_save`) finds them: decoders `head/score` (LlamaFor*), encoders
`head/classifier` (BertFor*). Axis letters as in `jaxft.models.layers`; C is the number of labels.

  sequence classification  encoder: pooler output (dense + tanh on [CLS]) @ classifier/w + b
                           decoder: hidden state of the last non-padding token @ score/w (no bias)
                           or, by config, the mean over non-padding tokens
  token classification     every token's hidden state @ classifier/w + b   (score/{w,b} for decoders)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.models.layers import last_token, mean_pool
from jaxft.models.loss import token_loss
from jaxft.peft import method
from jaxft.tasks import Model, TaskError

# default: cls (the pooler; mean where the checkpoint has none) for encoders, last for decoders
POOLS = ("default", "cls", "mean", "last")


def backbone(trainable: dict | None) -> dict | None:
    """The trainable tree without the head: what the family's forward overlays on the base."""
    if not trainable or "head" not in trainable:
        return trainable
    return {k: v for k, v in trainable.items() if k != "head"}


def hidden(model: Model, base: dict, trainable: dict | None, batch: dict, rng=None):
    """The backbone's last hidden states (B, T, D) for batch tokens (B, T) and segment_ids (B, T) (0 = padding);
    decoders also read batch positions, encoders batch token_types where present."""
    f, trainable = model.family, backbone(trainable)
    if f.KIND not in ("decoder", "encoder"):
        raise TaskError(f"a {f.KIND} model has no single stack of hidden states for this head")
    extra = {"token_types": batch["token_types"]} if "token_types" in batch else {}
    h, _ = f.forward(model.cfg, base, batch["tokens"], trainable=trainable, positions=batch.get("positions"),
                     segment_ids=batch["segment_ids"], peft=model.spec, rng=rng, dtype=model.dtype,
                     remat=model.remat, unroll=model.unroll, return_hidden=True, layout=model.layout, **extra)
    return h


def init_linear(key, d_in: int, d_out: int, bias: bool = True, std: float = 0.02) -> dict:
    """{"w": (in, out) normal(std), "b": (out,) zeros} in float32, as transformers initializes a new head."""
    p = {"w": std * jax.random.normal(key, (d_in, d_out), jnp.float32)}
    if bias:
        p["b"] = jnp.zeros((d_out,), jnp.float32)
    return p


def linear(x, p: dict):
    """x (..., in) @ p["w"] (+ p["b"]) in float32 -> (..., out)."""
    y = jnp.einsum("...i,io->...o", x.astype(jnp.float32), p["w"].astype(jnp.float32))
    return y + p["b"] if "b" in p else y


def head_name(model: Model) -> str:
    """`score` for decoders, `classifier` for encoders (the transformers module names)."""
    return "classifier" if model.family.KIND == "encoder" else "score"


def pooled(model: Model, base: dict, trainable: dict | None, h, segment_ids, pool: str = "default"):
    """The sentence vector (B, D) of hidden states h (B, T, D) by `pool` (see POOLS)."""
    if pool not in POOLS:
        raise TaskError(f"head.pool: {pool!r} is not one of {', '.join(POOLS)}")
    if pool == "default":  # BertForSequenceClassification / LlamaForSequenceClassification
        has_pooler = getattr(model.cfg, "pooler", True)
        pool = ("cls" if has_pooler else "mean") if model.family.KIND == "encoder" else "last"
    if pool == "mean":
        return mean_pool(h, segment_ids)
    if pool == "last":
        return last_token(h, segment_ids)
    if not hasattr(model.family, "pool") or not getattr(model.cfg, "pooler", True):
        raise TaskError(f"head.pool 'cls': this {model.family.KIND} model has no pooler (use mean or last)")
    resolved, _ = method.resolve(model.spec, base, backbone(trainable))
    return model.family.pool(model.cfg, tree.overlay(base, resolved), h)


def labelled_loss(logits, labels, ignore: int) -> tuple:
    """(sum of cross-entropy over the labelled positions, their number): logits (..., C), labels (...) int,
    where `ignore` marks a position that counts nothing. Rows (classification) or tokens (NER) alike."""
    return token_loss(logits, labels, labels != ignore)
