"""Autoregressive generation over a KV cache: the prefill, then a `lax.while_loop` of decode steps, in one jit,
for every family: one loop samples, stops rows at EOS and writes the tokens; the family supplies what differs.

  prefill(cfg, base, trainable, tokens, segment_ids, positions, *, length, peft, dtype, extras)
                   -> (hidden (B, D) at the last prompt position, state): the prompt, `extras` (image
                   embeddings, ...) and, for T5, the encoder pass and the cross-attention cache
  decode_step(cfg, base, trainable, tokens (B, 1), state, *, peft, dtype) -> (hidden (B, D), state)
  decode_logits(cfg, base, trainable, hidden (B, D), dtype, policy) -> logits (B, V) float32

A decoder family that brings no prefill / decode_step runs `decoder_prefill` / `decoder_step` here, its
`forward` over the cache of its `init_cache`. Decoder prompts of different lengths share a batch by left
padding: padding slots carry segment id 0, so nothing attends to them, and each row's positions start at 0 at
its first real token, so a row decodes as it would alone (encoder inputs are padded on the right). The padded
prompt length and the new-token budget are rounded up to powers of two, so that a new prompt length or
`max_new_tokens` rarely means a new compilation; the batch size is not rounded. Greedy decoding and sampling
share the compiled function (the sampling knobs are traced).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.backend import Policy, decode_unrolled
from jaxft.backend import resolve as resolve_policy
from jaxft.models import family_of
from jaxft.peft import method as peft_method

MIN_BUCKET = 16  # smallest padded prompt length / new-token budget: a compilation per power of two above it


def generate(cfg, base: dict, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_ids=None, trainable: dict | None = None,
             peft=None, lora=None, dtype=jnp.float32, unroll: bool | None = None, policy: Policy | None = None,
             extras: dict | None = None) -> list[list[int]]:
    """The new tokens of each prompt, up to `max_new_tokens`; a row stops at its first EOS, which is excluded.

    cfg: the Config of any family of `jaxft.models` that generates (decoders; encoder-decoders such as T5,
    whose prompts are the encoder's inputs and whose decoder starts from its decoder_start_token_id).
    prompts: B lists of token ids (non-empty, any lengths). Greedy (argmax) when `temperature` is 0, otherwise
    samples softmax(logits / temperature) restricted to the `top_k` most likely tokens (0: all), then to the
    smallest set of them whose probability reaches `top_p` (nucleus); the draws depend only on `seed`, the
    prompts and the arguments. `trainable` and `peft` (the method's spec; `lora=` a bare LoraSpec) are passed
    to the family's `forward`: every fine-tuning method generates, a soft prompt or prefix included (the prefix
    stays outside the cache, the prompt goes in with the prefill); `dtype` is the compute and KV-cache dtype.
    eos_ids: the tokens that end a row (default: none for decoders, the config's eos_token_id for
    encoder-decoders). Decoding stops when every row has ended or made `max_new_tokens` tokens.
    extras: keyword arguments of the family's `forward` for the prefill only, e.g. {"pixel_values": (B, ...)}
    for a vision-language family that puts image embeddings into the prompt once; rows as the prompts'.
    `unroll` runs the decode steps' layers as an unrolled loop over per-layer weights and KV-cache buffers
    split once before decoding (the family's `split_layers`, `split_cache`), so that no step slices a weight
    out of its stack (a second copy of the layer weights while generating). None (the default) leaves it to the
    backend `policy` (default: `jaxft.backend.resolve` for JAX's backend and `dtype`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling arguments: max_new_tokens={max_new_tokens} temperature={temperature} "
                         f"top_k={top_k} top_p={top_p}")
    family = family_of(cfg)
    seq2seq = family.KIND == "encoder-decoder"
    spec = peft_method.as_method(peft if peft is not None else lora)
    trainable, spec = peft_method.resolve(spec, base, trainable)  # once here, not in every decode step
    virtual = 0 if spec is None else spec.virtual_tokens
    longest = max(len(p) for p in prompts)
    if not seq2seq and longest + max_new_tokens + virtual > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens"
                         f"{f' + {virtual} virtual tokens' if virtual else ''} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    policy = policy or resolve_policy(None, dtype)
    if unroll is None:  # (a family without split_layers runs its scan)
        unroll = decode_unrolled(policy, len(prompts)) and hasattr(family, "split_layers")
    if unroll and (hasattr(family, "decode_step") or not hasattr(family, "split_layers")):
        raise ValueError(f"unroll=True: the {cfg.model_type} family has no split_layers for `forward`'s decoding")
    if eos_ids is None:
        eos_ids = (cfg.eos_token_id,) if seq2seq else ()

    # Relative positions (T5) read the encoder's inputs from each row's start: they are padded on the right.
    tokens, segment_ids, positions = (pad_right if seq2seq else pad_left)(prompts, _bucket(longest))
    is_eos = np.zeros((cfg.vocab_size,), bool)
    is_eos[[i for i in eos_ids if 0 <= i < cfg.vocab_size]] = True
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    out = _generate(cfg, base, trainable, tokens, segment_ids, positions, extras, np.int32(max_new_tokens), is_eos,
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


def pad_right(prompts: list[list[int]], length: int):
    """(tokens, segment_ids, positions), each (B, length) int32 numpy: prompts left-aligned, padding id 0."""
    tokens = np.zeros((len(prompts), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
        segment_ids[row, :len(prompt)] = 1
    return tokens, segment_ids, np.where(segment_ids > 0, np.arange(length, dtype=np.int32), 0)


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
def _generate(cfg, base, trainable, tokens, segment_ids, positions, extras, max_new, is_eos, key, knobs, *, peft,
              dtype, budget, unroll=False, policy=None):
    """The compiled part of `generate`: the family's prefill, then the decode loop -> (B, budget) int32 new tokens.

    tokens / segment_ids / positions: (B, P) from `pad_left` / `pad_right`; is_eos: (V,) bool. The columns past a
    row's EOS hold whatever it went on decoding, and those past `max_new` zeros: the caller truncates.
    """
    family = family_of(cfg)
    prefill = getattr(family, "prefill", decoder_prefill)
    step = getattr(family, "decode_step", decoder_step)
    hidden, state = prefill(cfg, base, trainable, tokens, segment_ids, positions, length=budget, peft=peft,
                            dtype=dtype, extras=extras)
    step_base, step_trainable = base, trainable
    if unroll:  # the decode steps read per-layer weights split here, once, instead of slicing the stacks
        step_base, step_trainable = family.split_layers(base), family.split_layers(trainable)
        state = {**state, "cache": family.split_cache(state["cache"])}
    step = partial(step, cfg, step_base, step_trainable, peft=peft, dtype=dtype)
    head = partial(family.decode_logits, cfg, base, trainable, dtype=dtype, policy=policy)
    first = sample(head(hidden), jax.random.fold_in(key, 0), knobs)

    def cond(carry):
        i, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, out, done, state = carry
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # (B, 1)
        hidden, state = step(previous, state)
        token = sample(head(hidden), jax.random.fold_in(key, i), knobs)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, out, done | is_eos[token], state

    out = jnp.zeros((tokens.shape[0], budget), jnp.int32).at[:, 0].set(first)
    return jax.lax.while_loop(cond, body, (jnp.int32(1), out, is_eos[first], state))[1]


def decoder_prefill(cfg, base, trainable, tokens, segment_ids, positions, *, length, peft=None, dtype=jnp.float32,
                    extras=None):
    """The prefill of a decoder family that brings no `prefill` of its own: its `forward` over the left-padded
    prompts (B, P), `extras` passed along, into a fresh cache (`init_cache`) with room for a soft prompt, the P
    prompt and `length` new tokens -> (hidden (B, D) at the last prompt position, state for `decoder_step`)."""
    family = family_of(cfg)
    b, p = tokens.shape
    soft = 0 if not trainable or "prompt" not in trainable else trainable["prompt"]["embeddings"].shape[0]
    hidden, cache = family.forward(cfg, base, tokens, trainable=trainable, positions=positions,
                                   segment_ids=segment_ids, peft=peft, dtype=dtype, return_hidden=True,
                                   cache=family.init_cache(cfg, b, soft + p + length, dtype), **(extras or {}))
    # Left padding puts every row's last prompt token in the last column; positions go on from the prompt lengths.
    return hidden[:, -1], {"cache": cache, "positions": jnp.sum(segment_ids, axis=1).astype(jnp.int32)}


def decoder_step(cfg, base, trainable, tokens, state, *, peft=None, dtype=jnp.float32):
    """One decoding step of a decoder family through its `forward` over the cache: tokens (B, 1) -> (hidden (B, D),
    state). A soft prompt went into the cache with the prefill: the steps do without it."""
    if trainable and "prompt" in trainable:
        trainable = {k: v for k, v in trainable.items() if k != "prompt"}
    positions = state["positions"][:, None]
    hidden, cache = family_of(cfg).forward(cfg, base, tokens, trainable=trainable, positions=positions,
                                           segment_ids=jnp.ones_like(tokens), cache=state["cache"], peft=peft,
                                           dtype=dtype, return_hidden=True)
    return hidden[:, 0], {"cache": cache, "positions": state["positions"] + 1}


def stop_ids(tokenizer, chat_template: bool) -> list[int]:
    """The ids that end an answer (`generate`'s eos_ids) for a transformers tokenizer: EOS, and under a chat
    template the special token that closes an assistant turn (ChatML's <|im_end|>), which is where a trained
    model's answer ends."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat_template and getattr(tokenizer, "chat_template", None) is not None:
        marker = "Xq7 answer"
        user = [{"role": "user", "content": "question"}]
        start = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": marker}], tokenize=False)
        if full.startswith(start + marker):
            after = tokenizer(full[len(start) + len(marker):], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                        if t.special}
            if after and after[0] in special and after[0] not in stop:
                stop.append(after[0])
    return stop


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _until_eos(row, is_eos) -> list[int]:
    for i, token in enumerate(row):
        if is_eos[token]:
            return row[:i].tolist()
    return row.tolist()
