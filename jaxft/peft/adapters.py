"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a sublayer.

  h -> h + up(act(down(h)))      down: (D, S), up: (S, D), each with a bias; S = adapter.size

Houlsby places one after the attention block's output projection and one after the MLP, Pfeiffer after the
MLP only; both act on the sublayer's output before it joins the residual stream. In T5 the attention block is
each stack's self-attention (the decoder's cross-attention gets none). `up` starts at zero, so at
initialization every adapter is the identity and the model computes exactly what the base computes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.models.layers import dense
from jaxft.peft.method import ACTIVATIONS, PeftError

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
_ACT = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}


def init(key, stacks: dict[str, int], dim: int, size: int, placement: str, attn: str = "attn") -> dict:
    """The trainable tree: `<stack>{attn,mlp}/adapter/{down,up}/{w,b}` stacked on each stack's L (see the module
    docstring); stacks: {prefix: L} of the model's layer stacks (`jaxft.peft.full.stacks`: `layers/`, or T5's
    `encoder/layers/` and `decoder/layers/`); attn: the name of the attention block (T5: `self_attn`).

    down: Kaiming-uniform as LoRA's A (bound 1/sqrt(D)), so that the bottleneck sees a signal from the start;
    up and both biases: zeros.
    """
    if placement not in PLACEMENTS:
        raise PeftError(f"adapter.placement: {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if not 0 < size <= dim:
        raise PeftError(f"adapter.size must be in [1, {dim}] (the model width), got {size}")
    flat = {}
    keys = iter(jax.random.split(key, len(PLACEMENTS[placement]) * len(stacks)))
    for stack, n_layers in stacks.items():
        for where in PLACEMENTS[placement]:
            where = attn if where == "attn" else where
            bound = 1.0 / math.sqrt(dim)
            flat[f"{stack}{where}/adapter/down/w"] = jax.random.uniform(next(keys), (n_layers, dim, size),
                                                                        jnp.float32, -bound, bound)
            flat[f"{stack}{where}/adapter/down/b"] = jnp.zeros((n_layers, size), jnp.float32)
            flat[f"{stack}{where}/adapter/up/w"] = jnp.zeros((n_layers, size, dim), jnp.float32)
            flat[f"{stack}{where}/adapter/up/b"] = jnp.zeros((n_layers, dim), jnp.float32)
    return tree.unflatten(flat)


def bottleneck(h, p: dict, spec):
    """h (B, T, D) -> h + up(act(down(h))), in h's dtype; p: down/{w (D, S), b (S,)}, up/{w (S, D), b (D,)};
    spec: the MethodSpec, whose `activation` is the non-linearity."""
    if spec is None or spec.activation not in ACTIVATIONS:
        raise PeftError(f"bottleneck adapter leaves need peft=MethodSpec('adapter', activation=one of "
                        f"{', '.join(ACTIVATIONS)}), got {spec}")
    return h + dense(_ACT[spec.activation](dense(h, p["down"])), p["up"])
