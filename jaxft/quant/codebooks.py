"""The value tables of the quantized formats and nearest-value rounding into them, exactly as bitsandbytes does.

  NF4       16 values, the quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers et al. 2023).
  INT4      the integers -8..7; symmetric int4 uses -7..7 (code = q + 8), so that zero is exact and the range
            is symmetric.
  DYNAMIC   bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map()`), used for the double-quantized
            scales: sign, a decimal exponent 10^-6..10^0 and a fraction whose width shrinks as the exponent grows.

Codes are indices into these tables; every table is float32, sorted ascending.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)

INT4 = np.arange(-8, 8, dtype=np.float32)

# Decision thresholds between neighbouring NF4 values, computed in float32 as bitsandbytes computes them.
_NF4_BOUNDS = (NF4[:-1] + NF4[1:]) / np.float32(2)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace` bit for bit (CPU kernel: the first half counts up from `start` with a fused
    multiply-add, the second half down from `end`), so that the dynamic map below equals bitsandbytes'."""
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = (np.float64(a) + np.float64(step) * i).astype(np.float32)  # exact in float64, rounded once: an FMA
    down = (np.float64(b) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, up, down)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 sorted values."""
    values = [np.float32([0.0, 1.0])]
    for e in range(7):
        edges = _torch_linspace(0.1, 1.0, 2 ** e + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (e - 6))
        values += [scale * means, -scale * means]
    return np.sort(np.concatenate(values))


DYNAMIC = _dynamic_map()
_DYNAMIC_BOUNDS = (DYNAMIC[:-1] + DYNAMIC[1:]) * np.float32(0.5)


def encode_nf4(x):
    """x: normalized values in [-1, 1] (float32) -> uint8 NF4 codes of the same shape.

    Nearest value; a value exactly halfway between two goes to the lower one (bitsandbytes' `bucketize`
    against the midpoints, and the `>` thresholds of its CUDA kernel).
    """
    return jnp.sum(x[..., None] > jnp.asarray(_NF4_BOUNDS), axis=-1).astype(jnp.uint8)


def encode_dynamic(x):
    """x: normalized values in [-1, 1] (float32) -> uint8 codes into DYNAMIC of the same shape.

    Nearest value, decided against the float32 midpoints; a value exactly on a midpoint goes to the even
    code. This is what bitsandbytes' CUDA kernel (`dQuantize`, a 7-step binary search that ends on an even
    index and then compares with the midpoints to its neighbours) computes. Its CPU kernel is approximate
    (a lookup table whose resolution misses values within ~1e-5 of zero or very near a midpoint).
    """
    bounds = jnp.asarray(_DYNAMIC_BOUNDS)
    i = jnp.sum(x[..., None] > bounds, axis=-1)  # the number of midpoints strictly below x
    tie = x == bounds[jnp.minimum(i, bounds.size - 1)]
    return jnp.where(tie & (i % 2 == 1), i + 1, i).astype(jnp.uint8)
