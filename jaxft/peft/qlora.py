"""Merging a LoRA trained on a quantized base (QLoRA) into that base, as bf16 weights or quantized again.

A QLoRA user has no original weights: the adapter was trained against the dequantized base, so that is what
it is merged onto (W' = dequantize(Q) + s A B, in float32). The result is either dense (`dtype`, bf16 by
default: what `jaxft.checkpoint.save_hf` exports and what a GPU serves) or quantized again, for a merged model
as small as the one trained. Re-quantizing rounds W' once more, so the merged quantized model is close to,
not equal to, base + adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.peft import lora
from jaxft.quant import as_dense
from jaxft.quant import FORMATS, QuantizedWeight, quantize

_merge = jax.jit(lora.merge, static_argnums=(2, 3))  # dequantization and merge in one program per module
_dense = jax.jit(as_dense, static_argnums=1)


def merge_lora(base: dict, trainable: dict, spec: lora.LoraSpec, *, requantize: bool | str = False,
               dtype=jnp.bfloat16) -> dict:
    """The base with the LoRA / DoRA adapter in `trainable` merged into its weights (see `jaxft.peft.lora.merge`).

    base: a frozen base whose linear weights (L, in, out) may be QuantizedWeights; trainable, spec: the adapter.
    requantize:
      False   every weight that is adapted or quantized comes back dense, of `dtype`: a plain model.
      True    each adapted weight that was quantized is quantized again in its own format, block size and
              double quantization; quantized weights without an adapter are kept as they are (bit for bit).
      "nf4" / "int4"   every quantized weight ends up in that format (keeping its block size and double
              quantization); one without an adapter is converted only if its format differs.
    Adapted weights that were dense stay dense, of `dtype`; every other leaf is passed on, not copied.
    One module is merged at a time, so the float32 copies alive at once are those of one (L, in, out) weight.
    """
    if requantize not in (False, True, *FORMATS):
        raise ValueError(f"requantize={requantize!r}: expected False, True or one of {', '.join(FORMATS)}")
    flat, adapter = tree.flatten(base), tree.flatten(trainable)
    modules = sorted({p.rsplit("/", 1)[0] for p in adapter if p.endswith("/lora_a")})
    if not modules:
        raise ValueError("merge_lora: the trainable tree holds no LoRA weights (no '.../lora_a' leaf)")
    missing = [f"{m}/w" for m in modules if f"{m}/w" not in flat]
    if missing:
        raise ValueError(f"merge_lora: the adapter adapts weights the base does not have: {', '.join(missing)}")

    out = dict(flat)
    for path, leaf in flat.items():
        module = path.rsplit("/", 1)[0]
        adapted = path.endswith("/w") and module in modules
        quantized = isinstance(leaf, QuantizedWeight)
        if not (adapted or quantized):
            continue
        w = leaf
        if adapted:
            own = tree.unflatten({p: x for p, x in adapter.items() if p.startswith(module + "/")})
            w = tree.flatten(_merge(tree.unflatten({path: leaf}), own, spec, jnp.dtype(jnp.float32)))[path]
        if not quantized or requantize is False:
            out[path] = _dense(w, jnp.dtype(dtype))
            continue
        fmt = leaf.format if requantize is True else requantize
        if not adapted and fmt == leaf.format:
            continue
        out[path] = quantize(_dense(w, jnp.dtype(jnp.float32)), fmt, leaf.block_size, leaf.offset is not None)
    return tree.unflatten(out)
