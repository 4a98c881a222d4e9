"""The model families jaxft runs, each one module (or object) of pure functions over a parameter pytree, found by
its Hugging Face `model_type` in a registry that loading, export, training and generation look up.

The family protocol (what `register_family` expects; `jaxft.models.llama` is the reference):
  Config         a frozen, hashable dataclass with `from_hf(dict, source)`, `to_hf()`, `model_type`, `n_layers`,
                 `dim`, `n_heads`, `n_kv_heads`, `head_dim`, `mlp_dim`, `vocab_size`, `max_seq_len`
  TABLE          its Hugging Face name <-> jaxft path table (`jaxft.models.table.Entry` rows)
  PARAM_AXES     (path regex, logical axes) of every parameter, for sharding (`jaxft.parallel`)
  KIND           "decoder", "encoder" or "encoder-decoder"
  LORA_TARGETS   the paths PEFT's default LoRA targets map to (`lora.targets='default'`); optionally
                 IA3_TARGETS / IA3_FEEDFORWARD (`ia3.targets='default'`)
  init(key, cfg, dtype) -> params
  forward(cfg, base, tokens, *, trainable=, peft=, rng=, dtype=, positions=, segment_ids=, cache=,
          return_hidden=, ...) -> (logits or hidden states, cache), calling the hook points of `peft`
          (`jaxft.models.hooks`) and nothing of jaxft.peft
  generation (`jaxft.generate`): decode_logits(cfg, base, trainable, hidden (B, D), dtype, policy) -> (B, V)
          (policy: the `jaxft.backend.Policy`), and either init_cache(cfg, batch, length, dtype) (a decoder:
          the prefill and decode steps are its `forward` over that cache) or prefill(...) and decode_step(...)
          of its own (T5: the encoder pass and the cross-attention cache; see `jaxft.generate`)
  optionally: output_head(cfg, params, hidden, dtype) -> (hidden, weight, tied), the output layer as forward
          applies it, for a loss that runs it over chunks of tokens (`train.loss_chunk`)
  optionally: checkpoint_names(cfg, names) -> (cfg, present) (tensors that complete the config) and
          checkpoint_view(cfg, present, read) -> (present, read) (tensors stored other than TABLE names them:
          a mixture of experts' per-expert or fused expert tensors, `jaxft.models.mixtral.expert_view`)

`family(model_type)` finds a family; `config_from_hf` reads a config.json dict into the right family's Config.
jaxft's own families are imported on first use, so a family costs nothing until used.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxft.models.config import ConfigError
from jaxft.models.hooks import Hooks, hooks_of

__all__ = ["FAMILIES", "ConfigError", "Hooks", "config_from_hf", "family", "family_of", "hooks_of", "register_family"]

# Hugging Face model_type -> the family: a module name (jaxft's own, imported on first use) or a registered object.
FAMILIES: dict[str, Any] = {
    "llama": "jaxft.models.llama",
    "mistral": "jaxft.models.llama",
    "qwen2": "jaxft.models.llama",
    "mixtral": "jaxft.models.mixtral",
    "qwen2_moe": "jaxft.models.qwen2_moe",
    "qwen3_moe": "jaxft.models.qwen3_moe",
    "olmoe": "jaxft.models.olmoe",
    "bert": "jaxft.models.bert",
    "t5": "jaxft.models.t5",
    "llava": "jaxft.models.llava",
    "idefics3": "jaxft.models.idefics3",
}


def register_family(family, *model_types: str) -> None:
    """Makes `family` (a module or object following the protocol above) the family of each of `model_types`
    (default: its Config's model_type). A model_type registered again is replaced."""
    missing = [name for name in ("Config", "TABLE", "PARAM_AXES", "KIND", "init", "forward")
               if not hasattr(family, name)]
    if missing:
        raise ConfigError(f"register_family: {getattr(family, '__name__', family)!r} lacks {', '.join(missing)}")
    for model_type in model_types or (family.Config.model_type,):
        FAMILIES[model_type] = family


def family(model_type: str):
    """The family of `model_type` ('llama', 'bert', 't5', ...); ConfigError naming it if unknown."""
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported (expected one of {', '.join(FAMILIES)})")
    found = FAMILIES[model_type]
    return importlib.import_module(found) if isinstance(found, str) else found


def family_of(cfg):
    """The family of a model config."""
    return family(cfg.model_type)


def config_from_hf(hf: dict[str, Any], source: str = "config.json"):
    """The family Config of a Hugging Face `config.json` dict, chosen by its model_type."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          f"(expected one of {', '.join(FAMILIES)})")
    return family(model_type).Config.from_hf(hf, source=source)
