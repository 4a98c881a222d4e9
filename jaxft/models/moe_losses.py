"""The router's auxiliary losses and load statistics, from the router logits the MoE blocks return.

Every function takes the logits of the model's MoE layers, stacked (L, B, T, E) or as a sequence of (B, T, E)
arrays, and optionally the (B, T) mask of real tokens (1) and padding (0), which then counts for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(router_logits, top_k: int, mask=None):
    """Switch Transformer's load-balancing loss, exactly as transformers' `load_balancing_loss_func`:

      E * sum_e f_e * P_e,  f_e = share of the top-k assignments that went to expert e,
                            P_e = mean router probability of expert e,
    both averaged over all layers and real tokens together (not a mean of per-layer losses). A perfectly
    uniform router (f_e = k/E, P_e = 1/E) gives k. Returns a float32 scalar.
    """
    logits, weight = _stacked(router_logits, mask)
    n_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    assigned = jnp.sum(jax.nn.one_hot(chosen, n_experts, dtype=jnp.float32), axis=-2)  # (L, B, T, E)
    rows = logits.shape[0] * jnp.sum(weight)
    tokens_per_expert = jnp.sum(assigned * weight[..., None], axis=(0, 1, 2)) / rows
    prob_per_expert = jnp.sum(probs * weight[..., None], axis=(0, 1, 2)) / rows
    return n_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits, mask=None):
    """ST-MoE's router z-loss: the mean over layers and real tokens of logsumexp(logits)^2 (keeps the logits
    small, so the router's softmax stays in float32's comfortable range). Float32 scalar."""
    logits, weight = _stacked(router_logits, mask)
    z = jax.nn.logsumexp(logits, axis=-1) ** 2  # (L, B, T)
    return jnp.sum(z * weight) / (logits.shape[0] * jnp.sum(weight))


def expert_share(router_logits, top_k: int, mask=None):
    """Per layer, the share of the top-k assignments of real tokens that each expert got, and the imbalance.

    Returns (share (L, E) float32, each row summing to 1; ratio (L,) = max share / min share, inf where an
    expert got nothing: a layer whose ratio grows is collapsing onto a few experts).
    """
    logits, weight = _stacked(router_logits, mask)
    n_experts = logits.shape[-1]
    _, chosen = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # as routed (ties broken alike)
    assigned = jnp.sum(jax.nn.one_hot(chosen, n_experts, dtype=jnp.float32), axis=-2)
    counts = jnp.sum(assigned * weight[..., None], axis=(1, 2))  # (L, E)
    share = counts / jnp.sum(counts, axis=-1, keepdims=True)
    low = jnp.min(share, axis=-1)
    ratio = jnp.where(low > 0, jnp.max(share, axis=-1) / jnp.where(low > 0, low, 1.0), jnp.inf)
    return share, ratio


def _stacked(router_logits, mask):
    """-> (logits (L, B, T, E) float32, weight (B, T) float32)."""
    if isinstance(router_logits, (list, tuple)):
        router_logits = jnp.stack(router_logits)
    logits = jnp.asarray(router_logits, jnp.float32)
    if logits.ndim != 4:
        raise ValueError(f"router logits of shape {logits.shape}: expected (L, B, T, E) or L arrays (B, T, E)")
    if mask is None:
        return logits, jnp.ones(logits.shape[1:3], jnp.float32)
    if tuple(mask.shape) != logits.shape[1:3]:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}: expected (B, T) = {logits.shape[1:3]}")
    return logits, jnp.asarray(mask, jnp.float32)
