"""Fine-tuning methods, one contract: each is a module that builds a trainable tree over the frozen base and a
static `MethodSpec`, and fills the model's hook points (`jaxft.models.hooks`) with it; one forward per family and
one trainer serve them all (see `jaxft.peft.method`). `register` adds a method defined elsewhere. `features`
alone trains a head outside the language model (`jaxft.peft.features`).
"""

from __future__ import annotations

import jax

from jaxft import tree
from jaxft.peft import adapters, features, full, ia3, lora, parts, prefix, prompt, sources
from jaxft.peft.features import FeatureSpec
from jaxft.peft.lora import LoraError, LoraSpec
from jaxft.peft.method import (MethodSpec, PeftError, as_method, finalize, implementation, register, resolve,
                               virtual_tokens)

__all__ = ["METHODS", "FeatureSpec", "LoraError", "LoraSpec", "MethodSpec", "PeftError", "as_method", "build",
           "describe", "finalize", "merge", "penalty", "register", "resolve", "virtual_tokens"]

METHODS = ("lora", "adapter", "prefix", "prompt", "ia3", "full", "partial", "features")  # those jaxft ships
for _name, _impl in zip(METHODS, (lora, adapters, prefix, prompt, ia3, full.FULL, full.PARTIAL, features)):
    register(_name, _impl)


def build(key, base: dict, config, cfg, tokenizer=None) -> tuple[dict, MethodSpec]:
    """(trainable tree, MethodSpec) of `config.peft.method` with the settings of `config.<method>`: the tree the
    optimizer trains, and the static spec the model's forward takes as `peft=` to apply it.

    cfg: the model's Config (any family); tokenizer: needed by prompt.init='text'. Traceable (the trainer runs it under
    jit to create the tree in its shards). With `config.peft.init_from` (a PEFT adapter directory, a jaxft
    adapter or a training workdir) the tree is that adapter's, which must be the tree the config would create
    (`jaxft.peft.sources.init_from`). Raises PeftError naming a setting that cannot be used.
    """
    if not config.peft.init_from:
        return _fresh(key, base, config, cfg, tokenizer)
    static = {}

    def fresh(key, base):  # only its shapes: checks the settings and says what the adapter must be
        trainable, static["spec"] = _fresh(key, base, config, cfg, tokenizer)
        return trainable

    shapes = {p: tuple(x.shape) for p, x in tree.items(jax.eval_shape(fresh, key, base))}
    return sources.init_from(config, cfg, shapes, static["spec"]), static["spec"]


def _fresh(key, base: dict, config, cfg, tokenizer) -> tuple[dict, MethodSpec]:
    """`build` without init_from: a new trainable tree, initialized as the method's settings say; for a
    vision-language model, with its vision and projector parts' methods (`jaxft.peft.parts`)."""
    if parts.is_multimodal(cfg):
        return parts.build(key, base, config, cfg, tokenizer, _method_build)
    parts.check_text_only(config, cfg.model_type)
    return _method_build(key, base, config, cfg, tokenizer)


def _method_build(key, base: dict, config, cfg, tokenizer) -> tuple[dict, MethodSpec]:
    method = config.peft.method
    module = implementation(method)
    if not hasattr(module, "build"):
        raise PeftError(f"peft.method {method!r} trains a head on cached features, not through the language model: "
                        f"the classification task builds it (`jaxft.tasks.classification.features_trainable`)")
    return module.build(key, base, config, cfg, tokenizer)


def describe(config) -> dict:
    """What a checkpoint must agree on to be resumed: the method and its shape-defining settings."""
    method = config.peft.method
    return {"method": method, **{k: config[method][k] for k in getattr(implementation(method), "SHAPING", ())}}


def penalty(spec: MethodSpec, l2sp: float):
    """The regularizer the trainer adds to the loss, penalty(trainable, base) -> scalar, or None.

    l2sp (train.l2sp): the L2-SP weight, towards the pretrained values of retrained base weights (full and
    partial fine-tuning; other methods retrain none, so asking for it there is an error).
    """
    if l2sp == 0:
        return None
    if l2sp < 0:
        raise PeftError(f"train.l2sp must be >= 0, got {l2sp}")
    if spec.method not in ("full", "partial"):
        raise PeftError(f"train.l2sp: L2-SP pulls retrained base weights towards their pretrained values, and "
                        f"method {spec.method!r} retrains none (use full or partial, or train.l2sp=0)")
    return full.l2sp(spec.layers, l2sp)


def merge(base: dict, trainable: dict, spec, dtype=None) -> dict:
    """A plain base tree that computes what base + trainable computes, where one exists: LoRA (W + s A B, DoRA
    rescaled), IA3 (the vectors folded into k/v/down_proj), full and partial (the trained leaves in place).
    Leaves keep their dtype (a quantized one becomes float32) unless `dtype` is given; the rest is shared.

    Raises PeftError saying why for the methods that no base weights can express (adapter, prefix, prompt,
    features).
    """
    method = spec.method
    if isinstance(spec, parts.PartsSpec):  # the method's merge knows the language model's leaves alone
        return parts.merge(base, trainable, spec, dtype, merge)
    module = implementation(method)
    if not hasattr(module, "merge"):
        why = getattr(module, "UNMERGEABLE", "no base weights compute what it does")
        raise PeftError(f"peft.merge: {method} cannot be merged: {why}; keep the base and the adapter "
                        f"(jaxft.peft.io) instead")
    return module.merge(base, trainable, spec, dtype)
