"""Quantizing the frozen base: which leaves become QuantizedWeights, either on a whole tree or leaf by leaf
while a checkpoint loads."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.host import Layers, device_array
from jaxft.quant.weight import QuantizedWeight, check_settings, check_shape, quantize
from jaxft.tree import map_with_path

# every linear map of the blocks (T5: of both stacks); embeddings, norms, T5's position biases and the head stay dense
LINEAR_WEIGHTS = r"((encoder|decoder)/)?layers/.*/w"


def leaf_fn(format: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
            include: str = LINEAR_WEIGHTS, dense_dtype=jnp.bfloat16) -> Callable[[str, Any], Any]:
    """A `(path, array) -> leaf` hook for a loader to apply to each leaf as it arrives (quantize while loading).

    Leaves whose path fully matches the regex `include` become QuantizedWeights (see `quantize`); other
    floating leaves are cast to `dense_dtype` (None keeps their dtype). Errors name the path.
    It takes stacked leaves layer by layer (`by_layer`, see `jaxft.host.Layers`): each layer is
    quantized or cast as soon as it is read, so a stacked leaf never exists in float32, and the leaf is the
    layers' results stacked, equal to those of the whole stacked array.
    """
    rx = re.compile(include)
    check_settings(format, block_size)  # a bad setting fails before the first leaf arrives

    def quantized(path: str, x) -> QuantizedWeight:
        try:
            return quantize(x, format, block_size, double_quant)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def by_layer(path: str, layers: Layers) -> QuantizedWeight:
        try:
            check_shape(layers.shape, block_size)  # before the first layer is read, naming the stacked shape
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        # each layer's arrays come back to the host as it is done; stacked there (no stacking program to compile)
        parts = [jax.device_get(quantized(path, layers[i])) for i in range(len(layers))]
        return jax.tree.map(lambda *arrays: device_array(arrays), *parts)

    def fn(path: str, x):
        if rx.fullmatch(path):
            return by_layer(path, x) if isinstance(x, Layers) else quantized(path, x)
        if isinstance(x, (np.ndarray, Layers)):  # cast on the host: a float32 copy never reaches the device
            return device_array(x, dense_dtype, floating_only=True)
        x = jnp.asarray(x)  # a leaf already on the device (`quantize_params`)
        return x.astype(dense_dtype) if dense_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x

    fn.by_layer = True
    return fn


def quantize_params(params: dict, format: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
                    include: str = LINEAR_WEIGHTS, dense_dtype=jnp.bfloat16) -> dict:
    """The frozen base with its linear weights quantized (the same tree, `w` leaves replaced by
    QuantizedWeights) and every other floating leaf cast to `dense_dtype`. Arguments as in `leaf_fn`."""
    return map_with_path(leaf_fn(format, block_size=block_size, double_quant=double_quant, include=include,
                                 dense_dtype=dense_dtype), params)

