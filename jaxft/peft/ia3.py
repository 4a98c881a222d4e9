"""IA3 (Liu et al. 2022): learned vectors that rescale activations, as HF PEFT computes them.

A target weight at `<module>/w` (L, in, out) gets `<module>/ia3_out` (L, out), multiplying its output (bias
included), or, for a feed-forward target, `<module>/ia3_in` (L, in), multiplying its input. PEFT's defaults
for the LLaMA family: keys and values (k_proj, v_proj) at their output, and the MLP's intermediate activation
(the input of down_proj). The vectors start at one, which leaves the model as it was; `merge` folds them into
the weights exactly: W * s per output column (and b * s), or s * W per input row.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from jaxft import tree
from jaxft.models import family
from jaxft.models.layers import einsum
from jaxft.peft.method import MethodSpec, PeftError
from jaxft.quant import as_dense

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING for the LLaMA
# family; other families name theirs as IA3_TARGETS / IA3_FEEDFORWARD in their module.
DEFAULT_TARGETS = r"layers/(attn/(k_proj|v_proj)|mlp/down_proj)/w"
DEFAULT_FEEDFORWARD = r"layers/mlp/down_proj/w"


def target_paths(base: dict, targets: str, feedforward: str,
                 model_type: str = "llama") -> tuple[list[str], list[str]]:
    """(paths scaled at the output, paths scaled at the input): `targets` and `feedforward` are regexes over
    weight paths ('default': as PEFT for the family of `model_type`); feed-forward paths must be among the
    targets."""
    module = family(model_type)
    targets = getattr(module, "IA3_TARGETS", DEFAULT_TARGETS) if targets == "default" else targets
    if feedforward == "default":
        feedforward = getattr(module, "IA3_FEEDFORWARD", DEFAULT_FEEDFORWARD)
    shapes = {p: tuple(x.shape) for p, x in tree.items(base)}
    try:
        paths = [p for p in tree.select(base, targets) if p.endswith("/w") and len(shapes[p]) == 3]
        ff = set(tree.select(base, feedforward)) if feedforward else set()
    except re.error as e:
        raise PeftError(f"ia3.targets / ia3.feedforward: not a valid regex ({e})") from None
    if not paths:
        raise PeftError(f"ia3.targets: {targets!r} matches no linear weight of the model "
                        f"(paths look like 'layers/attn/k_proj/w')")
    stray = sorted(ff - set(paths))
    if stray:
        raise PeftError(f"ia3.feedforward: {', '.join(stray)} is not among ia3.targets")
    return [p for p in paths if p not in ff], [p for p in paths if p in ff]


def linear(spec, x, p: dict, rng=None):
    """The `linear` hook: x scaled by ia3_in (in,) before the map, the output by ia3_out (out,) after its bias."""
    dtype = x.dtype
    if "ia3_in" in p:
        x = (x.astype(jnp.float32) * p["ia3_in"]).astype(dtype)
    y = einsum("...i,io->...o", x, as_dense(p["w"], dtype))
    if "b" in p:
        y = y + p["b"].astype(jnp.float32)
    if "ia3_out" in p:
        y = y * p["ia3_out"].astype(jnp.float32)
    return y.astype(dtype)


def init(base: dict, out_paths: list[str], in_paths: list[str]) -> dict:
    """Ones: (L, out) beside each output-scaled weight, (L, in) beside each input-scaled one."""
    shapes, flat = {p: tuple(x.shape) for p, x in tree.items(base)}, {}
    for path in out_paths:
        n_layers, _, d_out = shapes[path]
        flat[path.rsplit("/", 1)[0] + "/ia3_out"] = jnp.ones((n_layers, d_out), jnp.float32)
    for path in in_paths:
        n_layers, d_in, _ = shapes[path]
        flat[path.rsplit("/", 1)[0] + "/ia3_in"] = jnp.ones((n_layers, d_in), jnp.float32)
    return tree.unflatten(flat)


SHAPING = ("targets", "feedforward")


def build(key, base: dict, config, cfg, tokenizer=None):
    out_paths, in_paths = target_paths(base, config.ia3.targets, config.ia3.feedforward, cfg.model_type)
    return init(base, out_paths, in_paths), MethodSpec("ia3")


def expected(spec, flat: dict, base: dict, cfg) -> dict:
    """(L, out) for each ia3_out, (L, in) for each ia3_in of `flat` beside a linear weight of the base."""
    want = {}
    for path in flat:
        module, leaf = path.rsplit("/", 1)
        w = base.get(f"{module}/w")
        if w is not None and len(w) == 3 and leaf in ("ia3_out", "ia3_in"):  # else: reported as a stray leaf
            want[path] = (w[0], w[2] if leaf == "ia3_out" else w[1])
    return want


def selection(config) -> tuple[str, bool]:
    """The settings that choose the vectors, as `peft.init_from` names them (listing leaves: their names say
    which are scaled at the input)."""
    return f"ia3.targets={config.ia3.targets!r} with ia3.feedforward={config.ia3.feedforward!r}", True


def merge(base: dict, trainable: dict, spec=None, dtype=None) -> dict:
    """Plain weights computing what base + IA3 computes; a quantized weight is dequantized (float32)."""
    flat = tree.flatten(base)
    for path, s in tree.items(trainable):
        module, name = path.rsplit("/", 1)
        if name not in ("ia3_out", "ia3_in"):
            raise PeftError(f"{path}: not an IA3 vector")
        original = flat[f"{module}/w"]
        out_dtype = dtype or (jnp.float32 if hasattr(original, "dequantize") else original.dtype)
        w = as_dense(original, jnp.float32)
        w = w * s[:, None, :] if name == "ia3_out" else s[:, :, None] * w
        flat[f"{module}/w"] = w.astype(out_dtype)
        if name == "ia3_out" and f"{module}/b" in flat:
            b = flat[f"{module}/b"]
            flat[f"{module}/b"] = (b.astype(jnp.float32) * s).astype(dtype or b.dtype)
    return tree.unflatten(flat)

