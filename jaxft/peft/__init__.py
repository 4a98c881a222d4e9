"""Fine-tuning methods, one contract: each builds a trainable tree over the frozen base and a static
`MethodSpec` (see `jaxft.peft.method`); one forward (`jaxft.models.llama.forward(..., peft=spec)`) and one
trainer serve them all. `features` alone trains a head outside the language model (`jaxft.peft.features`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.peft import adapters, full, ia3, lora, prefix, prompt
from jaxft.peft.features import FeatureSpec
from jaxft.peft.lora import LoraError, LoraSpec
from jaxft.peft.method import MethodSpec, PeftError, as_method, finalize, resolve

__all__ = ["METHODS", "FeatureSpec", "LoraError", "LoraSpec", "MethodSpec", "PeftError", "build", "describe",
           "finalize", "merge", "penalty", "resolve"]

METHODS = ("lora", "adapter", "prefix", "prompt", "ia3", "full", "partial", "features")

# The settings of each method that fix the shapes of its trainable tree: a checkpoint resumes only if they agree.
_SHAPING = {"lora": ("rank", "targets", "dora"), "adapter": ("size", "placement"), "prefix": ("length", "projection"),
            "prompt": ("length",), "ia3": ("targets", "feedforward"), "partial": ("select",)}

_UNMERGEABLE = {
    "adapter": "bottleneck adapters add a non-linear block after attention and the MLP, which no change of the "
               "base weights computes",
    "prefix": "prefix tuning adds learned keys and values to every attention layer; they are inputs, not weights",
    "prompt": "prompt tuning prepends learned embeddings to the input; they are inputs, not weights",
    "features": "feature-based fine-tuning trains a classification head beside the model; the model is unchanged",
}


def build(key, base: dict, config, cfg, tokenizer=None) -> tuple[dict, MethodSpec]:
    """(trainable tree, MethodSpec) of `config.peft.method` with the settings of `config.<method>`.

    cfg: the model's Config (any family); tokenizer: needed by prompt.init='text'. Traceable (the trainer runs it under
    jit to create the tree in its shards). With `config.peft.init_from` (a PEFT adapter directory, a jaxft
    adapter or a training workdir) the tree is that adapter's, which must be the tree the config would create
    (`jaxft.peft.sources.init_from`). Raises PeftError naming a setting that cannot be used.
    """
    if not config.peft.init_from:
        return _fresh(key, base, config, cfg, tokenizer)
    from jaxft.peft import sources

    static = {}

    def fresh(key, base):  # only its shapes: checks the settings and says what the adapter must be
        trainable, static["spec"] = _fresh(key, base, config, cfg, tokenizer)
        return trainable

    shapes = {p: tuple(x.shape) for p, x in tree.items(jax.eval_shape(fresh, key, base))}
    return sources.init_from(config, cfg, shapes, static["spec"]), static["spec"]


def _fresh(key, base: dict, config, cfg, tokenizer) -> tuple[dict, MethodSpec]:
    """`build` without init_from: a new trainable tree, initialized as the method's settings say."""
    method = config.peft.method
    if method not in METHODS:
        raise PeftError(f"peft.method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "lora":
        c = config.lora
        spec = LoraSpec(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), rslora=c.rslora, dora=c.dora)
        paths = lora.target_paths(base, c.targets, cfg.model_type)
        return lora.init(key, base, spec, paths, init_a=c.init), MethodSpec("lora", lora=spec)
    if method == "adapter":
        c = config.adapter
        if c.activation not in adapters.ACTIVATIONS:
            raise PeftError(f"adapter.activation: {c.activation!r} is not one of {', '.join(adapters.ACTIVATIONS)}")
        paths = tree.flatten(base)
        attn = "self_attn" if any("/self_attn/" in p for p in paths) else "attn"  # T5 names it self_attn
        return (adapters.init(key, full.stacks(base), cfg.dim, c.size, c.placement, attn),
                MethodSpec("adapter", activation=c.activation))
    if method == "prefix":
        c = config.prefix
        n = _virtual_tokens("prefix.length", c.length, config.train.seq_len, cfg.max_seq_len)
        return prefix.init(key, cfg, base, n, c.projection, c.init), MethodSpec("prefix", virtual_tokens=n)
    if method == "prompt":
        c = config.prompt
        n = _virtual_tokens("prompt.length", c.length, config.train.seq_len, cfg.max_seq_len)
        return (prompt.init(key, _embedding(base), n, c.init, c.init_text, tokenizer),
                MethodSpec("prompt", virtual_tokens=n))
    if method == "ia3":
        out_paths, in_paths = ia3.target_paths(base, config.ia3.targets, config.ia3.feedforward, cfg.model_type)
        return ia3.init(base, out_paths, in_paths), MethodSpec("ia3")
    if method == "full":
        return full.init(base, [(p, None) for p in tree.flatten(base)]), MethodSpec("full")
    if method == "partial":
        selected = full.select(base, config.partial.select)
        split = tuple((p, layers) for p, layers in selected if layers is not None)
        return full.init(base, selected), MethodSpec("partial", layers=split)
    raise PeftError("peft.method 'features' trains a head on cached features, not through the language-model "
                    "trainer: use jaxft.train.features.train (`jaxft train` dispatches to it)")


def describe(config) -> dict:
    """What a checkpoint must agree on to be resumed: the method and its shape-defining settings."""
    method = config.peft.method
    return {"method": method, **{k: config[method][k] for k in _SHAPING.get(method, ())}}


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
    method = "features" if isinstance(spec, FeatureSpec) else as_method(spec).method
    if method in _UNMERGEABLE:
        raise PeftError(f"peft.merge: {method} cannot be merged: {_UNMERGEABLE[method]}; keep the base and the "
                        f"adapter (jaxft.peft.io) instead")
    spec = as_method(spec)
    if method == "lora":
        return lora.merge(base, trainable, spec.lora, dtype)
    if method == "ia3":
        return ia3.merge(base, trainable, dtype)
    resolved, _ = resolve(spec, base, trainable)
    flat = tree.flatten(base)
    for path, x in tree.items(resolved):
        old = flat[path]
        flat[path] = x.astype(dtype or (jnp.float32 if hasattr(old, "dequantize") else old.dtype))
    return tree.unflatten(flat)


def _embedding(base: dict):
    """The token embedding table (V, D) of a base of any family (LLaMA embed/w, BERT embed/word/w, T5 shared/w)."""
    flat = tree.flatten(base)
    return next(flat[p] for p in ("embed/w", "embed/word/w", "shared/w") if p in flat)


def _virtual_tokens(name: str, n: int, seq_len: int, max_seq_len: int) -> int:
    """Checks a prefix / prompt length against the model's context, with the training rows after it."""
    if n <= 0:
        raise PeftError(f"{name} must be positive, got {n}")
    if n + seq_len > max_seq_len:
        raise PeftError(f"{name}={n} virtual tokens + train.seq_len={seq_len} exceed the model's context "
                        f"(max_seq_len={max_seq_len})")
    return n
