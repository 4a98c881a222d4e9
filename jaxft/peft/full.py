"""Full and partial fine-tuning: trainable leaves that replace base leaves, and the L2-SP penalty.

Full fine-tuning trains a float32 copy of every base leaf. Partial fine-tuning trains the leaves that
`partial.select` picks, a regex over *per-layer* paths: the stacked leaf `layers/attn/q_proj/w` (L, D, N*H)
reads as `layers/0/attn/q_proj/w` ... `layers/{L-1}/attn/q_proj/w`, so that blocks can be chosen one by one;
`embed/w`, `final_norm/scale` and `lm_head/w` keep their paths. Presets: 'norms', 'biases', 'top<k>' (the
last k blocks).

A stacked leaf selected in only some layers is *split*: the trainable tree holds just those layers (k, ...)
and `MethodSpec.layers` lists which; `scatter` puts them into the frozen leaf inside the forward pass. So the
gradient, the optimizer state and the checkpoints cover exactly the trained layers, and no mask is needed that
could let the frozen layers into the optimizer. The price is one copy of each split leaf per forward pass.

L2-SP (Li et al. 2018) pulls the trained leaves towards their pretrained values, a guard against forgetting:
weight / 2 * sum ||theta - theta_pretrained||^2, the pretrained values read from the base itself.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from jaxft import tree
from jaxft.peft.method import PeftError
from jaxft.quant import as_dense

PRESETS = {"norms": r".*norm/scale", "biases": r".*/b"}


def select(base: dict, pattern: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """(path, layers) of the base leaves `pattern` selects: layers None for a whole leaf, else the selected
    layers of a stacked one. Raises PeftError naming partial.select when it selects nothing."""
    flat = tree.flatten(base)
    n_layers = next(x.shape[0] for p, x in flat.items() if p.startswith("layers/"))
    regex = PRESETS.get(pattern, pattern)
    top = re.fullmatch(r"top(\d+)", pattern)
    if top:
        k = int(top.group(1))
        if not 0 < k <= n_layers:
            raise PeftError(f"partial.select: {pattern!r} asks for {k} blocks; the model has {n_layers}")
        regex = rf"layers/({'|'.join(str(i) for i in range(n_layers - k, n_layers))})/.*"
    try:
        rx = re.compile(regex)
    except re.error as e:
        raise PeftError(f"partial.select: {pattern!r} is not a valid regex ({e})") from None
    out = []
    for path in flat:
        if path.startswith("layers/"):
            rest = path.removeprefix("layers/")
            picked = tuple(i for i in range(n_layers) if rx.fullmatch(f"layers/{i}/{rest}"))
            if picked:
                out.append((path, None if len(picked) == n_layers else picked))
        elif rx.fullmatch(path):
            out.append((path, None))
    if not out:
        raise PeftError(f"partial.select: {pattern!r} selects no parameter of the model (paths look like "
                        f"'layers/{n_layers - 1}/attn/q_proj/w' or 'final_norm/scale'; presets: norms, biases, "
                        f"top<k>)")
    return out


def init(base: dict, selected: list[tuple[str, tuple[int, ...] | None]]) -> dict:
    """Float32 copies of the selected leaves (dequantized if need be), split ones holding their layers only."""
    flat = tree.flatten(base)
    out = {}
    for path, layers in selected:
        leaf = as_dense(flat[path], jnp.float32)
        out[path] = leaf if layers is None else leaf[jnp.asarray(layers)]
    return tree.unflatten(out)


def scatter(base: dict, trainable: dict, layers: tuple[tuple[str, tuple[int, ...]], ...]) -> dict:
    """The trainable tree with each split leaf (k, ...) written into a copy of its stacked base leaf (L, ...)."""
    flat, flat_base = tree.flatten(trainable), tree.flatten(base)
    for path, picked in layers:
        part = flat[path]
        flat[path] = as_dense(flat_base[path], part.dtype).at[jnp.asarray(picked)].set(part)
    return tree.unflatten(flat)


def l2sp(layers: tuple[tuple[str, tuple[int, ...]], ...], weight: float):
    """penalty(trainable, base) -> weight / 2 * sum ||theta - theta_pretrained||^2 over the trainable leaves."""
    split = dict(layers)

    def penalty(trainable: dict, base: dict):
        flat_base = tree.flatten(base)
        total = jnp.zeros((), jnp.float32)
        for path, x in tree.items(trainable):
            anchor = as_dense(flat_base[path], jnp.float32)
            if path in split:
                anchor = anchor[jnp.asarray(split[path])]
            total = total + jnp.sum(jnp.square(x.astype(jnp.float32) - anchor))
        return 0.5 * weight * total

    return penalty
