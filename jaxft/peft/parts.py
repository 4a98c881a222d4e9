"""A method per part of a vision-language model (`jaxft.models.llava`): the language model's method
(`peft.method`, any of jaxft's) beside `vision.method` and `projector.method`, each `frozen`, `lora` or `full`.

One trainable tree serves all three, one optimizer trains it: the language model's method's leaves at the paths
it knows (`layers/...`, `embed/...`), and beside them

  vision/...      full: a float32 copy of the tower's tree; lora: lora_a (L, D, R), lora_b (L, R, out) beside
                  the weights `vision.targets` picks (the LoRA settings are lora.rank, alpha, dropout, rslora)
  projector/...   full: a float32 copy of the connector's tree; lora: lora_a (in, R), lora_b (R, out) beside
                  each of its weights

and nothing for a frozen part, which the model reads from the base (never copied). `PartsSpec` is the language
model's `MethodSpec` with the parts' LoRA specs beside it; the family reads them as `peft.vision` /
`peft.projector`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.models import vit
from jaxft.peft import lora
from jaxft.peft.method import AdapterError, MethodSpec, PeftError
from jaxft.quant import as_dense

PART_METHODS = ("frozen", "lora", "full")
DEFAULTS = {"vision": "frozen", "projector": "full"}


@dataclasses.dataclass(frozen=True)
class PartsSpec(MethodSpec):
    """The language model's method (the fields of MethodSpec) and the method of each other part."""
    vision: Any = None  # the tower's LoraSpec where vision.method is lora, else None
    projector: Any = None  # the connector's LoraSpec where projector.method is lora, else None
    part_methods: tuple[tuple[str, str], ...] = ()  # (("vision", "frozen"), ("projector", "full"))

    @classmethod
    def from_json(cls, d: dict) -> "PartsSpec":
        base = MethodSpec.from_json(d)
        parts = {k: None if d.get(k) is None else lora.LoraSpec(**d[k]) for k in DEFAULTS}
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(MethodSpec)}, **parts,
                   part_methods=tuple((k, m) for k, m in d.get("part_methods", ())))


def is_multimodal(cfg) -> bool:
    """Whether `cfg` (a family Config) has parts besides the language model."""
    return hasattr(cfg, "vision") and hasattr(cfg, "projector") and hasattr(cfg, "text")


def check_text_only(config, model_type: str) -> None:
    """PeftError naming the key where a text-only model is given a part method other than the default."""
    for part, default in DEFAULTS.items():
        if config[part].method != default:
            raise PeftError(f"{part}.method={config[part].method!r}: model_type {model_type!r} is a text-only "
                            f"model, with no {part} (leave {part}.method at {default!r})")


def build(key, base: dict, config, cfg, tokenizer, build_text) -> tuple[dict, PartsSpec]:
    """(trainable tree, PartsSpec) of a vision-language model: `build_text(key, text_base, config, text_cfg,
    tokenizer)` builds the language model's method over the language model's leaves alone (the same key, so the
    same initialization as on the text-only model), then each part's leaves (module docstring)."""
    text_base = {k: v for k, v in base.items() if k not in DEFAULTS}
    trainable, spec = build_text(key, text_base, config, cfg.text, tokenizer)
    if spec.method == "features":
        raise PeftError("peft.method='features' trains a head outside the language model; a vision-language "
                        "model's parts train through the language-model trainer (use another peft.method)")
    c = config.lora
    part_spec = lora.LoraSpec(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), rslora=c.rslora)
    specs, methods = {}, []
    for k, part in enumerate(DEFAULTS):
        method = config[part].method
        if method not in PART_METHODS:
            raise PeftError(f"{part}.method={method!r} is not one of {', '.join(PART_METHODS)}")
        methods.append((part, method))
        part_key = jax.random.fold_in(key, 100 + k)
        if method == "full":
            trainable = {**trainable, part: jax.tree.map(lambda x: as_dense(x, jnp.float32), base[part])}
        elif method == "lora" and part == "vision":
            targets = config.vision.targets
            try:
                paths = lora.target_paths(base[part], vit.LORA_TARGETS if targets == "default" else targets)
            except lora.LoraError:
                raise PeftError(f"vision.targets: {targets!r} matches no linear weight of the vision tower (paths "
                                f"look like 'layers/attn/q_proj/w')") from None
            trainable = {**trainable, part: lora.init(part_key, base[part], part_spec, paths, init_a=c.init)}
            specs[part] = part_spec
        elif method == "lora":
            trainable = {**trainable, part: _matrix_lora(part_key, base[part], part_spec.rank)}
            specs[part] = part_spec
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(MethodSpec)}
    return trainable, PartsSpec(**fields, **specs, part_methods=tuple(methods))


def text_spec(spec: PartsSpec) -> MethodSpec:
    """The language model's method alone (what its method's module reads)."""
    return MethodSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(MethodSpec)})


def check(flat: dict[str, tuple[int, ...]], spec: PartsSpec, base: dict[str, tuple[int, ...]], source: str) -> dict:
    """Raises AdapterError naming `source` and the leaf unless the parts' leaves of `flat` (path -> shape) are
    what each part's method makes over a base of leaf shapes `base`; returns the language model's leaves, for
    its own method's check."""
    methods = dict(spec.part_methods)
    for part in DEFAULTS:
        leaves = {p.split("/", 1)[1]: s for p, s in flat.items() if p.startswith(part + "/")}
        want = {p.split("/", 1)[1]: s for p, s in base.items() if p.startswith(part + "/")}
        method = methods.get(part, "frozen")
        if method == "lora":
            rank = getattr(spec, part).rank
            weights = {p.rsplit("/", 1)[0]: shape for p, shape in want.items() if p.endswith("/w")}
            want = {f"{m}/{leaf}": s for m, (*lead, d_in, d_out) in weights.items() if f"{m}/lora_a" in leaves
                    for leaf, s in (("lora_a", (*lead, d_in, rank)), ("lora_b", (*lead, rank, d_out)))}
        elif method == "frozen":
            want = {}
        for path in sorted(set(leaves) | set(want)):
            if leaves.get(path) != want.get(path):
                raise AdapterError(f"{source}: {part}/{path} is {leaves.get(path) or 'missing'}, a {part} trained "
                                   f"by {method} has {want.get(path) or 'no such leaf'}")
    return {p: s for p, s in flat.items() if p.split("/", 1)[0] not in DEFAULTS}


def merge(base: dict, trainable: dict, spec: PartsSpec, dtype, merge_text) -> dict:
    """A plain base of a vision-language model that computes what base + trainable computes: the language model's
    leaves through `merge_text(text_base, text_trainable, MethodSpec, dtype)` (`jaxft.peft.merge`, which raises for
    the methods no weights express), a LoRA part as W + s A B (`lora.merge`, stacked or not), a full part's
    trained leaves in place (in the base leaves' dtype unless `dtype`), a frozen part as it is. `base` may hold
    only the subtrees that change (export passes no more)."""
    out = merge_text({k: v for k, v in base.items() if k not in DEFAULTS},
                     {k: v for k, v in trainable.items() if k not in DEFAULTS}, text_spec(spec), dtype)
    for part, method in spec.part_methods:
        if part not in base:
            continue
        if method == "full":
            out[part] = jax.tree.map(lambda x, b: x.astype(dtype or b.dtype), trainable[part], base[part])
        elif method == "lora":
            out[part] = lora.merge(base[part], trainable[part], getattr(spec, part), dtype)
        else:
            out[part] = base[part]
    return out


def _matrix_lora(key, params: dict, rank: int) -> dict:
    """LoRA beside every (in, out) weight of an unstacked tree (the connector): A Kaiming-uniform as PEFT's,
    B zeros."""
    flat = {}
    weights = [(p, w) for p, w in tree.flatten(params).items() if p.endswith("/w")]
    for k, (path, w) in zip(jax.random.split(key, len(weights)), weights):
        d_in, d_out = w.shape
        bound = 1.0 / math.sqrt(d_in)
        module = path.rsplit("/", 1)[0]
        flat[f"{module}/lora_a"] = jax.random.uniform(k, (d_in, rank), jnp.float32, -bound, bound)
        flat[f"{module}/lora_b"] = jnp.zeros((rank, d_out), jnp.float32)
    return tree.unflatten(flat)
