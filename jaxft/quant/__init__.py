"""Quantized frozen weights. `as_dense` is what the model calls on every weight before a matmul."""

import jax.numpy as jnp


def as_dense(w, dtype):
    """A weight as a dense array of `dtype`: quantized weights are dequantized (inside jit), dense ones cast."""
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)
