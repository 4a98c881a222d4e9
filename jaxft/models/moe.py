"""The mixture-of-experts MLP block: routing, the grouped expert computation, and sparse upcycling.

Axis letters as in `jaxft.models.layers`, plus E experts and k the experts chosen per token (top-k); N = B*T
tokens and M = N*k routed rows (one per token and chosen expert). One layer's parameters (a model stacks L of
them on a leading axis and scans, as for the dense MLP):

  router/w                  (D, E)         logits = x @ w, as transformers' `gate` (weight (E, D) transposed)
  experts/{gate,up}_proj/w  (E, D, F)      dense, or a `jaxft.quant.QuantizedWeight` with the leading E axis
  experts/down_proj/w       (E, F, D)
  experts/*/lora_a, lora_b  (E, in, R), (E, R, out)   per-expert LoRA factors (optional)
  shared/{gate,up}_proj/w   (D, Fs), shared/down_proj/w (Fs, D)    Qwen2-MoE's shared expert (optional)
  shared_gate/w             (D, 1)         its sigmoid gate (optional)

Cost of one block, forward, tokens N, width D, expert width F, LoRA rank R (a multiply-add is 2 FLOPs):
  router                 2 N D E
  routed experts         3 matmuls x 2 M D F = 6 N k D F         (all experts for all tokens: 6 N E D F, so the
                                                                   grouped computation is k/E of that)
  LoRA on the experts    3 x 2 M R (D + F) = 6 N k R (D + F)      (never an (E, D, F) delta: 0 extra weight bytes)
  shared expert          6 N D Fs
  sort / gather          O(M log M) integer work; moving M*D inputs in and M*D outputs back
  backward               the inputs' gradient: the same grouped products against the transposed weights (1x);
                         the weights' gradient (another 1x) only where trained: with LoRA on a frozen base, only
                         the rank-R factors' (XLA drops the unused one)
Memory: weights 3 E D F (NF4 / int4: about 0.53 byte each with double quantization), dequantized inside the
product (ragged_dot: one (E, D, F) matrix at a time, recomputed in the backward pass rather than kept; tiled:
one expert's (D, F) per tile); activations kept for the backward pass about M (2 D + 3 F) values (sorted inputs,
gate, up, their product, outputs), LoRA adds 3 M R; router logits N E. Nothing of size N E D or N E F.
The grouped products are `jaxft.models.grouped.grouped_matmul`: `jax.lax.ragged_dot` (XLA's grouped GEMM on GPU
and TPU; on CPU JAX lowers it to E times the FLOPs above) or, by default on CPU, a scan over row tiles
(at most (1 + (E - 1) * 64 / M) times the FLOPs above).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxft.models.grouped import grouped_matmul, impl_for
from jaxft.quant import as_dense


def linear(x, p: dict):
    """x (..., in) @ p["w"] (in, out) (+ p["b"]), dense or quantized: the default for the router and the shared
    expert. A model passes its own (`jaxft.models.layers.dense`) to apply adapters there."""
    y = jnp.einsum("...i,io->...o", x, as_dense(p["w"], x.dtype), preferred_element_type=jnp.float32)
    if "b" in p:
        y = y + p["b"].astype(jnp.float32)
    return y.astype(x.dtype)


def route(logits, top_k: int, normalize: bool):
    """logits (N, E) -> (weights (N, k) float32, experts (N, k) int32).

    Softmax over all E experts in float32, then the k largest probabilities; `normalize` rescales them to sum
    to one (Mixtral always, Qwen2/3-MoE and OLMoE with `norm_topk_prob`). Same order as transformers.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Rows one expert takes: ceil(factor * N * k / E) (factor 1: a perfectly balanced load fits exactly)."""
    return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


def dispatch(experts, n_experts: int, capacity_rows: int | None = None):
    """Sorts the M = N*k assignments by expert.

    experts: (N, k) int32. Assignments are numbered choice-major (m = j * N + n: every token's first choice
    before any second choice), which is the priority when an expert is over capacity: its later rows are
    dropped (GShard / Switch order). Returns (rows, group_sizes, dropped):
      rows         (M',) int32  assignment numbers in expert order, kept ones first; M' = min(M, E * capacity)
      group_sizes  (E,) int32   kept rows per expert (sum <= M'; rows past the sum are dropped ones)
      dropped      ()  int32    assignments dropped for capacity (0 when dropless, capacity_rows None)
    """
    flat = experts.T.reshape(-1)
    m = flat.shape[0]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    if capacity_rows is None:
        return order, counts, jnp.zeros((), jnp.int32)
    starts = jnp.cumsum(counts) - counts
    position = jnp.arange(m, dtype=jnp.int32) - starts[flat[order]]  # rank of the row within its expert
    order = order[jnp.argsort(position >= capacity_rows, stable=True)]  # kept rows first, still by expert
    group_sizes = jnp.minimum(counts, capacity_rows)
    return order[:min(m, n_experts * capacity_rows)], group_sizes, m - jnp.sum(group_sizes)


def grouped_linear(x, p: dict, group_sizes, lora_scale: float = 1.0, impl: str = "ragged_dot"):
    """x (M, in), rows sorted by expert (group_sizes (E,)) -> (M, out) float32: row m times its expert's weight.

    p["w"] (E, in, out), dense or quantized; with p["lora_a"] (E, in, R) and p["lora_b"] (E, R, out) adds
    lora_scale * (x @ A_e) @ B_e, both as grouped products of rank R (the caller's scale: alpha / r, or
    alpha / sqrt(r) for rsLoRA). Rows past sum(group_sizes) give zeros. `impl`: see `jaxft.models.grouped`.
    """
    if hasattr(p["w"], "dequantize") and impl == "ragged_dot":
        return _grouped_quantized(x, p, group_sizes, lora_scale, impl)
    return _grouped(x, p, group_sizes, lora_scale, impl)


def _grouped(x, p, group_sizes, lora_scale, impl):
    lora = (p["lora_a"], p["lora_b"], lora_scale) if "lora_a" in p else None
    return grouped_matmul(x, p["w"], group_sizes, impl, lora=lora)


# Rematerialized, as `jaxft.models.layers.dense` does for a quantized weight: the backward pass dequantizes the
# (E, in, out) weight again instead of keeping its dense copy between the passes. (The tiled product
# dequantizes one expert at a time in both passes by itself.)
_grouped_quantized = jax.checkpoint(_grouped, static_argnums=(3, 4))


def experts_mlp(x, p: dict, group_sizes, lora_scale: float = 1.0, act: Callable = jax.nn.silu,
                impl: str = "ragged_dot", expert_linear: Callable | None = None):
    """The gated MLP of each row's expert: x (M, D) sorted by expert -> (M, D) float32.
    p: gate_proj, up_proj (E, D, F), down_proj (E, F, D) as `grouped_linear` takes them.
    expert_linear(x, p, group_sizes, impl) replaces `grouped_linear` with lora_scale (a method's hook)."""
    if expert_linear is None:
        expert_linear = lambda x, q, sizes, impl: grouped_linear(x, q, sizes, lora_scale, impl)
    gate = expert_linear(x, p["gate_proj"], group_sizes, impl)
    up = expert_linear(x, p["up_proj"], group_sizes, impl)
    h = (act(gate) * up).astype(x.dtype)
    return expert_linear(h, p["down_proj"], group_sizes, impl)


def moe_block(x, p: dict, *, top_k: int, normalize: bool, capacity_factor: float | None = None,
              lora_scale: float = 1.0, act: Callable = jax.nn.silu, dense: Callable = linear,
              grouped: str | None = None, expert_linear: Callable | None = None):
    """The sparse MoE MLP: x (B, T, D) -> (y (B, T, D), aux).

    Each token goes to its top-k experts (`route`); their outputs are summed with the routing weights. Dropless
    unless `capacity_factor` is set (then each expert takes `capacity(...)` rows and the rest contribute
    nothing). With p["shared"], adds the shared expert, gated by sigmoid(x @ shared_gate) when that is present
    (Qwen2-MoE). `dense(x, p)` computes the router and the shared expert (the model's adapter-aware linear).
    `grouped` names the grouped-matmul implementation (`jaxft.models.grouped`); None: the default backend's.
    `expert_linear(x, p, group_sizes, impl)` computes each expert projection instead of `grouped_linear` with
    `lora_scale` (the model's method hook, `jaxft.models.hooks.Hooks.grouped_linear`).
    aux: router_logits (B, T, E) float32, for the losses of `jaxft.models.moe_losses`; dropped () int32.
    """
    b, t, d = x.shape
    n = b * t
    n_experts = _check(p, top_k)
    flat = x.reshape(n, d)
    logits = dense(flat, p["router"]).astype(jnp.float32)
    weights, experts = route(logits, top_k, normalize)
    cap = None if capacity_factor is None else capacity(n, n_experts, top_k, capacity_factor)
    rows, group_sizes, dropped = dispatch(experts, n_experts, cap)
    impl = grouped or impl_for(jax.default_backend())
    out = experts_mlp(flat[rows % n], p["experts"], group_sizes, lora_scale, act, impl, expert_linear)  # (M', D)

    # Back to assignment order: a gather through the inverse permutation (dropped assignments give zeros).
    m = n * top_k
    inverse = jnp.zeros((m,), jnp.int32).at[rows].set(jnp.arange(rows.shape[0], dtype=jnp.int32),
                                                      mode="drop", unique_indices=True)
    kept = jnp.zeros((m,), bool).at[rows].set(jnp.arange(rows.shape[0]) < jnp.sum(group_sizes), mode="drop")
    per_choice = jnp.where(kept[:, None], out[inverse], 0.0).reshape(top_k, n, d)
    y = jnp.einsum("kn,knd->nd", weights.T, per_choice)
    if "shared" in p:
        s = p["shared"]
        shared = dense((act(dense(flat, s["gate_proj"])) * dense(flat, s["up_proj"])).astype(x.dtype), s["down_proj"])
        if "shared_gate" in p:
            shared = jax.nn.sigmoid(dense(flat, p["shared_gate"]).astype(jnp.float32)) * shared
        y = y + shared.astype(jnp.float32)
    return y.astype(x.dtype).reshape(b, t, d), {"router_logits": logits.reshape(b, t, n_experts), "dropped": dropped}


def block_flops(n_tokens: int, dim: int, mlp_dim: int, n_experts: int, top_k: int, rank: int = 0,
                shared_dim: int = 0) -> dict:
    """Forward matmul FLOPs of one block (the module docstring's count): `grouped`, as `moe_block` computes it
    (with ragged_dot; the tiled product adds its edge tiles), and `all_experts`, every expert on every token."""
    router = 2 * n_tokens * dim * n_experts
    shared = 6 * n_tokens * dim * shared_dim + (2 * n_tokens * dim if shared_dim else 0)
    combine = 2 * n_tokens * top_k * dim
    per_row = 6 * dim * mlp_dim + 6 * rank * (dim + mlp_dim)
    return {"grouped": router + n_tokens * top_k * per_row + combine + shared,
            # + a dense (N, E) combine matrix from the top-k (GShard's one-hot einsum) and the sum it weights
            "all_experts": router + n_tokens * n_experts * per_row + 2 * n_tokens * n_experts * (top_k + dim)
            + shared}


def _check(p: dict, top_k: int) -> int:
    """The expert count E, after a one-line ValueError for a router and experts that disagree or a bad top-k."""
    n_experts = p["router"]["w"].shape[-1]
    for name in ("gate_proj", "up_proj", "down_proj"):
        for leaf in ("w", "lora_a", "lora_b"):
            if leaf in p["experts"][name] and p["experts"][name][leaf].shape[0] != n_experts:
                raise ValueError(f"experts/{name}/{leaf} has {p['experts'][name][leaf].shape[0]} experts but "
                                 f"router/w routes to {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k}: expected 1 <= top_k <= the {n_experts} experts")
    return n_experts


def upcycle(mlp: dict, n_experts: int, router_std: float = 0.0, key=None) -> dict:
    """Sparse upcycling (Komatsuzaki et al. 2022): a dense gated MLP {gate,up,down}_proj/w ((..., D, F),
    (..., F, D), leading axes such as L kept) -> MoE block params with E copies of it as the experts.

    With identical experts and renormalized top-k weights (`normalize=True`, Mixtral's routing) the block's
    output is the dense MLP's whatever the router: the k weights sum to one. `router_std` > 0 draws the router
    from a normal (key needed), as Komatsuzaki et al. do; use that to train. The default zero router sends
    every token to experts 0..k-1 (top-k breaks the ties by index), and no router starts with a gradient: while
    the chosen experts are identical, the renormalized weights do not change the output.
    """
    w = {name: _weight(mlp[name]["w"]) for name in ("gate_proj", "up_proj", "down_proj")}
    lead, d = w["gate_proj"].shape[:-2], w["gate_proj"].shape[-2]
    experts = {name: {"w": jnp.broadcast_to(jnp.expand_dims(v, -3), v.shape[:-2] + (n_experts,) + v.shape[-2:])}
               for name, v in w.items()}
    if router_std > 0:
        router = router_std * jax.random.normal(key, lead + (d, n_experts), w["gate_proj"].dtype)
    else:
        router = jnp.zeros(lead + (d, n_experts), w["gate_proj"].dtype)
    return {"router": {"w": router}, "experts": experts}


def _weight(w):
    """A dense array of a weight: quantized ones dequantized to float32 (their experts then stay dense)."""
    return w.dequantize(jnp.float32) if hasattr(w, "dequantize") else jnp.asarray(w)
