"""The model families jaxft runs, each a module of pure functions over a parameter pytree.

A family module has:
  Config         a frozen dataclass with `from_hf(dict, source)`, `to_hf()`, `model_type` and `n_layers`
  TABLE          its Hugging Face name <-> jaxft path table (`jaxft.checkpoint.mapping.Entry` rows)
  PARAM_AXES     (path regex, logical axes) of every parameter, for sharding (`jaxft.parallel`)
  LORA_TARGETS   the paths PEFT's default LoRA targets map to (its `lora.targets='default'`)
  KIND           "decoder", "encoder" or "encoder-decoder"
  init(key, cfg, dtype) -> params, and forward(cfg, base, tokens, *, trainable=, peft=, rng=, dtype=, ...)

`family(model_type)` finds the module of a Hugging Face `model_type`; `config_from_hf` reads a config.json dict
into the right family's Config. Modules are imported on first use, so a family costs nothing until used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from jaxft.models.config import ConfigError

# Hugging Face model_type -> the module implementing it.
FAMILIES = {
    "llama": "jaxft.models.llama",
    "mistral": "jaxft.models.llama",
    "qwen2": "jaxft.models.llama",
    "bert": "jaxft.models.bert",
    "t5": "jaxft.models.t5",
}


def family(model_type: str) -> ModuleType:
    """The family module of `model_type` ('llama', 'bert', 't5', ...); ConfigError naming it if unknown."""
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported (expected one of {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])


def family_of(cfg) -> ModuleType:
    """The family module of a model config."""
    return family(cfg.model_type)


def config_from_hf(hf: dict[str, Any], source: str = "config.json"):
    """The family Config of a Hugging Face `config.json` dict, chosen by its model_type."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          f"(expected one of {', '.join(FAMILIES)})")
    return family(model_type).Config.from_hf(hf, source=source)
