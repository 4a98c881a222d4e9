"""Examples of one row each (a text, a pair, a sentence of words), as the non-LM tasks feed them.

The task tokenizes every example into fixed-length numpy arrays {key: (N, ...)}; this module reads the columns
and the label set, holds out the evaluation part, and turns the arrays into a shuffled, resumable training
stream (grain, as `jaxft.data`) and into padded evaluation batches. As for the token rows of `jaxft.data.pipeline`
(whose stream this is), batch_size is the global batch and each process keeps its own slice of every global batch.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxft.data.pipeline import process_slice, stream as batch_stream
from jaxft.data.sources import DataError, Record, read_records

IGNORE = -100  # a label that counts nothing (padding rows, sub-word continuations), as transformers uses it


def records(path) -> list[Record]:
    """The records of `path` (JSON / JSON Lines / CSV / TSV / Parquet; see `jaxft.data.read_records`)."""
    return read_records(path)


def column(recs: list[Record], field: str, key: str) -> list[str]:
    """The stripped string values of `field` in every record; DataError naming the record and the config key
    when the field is missing or empty."""
    out = []
    for r in recs:
        value = r.fields.get(field)
        if value is None:  # a header cell with stray spaces ("sentence " before a tab) names the field too
            value = next((v for k, v in r.fields.items() if str(k).strip() == field), None)
        if value is None or str(value).strip() == "":
            raise DataError(f"{r.where}: no {field!r} field ({key}); the record has "
                            f"{', '.join(map(repr, r.fields)) or 'no fields'}")
        out.append(str(value).strip())
    return out


def label_set(declared: str, found: list[str]) -> list[str]:
    """The class names, in class-index order: `declared` (comma-separated, data.labels), or, when it is empty,
    the distinct values `found` (sorted, numerically when all are integers)."""
    if declared.strip():
        names = [x.strip() for x in declared.split(",") if x.strip()]
        if len(set(names)) != len(names):
            raise DataError(f"data.labels: {declared!r} names a label twice")
        return names
    distinct = set(found)
    if all(_is_int(x) for x in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_ids(values: list[str], wheres: list[str], names: list[str], field: str) -> np.ndarray:
    """(N,) int32 class ids of `values`; DataError naming the file and line of a value outside `names`."""
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(values), np.int32)
    for k, (v, where) in enumerate(zip(values, wheres)):
        if v not in index:
            raise DataError(f"{where}: label {v!r} ({field!r}) is not in the label set "
                            f"[{', '.join(names)}] (data.labels; empty: the labels of the training file)")
        out[k] = index[v]
    return out


def held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices of n examples: a seeded `fraction` of them held out (at least one,
    never all)."""
    if n < 2 or fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(1, round(fraction * n)), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def pad(seqs: list, length: int, value: int, dtype=np.int32) -> np.ndarray:
    """(N, length) of the sequences cut to `length` and padded with `value`."""
    out = np.full((len(seqs), length), value, dtype)
    for i, s in enumerate(seqs):
        s = list(s)[:length]
        out[i, :len(s)] = s
    return out


def pad_id(tokenizer) -> int:
    """The id padded rows hold: the tokenizer's pad token, else its EOS, else 0 (segment ids mask them anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def stream(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> grain.DatasetIterator:
    """An endless iterator of training batches (rows reshuffled every epoch, a last partial batch dropped), this
    process's slice of each global batch; get_state() / set_state() resume it exactly."""
    n = len(next(iter(arrays.values())))
    if n < batch_size:
        raise DataError(f"{n} training example(s), fewer than train.batch_size={batch_size}")
    return iter(batch_stream(n, batch_size, seed, _Take(arrays, process_slice(batch_size))))


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, fill: dict[str, int]) -> list[dict]:
    """Batches of the rows in order; the last global batch is padded with rows of `fill` values (each key's
    value: segment_ids 0 and IGNORE labels, so that they count nothing)."""
    n = len(next(iter(arrays.values())))
    part = process_slice(batch_size)
    out = []
    for start in range(0, n, batch_size):
        rows = {k: v[start:start + batch_size] for k, v in arrays.items()}
        short = batch_size - len(next(iter(rows.values())))
        if short:
            rows = {k: np.concatenate([v, np.full((short, *v.shape[1:]), fill[k], v.dtype)]) for k, v in rows.items()}
        out.append({k: v[part] for k, v in rows.items()})
    return out


def eval_settings(config) -> tuple[int, int]:
    """(eval batch size, most examples evaluated; 0 = all) from config.eval; batch size 0: train.batch_size."""
    return config.eval.batch_size or config.train.batch_size, config.eval.max_examples


def take(arrays: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in arrays.items()}


class _Take(grain.transforms.Map):
    def __init__(self, arrays: dict[str, np.ndarray], part: slice):
        self.arrays, self.part = arrays, part

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices[self.part]] for k, v in self.arrays.items()}


def _is_int(x: str) -> bool:
    try:
        int(x)
        return True
    except ValueError:
        return False
