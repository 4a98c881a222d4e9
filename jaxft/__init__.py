"""jaxft: fine-tune language models with JAX. The frozen base and the trainable tree are separate pytrees.

The public API (each name is imported on first use, so `import jaxft` loads nothing heavy):

  load_model(path)                 a Hugging Face directory or GGUF file -> Loaded(cfg, params, tokenizer, ...)
  load_config(file, overrides)     a config file (configs/*.py) with `key=value` overrides
  build_method(key, base, config, cfg) -> (trainable, spec)   the method of config.peft.method over a base
  merge_method(base, trainable, spec)  a plain base computing the same, where the method allows it
  load_adapter(path, cfg)          a saved adapter (jaxft's or HF PEFT's), checked against the base
  generate_tokens(cfg, base, prompts, ...)   decoding, any family that generates (decoders, T5)
  run_training(config, workdir), run_evaluation(config, workdir)     what `jaxft train` / `jaxft eval` run
  register_family(family), family(model_type)   model families (`jaxft.models`)
  register_method(name, module), MethodSpec, LoraSpec, Hooks      fine-tuning methods (`jaxft.peft`)
"""

import importlib

_API = {
    "load_model": ("jaxft.checkpoint", "load"),
    "load_config": ("jaxft.config", "load"),
    "build_method": ("jaxft.peft", "build"),
    "merge_method": ("jaxft.peft", "merge"),
    "load_adapter": ("jaxft.peft.sources", "load"),
    "generate_tokens": ("jaxft.generate", "generate"),
    "run_training": ("jaxft.train.loop", "train"),
    "run_evaluation": ("jaxft.train.evaluate", "evaluate"),
    "register_family": ("jaxft.models", "register_family"),
    "family": ("jaxft.models", "family"),
    "register_method": ("jaxft.peft", "register"),
    "MethodSpec": ("jaxft.peft", "MethodSpec"),
    "LoraSpec": ("jaxft.peft", "LoraSpec"),
    "Hooks": ("jaxft.models.hooks", "Hooks"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'jaxft' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
