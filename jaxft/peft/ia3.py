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
from jaxft.peft.method import PeftError
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
    from jaxft.models import family

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


def merge(base: dict, trainable: dict, dtype=None) -> dict:
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

