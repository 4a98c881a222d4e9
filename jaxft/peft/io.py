"""The jaxft adapter format: `adapter.safetensors` (trainable leaves by path) and `adapter.json` (how to use them).

Megabytes, not gigabytes: only the trainable tree is written. (HF PEFT's format is a separate export.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxft import tree
from jaxft.peft.lora import LoraSpec


def save(out_dir: Path, trainable: dict, spec: LoraSpec, config, model_path) -> Path:
    """Writes the adapter atomically (a temp dir renamed into place); replaces an older adapter of the run."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".adapter-"))
    arrays = {p: np.asarray(x, np.float32) for p, x in tree.items(trainable)}
    save_file(arrays, str(tmp / "adapter.safetensors"))
    meta = {"format": "jaxft-adapter/1", "method": config.peft.method, "lora": dataclasses.asdict(spec),
            "targets": config.lora.targets, "model": str(model_path)}
    (tmp / "adapter.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load(path: Path) -> tuple[dict, LoraSpec, dict]:
    """(trainable tree, LoraSpec, metadata) of an adapter written by `save`."""
    path = Path(path)
    meta_file = path / "adapter.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a jaxft adapter (no adapter.json)")
    meta = json.loads(meta_file.read_text())
    arrays = load_file(str(path / "adapter.safetensors"))
    trainable = tree.unflatten({p: jnp.asarray(a) for p, a in arrays.items()})
    return trainable, LoraSpec(**meta["lora"]), meta
