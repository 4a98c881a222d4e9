"""Autoregressive generation over a KV cache: the prefill, then a `lax.while_loop` of decode steps, in one jit.

Prompts of different lengths share a batch by left padding: padding slots carry segment id 0, so nothing
attends to them, and each row's positions start at 0 at its first real token, so a row decodes as it would
alone. The padded prompt length and the new-token budget are rounded up to powers of two, so that a new
prompt length or `max_new_tokens` rarely means a new compilation; the batch size is not rounded. Greedy
decoding and sampling share the compiled function (the sampling knobs are traced).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.backend import Policy, decode_unrolled
from jaxft.backend import resolve as resolve_policy
from jaxft.models import family_of, t5
from jaxft.models.config import LlamaConfig
from jaxft.peft import method as peft_method
from jaxft.tree import overlay

MIN_BUCKET = 16  # smallest padded prompt length / new-token budget: a compilation per power of two above it


def generate(cfg: LlamaConfig, base: dict, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_ids=(), trainable: dict | None = None, peft=None, lora=None,
             dtype=jnp.float32, unroll: bool | None = None, policy: Policy | None = None) -> list[list[int]]:
    """The new tokens of each prompt, up to `max_new_tokens`; a row stops at its first EOS, which is excluded.

    prompts: B lists of token ids (non-empty, any lengths). Greedy (argmax) when `temperature` is 0, otherwise
    samples softmax(logits / temperature) restricted to the `top_k` most likely tokens (0: all), then to the
    smallest set of them whose probability reaches `top_p` (nucleus); the draws depend only on `seed`, the
    prompts and the arguments. `trainable` and `peft` (the method's spec; `lora=` a bare LoraSpec) are passed
    to the family's `forward` (any decoder family of `jaxft.models`): every fine-tuning method generates, a soft
    prompt or prefix included (the prefix stays outside the cache, the prompt goes in with the prefill); `dtype`
    is the compute and KV-cache dtype. Decoding stops when every row has hit one of `eos_ids` or
    `max_new_tokens` tokens.
    `unroll` runs the decode steps' layers as an unrolled loop over per-layer weights and KV-cache buffers
    split once before decoding (the family's `split_layers`, `split_cache`), so that no step slices a weight
    out of its stack: measured on a 2-core CPU, 1.15x faster decoding at batch 8 and 0.9x at batch 1, at the
    cost of a 3x longer compilation and a second copy of the layer weights while generating (bench/generate.py).
    None (the default) leaves it to the backend `policy` (default: `jaxft.backend.resolve` for JAX's backend and
    `dtype`): from 4 prompts on on CPUs, never on GPUs and TPUs (where it would hold a second copy of the weights).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling arguments: max_new_tokens={max_new_tokens} temperature={temperature} "
                         f"top_k={top_k} top_p={top_p}")
    spec = peft_method.as_method(peft if peft is not None else lora)
    trainable, spec = peft_method.resolve(spec, base, trainable)  # once here, not in every decode step
    virtual = 0 if spec is None else spec.virtual_tokens
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens + virtual > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens"
                         f"{f' + {virtual} virtual tokens' if virtual else ''} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    policy = policy or resolve_policy(None, dtype)
    if unroll is None:  # (a family without split_layers runs its scan)
        unroll = decode_unrolled(policy, len(prompts)) and hasattr(family_of(cfg), "split_layers")

    tokens, segment_ids, positions = pad_left(prompts, _bucket(longest))
    is_eos = np.zeros((cfg.vocab_size,), bool)
    is_eos[[i for i in eos_ids if 0 <= i < cfg.vocab_size]] = True
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    out = _generate(cfg, base, trainable, tokens, segment_ids, positions, np.int32(max_new_tokens), is_eos,
                    jax.random.key(seed), knobs, peft=spec, dtype=jnp.dtype(dtype), budget=_bucket(max_new_tokens),
                    unroll=unroll, policy=policy)
    return [_until_eos(row[:max_new_tokens], is_eos) for row in np.asarray(out)]


def pad_left(prompts: list[list[int]], length: int):
    """(tokens, segment_ids, positions), each (B, length) int32 numpy: prompts right-aligned, padding id 0."""
    tokens = np.zeros((len(prompts), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        tokens[row, start:] = prompt
        segment_ids[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return tokens, segment_ids, positions


def sample(logits, key, knobs):
    """logits (B, V) float32 -> next tokens (B,) int32. knobs: (temperature, top_k, top_p), traced scalars.

    Argmax when temperature is 0. Every mode is in the one compiled function: `lax.cond` runs only the one
    asked for, so that greedy decoding does not pay for the sort of top-k / top-p.
    """
    temperature, top_k, top_p = knobs

    def draw(logits):
        logits = logits / temperature
        logits = jax.lax.cond((top_k > 0) | (top_p < 1), top_k_top_p, lambda x, *_: x, logits, top_k, top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), draw, logits)


def top_k_top_p(logits, top_k, top_p):
    """logits (B, V) -> the same with -inf outside the top_k largest (0: all), then outside the smallest set of
    the rest whose softmax probability reaches top_p: transformers' TopKLogitsWarper, then TopPLogitsWarper.
    Ties with the last token kept are kept too. top_k and top_p may be traced."""
    vocab = logits.shape[-1]
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(rank < k, jnp.flip(jnp.sort(logits, axis=-1), axis=-1), -jnp.inf)  # descending
    probs = jax.nn.softmax(ranked, axis=-1)
    # A token stays while the more likely ones before it have not reached top_p: the first always stays.
    kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs < top_p) & (rank < k), axis=-1)
    threshold = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@partial(jax.jit, static_argnums=0, static_argnames=("peft", "dtype", "budget", "unroll", "policy"))
def _generate(cfg, base, trainable, tokens, segment_ids, positions, max_new, is_eos, key, knobs, *, peft, dtype,
              budget, unroll=False, policy=None):
    """The compiled part of `generate`: prefill, then the decode loop -> (B, budget) int32 new tokens.

    tokens / segment_ids / positions: (B, P) from `pad_left`; is_eos: (V,) bool. The columns past a row's EOS
    hold whatever it went on decoding, and those past `max_new` zeros: the caller truncates.
    """
    family = family_of(cfg)
    model = partial(family.forward, cfg, base, peft=peft, dtype=dtype, return_hidden=True)
    b, p = tokens.shape
    soft = 0 if not trainable or "prompt" not in trainable else trainable["prompt"]["embeddings"].shape[0]
    hidden, cache = model(tokens, trainable=trainable, positions=positions, segment_ids=segment_ids,
                          cache=family.init_cache(cfg, b, soft + p + budget, dtype))
    # A soft prompt went into the cache with the prefill: the decode steps do without it.
    decoding = trainable if not soft else {k: v for k, v in trainable.items() if k != "prompt"}
    if unroll:  # the decode steps read per-layer weights split here, once, instead of slicing the stacks
        model = partial(family.forward, cfg, family.split_layers(base), peft=peft, dtype=dtype, return_hidden=True)
        decoding = family.split_layers(decoding)
        cache = family.split_cache(cache)
    # Left padding puts every row's last prompt token in the last column: only its logits are needed.
    head = partial(family.decode_logits, cfg, base, trainable, dtype=dtype, policy=policy)
    first = sample(head(hidden[:, -1]), jax.random.fold_in(key, 0), knobs)
    lengths = jnp.sum(segment_ids, axis=1)  # positions continue from the real prompt lengths

    def cond(state):
        step, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, out, done, cache = state
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)  # (B, 1)
        hidden, cache = model(previous, trainable=decoding, positions=(lengths + step - 1)[:, None],
                              segment_ids=jnp.ones_like(previous), cache=cache)
        token = sample(head(hidden[:, 0]), jax.random.fold_in(key, step), knobs)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, out, done | is_eos[token], cache

    out = jnp.zeros((b, budget), jnp.int32).at[:, 0].set(first)
    return jax.lax.while_loop(cond, body, (jnp.int32(1), out, is_eos[first], cache))[1]


def generate_seq2seq(cfg: t5.Config, base: dict, enc_prompts: list[list[int]], *, max_new_tokens: int,
                     eos_id: int | None = None, trainable: dict | None = None, peft=None, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, dtype=jnp.float32) -> list[list[int]]:
    """The decoded tokens of each encoder input, up to `max_new_tokens`; a row stops at `eos_id` (default the
    config's), which is excluded. Greedy when `temperature` is 0, else sampled as `jaxft.generate.generate`.

    enc_prompts: B lists of token ids (non-empty, any lengths), right-padded into one batch (relative positions
    make the side irrelevant). The encoder runs once; the decoder starts from decoder_start_token_id with a KV
    cache, the cross-attention keys and values computed in its first step.
    """
    if not enc_prompts or any(len(p) == 0 for p in enc_prompts):
        raise ValueError("generate needs at least one input and no empty input")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling arguments: max_new_tokens={max_new_tokens} temperature={temperature} "
                         f"top_k={top_k} top_p={top_p}")
    if max_new_tokens == 0:
        return [[] for _ in enc_prompts]
    spec = peft_method.as_method(peft)
    trainable, spec = peft_method.resolve(spec, base, trainable)  # once here, not in every decode step
    tokens = np.zeros((len(enc_prompts), _bucket(max(len(p) for p in enc_prompts))), np.int32)
    segment_ids = np.zeros_like(tokens)
    for row, prompt in enumerate(enc_prompts):
        tokens[row, :len(prompt)] = prompt
        segment_ids[row, :len(prompt)] = 1
    is_eos = np.zeros((cfg.vocab_size,), bool)
    is_eos[cfg.eos_token_id if eos_id is None else eos_id] = True
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    out = _generate_seq2seq(cfg, base, trainable, tokens, segment_ids, np.int32(max_new_tokens), is_eos,
                            jax.random.key(seed), knobs, peft=spec, dtype=jnp.dtype(dtype),
                            budget=_bucket(max_new_tokens))
    return [_until_eos(row[:max_new_tokens], is_eos) for row in np.asarray(out)]


@partial(jax.jit, static_argnums=0, static_argnames=("peft", "dtype", "budget"))
def _generate_seq2seq(cfg, base, trainable, tokens, segment_ids, max_new, is_eos, key, knobs, *, peft, dtype,
                      budget):
    """The compiled part of `generate_seq2seq` -> (B, budget) int32 decoded tokens (past EOS / max_new: anything)."""
    params = overlay(base, trainable)
    b = tokens.shape[0]
    encoded = t5.encode(cfg, base, tokens, segment_ids=segment_ids, trainable=trainable, peft=peft, dtype=dtype)
    model = partial(t5.forward, cfg, base, None, trainable=trainable, peft=peft, dtype=dtype, return_hidden=True)
    start = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
    hidden, cache = model(start, enc_segment_ids=segment_ids, encoded=encoded,
                          cache=t5.init_cache(cfg, b, budget, dtype))
    first = sample(t5.lm_logits(cfg, params, hidden[:, -1]), jax.random.fold_in(key, 0), knobs)

    def cond(state):
        step, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, out, done, cache = state
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)  # (B, 1)
        hidden, cache = model(previous, cache=cache)
        token = sample(t5.lm_logits(cfg, params, hidden[:, 0]), jax.random.fold_in(key, step), knobs)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, out, done | is_eos[token], cache

    out = jnp.zeros((b, budget), jnp.int32).at[:, 0].set(first)
    return jax.lax.while_loop(cond, body, (jnp.int32(1), out, is_eos[first], cache))[1]


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _until_eos(row, is_eos) -> list[int]:
    for i, token in enumerate(row):
        if is_eos[token]:
            return row[:i].tolist()
    return row.tolist()
