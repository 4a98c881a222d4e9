"""Prompt tuning (Lester et al. 2021) as HF PEFT computes it: P learned embeddings before the text.

The trainable tree is `prompt/embeddings` (P, D). The model prepends them to the token embeddings of every
row, numbers them 0..P-1 and the text from P on (`MethodSpec.virtual_tokens`), and drops their outputs, so
that logits stay aligned with the tokens. They sit in a shared segment (id -1) that every example of a
packed row sees, which makes a packed row compute what its examples would compute one by one, each after
the prompt. In generation the prompt goes through the prefill with the text and then lives in the KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.peft.method import MethodSpec, PeftError, virtual_tokens
from jaxft.quant import as_dense

INITS = ("random", "text", "vocab")
SHAPING = ("length",)
UNMERGEABLE = "prompt tuning prepends learned embeddings to the input; they are inputs, not weights"
SHARED_SEGMENT = -1  # segment id of slots every example attends to (see `jaxft.models.layers.attention_mask`)


def init(key, embed, length: int, how: str = "vocab", text: str = "", tokenizer=None) -> dict:
    """The trainable tree of a soft prompt of `length` embeddings; embed: the base's table (V, D).

    how: 'random': normal with the standard deviation of the embedding table (so soft tokens start at the
    scale of real ones); 'text': the embeddings of `text` tokenized, repeated or cut to `length` (PEFT's TEXT);
    'vocab': the embeddings of `length` tokens sampled uniformly from the vocabulary (PEFT's SAMPLE_VOCAB).
    """
    if how not in INITS:
        raise PeftError(f"prompt.init: {how!r} is not one of {', '.join(INITS)}")
    table = as_dense(embed, jnp.float32)
    vocab, dim = table.shape
    if how == "random":
        return {"prompt": {"embeddings": jnp.std(table) * jax.random.normal(key, (length, dim), jnp.float32)}}
    if how == "vocab":
        return {"prompt": {"embeddings": table[jax.random.randint(key, (length,), 0, vocab)]}}
    if not text:
        raise PeftError("prompt.init='text' needs prompt.init_text, the text whose embeddings start the prompt")
    if tokenizer is None:
        raise PeftError("prompt.init='text' needs the model's tokenizer to read prompt.init_text")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise PeftError(f"prompt.init_text {text!r} gives no token")
    ids = (ids * -(-length // len(ids)))[:length]
    return {"prompt": {"embeddings": table[jnp.asarray(ids)]}}


def build(key, base: dict, config, cfg, tokenizer=None):
    c = config.prompt
    n = virtual_tokens("prompt.length", c.length, config.train.seq_len, cfg.max_seq_len)
    return init(key, embedding(base), n, c.init, c.init_text, tokenizer), MethodSpec("prompt", virtual_tokens=n)


def embedding(base: dict):
    """The token embedding table (V, D) of a base of any family (LLaMA embed/w, BERT embed/word/w, T5 shared/w)."""
    flat = tree.flatten(base)
    return next(flat[p] for p in ("embed/w", "embed/word/w", "shared/w") if p in flat)


def expected(spec, flat: dict, base: dict, cfg) -> dict:
    return {"prompt/embeddings": (spec.virtual_tokens, cfg.dim)}


def settings(config, spec, flat: dict) -> list:
    return [("prompt.length", config.prompt.length, spec.virtual_tokens)]


def input_embeddings(spec, trainable, x, positions, segment_ids):
    """The `input_embeddings` hook: the soft prompt before the text (see `prepend`)."""
    if not trainable or "prompt" not in trainable:
        return x, positions, segment_ids
    return prepend(spec, trainable["prompt"]["embeddings"], x, positions, segment_ids)


def prepend(spec, prompt, x, positions, segment_ids):
    """prompt (P, D), x (B, T, D), positions / segment_ids (B, T) of the text (positions already after P) ->
    the same for the (B, P + T) sequence with the prompt first: positions 0..P-1, the shared segment."""
    b = x.shape[0]
    n = prompt.shape[0]
    if spec is None or spec.virtual_tokens != n:
        raise PeftError(f"a soft prompt of {n} embeddings needs peft=MethodSpec('prompt', virtual_tokens={n}), "
                        f"got {spec}")
    x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype), (b, n, x.shape[-1])), x], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)), positions], 1)
    segment_ids = jnp.concatenate([jnp.full((b, n), SHARED_SEGMENT, segment_ids.dtype), segment_ids], 1)
    return x, positions, segment_ids
