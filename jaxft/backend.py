"""The backend policy: every choice that is about one backend's speed or memory, resolved once per run from
(backend, compute dtype, quantization) and passed down like the mesh layout (the trainer's layer loop,
`jaxft.train.build.unroll_layers`; `jaxft.generate`'s decode unrolling and output head).

Model and generation code take the policy's fields as plain arguments and carry no backend knowledge of
their own; the measurements behind each CPU choice are in bench/README.md (bench/train_step.py,
bench/generate.py, bench/qlora.py). On GPU and TPU nothing here duplicates weights or changes the program
that XLA would otherwise compile, except what is stated for accelerators below.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LAYER_LOOPS = ("auto", "scan", "unroll")
BACKENDS = ("cpu", "gpu", "tpu")


class PolicyError(ValueError):
    """A setting the policy cannot honour; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a run does differently per backend. Hashable: jitted functions may take it as a static argument."""
    backend: str  # cpu | gpu | tpu
    unroll_layers: bool  # training / evaluation: the layer stack as straight-line code instead of a scan
    decode_unroll_from: int | None  # batch size from which decoding splits the layer stack (None: never)
    tied_head_table_first: bool  # decoding with a tied head: (V, D) table as the left operand of the matmul


def resolve(backend: str | None = None, dtype=jnp.float32, quantized: bool = False,
            layer_loop: str = "auto") -> Policy:
    """The policy for `backend` (default: JAX's default backend) computing in `dtype`, with a quantized base or
    not; `layer_loop` is `train.layer_loop` (`auto` leaves it to the policy).

    CPU (XLA:CPU, measured on 2-core x86 machines):
    - bfloat16 layers unrolled: XLA:CPU converts every bf16 array a scan slices (frozen weights, saved
      residuals) to float32 outside the loop and back inside it each step; float32 runs faster scanned; a
      quantized base stays scanned (unrolled, the dequantized weights stay alive across the step).
    - decoding from 4 prompts on reads per-layer weight buffers instead of slicing the stack each step (costs a
      second copy of the layer weights while generating);
    - the tied output head at decode puts the (V, D) table on the left of the matmul.
    GPU / TPU: the layer scan (short compiles, no copies), decoding over the stacked weights, the head's
    operands in their natural order.
    """
    backend = backend or jax.default_backend()
    if backend not in BACKENDS:
        raise PolicyError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if layer_loop not in LAYER_LOOPS:
        raise PolicyError(f"train.layer_loop: {layer_loop!r} is not one of {', '.join(LAYER_LOOPS)}")
    cpu = backend == "cpu"
    if layer_loop == "auto":
        unroll = cpu and jnp.dtype(dtype) == jnp.bfloat16 and not quantized
    else:
        unroll = layer_loop == "unroll"
    return Policy(backend=backend, unroll_layers=unroll, decode_unroll_from=4 if cpu else None,
                  tied_head_table_first=cpu)


def decode_unrolled(policy: Policy, batch: int) -> bool:
    """Whether decoding `batch` prompts runs over split per-layer weights."""
    return policy.decode_unroll_from is not None and batch >= policy.decode_unroll_from
