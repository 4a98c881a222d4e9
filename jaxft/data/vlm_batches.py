"""Image + text examples laid out in rows (packed or one per row) and batched with their images.

A batch is `jaxft.data.packing`'s (B, T) arrays (tokens, targets, loss_mask, segment_ids, positions) plus

  pixel_values  (M, C, H, W) float32  the images of the batch in the order of their image tokens (row by row,
                                      example by example: the order `connectors.merge_images` takes them in)
  image_mask    (M,) bool             False for the padding images that fill the batch up to M

M is static (one compilation): by default the most images any B rows of the layout can hold together.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from jaxft.data import packing
from jaxft.data.images import MAX_PIXELS, open_image, pixel_shape, pixel_values
from jaxft.data.sources import DataError
from jaxft.data.vlm import VlmExamples


def layout(vex: VlmExamples, seq_len: int, pack: bool = True, order: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows of example indices: best-fit packed (`packing.pack`, in `order`) or one example per row."""
    lengths = vex.examples.lengths()
    return packing.pack(lengths, seq_len, order) if pack else packing.one_per_row(len(lengths))


def max_images(vex: VlmExamples, rows: list[np.ndarray], batch_size: int) -> int:
    """The most images `batch_size` rows of `rows` hold together (at least 1): a static M for every batch."""
    per_row = sorted((sum(len(vex.images[e]) for e in row) for row in rows), reverse=True)
    return max(1, sum(per_row[:batch_size]))


def build_batch(vex: VlmExamples, rows: list[np.ndarray], seq_len: int, n_images: int, processor,
                max_pixels: int = MAX_PIXELS) -> dict[str, np.ndarray]:
    """The batch (module docstring) of `rows`, with M = n_images. Raises DataError when the rows hold more."""
    out = packing.build_rows(vex.examples, rows, seq_len)
    paths: list[Path] = [p for row in rows for e in row for p in vex.images[e]]
    if len(paths) > n_images:
        raise DataError(f"a batch holds {len(paths)} images, more than its static maximum {n_images}")
    pixels = pixel_values(processor, [open_image(p, max_pixels) for p in paths])
    out["pixel_values"] = np.zeros((n_images, *pixel_shape(processor)), np.float32)
    out["pixel_values"][:len(paths)] = pixels
    out["image_mask"] = np.arange(n_images) < len(paths)
    return out


def train_stream(vex: VlmExamples, processor, seq_len: int, batch_size: int, seed: int = 0, *, pack: bool = True,
                 num_epochs: int | None = None, n_images: int | None = None) -> tuple[grain.IterDataset, int]:
    """A seeded, shuffled stream of batches over `num_epochs` passes (None: endless), rows laid out once after
    a seeded shuffle of the examples (as `jaxft.data.make_dataset`); returns it and M."""
    order = np.random.default_rng(seed).permutation(len(vex))
    rows = layout(vex, seq_len, pack, order)
    if len(rows) < batch_size:
        raise DataError(f"{len(rows)} row(s) of {seq_len} tokens, fewer than the batch size {batch_size}")
    m = n_images or max_images(vex, rows, batch_size)
    ds = (grain.MapDataset.range(len(rows)).shuffle(seed).repeat(num_epochs).batch(batch_size, drop_remainder=True)
          .map(_Build(vex, rows, seq_len, m, processor)))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)), m


def eval_batches(vex: VlmExamples, processor, seq_len: int, batch_size: int, *, pack: bool = True,
                 n_images: int | None = None) -> list[dict[str, np.ndarray]]:
    """One pass in file order; the last batch is filled with empty rows (no loss, no images)."""
    rows = layout(vex, seq_len, pack)
    m = n_images or max_images(vex, rows, batch_size)
    rows = rows + [np.zeros(0, np.int64)] * (-len(rows) % batch_size)
    return [build_batch(vex, rows[k:k + batch_size], seq_len, m, processor) for k in range(0, len(rows), batch_size)]


class _Build(grain.transforms.Map):
    """Batch of row indices -> the batch, materialized (images read and preprocessed here)."""

    def __init__(self, vex: VlmExamples, rows: list[np.ndarray], seq_len: int, n_images: int, processor):
        self.vex, self.rows, self.seq_len, self.n_images, self.processor = vex, rows, seq_len, n_images, processor

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return build_batch(self.vex, [self.rows[i] for i in indices], self.seq_len, self.n_images, self.processor)
