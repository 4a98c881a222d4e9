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
from jaxft.peft import full
from jaxft.peft.method import ACTIVATIONS, MethodSpec, PeftError

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
SHAPING = ("size", "placement")
UNMERGEABLE = ("bottleneck adapters add a non-linear block after attention and the MLP, which no change of the base "
               "weights computes")
_ACT = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}


def layout(stacks: dict[str, int], dim: int, size: int, placement: str, attn: str) -> dict[str, tuple[int, ...]]:
    """path -> shape of every leaf: `<stack><attn|mlp>/adapter/{down,up}/{w,b}` stacked on each stack's L (see the
    module docstring); stacks: {prefix: L} of the model's layer stacks (`jaxft.peft.full.stacks`: `layers/`, or
    T5's `encoder/layers/` and `decoder/layers/`); attn: the name of the attention block (T5: `self_attn`)."""
    out = {}
    for stack, n_layers in stacks.items():
        for where in PLACEMENTS[placement]:
            at = f"{stack}{attn if where == 'attn' else where}/adapter"
            out.update({f"{at}/down/w": (n_layers, dim, size), f"{at}/down/b": (n_layers, size),
                        f"{at}/up/w": (n_layers, size, dim), f"{at}/up/b": (n_layers, dim)})
    return out


def attention_name(base) -> str:
    """The name of the attention block that gets an adapter in a base (a tree or path -> shape): T5 names it
    self_attn (its cross_attn gets none), the other families attn."""
    return "self_attn" if any("/self_attn/" in p for p, _ in tree.items(base)) else "attn"


def init(key, stacks: dict[str, int], dim: int, size: int, placement: str, attn: str = "attn") -> dict:
    """The trainable tree of `layout`. down: Kaiming-uniform as LoRA's A (bound 1/sqrt(D)), so that the
    bottleneck sees a signal from the start; up and both biases: zeros."""
    if placement not in PLACEMENTS:
        raise PeftError(f"adapter.placement: {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if not 0 < size <= dim:
        raise PeftError(f"adapter.size must be in [1, {dim}] (the model width), got {size}")
    shapes = layout(stacks, dim, size, placement, attn)
    downs = [p for p in shapes if p.endswith("/down/w")]
    keys = dict(zip(downs, jax.random.split(key, len(downs))))
    bound = 1.0 / math.sqrt(dim)
    return tree.unflatten({p: jax.random.uniform(keys[p], shape, jnp.float32, -bound, bound) if p in keys
                           else jnp.zeros(shape, jnp.float32) for p, shape in shapes.items()})


def build(key, base: dict, config, cfg, tokenizer=None):
    c = config.adapter
    if c.activation not in ACTIVATIONS:
        raise PeftError(f"adapter.activation: {c.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return (init(key, full.stacks(base), cfg.dim, c.size, c.placement, attention_name(base)),
            MethodSpec("adapter", activation=c.activation))


def _found(flat: dict) -> tuple[int, str]:
    """(size, placement) of an adapter's leaves (path -> shape)."""
    size = next((s[-1] for p, s in flat.items() if p.endswith("adapter/down/w")), 0)
    attn = any(p.split("/")[-4] in ("attn", "self_attn") for p in flat if p.endswith("adapter/down/w"))
    return size, "houlsby" if attn else "pfeiffer"


def expected(spec, flat: dict, base: dict, cfg) -> dict:
    """The leaves an adapter of the size and placement of `flat` has over a base of these shapes."""
    size, placement = _found(flat)
    return layout(full.stacks(base), cfg.dim, size, placement, attention_name(base))


def settings(config, spec, flat: dict) -> list:
    size, placement = _found(flat)
    c = config.adapter
    return [("adapter.size", c.size, size), ("adapter.placement", c.placement, placement),
            ("adapter.activation", c.activation, spec.activation)]


def block_output(spec, p: dict, h):
    """The `block_output` hook: the sublayer's output h (B, T, D) through its adapter, where p holds one."""
    return bottleneck(h, p["adapter"], spec) if "adapter" in p else h


def bottleneck(h, p: dict, spec):
    """h (B, T, D) -> h + up(act(down(h))), in h's dtype; p: down/{w (D, S), b (S,)}, up/{w (S, D), b (D,)};
    spec: the MethodSpec, whose `activation` is the non-linearity."""
    if spec is None or spec.activation not in ACTIVATIONS:
        raise PeftError(f"bottleneck adapter leaves need peft=MethodSpec('adapter', activation=one of "
                        f"{', '.join(ACTIVATIONS)}), got {spec}")
    return h + dense(_ACT[spec.activation](dense(h, p["down"])), p["up"])
