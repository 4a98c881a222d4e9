"""The backend policy: every choice that is about one backend's speed or memory, resolved once per run from
(backend, compute dtype, quantization) and passed down like the mesh layout (the trainer's layer loop,
`jaxft.train.build.unroll_layers`; `jaxft.generate`'s decode unrolling and output head).

Model and generation code take the policy's fields as plain arguments and carry no backend knowledge of
their own; the measurements behind each CPU choice are in bench/README.md (bench/train_step.py,
bench/generate.py, bench/qlora.py). On GPU and TPU nothing here duplicates weights or changes the program
that XLA would otherwise compile, except what is stated for accelerators below.

Not a backend choice, so not here: `jaxft.models.layers.einsum`'s low-precision backward (with bf16 operands
the gradient matmuls run in bf16, accumulating in f32, as bf16 training on TPUs and GPUs does; JAX's own
transpose would promote every frozen weight to f32 on every step on any backend). It is the numerics of bf16
compute everywhere, tested against the plain gradient in tests/test_mixed_einsum.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LAYER_LOOPS = ("auto", "scan", "unroll")
REMAT = ("auto", "true", "false")
BACKENDS = ("cpu", "gpu", "tpu")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")
# train.remat=auto on the CPU: layers rematerialized from this many tokens of a micro-batch per device (`resolve`)
CPU_REMAT_TOKENS = 4096


class PolicyError(ValueError):
    """A setting the policy cannot honour; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a run does differently per backend. Hashable: jitted functions may take it as a static argument."""
    backend: str  # cpu | gpu | tpu
    unroll_layers: bool  # training / evaluation: the layer stack as straight-line code instead of a scan
    decode_unroll_from: int | None  # batch size from which decoding splits the layer stack (None: never)
    tied_head_table_first: bool  # decoding with a tied head: (V, D) table as the left operand of the matmul
    remat: bool = False  # training: each layer rematerialized in the backward pass (`train.remat`)
    prng_impl: str | None = None  # JAX's PRNG for dropout (`jax_default_prng_impl`); None: JAX's default
    compiler_options: tuple = ()  # (name, value) pairs for XLA when compiling a train step (`compiler_options`)


@dataclasses.dataclass(frozen=True)
class Attention:
    """How the families compute attention (the `attention.*` keys), carried to them by the run's
    `jaxft.parallel.Layout`: the keywords of `jaxft.models.attention.attention` of the same names. backend:
    the platform the step is compiled for (None: JAX's default; an ahead-of-time compile for a TPU from a CPU
    host says 'tpu'). Hashable, as the layout is a static argument of jitted functions."""
    impl: str = "auto"  # one of ATTENTION_IMPLS
    block_q: int = 512
    block_k: int = 512
    interpret: bool = False  # splash in Pallas interpret mode (and cudnn's call through XLA): tests on CPUs
    backend: str | None = None


def attention_of(config, backend: str | None = None) -> Attention:
    """The Attention of a run's config (`attention.*`), compiled for `backend` (None: JAX's default)."""
    a = config.attention
    return Attention(a.impl, a.block_q, a.block_k, a.interpret, backend)


def resolve(backend: str | None = None, dtype=jnp.float32, quantized: bool = False,
            layer_loop: str = "auto", remat="auto", tokens: int = 0) -> Policy:
    """The policy for `backend` (default: JAX's default backend) computing in `dtype`, with a quantized base or
    not; `layer_loop` is `train.layer_loop` and `remat` `train.remat` (`auto` leaves each to the policy);
    `tokens`: the tokens of one micro-batch a device holds (rows x seq_len over the devices that split them;
    `jaxft.train.build.tokens_per_device`), 0 where unknown or not training.

    CPU (XLA:CPU, measured on 2-core x86 machines):
    - bfloat16 layers unrolled: XLA:CPU converts every bf16 array a scan slices (frozen weights, saved
      residuals) to float32 outside the loop and back inside it each step; float32 runs faster scanned; a
      quantized base stays scanned (unrolled, the dequantized weights stay alive across the step), and so do
      rematerialized layers (unrolled, XLA:CPU's scheduler keeps much of what remat drops in a scan).
    - decoding from 4 prompts on reads per-layer weight buffers instead of slicing the stack each step (costs a
      second copy of the layer weights while generating);
    - the tied output head at decode puts the (V, D) table on the left of the matmul.
    - remat from CPU_REMAT_TOKENS tokens a device on: without it the backward pass keeps every layer's
      activations, which grow with the tokens (the default model's step keeps several GiB from 4k tokens on,
      tens at 16k; bench/README.md, long sequences); below, off: a short step fits without it, and remat
      recomputes every layer's forward pass.
    GPU / TPU: the layer scan (short compiles, no copies), decoding over the stacked weights, the head's
    operands in their natural order; remat on (Llama-3-8B shapes, bf16 LoRA on a v5e 2x2 slice: 512 tokens a
    row fit without it, 6,144 with it; issue 17); dropout from the `rbg` PRNG (the 8B step with lora.dropout
    compiled in 407 s for a TPU with threefry bits fused into the LoRA matmuls, 63 s with rbg;
    bench/README.md). rbg's bits differ from threefry's: a run's dropout masks depend on the backend anyway.
    """
    backend = backend or jax.default_backend()
    if backend not in BACKENDS:
        raise PolicyError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if layer_loop not in LAYER_LOOPS:
        raise PolicyError(f"train.layer_loop: {layer_loop!r} is not one of {', '.join(LAYER_LOOPS)}")
    remat = str(remat).lower()  # a config file may say True / False
    if remat not in REMAT:
        raise PolicyError(f"train.remat: {remat!r} is not one of {', '.join(REMAT)}")
    cpu = backend == "cpu"
    remat = (not cpu or tokens >= CPU_REMAT_TOKENS) if remat == "auto" else remat == "true"
    if layer_loop == "auto":
        unroll = cpu and jnp.dtype(dtype) == jnp.bfloat16 and not quantized and not remat
    else:
        unroll = layer_loop == "unroll"
    return Policy(backend=backend, unroll_layers=unroll, decode_unroll_from=4 if cpu else None,
                  tied_head_table_first=cpu, remat=remat, prng_impl=None if cpu else "rbg",
                  compiler_options=(("xla_tpu_spmd_rng_bit_generator_unsafe", True),) if backend == "tpu" else ())


def apply_prng(policy: Policy) -> None:
    """Sets JAX's default PRNG to the policy's (`jax_default_prng_impl`), before any key of the run is made."""
    if policy.prng_impl is not None:
        jax.config.update("jax_default_prng_impl", policy.prng_impl)


def compiler_options(backend: str | None = None) -> dict | None:
    """The policy's XLA options for `backend`'s train step, as `jax.jit(compiler_options=...)` takes them."""
    return dict(resolve(backend).compiler_options) or None


def per_platform(cpu, accelerator):
    """fn(*args) computing `cpu(*args)` when lowered for a CPU and `accelerator(*args)` for a GPU or TPU (the same
    values, laid out for each backend's speed or memory). The choice is made by the compile target
    (`jax.lax.platform_dependent`), so an ahead-of-time compile for a TPU from a CPU host takes the TPU's."""
    return lambda *args: jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)


def decode_unrolled(policy: Policy, batch: int) -> bool:
    """Whether decoding `batch` prompts runs over split per-layer weights."""
    return policy.decode_unroll_from is not None and batch >= policy.decode_unroll_from
