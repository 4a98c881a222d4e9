"""Image + text examples laid out in rows (packed or one per row) and batched with their images.

A batch is `jaxft.data.packing`'s (B, T) arrays (tokens, targets, loss_mask, segment_ids, positions) plus

  pixel_values  (M, C, H, W) float32  the images of the batch in the order of their image tokens (row by row,
                                      example by example: the order `connectors.merge_images` takes them in)
  image_mask    (M,) bool             False for the padding images that fill the batch up to M

M is static (one compilation): by default the most images any B rows of the layout can hold together. With
gradient accumulation over A micro-batches (`micro=A`), the images come in A equal groups of M / A, the k-th
group those of the k-th B / A rows (padded to M / A), so that splitting every array into A parts along its first
axis splits the images with their rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import numpy as np

from jaxft.data import packing
from jaxft.data.images import MAX_PIXELS, image_processor, open_image, pixel_shape, pixel_values
from jaxft.data.sources import DataError
from jaxft.data.vlm import MARKER, VlmExamples, image_expansion, marker_id, read_vlm, tokenize_vlm


def layout(vex: VlmExamples, seq_len: int, pack: bool = True, order: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows of example indices: best-fit packed (`packing.pack`, in `order`) or one example per row."""
    lengths = vex.examples.lengths()
    return packing.pack(lengths, seq_len, order) if pack else packing.one_per_row(len(lengths))


def max_images(vex: VlmExamples, rows: list[np.ndarray], batch_size: int) -> int:
    """The most images `batch_size` rows of `rows` hold together (at least 1): a static M for every batch."""
    per_row = sorted((sum(vex.pixel_count(e) for e in row) for row in rows), reverse=True)
    return max(1, sum(per_row[:batch_size]))


def build_batch(vex: VlmExamples, rows: list[np.ndarray], seq_len: int, n_images: int, processor,
                max_pixels: int = MAX_PIXELS, micro: int = 1) -> dict[str, np.ndarray]:
    """The batch (module docstring) of `rows`, with M = n_images in `micro` groups. Raises DataError when a
    group's rows hold more than M / micro images."""
    out = packing.build_rows(vex.examples, rows, seq_len)
    per, size = len(rows) // micro, n_images // micro
    out["pixel_values"] = np.zeros((n_images, *pixel_shape(processor)), np.float32)
    out["image_mask"] = np.zeros(n_images, bool)
    for g in range(micro):
        paths: list[Path] = [p for row in rows[g * per:(g + 1) * per] for e in row for p in vex.images[e]]
        pixels = pixel_values(processor, [open_image(p, max_pixels) for p in paths])  # (Idefics3: the tiles)
        if len(pixels) > size:
            raise DataError(f"a batch holds {len(pixels)} images, more than its static maximum {size}")
        out["pixel_values"][g * size:g * size + len(pixels)] = pixels
        out["image_mask"][g * size:g * size + len(pixels)] = True
    return out


def train_stream(vex: VlmExamples, processor, seq_len: int, batch_size: int, seed: int = 0, *, pack: bool = True,
                 num_epochs: int | None = None, n_images: int | None = None,
                 micro: int = 1) -> tuple[grain.IterDataset, int]:
    """A seeded, shuffled stream of batches over `num_epochs` passes (None: endless), rows laid out once after
    a seeded shuffle of the examples (as `jaxft.data.make_dataset`), the images in `micro` groups (gradient
    accumulation; module docstring); returns it and M."""
    order = np.random.default_rng(seed).permutation(len(vex))
    rows = layout(vex, seq_len, pack, order)
    if len(rows) < batch_size:
        raise DataError(f"{len(rows)} row(s) of {seq_len} tokens, fewer than the batch size {batch_size}")
    m = n_images or micro * max_images(vex, rows, batch_size // micro)
    ds = (grain.MapDataset.range(len(rows)).shuffle(seed).repeat(num_epochs).batch(batch_size, drop_remainder=True)
          .map(_Build(vex, rows, seq_len, m, processor, micro)))
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

    def __init__(self, vex: VlmExamples, rows: list[np.ndarray], seq_len: int, n_images: int, processor,
                 micro: int = 1):
        self.vex, self.rows, self.seq_len, self.n_images, self.processor = vex, rows, seq_len, n_images, processor
        self.micro = micro

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return build_batch(self.vex, [self.rows[i] for i in indices], self.seq_len, self.n_images, self.processor,
                           micro=self.micro)


def is_vision_language(model) -> bool:
    """Whether config.model is a vision-language model directory (its config.json names a vision_config)."""
    file = Path(str(model)).expanduser() / "config.json"
    if not file.is_file():
        return False
    try:
        return isinstance(json.loads(file.read_text()).get("vision_config"), dict)
    except (ValueError, UnicodeDecodeError):
        return False  # (the loader names the file)


def for_training(config, tokenizer) -> tuple:
    """The causal_lm task's data for a vision-language model: (endless training iterator with get_state /
    set_state, at most train.eval_batches evaluation batches, stats), from the LLaVA JSON / messages files of
    data.train (and data.eval, else a seeded data.eval_fraction of the examples), the images preprocessed by
    the model directory's own image processor (preprocessor_config.json) and each marker expanded to the
    model's image token count. Raises DataError naming the file or key that cannot be used."""
    d, t = config.data, config.train
    model = Path(str(config.model)).expanduser()
    hf = json.loads((model / "config.json").read_text())
    settings = model / "preprocessor_config.json"
    if not settings.is_file():
        raise DataError(f"{settings}: not found (the model's image processor settings)")
    processor = image_processor(json.loads(settings.read_text()), str(settings))
    image_id = hf.get("image_token_index", hf.get("image_token_id"))
    if marker_id(tokenizer) != image_id:
        raise DataError(f"{model}: the tokenizer's {MARKER!r} is token {marker_id(tokenizer)}, the model's image "
                        f"token is {image_id}")
    tokenize = dict(tokenizer=tokenizer, seq_len=t.seq_len, image_tokens=image_expansion(hf, tokenizer, processor),
                    system_prompt=d.system_prompt)
    train = tokenize_vlm(read_vlm(d.train), **tokenize)
    held_out = tokenize_vlm(read_vlm(d.eval), **tokenize) if d.eval else None
    if held_out is None and d.eval_fraction > 0 and len(train) > 1:
        order = np.random.default_rng(config.seed).permutation(len(train))
        n = min(max(1, round(d.eval_fraction * len(train))), len(train) - 1)
        train, held_out = subset(train, np.sort(order[n:])), subset(train, np.sort(order[:n]))
    stream, m = train_stream(train, processor, t.seq_len, t.batch_size, config.seed, pack=d.pack,
                             micro=t.grad_accum)
    batches = [] if held_out is None else eval_batches(held_out, processor, t.seq_len, t.batch_size,
                                                       pack=d.pack)[:t.eval_batches]
    stats = {"train": {"examples": len(train), "images_per_batch": m, "skipped_images": train.skipped_images,
                       "skipped_too_long": train.skipped_too_long},
             "eval": None if held_out is None else {"examples": len(held_out), "batches": len(batches)}}
    return iter(stream), batches, stats


def subset(vex: VlmExamples, index: np.ndarray) -> VlmExamples:
    """The examples at `index`, in that order (the skipped counts kept)."""
    return dataclasses.replace(vex, examples=vex.examples.take(index), images=[vex.images[e] for e in index],
                               tiles=None if vex.tiles is None else [vex.tiles[e] for e in index])
