"""From files to batches: read, tokenize, lay out in rows, then shuffle, repeat, batch and shard with grain.

Rows are laid out once, before training (after a seeded shuffle of the examples, so a row mixes examples from
all over the data), which fixes the number of steps per epoch; grain then reshuffles the rows every epoch.
`batch_size` is always the global batch: every process walks the same global order and keeps its own slice
of each global batch, so all processes take the same number of steps and together see exactly the batches
one process would.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import grain
import jax
import numpy as np

from jaxft.data import packing
from jaxft.data.formats import MAX_RECORD_BYTES, Examples, tokenize_records
from jaxft.data.sources import DataError, Record, read_records

log = logging.getLogger(__name__)
Paths = str | Path | Sequence[str | Path]


@dataclasses.dataclass(frozen=True)
class DataStats:
    records: int  # records read from the sources (for a held-out split: of the file both parts come from)
    skipped_too_long: int  # of those, records whose prompt alone fills seq_len: never trained on
    skipped_empty: int  # of those, records with nothing to predict
    skipped_oversized: int  # of those, records above jaxft.data.formats.MAX_RECORD_BYTES: never tokenized
    examples: int  # examples in this part (a long text document counts once per chunk)
    target_tokens: int  # positions with loss_mask 1 in one pass over this part
    rows: int  # rows of seq_len positions after packing (or one per example)
    fill: float  # fraction of row positions that hold an example
    batches_per_epoch: int  # global batches in one pass (training drops a last partial one, eval pads it)


def make_dataset(paths: Paths, format: str, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *,
                 pack: bool = True, fields: dict | None = None, system_prompt: str = "", chat_template: bool = True,
                 num_epochs: int | None = None, split: str = "train", text_sample_by: str = "document",
                 cache_dir: str | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[grain.IterDataset, DataStats]:
    """Training batches: a seeded, shuffled stream over `num_epochs` passes (None: endless).

    Each element is a dict of numpy arrays (b, T) with b = batch_size // process_count and T = seq_len, in the
    format of `jaxft.data.packing`. `iter(ds)` is a grain DatasetIterator: `get_state() -> dict` and
    `set_state(dict)` make a resumed run continue with the next batch (the dict is JSON; grain's orbax handler
    also takes the iterator). `split`, `text_sample_by`, `cache_dir`: see `read_records`; `fields`,
    `system_prompt`, `chat_template`: see `tokenize_records`. process_index / process_count default to JAX's.
    """
    records = _read(paths, split, text_sample_by, cache_dir)
    examples = _tokenize(records, paths, format, tokenizer, seq_len, fields, system_prompt, chat_template)
    return _train_stream(examples, len(records), seq_len, batch_size, seed, pack, num_epochs,
                         process_slice(batch_size, process_index, process_count), paths)


def make_eval_batches(paths: Paths, format: str, tokenizer, seq_len: int, batch_size: int, *, pack: bool = True,
                      fields: dict | None = None, system_prompt: str = "", chat_template: bool = True,
                      split: str = "train", text_sample_by: str = "document", cache_dir: str | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    """Evaluation batches: one deterministic pass in file order, no shuffle, as a list.

    Same batch format and process slicing as `make_dataset`; the last global batch is filled with empty rows
    (segment_ids 0, loss_mask 0), so every example counts exactly once and every batch has the same shape.
    """
    records = _read(paths, split, text_sample_by, cache_dir)
    examples = _tokenize(records, paths, format, tokenizer, seq_len, fields, system_prompt, chat_template)
    return _eval_list(examples, len(records), seq_len, batch_size, pack,
                      process_slice(batch_size, process_index, process_count))


def for_training(config, tokenizer) -> tuple[grain.DatasetIterator, list[dict[str, np.ndarray]], dict]:
    """The trainer's data, from `config.data`, `config.train` and `config.seed` (see configs/default_lora.py).

    Returns (endless iterator over training batches, with get_state / set_state; evaluation batches, at most
    train.eval_batches; {"train": DataStats, "eval": DataStats or None} as dicts). Without data.eval, a
    seeded data.eval_fraction of the training examples is held out (examples, not records, so that a single
    text document can be split too).
    """
    d, t = config.data, config.train
    fields = {"alpaca": {"instruction": d.instruction_field, "input": d.input_field, "output": d.output_field},
              "messages": {"messages": d.messages_field}, "text": {"text": d.text_field}}.get(d.format)
    tokenize = dict(format=d.format, tokenizer=tokenizer, seq_len=t.seq_len, fields=fields,
                    system_prompt=d.system_prompt, chat_template=True)
    part = process_slice(t.batch_size)
    records = _read(d.train, "train", "document", None)
    examples = _tokenize(records, d.train, **tokenize)
    eval_examples, n_eval_records = None, len(records)
    if d.eval:
        eval_records = _read(d.eval, "train", "document", None)
        eval_examples, n_eval_records = _tokenize(eval_records, d.eval, **tokenize), len(eval_records)
    elif d.eval_fraction > 0:
        order = np.random.default_rng(config.seed).permutation(len(examples))
        n = min(max(1, round(d.eval_fraction * len(examples))), len(examples) - 1)
        if n > 0:
            examples, eval_examples = examples.take(np.sort(order[n:])), examples.take(np.sort(order[:n]))
    train, train_stats = _train_stream(examples, len(records), t.seq_len, t.batch_size, config.seed, d.pack, None,
                                       part, d.train)
    stats = {"train": dataclasses.asdict(train_stats), "eval": None}
    batches = []
    if eval_examples is not None:
        batches, eval_stats = _eval_list(eval_examples, n_eval_records, t.seq_len, t.batch_size, d.pack, part)
        batches, stats["eval"] = batches[:t.eval_batches], dataclasses.asdict(eval_stats)
    return iter(train), batches, stats


def _train_stream(examples: Examples, n_records: int, seq_len: int, batch_size: int, seed: int, pack: bool,
                  num_epochs: int | None, part: slice, paths: Paths) -> tuple[grain.IterDataset, DataStats]:
    order = np.random.default_rng(seed).permutation(len(examples))
    rows = packing.pack(examples.lengths(), seq_len, order) if pack else packing.one_per_row(len(examples))
    if len(rows) < batch_size:
        raise DataError(f"{_names(paths)}: {len(rows)} row(s) of {seq_len} tokens, fewer than the batch size "
                        f"{batch_size}")
    stats = _stats(examples, n_records, rows, seq_len, len(rows) // batch_size)
    return stream(len(rows), batch_size, seed, _BuildBatch(examples, rows, seq_len, part), num_epochs), stats


def stream(n: int, batch_size: int, seed: int, build: grain.transforms.Map,
           num_epochs: int | None = None) -> grain.IterDataset:
    """The one training stream of jaxft's data: indices 0..n-1 of rows (or examples) reshuffled every epoch over
    `num_epochs` passes (None: endless), in global batches of `batch_size` (a last partial one dropped), each
    turned into arrays by `build` (global indices (batch_size,) -> this process's batch: `process_slice`).
    `iter()` of it resumes exactly through get_state() / set_state()."""
    ds = (grain.MapDataset.range(n).shuffle(seed).repeat(num_epochs).batch(batch_size, drop_remainder=True)
          .map(build))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def _eval_list(examples: Examples, n_records: int, seq_len: int, batch_size: int, pack: bool,
               part: slice) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    rows = packing.pack(examples.lengths(), seq_len) if pack else packing.one_per_row(len(examples))
    n_batches = -(-len(rows) // batch_size)
    stats = _stats(examples, n_records, rows, seq_len, n_batches)
    rows = rows + [np.zeros(0, np.int64)] * (n_batches * batch_size - len(rows))
    build = _BuildBatch(examples, rows, seq_len, part)
    return [build.map(np.arange(k * batch_size, (k + 1) * batch_size)) for k in range(n_batches)], stats


class _BuildBatch(grain.transforms.Map):
    """Global batch of row indices -> this process's slice of it, materialized."""

    def __init__(self, examples: Examples, rows: list[np.ndarray], seq_len: int, part: slice):
        self.examples, self.rows, self.seq_len, self.part = examples, rows, seq_len, part

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return packing.build_rows(self.examples, [self.rows[i] for i in indices[self.part]], self.seq_len)


def _read(paths: Paths, split: str, text_sample_by: str, cache_dir) -> list[Record]:
    return [r for p in _as_list(paths)
            for r in read_records(p, split=split, text_sample_by=text_sample_by, cache_dir=cache_dir)]


def _tokenize(records: list[Record], paths: Paths, format: str, tokenizer, seq_len: int, fields, system_prompt,
              chat_template) -> Examples:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    examples = tokenize_records(records, format, tokenizer, seq_len, fields=fields, system_prompt=system_prompt,
                                chat_template=chat_template)
    if len(examples) == 0:
        raise DataError(f"{_names(paths)}: no example left to train on ({len(records)} record(s): "
                        f"{examples.skipped_too_long} with a prompt longer than seq_len={seq_len}, "
                        f"{examples.skipped_empty} with nothing to predict, {examples.skipped_oversized} "
                        f"of more than {MAX_RECORD_BYTES} bytes)")
    return examples


def _stats(examples: Examples, n_records: int, rows: list, seq_len: int, batches: int) -> DataStats:
    stats = DataStats(records=n_records, skipped_too_long=examples.skipped_too_long,
                      skipped_empty=examples.skipped_empty, skipped_oversized=examples.skipped_oversized,
                      examples=len(examples),
                      target_tokens=examples.target_tokens(), rows=len(rows),
                      fill=float(examples.lengths().sum()) / (len(rows) * seq_len), batches_per_epoch=batches)
    log.info("data: %s", stats)
    return stats


def process_slice(batch_size: int, index: int | None = None, count: int | None = None) -> slice:
    """This process's rows of a global batch of `batch_size` (index / count default to JAX's processes)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} (global) is not divisible by process_count {count}")
    local = batch_size // count
    return slice(index * local, (index + 1) * local)


def _as_list(paths: Paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def _names(paths: Paths) -> str:
    return ", ".join(str(p) for p in _as_list(paths))
