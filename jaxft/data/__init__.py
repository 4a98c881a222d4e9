"""The data pipeline: files -> records -> tokens with a loss mask -> packed rows -> batches (grain).

A batch is a dict of numpy arrays, all (B, T): tokens, targets (already shifted), loss_mask, segment_ids
(0 = padding) and positions; see `jaxft.data.packing`. The tasks other than language modelling read the same
files into fixed-length examples (`jaxft.data.rows`); every training stream is `jaxft.data.pipeline.stream`.
"""

from jaxft.data.formats import FIELDS, Examples, tokenize_records
from jaxft.data.packing import BATCH_KEYS, build_rows, one_per_row, pack
from jaxft.data.pipeline import DataStats, for_training, make_dataset, make_eval_batches
from jaxft.data.sources import DataError, Record, read_records

__all__ = [
    "BATCH_KEYS", "DataError", "DataStats", "Examples", "FIELDS", "Record", "build_rows", "for_training",
    "make_dataset", "make_eval_batches", "one_per_row", "pack", "read_records", "tokenize_records",
]
