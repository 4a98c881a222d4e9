"""Host arrays on their way to the device: a stacked leaf read one layer at a time (`Layers`), and host
arrays put on the device without a copy (`device_array`). The loader (`jaxft.checkpoint`) makes them; a leaf
function (quantize while loading, `jaxft.quant`) consumes them."""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np


class Layers:
    """The L layers of a stacked leaf, each read from the checkpoint when it is indexed: what `assemble` gives a
    leaf_fn that sets the attribute `by_layer = True`, so that it can make its leaf one layer at a time (quantize
    while loading) and the whole stacked leaf never exists in the dtype the checkpoint is read in.

    `layers[i]` reads layer i (host array, e.g. (D, N*H) for `layers/attn/q_proj/w`); index each layer once, in
    order. `np.asarray(layers)` reads them all into one (L, ...) array, the one other leaf_fns are given.
    """

    def __init__(self, path: str, shape: tuple[int, ...], read_layer: Callable[[int], np.ndarray]):
        self.path, self.shape, self._read = path, shape, read_layer

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: layer {i} of {len(self)}")
        return self._read(i)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        stack = _stack(self, lambda stored: stored)
        return stack if dtype is None else stack.astype(dtype, copy=False)


def device_array(x, dtype=None, *, floating_only: bool = False) -> jax.Array:
    """A host array, or a sequence of L host arrays of one shape (e.g. `Layers`, read one at a time), as one jax
    Array ((L, ...) for a sequence) with the values `jnp.asarray(x, dtype)` gives.

    dtype: None keeps the array's own (the widest of a sequence's). floating_only: integer and boolean arrays
      keep theirs.
    Each array is cast on the host straight into a new 64-byte aligned buffer, which the CPU backend adopts as
    the device buffer without a copy (`jnp.asarray` copies twice); other backends copy it once. Nothing else
    holds the buffer, so nothing can change the array behind jax's back.
    """
    def target(host_dtype):
        keep = dtype is None or (floating_only and not np.issubdtype(host_dtype, np.floating))
        return jax.dtypes.canonicalize_dtype(host_dtype if keep else dtype)

    if isinstance(x, np.ndarray):
        out = _aligned(x.shape, target(x.dtype))
        out[...] = x
    else:
        out = _stack(x, target)
    return jax.device_put(out, may_alias=True)


def _stack(arrays, target: Callable) -> np.ndarray:
    """A sequence of host arrays of one shape, read one at a time, stacked along a new leading axis into a new
    64-byte aligned array of dtype target(stored dtype) (the widest, if the arrays are stored in several)."""
    out = None
    for i in range(len(arrays)):
        x = np.asarray(arrays[i])
        if out is None:
            out = _aligned((len(arrays), *x.shape), target(x.dtype))
        elif (wider := np.promote_types(out.dtype, target(x.dtype))) != out.dtype:
            out = _aligned(out.shape, wider, out)
        out[i] = x
    return out


def _aligned(shape: tuple[int, ...], dtype, like: np.ndarray | None = None, align: int = 64) -> np.ndarray:
    """An uninitialized array (or a copy of `like`) whose data starts on an `align`-byte boundary."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start:start + n].view(dtype).reshape(shape)
    if like is not None:
        out[...] = like
    return out
