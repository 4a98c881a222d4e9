"""Quantizing the frozen base: which leaves become QuantizedWeights, either on a whole tree or leaf by leaf
while a checkpoint loads."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxft.quant.weight import check_settings, quantize
from jaxft.tree import map_with_path

LINEAR_WEIGHTS = r"layers/.*/w"  # every linear map of the blocks; embeddings, norms and the head stay dense


def leaf_fn(format: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
            include: str = LINEAR_WEIGHTS, dense_dtype=jnp.bfloat16) -> Callable[[str, Any], Any]:
    """A `(path, array) -> leaf` hook for a loader to apply to each leaf as it arrives (quantize while loading).

    Leaves whose path fully matches the regex `include` become QuantizedWeights (see `quantize`); other
    floating leaves are cast to `dense_dtype` (None keeps their dtype). Errors name the path.
    """
    rx = re.compile(include)
    check_settings(format, block_size)  # a bad setting fails before the first leaf arrives

    def fn(path: str, x):
        if rx.fullmatch(path):
            try:
                return quantize(x, format, block_size, double_quant)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        if dense_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            return _cast(x, dense_dtype)
        return jnp.asarray(x)

    return fn


def quantize_params(params: dict, format: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
                    include: str = LINEAR_WEIGHTS, dense_dtype=jnp.bfloat16) -> dict:
    """The frozen base with its linear weights quantized (the same tree, `w` leaves replaced by
    QuantizedWeights) and every other floating leaf cast to `dense_dtype`. Arguments as in `leaf_fn`."""
    return map_with_path(leaf_fn(format, block_size=block_size, double_quant=double_quant, include=include,
                                 dense_dtype=dense_dtype), params)


def _cast(x, dtype):
    if isinstance(x, np.ndarray):
        x = x.astype(dtype)  # on the host, so that the float32 copy never reaches the device
    return jnp.asarray(x).astype(dtype)
