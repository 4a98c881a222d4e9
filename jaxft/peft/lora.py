"""LoRA, rsLoRA and DoRA as a trainable tree that sits beside the frozen base weights it adapts.

For a base weight at `layers/attn/q_proj/w` of shape (L, in, out) the trainable tree holds
`layers/attn/q_proj/lora_a` (L, in, R), `.../lora_b` (L, R, out) and, for DoRA, `.../magnitude` (L, out).
The model's `linear` hook (`jaxft.models.hooks`) finds them next to `w` after `jaxft.tree.overlay`.
A mixture of experts' weight `layers/mlp/experts/*/w` (L, E, in, out) gets per-expert factors (L, E, in, R) and
(L, E, R, out), applied inside the grouped expert products (the `grouped_linear` hook, `jaxft.models.moe`:
no (E, in, out) delta is ever formed); `all-linear` covers them and leaves the router frozen (a regex naming
`router` adapts it). DoRA there holds a magnitude per expert and output (L, E, out), applied to the grouped
products' rows (`expert_linear`). On the experts: no dropout.
The arithmetic follows HF PEFT, so that adapters move between the two without changing outputs.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.models import family
from jaxft.models.hooks import Hooks
from jaxft.models.layers import einsum, linear as plain_linear
from jaxft.models.moe import grouped_linear as moe_grouped_linear
from jaxft.peft.method import MethodSpec, PeftError
from jaxft.quant import as_dense

ALL_LINEAR = r"((encoder|decoder)/)?layers/.*/w"  # every linear weight of the blocks (of both T5 stacks); the
#                                                   output head stays frozen, as in PEFT


SHAPING = ("rank", "targets", "dora")


class LoraError(ValueError):
    """A LoRA setting jaxft cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class LoraSpec(Hooks):
    """The static (hashable) part of a LoRA adapter, passed to the model next to the trainable arrays (as
    `peft=`, it stands for `MethodSpec('lora', lora=spec)`)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed LoRA: a learned magnitude per output

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    method = "lora"  # (not a field)

    def linear(self, x, p: dict, rng=None):
        return adapted_linear(self, x, p, rng)

    def grouped_linear(self, x, p: dict, group_sizes, impl: str):
        return expert_linear(self, x, p, group_sizes, impl)

    def as_method(self) -> MethodSpec:
        return MethodSpec("lora", lora=self)


def linear(spec, x, p: dict, rng=None):
    """The `linear` hook of MethodSpec('lora'): x (..., in) -> (..., out), see `adapted_linear`."""
    return adapted_linear(spec.lora, x, p, rng)


def grouped_linear(spec, x, p: dict, group_sizes, impl: str):
    """The `grouped_linear` hook of MethodSpec('lora'), see `expert_linear`."""
    return expert_linear(spec.lora, x, p, group_sizes, impl)


def expert_linear(spec: LoraSpec, x, p: dict, group_sizes, impl: str):
    """Rows x (M, in) sorted by expert (group_sizes (E,)) -> (M, out) float32: x @ W_e (+ scaling * (x @ A_e) @ B_e
    where p holds the expert's factors lora_a (E, in, R), lora_b (E, R, out)), as grouped products
    (`jaxft.models.moe`). With DoRA's magnitude (E, out), each row is then scaled by its expert's
    m_e / ||W_e + s A_e B_e|| (the norm over the input axis, a constant for the gradient, as `lora_delta`)."""
    q = {k: p[k] for k in ("w", "lora_a", "lora_b") if k in p}
    y = moe_grouped_linear(x, q, group_sizes, spec.scaling if "lora_a" in q else 1.0, impl)
    if "magnitude" not in p:
        return y
    norm = jax.lax.stop_gradient(expert_weight_norm(p["w"], p["lora_a"], p["lora_b"], spec.scaling))
    scale = p["magnitude"].astype(jnp.float32) / norm  # (E, out)
    ends = jnp.cumsum(group_sizes)
    expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right"), ends.shape[0] - 1)
    return y * scale[expert]  # rows past sum(group_sizes) are zeros and stay so


def expert_weight_norm(w, a, b, scaling: float):
    """||W_e + s A_e B_e|| over the input axis: w (E, in, out) dense or quantized, a (E, in, R), b (E, R, out)
    -> (E, out) float32, without forming the (E, in, out) sum: per column, ||W||^2 + 2 s <W, A B> + s^2 ||A B||^2,
    with W^T A (E, out, R) and A^T A (E, R, R) the only products kept."""
    w = as_dense(w, jnp.float32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    cross = jnp.einsum("eor,ero->eo", jnp.einsum("eio,eir->eor", w, a), b)
    ab_sq = jnp.einsum("ero,ers,eso->eo", b, jnp.einsum("eir,eis->ers", a, a), b)
    return jnp.sqrt(jnp.maximum(jnp.sum(w * w, axis=-2) + 2 * scaling * cross + scaling ** 2 * ab_sq, 0.0))


def adapted_linear(spec: LoraSpec | None, x, p: dict, rng=None):
    """x (..., in) -> (..., out) in x's dtype: the base layer's output x @ w (+ b) plus LoRA's term, where `p`
    holds lora_a beside w; else the plain map.

    As HF PEFT computes it: the base output (bias included) and LoRA's term are each rounded to the compute
    dtype, then added in it. The matmuls accumulate in float32 inside, but a bf16 model keeps no pair of
    float32 (..., out) arrays alive until their sum (at long sequences the largest buffers of a step,
    bench/README.md). float32 models: plain LoRA without a bias computes exactly what it did when the sum was
    float32; with a bias or DoRA the additions are in PEFT's order, which moves results by rounding only.
    """
    if "lora_a" not in p:
        return plain_linear(x, p)
    dtype = x.dtype
    w = as_dense(p["w"], dtype)
    xw = einsum("...i,io->...o", x, w)  # float32
    base = xw + p["b"].astype(jnp.float32) if "b" in p else xw
    return base.astype(dtype) + lora_delta(x, w, xw, p, spec, rng).astype(dtype)


def target_paths(base: dict, targets: str, model_type: str = "llama") -> list[str]:
    """Paths of the base weights that LoRA adapts: `targets` is a regex over paths, 'default' or 'all-linear'."""
    pattern = {"default": family(model_type).LORA_TARGETS, "all-linear": ALL_LINEAR}.get(targets, targets)
    flat = tree.flatten(base)
    try:  # stacked linear weights (L, in, out), and experts' (L, E, in, out)
        paths = [p for p in tree.select(base, pattern) if p.endswith("/w")
                 and len(_shape(flat[p])) == (4 if _EXPERTS.search(p) else 3)]
    except re.error as e:
        raise LoraError(f"lora.targets: {targets!r} is not a valid regex ({e})") from None
    if targets == "all-linear":  # the router stays frozen unless a regex names it
        paths = [p for p in paths if "/router/" not in p]
    if not paths:
        raise LoraError(f"lora.targets: {targets!r} matches no linear weight of the model "
                        f"(paths look like 'layers/attn/q_proj/w')")
    for part in ("experts", "router"):  # a regex naming a part the model lacks would adapt the rest silently
        if pattern is targets and part in targets and not any(f"/{part}/" in p for p in paths):
            raise LoraError(f"lora.targets: {targets!r} names {part}, but this {model_type} model has no "
                            f"{part}/ weights (expected a mixture of experts, e.g. mixtral)")
    return paths


def init(key, base: dict, spec: LoraSpec, paths: list[str], init_a: str = "kaiming") -> dict:
    """The trainable tree: A as in PEFT (Kaiming-uniform with a=sqrt(5), or gaussian std 1/r), B zeros.

    Adapters are float32 whatever the base dtype: the optimizer updates them in full precision.
    """
    if spec.rank <= 0:
        raise LoraError(f"lora.rank must be positive, got {spec.rank}")
    if not 0.0 <= spec.dropout < 1.0:
        raise LoraError(f"lora.dropout must be in [0, 1), got {spec.dropout}")
    if init_a not in ("kaiming", "gaussian"):
        raise LoraError(f"lora.init must be 'kaiming' or 'gaussian', got {init_a!r}")
    flat_base = tree.flatten(base)
    flat = {}
    for k, path in zip(jax.random.split(key, len(paths)), paths):
        *lead, d_in, d_out = _shape(flat_base[path])  # lead: (L,) or, for experts, (L, E)
        module = path.rsplit("/", 1)[0]
        if init_a == "kaiming":  # kaiming_uniform_(a=sqrt(5)) on (R, in): bound = 1/sqrt(in)
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (*lead, d_in, spec.rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (*lead, d_in, spec.rank), jnp.float32) / spec.rank
        flat[f"{module}/lora_a"] = a
        flat[f"{module}/lora_b"] = jnp.zeros((*lead, spec.rank, d_out), jnp.float32)
        if spec.dora:  # ||W + s B A|| per output, which at init (B = 0) is the column norm of W
            w = as_dense(flat_base[path], jnp.float32)
            flat[f"{module}/magnitude"] = jnp.linalg.norm(w, axis=-2)
    return tree.unflatten(flat)


def lora_delta(x, w, y, p: dict, spec: LoraSpec, rng):
    """The adapter's contribution to add to the base output (float32; `adapted_linear` rounds it to x's dtype).

    x: (..., in), w: (in, out) dense in the compute dtype, y = x @ w (..., out) float32 (before the bias), p:
    lora_a (in, R), lora_b (R, out), magnitude (out,). With `rows` in p, several adapters are stacked and each
    batch row picks one (see `jaxft.multi`).
    """
    if "rows" in p:
        return _per_row(x, y, p)
    if spec is None:
        raise LoraError("the trainable tree holds LoRA weights but no LoraSpec was passed to the model")
    if spec.dropout > 0 and rng is not None:
        x = dropout(rng, x, spec.dropout)
        base_term = einsum("...i,io->...o", x, w)
    else:
        base_term = y
    a, b = p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype)
    h = einsum("...i,ir->...r", x, a).astype(x.dtype)
    lora_out = einsum("...r,ro->...o", h, b) * spec.scaling
    if "magnitude" not in p:
        return lora_out
    # DoRA: m * (W + s BA) / ||W + s BA||, the norm treated as a constant (DoRA paper, section 4.3; as PEFT).
    merged = w.astype(jnp.float32) + spec.scaling * (p["lora_a"] @ p["lora_b"]).astype(jnp.float32)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))
    scale = p["magnitude"].astype(jnp.float32) / norm
    return (scale - 1.0) * base_term + scale * lora_out


def dropout(rng, x, rate: float):
    """x with each element zeroed with probability ~`rate` and the rest scaled so that the mean is kept (torch's
    `nn.Dropout`, as PEFT's lora_dropout). x: any shape; returns x's shape and dtype.

    The mask comes from 8-bit random integers (a quarter of the bits `jax.random.bernoulli` draws, and of the
    buffer that holds them): an element is dropped where its integer is below k = round(rate * 256), so the
    real rate is k / 256 (0.05 -> 13/256 = 0.0508, 0.1 -> 26/256 = 0.1016; exact where rate * 256 is an
    integer), and the kept elements are scaled by 256 / (256 - k), the inverse of the real keep rate, so the
    output's expectation is x. A rate that 8 bits round to 0 or 1 (under 1/512 or over 511/512) draws 16-bit
    integers instead, the same way.
    """
    bits, k = _dropout_bits(rate)
    draws = jax.random.bits(rng, x.shape, jnp.uint8 if bits == 8 else jnp.uint16)
    return jnp.where(draws >= k, x * (2 ** bits / (2 ** bits - k)), 0).astype(x.dtype)


def _dropout_bits(rate: float) -> tuple[int, int]:
    """(width of the random integers, k): an element is dropped where its integer is below k, see `dropout`."""
    k = round(rate * 256)
    if 0 < k < 256:
        return 8, k
    return 16, min(max(round(rate * 2 ** 16), 1), 2 ** 16 - 1)


def _per_row(x, y, p: dict):
    """N adapters stacked, row b of the batch using adapter rows[b] (N: none), for inference (no dropout).

    x: (B, ..., in), p: rows (B,) int32, lora_a (N, in, R), lora_b (N, R, out) with each adapter's scaling
    folded in, and dora_scale (N, out), DoRA's m / ||W + s B A|| (ones for plain LoRA), where any is DoRA.
    The rows' A and B are gathered here, one layer at a time, rather than copied per row for the whole model.
    """
    rows = p["rows"]
    a = jnp.take(p["lora_a"], rows, axis=0, mode="fill", fill_value=0).astype(x.dtype)  # (B, in, R)
    b = jnp.take(p["lora_b"], rows, axis=0, mode="fill", fill_value=0).astype(x.dtype)  # (B, R, out)
    h = jnp.einsum("b...i,bir->b...r", x, a, preferred_element_type=jnp.float32).astype(x.dtype)
    lora_out = jnp.einsum("b...r,bro->b...o", h, b, preferred_element_type=jnp.float32)
    if "dora_scale" not in p:
        return lora_out
    scale = jnp.take(p["dora_scale"], rows, axis=0, mode="fill", fill_value=1).astype(jnp.float32)  # (B, out)
    scale = scale.reshape(scale.shape[:1] + (1,) * (x.ndim - 2) + scale.shape[1:])
    return (scale - 1.0) * y + scale * lora_out


def build(key, base: dict, config, cfg, tokenizer=None):
    c = config.lora
    spec = LoraSpec(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), rslora=c.rslora, dora=c.dora)
    paths = target_paths(base, c.targets, cfg.model_type)
    return init(key, base, spec, paths, init_a=c.init), MethodSpec("lora", lora=spec)


def check(spec, flat: dict, base: dict, about: str) -> None:
    """Raises PeftError unless every module of `flat` (path -> shape) is a linear layer of the base (path ->
    shape) holding exactly the leaves of `spec` (LoraSpec or MethodSpec) in their shapes."""
    spec = spec.lora if isinstance(spec, MethodSpec) else spec
    for module in sorted({p.rsplit("/", 1)[0] for p in flat}):
        w = base.get(f"{module}/w")
        if w is None or len(w) != (4 if _EXPERTS.search(module + "/w") else 3):
            raise PeftError(f"{module} is not a linear layer of the base model ({about})")
        *lead, d_in, d_out = w
        want = {"lora_a": (*lead, d_in, spec.rank), "lora_b": (*lead, spec.rank, d_out)}
        if spec.dora:
            want["magnitude"] = (*lead, d_out)
        leaves = {p.rsplit("/", 1)[1] for p in flat if p.rsplit("/", 1)[0] == module}
        if leaves != set(want):
            raise PeftError(f"{module} holds {sorted(leaves)}, expected {sorted(want)} for a "
                            f"{'DoRA' if spec.dora else 'LoRA'} adapter")
        for leaf, shape in want.items():
            got = flat[f"{module}/{leaf}"]
            if got != shape:
                raise PeftError(f"{module}/{leaf} has shape {got}, but a rank-{spec.rank} adapter of this base needs "
                                f"{shape}: it was made for another model ({about})")


def settings(config, spec, flat: dict) -> list:
    c, spec = config.lora, spec.lora if isinstance(spec, MethodSpec) else spec
    return [("lora.rank", c.rank, spec.rank), ("lora.alpha", float(c.alpha), spec.alpha),
            ("lora.rslora", bool(c.rslora), spec.rslora), ("lora.dora", bool(c.dora), spec.dora)]


def selection(config) -> tuple[str, bool]:
    """The setting that chooses the adapted modules, as `peft.init_from` names it (listing modules)."""
    return f"lora.targets={config.lora.targets!r}", False


def merge(base: dict, trainable: dict, spec, dtype=None) -> dict:
    """Plain weights whose outputs equal the adapted model's: W + s A B (DoRA: rescaled per output); spec: the
    LoraSpec (or its MethodSpec).

    A quantized base weight is dequantized first (a QLoRA user has no original weights to merge onto).
    Returns a new base tree; leaves without adapters are shared, not copied.
    """
    spec = spec.lora if isinstance(spec, MethodSpec) else spec
    flat = tree.flatten(base)
    for module, node in _adapted_modules(trainable):
        w = as_dense(flat[f"{module}/w"], jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", node["lora_a"], node["lora_b"]) * spec.scaling
        merged = w + delta
        if "magnitude" in node:  # (a zero column, e.g. an MLP a layer does not use (qwen3_moe), stays zero)
            norm = jnp.linalg.norm(merged, axis=-2)
            merged = merged * jnp.where(norm > 0, node["magnitude"] / jnp.where(norm > 0, norm, 1.0), 0.0)[..., None, :]
        original = flat[f"{module}/w"]
        out_dtype = dtype or (jnp.float32 if hasattr(original, "dequantize") else original.dtype)
        flat[f"{module}/w"] = merged.astype(out_dtype)
    return tree.unflatten(flat)


def _adapted_modules(trainable: dict):
    flat = tree.flatten(trainable)
    modules = sorted({p.rsplit("/", 1)[0] for p in flat if p.endswith("/lora_a")})
    for m in modules:
        yield m, {k: flat[f"{m}/{k}"] for k in ("lora_a", "lora_b", "magnitude") if f"{m}/{k}" in flat}


_EXPERTS = re.compile(r"(^|/)experts/")  # a mixture of experts' stacked (L, E, in, out) weights


def _shape(leaf) -> tuple:
    return tuple(leaf.shape)
