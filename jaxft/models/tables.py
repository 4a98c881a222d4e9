"""A Hugging Face state dict <-> a jaxft parameter tree, by one mapping table, for the parts of a model that are
not a whole family directory: vision towers and connectors, read from inside a bigger checkpoint (a LLaVA or
Idefics3 file) or from their own.

The table rows are `jaxft.checkpoint.mapping.Entry` (HF name, jaxft path, transpose); a `{i}` in the HF name is one
tensor per layer, stacked on the leading L axis of the jaxft leaf. `hf_shapes` names the leaves whose HF tensor is
not a plain (out, in) matrix: a convolution kernel (D, C, p, p) is stored in jaxft as the matrix (C*p*p, D).
"""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from jaxft.models.table import Entry, LoadError, summarize
from jaxft.tree import flatten, unflatten


def expected(table: tuple[Entry, ...], shapes: dict[str, tuple], hf_shapes: dict[str, tuple] | None = None):
    """HF name (without prefix) -> (entry, layer or None, HF shape), for the paths `shapes` holds."""
    hf_shapes = hf_shapes or {}
    out = {}
    for entry in table:
        if entry.path not in shapes:
            continue
        shape = shapes[entry.path]
        layered = "{i}" in entry.hf
        one = shape[1:] if layered else shape
        hf = hf_shapes.get(entry.path, one[::-1] if entry.transpose else one)
        for i in range(shape[0]) if layered else (None,):
            out[entry.hf if i is None else entry.hf.format(i=i)] = (entry, i, tuple(hf))
    return out


def from_state_dict(table, shapes: dict[str, tuple], tensors: Mapping[str, np.ndarray], *, prefix: str = "",
                    strip: tuple[str, ...] = (), ignore: str | None = None, hf_shapes: dict | None = None,
                    source: str = "state dict", what: str = "model", dtype=jnp.float32) -> dict:
    """The parameter tree of `shapes` (jaxft path -> shape) from `tensors` (HF name -> host array).

    Only the names that start with `prefix` are read (the rest of a bigger checkpoint is left alone); after it,
    an optional leading `strip` part is dropped (`vision_model.`: checkpoints saved before transformers 5) and
    names fully matching the regex `ignore` are skipped. Raises LoadError naming `source` and every missing,
    unexpected or misshapen tensor.
    """
    wanted = expected(table, shapes, hf_shapes)
    present = {}
    for name in tensors:
        if not name.startswith(prefix):
            continue
        short = name[len(prefix):]
        for part in strip:
            short = short.removeprefix(part)
        if ignore is None or not re.fullmatch(ignore, short):
            present[short] = name
    missing = [prefix + n for n in wanted if n not in present]
    unexpected = [present[n] for n in present if n not in wanted]
    if missing or unexpected:
        parts = [f"missing tensors {summarize(missing)}"] if missing else []
        parts += [f"unexpected tensors {summarize(unexpected)}"] if unexpected else []
        raise LoadError(f"{source}: {'; '.join(parts)} (for a {what})")
    stacks: dict[str, list] = {}
    for short, (entry, layer, hf_shape) in wanted.items():
        x = np.asarray(tensors[present[short]])
        if tuple(x.shape) != hf_shape:
            raise LoadError(f"{source}: tensor {present[short]} has shape {tuple(x.shape)}, expected {hf_shape} "
                            f"from the config")
        if entry.path in (hf_shapes or {}):
            x = x.reshape(x.shape[0], -1)
        stacks.setdefault(entry.path, []).append(x.T if entry.transpose else x)
    layered = {entry.path for entry, layer, _ in wanted.values() if layer is not None}
    return unflatten({path: jnp.asarray(np.stack(xs) if path in layered else xs[0], dtype)
                      for path, xs in stacks.items()})


def to_state_dict(table, params: dict, *, prefix: str = "", hf_shapes: dict | None = None,
                  dtype=np.float32) -> dict[str, np.ndarray]:
    """The inverse of `from_state_dict`: HF name (with `prefix`) -> host array in HF layout."""
    flat = {path: np.asarray(x, dtype) for path, x in flatten(params).items()}
    shapes = {path: x.shape for path, x in flat.items()}
    wanted = expected(table, shapes, hf_shapes)
    extra = sorted(set(flat) - {entry.path for entry, _, _ in wanted.values()})
    if extra:
        raise ValueError(f"params have leaves with no HF name: {extra}")
    out = {}
    for name, (entry, layer, hf_shape) in wanted.items():
        x = flat[entry.path] if layer is None else flat[entry.path][layer]
        out[prefix + name] = np.ascontiguousarray((x.T if entry.transpose else x).reshape(hf_shape))
    return out
