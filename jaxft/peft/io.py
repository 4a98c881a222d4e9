"""The jaxft adapter format: `adapter.safetensors` (trainable leaves by path) and `adapter.json` (how to use them).

Megabytes, not gigabytes: only the trainable tree is written (for full fine-tuning, that is the whole model).
`adapter.json` records the method and its spec (`"spec"`), so that any method's adapter loads back into
something `llama.forward(..., peft=spec)` or `jaxft.peft.features.predict` runs. Format 1 files (LoRA only,
before methods) load too. (HF PEFT's format is a separate export.)
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
from jaxft.peft.features import FeatureSpec
from jaxft.peft.lora import LoraSpec
from jaxft.peft.parts import PartsSpec
from jaxft.peft.method import MethodSpec, as_method

FORMAT = "jaxft-adapter/2"


def save(out_dir: Path, trainable: dict, spec, config, model_path) -> Path:
    """Writes the adapter atomically (a temp dir renamed into place); replaces an older adapter of the run.

    spec: the MethodSpec (a bare LoraSpec means LoRA; a FeatureSpec, a features head). `config` supplies
    lora.targets for LoRA adapters. Save what inference needs (`jaxft.peft.finalize` drops training-only parts).
    """
    out_dir = Path(out_dir)
    spec = spec if isinstance(spec, FeatureSpec) else as_method(spec)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".adapter-"))
    arrays = {p: np.asarray(x, np.float32) for p, x in tree.items(trainable)}
    save_file(arrays, str(tmp / "adapter.safetensors"))
    meta = {"format": FORMAT, "method": spec.method, "spec": spec.to_json(), "model": str(model_path)}
    if spec.method == "lora":  # as format 1 wrote them, for readers of the LoRA fields
        meta.update(lora=dataclasses.asdict(spec.lora), targets=config.lora.targets)
    (tmp / "adapter.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load(path: Path) -> tuple[dict, LoraSpec | MethodSpec | FeatureSpec, dict]:
    """(trainable tree, spec, metadata) of an adapter written by `save`.

    spec: a LoraSpec for a LoRA adapter (as before methods: what `jaxft.export` and `jaxft.multi` read; the model
    takes it as `peft=` too), a FeatureSpec for a features head, the MethodSpec otherwise.
    """
    path = Path(path)
    meta_file = path / "adapter.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a jaxft adapter (no adapter.json)")
    meta = json.loads(meta_file.read_text())
    arrays = load_file(str(path / "adapter.safetensors"))
    trainable = tree.unflatten({p: jnp.asarray(a) for p, a in arrays.items()})
    method = meta.get("method", "lora")
    if method == "lora":
        spec = LoraSpec(**meta["lora"])
    elif method == "features":
        spec = FeatureSpec.from_json(meta["spec"])
    else:
        spec = MethodSpec.from_json(meta["spec"])
    if "part_methods" in meta.get("spec", {}):  # a vision-language model's: its parts' methods beside
        spec = PartsSpec.from_json(meta["spec"])
    return trainable, spec, meta
