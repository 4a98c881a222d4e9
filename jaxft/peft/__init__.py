"""Parameter-efficient fine-tuning methods: each builds a trainable tree beside the frozen base."""

from __future__ import annotations

from jaxft.peft import lora
from jaxft.peft.lora import LoraError, LoraSpec

METHODS = ("lora",)


def build(key, base: dict, config, model_type: str):
    """(trainable tree, static spec) for `config.peft.method`, with the settings of `config.<method>`."""
    method = config.peft.method
    if method not in METHODS:
        raise LoraError(f"peft.method: {method!r} is not one of {', '.join(METHODS)}")
    c = config.lora
    spec = LoraSpec(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), rslora=c.rslora, dora=c.dora)
    paths = lora.target_paths(base, c.targets, model_type)
    return lora.init(key, base, spec, paths, init_a=c.init), spec


def describe(config) -> dict:
    """What a checkpoint must agree on to be resumed: the method and the shape-defining settings."""
    c = config.lora
    return {"method": config.peft.method, "rank": c.rank, "targets": c.targets, "dora": c.dora}
