"""Sequence to sequence (summarization, translation): the loss on the target given the source, and evaluation by
generating targets and scoring them (ROUGE, BLEU / chrF) besides the loss and perplexity.

Records come from one file with a source and a target column (data.source_field, data.target_field: JSON
Lines, CSV, ...), or from two line-aligned text files (data.train and data.train_target, e.g. Multi30k's
train.en and train.de; data.eval and data.eval_target likewise). Without data.eval, a seeded data.eval_fraction
of the training records is held out: records, not examples, since generation needs each one's reference.

Decoder-only models (the default model): the prompt (data.prompt_template, its "{source}" replaced by the
source) and the target are one sequence, under the chat template (one user turn, one assistant turn) or, with
data.chat_template False, the prompt followed directly by the target; the loss counts the target and what ends
it (EOS; the end-of-turn tokens of a chat template). Tokenized and packed by `jaxft.data` (format "seq2seq"),
so the batches are those of causal LM training.

Encoder-decoder models (T5): the prompt goes to the encoder and the target to the decoder, one example per row
(no packing), both cut to train.seq_len tokens and ended by EOS. Batch keys, all (B, T) int32 but loss_mask:
  tokens, segment_ids          the encoder's input and its mask (0 = padding)
  dec_tokens, dec_segment_ids  the decoder's input: the targets shifted right behind decoder_start_token_id
  targets, loss_mask           the target ids (padding 0) and 1.0 where a target counts
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxft import generate as gen
from jaxft.generate import stop_ids
from jaxft import metrics as metric_lib
from jaxft.data import DataError, packing, read_records, tokenize_records
from jaxft.data.formats import field_names, prompt_ids, seq2seq_texts
from jaxft.data.sources import read_parallel
from jaxft.data import rows
from jaxft.tasks import Eval, Model, TaskError, causal_lm, evaluate_batches

log = logging.getLogger(__name__)

KINDS = ("decoder", "encoder-decoder")
METRICS = ("rouge", "bleu")  # eval.metrics: rouge -> ROUGE-1/2/L P/R/F1; bleu -> BLEU and chrF (sacrebleu)
_T5_KEYS = ("tokens", "segment_ids", "dec_tokens", "dec_segment_ids", "targets", "loss_mask")


def batches(config, tokenizer) -> tuple:
    """(endless training iterator, evaluation batches, info) as the task interface (`jaxft.tasks`) describes;
    the layout depends on the kind of config.model (module docstring)."""
    metric_names(config)  # a misspelt eval.metrics fails now, not at the first evaluation
    train, held = split(config)
    kind, start_id = _model_kind(config)
    t = config.train
    if kind == "encoder-decoder":
        arrays, stats = t5_arrays(train, config, tokenizer, start_id)
        eval_arrays, eval_stats = t5_arrays(held, config, tokenizer, start_id) if held else ({}, None)
    else:
        arrays, stats = decoder_arrays(train, config, tokenizer, config.data.train)
        eval_arrays, eval_stats = (decoder_arrays(held, config, tokenizer, config.data.eval or config.data.train)
                                   if held else ({}, None))
    # Rows of train.batch_size, as in training: a batch's logits take as much memory as there.
    eval_list = rows.eval_batches(eval_arrays, t.batch_size, {k: 0 for k in eval_arrays}) if eval_arrays else []
    info = {"kind": kind, "train": stats, "eval": eval_stats}
    log.info("seq2seq data: %s", info)
    return rows.stream(arrays, t.batch_size, config.seed), eval_list, info


def init_head(key, cfg, config, n_labels):
    """No head: the model's own output layer predicts the target."""
    return None


def forward(model: Model, base: dict, trainable: dict | None, batch: dict, rng=None):
    """Logits (B, T, V) float32 over the target positions (with model.loss_chunk, `causal_lm.HeadInputs`): the
    decoder-only model over prompt + target rows, as causal LM, or T5 over the encoder tokens and the shifted
    targets."""
    f = model.family
    if f.KIND != "encoder-decoder":
        return causal_lm.forward(model, base, trainable, batch, rng)
    out, _ = f.forward(model.cfg, base, batch["tokens"], batch["dec_tokens"], enc_segment_ids=batch["segment_ids"],
                       dec_segment_ids=batch["dec_segment_ids"], trainable=trainable, peft=model.spec, rng=rng,
                       dtype=model.dtype or jnp.float32, layout=model.layout, unroll=model.unroll,
                       remat=model.remat, return_hidden=bool(model.loss_chunk))
    return causal_lm.head_inputs(model, base, trainable, out) if model.loss_chunk else out


def loss(out, batch) -> tuple:
    """(sum of the token cross-entropy where loss_mask is 1, number of such tokens), as causal LM's; positions
    outside the mask count nothing even where their logits are not finite (all-padding rows)."""
    return causal_lm.loss(out, batch)


def predict(out, batch) -> dict:
    """Nothing per batch: the generation metrics come from `evaluate`, which generates."""
    return {}


def evaluate(ev: Eval) -> dict[str, float]:
    """loss and perplexity over ev.batches, then the eval.metrics (ROUGE, BLEU / chrF) of generated targets
    against the references of the held-out records (at most eval.max_examples)."""
    mean_loss, _ = evaluate_batches(ev)
    results = {"loss": mean_loss, "perplexity": metric_lib.perplexity(mean_loss)}
    if ev.model is None or ev.tokenizer is None or not metric_names(ev.config):  # nothing to generate for
        return results
    _, held = split(ev.config)
    _, max_examples = rows.eval_settings(ev.config)
    held = held[:max_examples] if max_examples else held
    if not held:
        return results
    prompts, refs = texts(held, ev.config)
    preds = generate_texts(ev.model, ev.base, ev.trainable, ev.tokenizer, ev.config, prompts)
    return {**results, **score(preds, refs, ev.config)}


# ---- records ----------------------------------------------------------------------------------------------

def read(config, which: str) -> list:
    """The records of data.train or data.eval (`which`): one file with source and target fields, or the lines
    of a file and of its data.<which>_target twin."""
    d = config.data
    path, target = d[which], d[f"{which}_target"]
    if target:
        return read_parallel(path, target, keys=(d.source_field, d.target_field))
    return read_records(path)


def split(config) -> tuple[list, list]:
    """(training records, held-out records): data.eval's records, or a seeded data.eval_fraction of
    data.train's (by config.seed); both in file order. The last split is kept: evaluation asks again."""
    d = config.data
    files = [f for f in (d.train, d.train_target, d.eval, d.eval_target) if f]
    key = (*files, *(_mtime(f) for f in files), d.source_field, d.target_field, float(d.eval_fraction), config.seed)
    if key not in _SPLIT:
        train = read(config, "train")
        if d.eval:
            held = read(config, "eval")
        else:
            kept, held_out = rows.held_out(len(train), float(d.eval_fraction), config.seed)
            train, held = [train[i] for i in kept], [train[i] for i in held_out]
        _SPLIT.clear()
        _SPLIT[key] = train, held
    return _SPLIT[key]


_SPLIT: dict = {}  # the records of the last split, by its settings


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:  # not a file (a cached data set's name): read_records says what is wrong
        return 0


def texts(records: list, config) -> tuple[list[str], list[str]]:
    """(prompts, targets) of `records`: data.prompt_template around each source, and the references."""
    names = _names(config)
    pairs = [seq2seq_texts(r, names, config.data.prompt_template) for r in records]
    return [p for p, _ in pairs], [t for _, t in pairs]


def _names(config) -> dict:
    return field_names("seq2seq", {"source": config.data.source_field, "target": config.data.target_field})


# ---- batches ----------------------------------------------------------------------------------------------

def decoder_arrays(records: list, config, tokenizer, name: str = "") -> tuple[dict, dict]:
    """All rows of `records` for a decoder-only model, as `jaxft.data.packing` builds them ((N, T) arrays:
    tokens, targets, loss_mask, segment_ids, positions), packed unless data.pack is False; and their stats.
    `name` (the file) is for the error when no record fits in train.seq_len."""
    d, seq_len = config.data, config.train.seq_len
    examples = tokenize_records(records, "seq2seq", tokenizer, seq_len, fields=_names(config),
                                system_prompt=d.system_prompt, chat_template=d.chat_template,
                                prompt_template=d.prompt_template)
    if len(examples) == 0:
        raise DataError(f"{name or d.train}: no example left ({len(records)} record(s): "
                        f"{examples.skipped_too_long} with a prompt longer than train.seq_len={seq_len})")
    order = np.random.default_rng(config.seed).permutation(len(examples))
    layout = packing.pack(examples.lengths(), seq_len, order) if d.pack else packing.one_per_row(len(examples))
    arrays = packing.build_rows(examples, layout, seq_len)
    stats = {"records": len(records), "examples": len(examples), "skipped_too_long": examples.skipped_too_long,
             "target_tokens": examples.target_tokens(), "rows": len(layout),
             "fill": float(examples.lengths().sum()) / (len(layout) * seq_len)}
    return arrays, stats


def t5_arrays(records: list, config, tokenizer, start_id: int) -> tuple[dict, dict]:
    """(N, T) arrays of `records` for an encoder-decoder model (module docstring: one example per row, cut to
    train.seq_len tokens, the last kept one EOS), and their stats."""
    seq_len = config.train.seq_len
    prompts, targets = texts(records, config)
    enc, cut_sources = encode(prompts, tokenizer, seq_len)
    dec, cut_targets = encode(targets, tokenizer, seq_len)
    out = {"tokens": rows.pad(enc, seq_len, 0), "targets": rows.pad(dec, seq_len, 0)}
    out["segment_ids"] = rows.pad([[1] * len(e) for e in enc], seq_len, 0)
    out["dec_segment_ids"] = rows.pad([[1] * len(t) for t in dec], seq_len, 0)
    out["loss_mask"] = out["dec_segment_ids"].astype(np.float32)
    out["dec_tokens"] = shift_right(out["targets"], start_id)
    stats = {"records": len(records), "examples": len(records), "target_tokens": int(out["loss_mask"].sum()),
             "cut_sources": cut_sources, "cut_targets": cut_targets}
    return {k: out[k] for k in _T5_KEYS}, stats


def encode(strings: list[str], tokenizer, max_len: int) -> tuple[list[list[int]], int]:
    """(token ids of each string with the tokenizer's special tokens, ending with EOS (appended where the
    tokenizer does not add it), cut to max_len tokens keeping EOS last as transformers' truncation does;
    how many were cut)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    out, cut = [], 0
    for ids in tokenizer(list(strings), add_special_tokens=True)["input_ids"] if strings else []:
        ids = ids if ids and ids[-1] == eos else ids + [eos]
        if len(ids) > max_len:
            ids, cut = ids[:max_len - 1] + [eos], cut + 1
        out.append(ids)
    return out, cut


def shift_right(targets: np.ndarray, start_id: int) -> np.ndarray:
    """(B, T) decoder inputs: start_id, then each row's targets but the last (transformers' T5 shift_right
    for labels without -100; padding 0 stays 0)."""
    out = np.empty_like(targets)
    out[:, 0] = start_id
    out[:, 1:] = targets[:, :-1]
    return out


def _model_kind(config) -> tuple[str, int]:
    """("decoder" | "encoder-decoder", decoder_start_token_id) of config.model, from its config.json (a .gguf
    file or 'default' is a decoder): the batches' layout depends on it."""
    from jaxft.checkpoint import hf
    from jaxft.models import family_of

    path = Path(str(config.model)).expanduser()
    if not (path / "config.json").is_file():
        return "decoder", 0
    cfg = hf.read_config(path)
    kind = family_of(cfg).KIND
    if kind not in KINDS:
        raise TaskError(f"model {config.model}: a {kind} model cannot run task 'seq2seq', which needs "
                        f"{' or '.join(KINDS)} models")
    return kind, int(getattr(cfg, "decoder_start_token_id", 0))


# ---- generation and scores ----------------------------------------------------------------------------------

def generate_texts(model: Model, base: dict, trainable, tokenizer, config, prompts: list[str]) -> list[str]:
    """The generated target of each prompt (decoded, special tokens dropped, stripped): batches of
    eval.batch_size, greedy or sampled (eval.temperature, eval.top_k, eval.top_p; seed config.seed + batch)."""
    e = config.eval
    batch_size, _ = rows.eval_settings(config)
    dtype = model.dtype or jnp.float32
    if model.family.KIND == "encoder-decoder":
        ids, _ = encode(prompts, tokenizer, config.train.seq_len)
        stop = [tokenizer.eos_token_id]
    else:
        d = config.data
        ids = [prompt_ids(p, tokenizer, system_prompt=d.system_prompt, chat_template=d.chat_template)
               for p in prompts]
        virtual = getattr(model.spec, "virtual_tokens", 0) or 0
        room = model.cfg.max_seq_len - e.generate_max_new_tokens - virtual
        if room < 1:
            raise TaskError(f"eval.generate_max_new_tokens={e.generate_max_new_tokens} leaves no room for a "
                            f"prompt in the model's max_seq_len={model.cfg.max_seq_len}")
        cut = sum(len(x) > room for x in ids)
        if cut:
            log.warning("%d prompt(s) longer than %d tokens keep only their last %d", cut, room, room)
        ids = [x[-room:] for x in ids]
        stop = stop_ids(tokenizer, d.chat_template)

    def run(chunk, seed):
        return gen.generate(model.cfg, base, chunk, max_new_tokens=e.generate_max_new_tokens, temperature=e.temperature,
                            top_k=e.top_k, top_p=e.top_p, seed=seed, eos_ids=stop, trainable=trainable,
                            peft=model.spec, dtype=dtype)
    # Longest first: prompts of similar lengths share a batch, so less padding and fewer compiled shapes.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [None] * len(ids)
    for k, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        for i, new in zip(chunk, run([ids[i] for i in chunk], config.seed + k)):
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


def metric_names(config) -> list[str]:
    """The names in eval.metrics (comma-separated: rouge, bleu; empty: no generation, loss and perplexity
    only); ValueError naming an unknown one."""
    names = [m.strip().lower() for m in config.eval.metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"eval.metrics: {', '.join(unknown)} not among {', '.join(METRICS)} "
                         "(comma-separated, e.g. 'rouge,bleu')")
    return names


def score(preds: list[str], refs: list[str], config) -> dict[str, float]:
    """The eval.metrics of `preds` against `refs` (`jaxft.metrics`), one dict."""
    out = {}
    for name in metric_names(config):
        out.update(metric_lib.rouge(preds, refs) if name == "rouge" else metric_lib.bleu_chrf(preds, refs))
    return out

