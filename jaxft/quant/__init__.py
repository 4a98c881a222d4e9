"""Quantized frozen weights (QLoRA's NF4, symmetric int4). `as_dense` is what the model calls on every weight
before a matmul; `quantize_params` / `leaf_fn` turn a dense base into a quantized one."""

import jax.numpy as jnp

from jaxft.quant.params import LINEAR_WEIGHTS, leaf_fn, quantize_params
from jaxft.quant.weight import FORMATS, QuantizedWeight, quantize, stored_bits

__all__ = ["FORMATS", "LINEAR_WEIGHTS", "QuantizedWeight", "as_dense", "leaf_fn", "quantize", "quantize_params",
           "stored_bits"]


def as_dense(w, dtype):
    """A weight as a dense array of `dtype`: quantized weights are dequantized (inside jit), dense ones cast."""
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)
