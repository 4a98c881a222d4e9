"""The quantized weight: a small pytree of 4-bit codes and blockwise scales that dequantizes inside jit.

Two formats share one layout and one dequantization (a table lookup times a per-block scale):
  nf4   QLoRA's NormalFloat4, bit for bit as bitsandbytes' `quantize_4bit(quant_type="nf4")` stores it:
        blocks of `block_size` (64) consecutive inputs, scale = the block's absmax, each value rounded to the
        nearest of the 16 NF4 values of x / absmax.
  int4  symmetric integers: scale = absmax / 7, q = round(x / scale) (half to even) in -7..7, stored as q + 8.

Double quantization (bitsandbytes' `compress_statistics=True`), in short: the float32 scales are themselves
quantized to 8 bits. Precisely: per weight (one layer), subtract the mean of all its scales (`offset`), cut
the centered scales, flattened in order, into blocks of 256, and store each as an 8-bit code into
bitsandbytes' dynamic map times the block's absmax (`nested_scales`). That brings the cost of a scale from
32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127 bits per weight. The 8-bit codes are those of bitsandbytes' CUDA
kernel (nearest value); its CPU kernel rounds a few of them to a farther neighbour.
"""

from __future__ import annotations

import math
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.backend import per_platform
from jaxft.quant.codebooks import DYNAMIC, INT4, NF4, encode_dynamic, encode_nf4

FORMATS = ("nf4", "int4")
NESTED_BLOCK = 256  # scales per block of the double quantization, fixed by bitsandbytes
# byte -> (value of its high nibble, value of its low nibble), per format
_PAIRS = {name: np.stack([np.repeat(table, 16), np.tile(table, 16)], axis=-1)
          for name, table in (("nf4", NF4), ("int4", INT4))}


@flax.struct.dataclass
class QuantizedWeight:
    """A linear weight w (..., in, out), stored as 4-bit codes and blockwise scales.

    Invariant (`...` are leading axes, e.g. the L stacked layers, first on every array so that `lax.scan`
    and indexing slice all of them together; the static fields describe one slice):
      codes          uint8   (..., out, in // 2)  two codes per byte: w[..., 2j, o] in the high nibble of
                                                  codes[..., o, j], w[..., 2j+1, o] in the low nibble.
                                                  Per output this is bitsandbytes' packing of the torch
                                                  weight (out, in) flattened row-major.
      scales         float32 (..., out, in // block_size)           without double quantization;
                     uint8   (..., out, in // block_size)           with it: codes into DYNAMIC.
      nested_scales  float32 (..., ceil(out * in / block_size / 256)) or None
      offset         float32 (...,)                                   or None
    and
      scale[..., o, b] = scales                                                   (single quantization)
                       = DYNAMIC[scales].flat[k] * nested_scales[k // 256] + offset   (k = o * in / block_size + b)
      w[..., i, o]    ~= TABLE[code of w[..., i, o]] * scale[..., o, i // block_size]
    with TABLE = NF4 for "nf4" and INT4 (code - 8) for "int4".
    """

    codes: jax.Array
    scales: jax.Array
    nested_scales: jax.Array | None
    offset: jax.Array | None
    format: str = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False)
    in_dim: int = flax.struct.field(pytree_node=False)
    out_dim: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense weight it stands for: (..., in, out)."""
        return tuple(self.codes.shape[:-2]) + (self.in_dim, self.out_dim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def block_scales(self):
        """(..., out, in // block_size) float32: the scale of every block, double quantization undone."""
        if self.offset is None:
            return self.scales
        lead = self.scales.shape[:-2]
        n = self.out_dim * (self.in_dim // self.block_size)
        q = self.scales.reshape(*lead, n)
        q = jnp.pad(q, [(0, 0)] * len(lead) + [(0, (-n) % NESTED_BLOCK)])
        centered = jnp.asarray(DYNAMIC)[q].reshape(*lead, -1, NESTED_BLOCK) * self.nested_scales[..., None]
        centered = _rounded(centered)
        scale = centered.reshape(*lead, -1)[..., :n] + self.offset[..., None]
        return scale.reshape(self.scales.shape)

    def dequantize(self, dtype=jnp.bfloat16):
        """-> (..., in, out) dense weight of `dtype`. Pure jnp: traced inside the caller's jit, where XLA makes it
        one pass that writes the weight (computed in float32 and cast once, as bitsandbytes does). Each byte is
        looked up whole, both of its values at once, which XLA's gather does much faster than two nibbles.

        Two layouts of the same values, chosen by the compile target (`jaxft.backend.per_platform`):
        - CPU: gathered as (value, value) pairs from the transposed codes, so that the weight comes out in (in,
          out) order: a transposed matmul operand makes XLA's CPU backend run a bf16 matmul in float32, 1.6x
          slower, and this lookup ran 1.3-2.5x faster on the CPU than the accelerators' (bench/README.md).
        - GPU / TPU: gathered from a complex64 table (high nibble's value + i * low nibble's) in the codes' own
          order and transposed at the end, which the matmul takes for free. A pairs gather ends in an axis of 2,
          which a TPU's (8, 128) tiles pad 64-fold (3.5 GiB buffers for an 8B MLP weight), and gathering from
          transposed codes made XLA copy every layer's codes into a transposed layout before the layer scan
          (bench/README.md, the long-context trace).
        """
        return per_platform(partial(_dense_cpu, dtype=dtype), partial(_dense_accelerator, dtype=dtype))(self)


def _dense_cpu(q: QuantizedWeight, dtype):
    lead = q.codes.shape[:-2]
    pairs = jnp.asarray(_PAIRS[q.format])[jnp.swapaxes(q.codes, -1, -2)]  # (..., in // 2, out, 2)
    values = jnp.swapaxes(pairs, -1, -2).reshape(*lead, -1, q.block_size, q.out_dim)
    scales = jnp.swapaxes(q.block_scales(), -1, -2)[..., :, None, :]  # (..., in // block_size, 1, out)
    return (values * scales).reshape(*lead, q.in_dim, q.out_dim).astype(dtype)


def _dense_accelerator(q: QuantizedWeight, dtype):
    lead = q.codes.shape[:-2]
    table = jnp.asarray(_PAIRS[q.format] @ np.array([1, 1j]), jnp.complex64)  # (256,)
    both = table[q.codes]  # (..., out, in // 2)
    pairs = jnp.stack([jnp.real(both), jnp.imag(both)], -1)  # (..., out, in // 2, 2)
    values = pairs.reshape(*lead, q.out_dim, -1, q.block_size)
    w = (values * q.block_scales()[..., None]).reshape(*lead, q.out_dim, q.in_dim).astype(dtype)
    return jnp.swapaxes(w, -1, -2)


def quantize(w, format: str = "nf4", block_size: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """w: (..., in, out) float (numpy or jax) -> QuantizedWeight, blocks of `block_size` along `in`.

    Leading axes (layers) are quantized one slice at a time, so a host array of all layers is never on the
    device in float32 at once. `block_size` is the group size of int4.
    """
    check_settings(format, block_size)
    shape = tuple(w.shape)
    check_shape(shape, block_size)
    in_dim, out_dim = shape[-2:]
    lead = shape[:-2]
    flat = w.reshape(-1, in_dim, out_dim)
    slices = [_quantize_matrix(flat[i], format, block_size, double_quant) for i in range(flat.shape[0])]
    arrays = [None if parts[0] is None else jnp.stack(parts).reshape(lead + parts[0].shape)
              for parts in zip(*slices)]
    return QuantizedWeight(*arrays, format=format, block_size=block_size, in_dim=in_dim, out_dim=out_dim)


def check_shape(shape: tuple[int, ...], block_size: int) -> None:
    """Raises a one-line ValueError if a weight of `shape` (..., in, out) cannot be cut into blocks along `in`."""
    if len(shape) < 2:
        raise ValueError(f"cannot quantize a weight of shape {shape}: expected (..., in, out)")
    if shape[-2] % block_size:
        raise ValueError(f"block_size={block_size} does not divide the in dimension {shape[-2]} of the weight {shape}")


def check_settings(format: str, block_size: int) -> None:
    """Raises a one-line ValueError naming the setting for an unknown format or an unusable block size."""
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r} (expected one of {', '.join(FORMATS)})")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size={block_size!r} must be a positive even number (two codes per byte)")


@partial(jax.jit, static_argnames=("format", "block_size", "double_quant"))
def _quantize_matrix(w, format: str, block_size: int, double_quant: bool):
    """w (in, out) -> (codes, scales, nested_scales, offset) of one slice, per the QuantizedWeight invariant."""
    in_dim, out_dim = w.shape
    x = w.astype(jnp.float32).T.reshape(out_dim, in_dim // block_size, block_size)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    if format == "nf4":
        # x * (1 / absmax), not x / absmax: the rounding bitsandbytes applies before picking a code.
        inv = jnp.where(absmax > 0, 1.0 / absmax, 0.0)
        codes = encode_nf4(jnp.clip(x * inv[..., None], -1.0, 1.0))
        scales = absmax
    else:
        scales = absmax / 7.0
        q = jnp.round(x / jnp.where(scales > 0, scales, 1.0)[..., None])
        codes = (jnp.clip(q, -7, 7) + 8).astype(jnp.uint8)
    codes = codes.reshape(out_dim, in_dim)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    if not double_quant:
        return packed, scales, None, None
    return (packed, *_double_quantize(scales))


def _double_quantize(scales):
    """scales (out, blocks) float32 -> (uint8 codes (out, blocks), nested_scales (n,), offset ())."""
    flat = scales.reshape(-1)
    offset = _rounded(jnp.mean(flat))  # the stored offset is the one subtracted: sum * (1/n) - x is no FMA
    n = flat.size
    padded = jnp.pad(flat - offset, (0, (-n) % NESTED_BLOCK)).reshape(-1, NESTED_BLOCK)
    absmax = jnp.max(jnp.abs(padded), axis=-1)
    inv = jnp.where(absmax > 0, 1.0 / absmax, 0.0)  # multiply by the reciprocal, as bitsandbytes' CUDA kernel
    normed = jnp.clip(padded * inv[:, None], -1.0, 1.0)
    codes = encode_dynamic(normed).reshape(-1)[:n].reshape(scales.shape)
    return codes, absmax, offset


def _rounded(x):
    """x, rounded to float32 before it is added to anything: XLA fuses `a * b + c` into one FMA, which rounds
    differently from bitsandbytes (and from the stored offset). `x == x` holds (no NaN here) but, without
    fast math, the compiler cannot assume it, so the select keeps the product out of the addition."""
    return jnp.where(x == x, x, 0.0)


def stored_bits(tree) -> float:
    """Bits actually stored (codes, scales, nested scales, offsets) per parameter of the quantized weights
    in `tree`; dense leaves are not counted."""
    weights = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight))
               if isinstance(x, QuantizedWeight)]
    if not weights:
        raise ValueError("stored_bits: the tree holds no quantized weight")
    bits = sum(8 * a.dtype.itemsize * a.size for q in weights for a in jax.tree_util.tree_leaves(q))
    return bits / sum(math.prod(q.shape) for q in weights)
