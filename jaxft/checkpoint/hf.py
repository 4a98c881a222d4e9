"""Hugging Face model directories: `config.json` + safetensors (one file, or shards with an index), both ways.

Tensors are memory-mapped and read one at a time, never through a PyTorch model. The safetensors header is
parsed here rather than with `safe_open(framework="numpy")`, which cannot return bfloat16 (the dtype of most
published checkpoints); ml_dtypes gives numpy a bfloat16, and a memory map copies nothing until a stacked
leaf is assembled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxft.checkpoint import experts
from jaxft.checkpoint.assemble import LeafFn, LoadError, assemble, hf_names, hf_tensors
from jaxft.models import config_from_hf, family_of
from jaxft.models.config import ConfigError
from jaxft.tree import flatten

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_config(path: Path):
    """The model config of the directory `path`, from its config.json."""
    file = path / "config.json"
    if not file.is_file():
        raise LoadError(f"{file}: not found (a Hugging Face model directory has a config.json)")
    try:
        hf = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise LoadError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    try:
        cfg = config_from_hf(hf, source=str(file))
    except ConfigError as e:
        raise LoadError(str(e)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a field of the wrong form
        raise LoadError(f"{file}: {type(e).__name__}: {e}") from None
    experts.check_routing(cfg, str(file), experts.count_key(cfg))
    return cfg


def load(path: Path, *, dtype=jnp.float32, leaf_fn: LeafFn | None = None) -> tuple[object, dict, object]:
    """(config, params, tokenizer or None) of the Hugging Face model directory `path`; see `assemble` for
    `leaf_fn`."""
    cfg = read_config(path)
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                names = [n for n, s in weight_map.items() if s == shard]
                raise LoadError(f"{path / shard}: shard not found (listed in {INDEX} for {len(names)} tensors, "
                                f"e.g. {names[0]})")
        files = {shard: _Safetensors(path / shard) for shard in set(weight_map.values())}
    elif (path / SINGLE).is_file():
        files = {SINGLE: _Safetensors(path / SINGLE)}
        weight_map = {name: SINGLE for name in files[SINGLE].header}
    else:
        raise LoadError(f"{path}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
    where = str(path / SINGLE) if len(files) == 1 else str(path)
    present = {name: name for name in weight_map}
    names = getattr(family_of(cfg), "checkpoint_names", None)  # families whose tensors complete the config
    if names is not None:
        cfg, present = names(cfg, list(weight_map))
    shapes = {name: files[shard].header.get(name, {}).get("shape", ()) for name, shard in weight_map.items()}
    experts.check_count(cfg, str(path / "config.json"), experts.count_key(cfg), shapes, where)
    read = lambda name: files[weight_map[name]].read(name)
    view = getattr(family_of(cfg), "checkpoint_view", None)  # families storing tensors as TABLE does not name them
    if view is not None:
        present, read = view(cfg, present, read)
    params = assemble(cfg, present, read, file=where, dtype=dtype, leaf_fn=leaf_fn)
    return cfg, params, tokenizer(path)


def tokenizer(path: Path):
    """The tokenizer saved in the directory, or None where there is none (e.g. a bare weights export)."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def save_hf(cfg, params: dict, out_dir, *, dtype=jnp.bfloat16, max_shard_bytes: int = 5 * 2**30,
            tokenizer=None, overwrite: bool = False) -> Path:
    """Writes `params` as a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads.

    config.json (`cfg.to_hf()`) and model.safetensors, or model-0000k-of-0000n.safetensors shards with an
    index when the tensors pass `max_shard_bytes`; the tokenizer too when given. Quantized leaves are written
    dequantized. The directory is written beside `out_dir` and renamed into place at the end, so that no
    partial directory is left; an existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace it)")
    flat = flatten(params)
    dtype = np.dtype(jnp.dtype(dtype))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf = dict(cfg.to_hf(), dtype=str(dtype))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        _write_tensors(cfg, flat, tmp, dtype, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_tensors(cfg, flat: dict, out: Path, dtype, max_shard_bytes: int) -> None:
    plan = [(name, shape) for name, (_, _, shape) in hf_names(cfg).items()]
    tensors = hf_tensors(cfg, flat, dtype)
    view = getattr(family_of(cfg), "export_view", None)  # the inverse of its checkpoint_view (mixtures of experts)
    if view is not None:
        plan, tensors = view(cfg, plan, tensors)
    write_shards(out, plan, tensors, dtype, max_shard_bytes)


def write_shards(out: Path, plan: list, tensors, dtype, max_shard_bytes: int) -> int:
    """Writes `tensors` ((name, array) in `plan`'s order) into `out` as model.safetensors, or as shards of at
    most `max_shard_bytes` with their index; returns the bytes written. The shards are planned from `plan`'s
    (name, shape) alone, so that each shard's arrays are materialized only while it is written."""
    shards, current, used = [], [], 0
    for name, shape in plan:
        size = math.prod(shape) * dtype.itemsize
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    files = [SINGLE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for k in range(len(shards))]
    shard_of = {name: file for file, names in zip(files, shards) for name in names}
    batch, file = {}, files[0]
    for name, x in tensors:
        if shard_of[name] != file:
            save_file(batch, str(out / file), metadata={"format": "pt"})
            batch, file = {}, shard_of[name]
        batch[name] = x
    save_file(batch, str(out / file), metadata={"format": "pt"})
    total = sum(math.prod(shape) * dtype.itemsize for _, shape in plan)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": shard_of}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    # An existing directory is moved aside first: rename cannot replace a non-empty directory.
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "dir")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


class _Safetensors:
    """One safetensors file, memory-mapped: `header` (name -> dtype, shape, offsets) and `read(name)`."""

    def __init__(self, file: Path):
        self.file = file
        with open(file, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is not None and 8 + n > file.stat().st_size:
                raise LoadError(f"{file}: truncated inside its header ({8 + n} bytes long, the file has "
                                f"{file.stat().st_size}); copy or download it again")
            try:
                if n is None:
                    raise ValueError(f"{len(head)} bytes, less than a header length")
                self.header = json.loads(f.read(n))
            except (struct.error, ValueError) as e:
                raise LoadError(f"{file}: not a safetensors file ({e})") from None
        if not isinstance(self.header, dict):
            raise LoadError(f"{file}: not a safetensors file (its header is not a JSON object)")
        self.header.pop("__metadata__", None)
        self.start = 8 + n
        try:
            end = max((info["data_offsets"][1] for info in self.header.values()), default=0)
        except (TypeError, KeyError, IndexError):
            raise LoadError(f"{file}: not a safetensors file (a header entry has no data_offsets)") from None
        size = file.stat().st_size
        if self.start + end > size:  # a copy or download cut short: say so rather than fail on a reshape
            raise LoadError(f"{file}: truncated: its header describes {self.start + end} bytes but the file has "
                            f"{size}; copy or download it again")
        self.data = np.memmap(file, np.uint8, "r")

    def read(self, name: str) -> np.ndarray:
        if name not in self.header:
            raise LoadError(f"{self.file}: no tensor {name}, which {INDEX} places in this file")
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise LoadError(f"{self.file}: tensor {name} has dtype {info['dtype']}, which jaxft does not read")
        begin, end = (self.start + o for o in info["data_offsets"])
        return self.data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
