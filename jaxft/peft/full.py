"""Full and partial fine-tuning: trainable leaves that replace base leaves, and the L2-SP penalty.

Full fine-tuning trains a float32 copy of every base leaf. Partial fine-tuning trains the leaves that
`partial.select` picks, a regex over *per-layer* paths: the stacked leaf `layers/attn/q_proj/w` (L, D, N*H)
reads as `layers/0/attn/q_proj/w` ... `layers/{L-1}/attn/q_proj/w`, so that blocks can be chosen one by one;
`embed/w`, `final_norm/scale` and `lm_head/w` keep their paths. A model may have several stacks, each its own
`.../layers/` (T5: `encoder/layers/3/mlp/down_proj/w`, `decoder/layers/0/cross_attn/q_proj/w`), of their own
lengths. Presets: 'norms' (LayerNorm / RMSNorm scales and biases), 'biases' (every bias, BitFit), 'top<k>'
(the last k blocks of each stack).

A stacked leaf selected in only some layers is *split*: the trainable tree holds just those layers (k, ...)
and `MethodSpec.layers` lists which; `scatter` puts them into the frozen leaf inside the forward pass. So the
gradient, the optimizer state and the checkpoints cover exactly the trained layers, and no mask is needed that
could let the frozen layers into the optimizer. The price is one copy of each split leaf per forward pass.

L2-SP (Li et al. 2018) pulls the trained leaves towards their pretrained values, a guard against forgetting:
weight / 2 * sum ||theta - theta_pretrained||^2, the pretrained values read from the base itself.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import jax.numpy as jnp

from jaxft import tree
from jaxft.peft.method import MethodSpec, PeftError, as_method
from jaxft.quant import as_dense

PRESETS = {"norms": r".*norm/(scale|bias)", "biases": r".*/(b|bias)"}
_STACKED = re.compile(r"((?:.*/)?layers/)(.*)")  # (the stack's prefix up to layers/, the path within a layer)


def stacks(base: dict) -> dict[str, int]:
    """{stack prefix: its number of layers} of the stacked leaves of a base (a tree, or path -> shape): {'layers/':
    L} for one stack (LLaMA, BERT), {'encoder/layers/': Le, 'decoder/layers/': Ld} for T5."""
    out = {}
    for path, x in tree.items(base):
        m = _STACKED.fullmatch(path)
        if m:
            out.setdefault(m.group(1), tuple(getattr(x, "shape", x))[0])
    return out


def select(base: dict, pattern: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """(path, layers) of the base leaves `pattern` selects: layers None for a whole leaf, else the selected
    layers of a stacked one. Raises PeftError naming partial.select when it selects nothing."""
    flat = tree.flatten(base)
    n_layers = stacks(base)
    regex = PRESETS.get(pattern, pattern)
    top = re.fullmatch(r"top(\d+)", pattern)
    if top:
        k, shortest = int(top.group(1)), min(n_layers.values())
        if not 0 < k <= shortest:
            each = f" in its shortest stack ({', '.join(f'{p} {n}' for p, n in n_layers.items())})"
            raise PeftError(f"partial.select: {pattern!r} asks for {k} blocks; the model has {shortest}"
                            f"{each if len(n_layers) > 1 else ''}")
        regex = "|".join(rf"{re.escape(p)}({'|'.join(str(i) for i in range(n - k, n))})/.*"
                         for p, n in n_layers.items())
    try:
        rx = re.compile(regex)
    except re.error as e:
        raise PeftError(f"partial.select: {pattern!r} is not a valid regex ({e})") from None
    out = []
    for path in flat:
        m = _STACKED.fullmatch(path)
        if m:
            stack, rest = m.groups()
            picked = tuple(i for i in range(n_layers[stack]) if rx.fullmatch(f"{stack}{i}/{rest}"))
            if picked:
                out.append((path, None if len(picked) == n_layers[stack] else picked))
        elif rx.fullmatch(path):
            out.append((path, None))
    if not out:
        stacked = next(p for p in flat if _STACKED.fullmatch(p))
        m = _STACKED.fullmatch(stacked)
        whole = next((p for p in flat if not _STACKED.fullmatch(p)), stacked)
        raise PeftError(f"partial.select: {pattern!r} selects no parameter of the model (paths look like "
                        f"'{m.group(1)}{n_layers[m.group(1)] - 1}/{m.group(2)}' or '{whole}'; presets: norms, "
                        f"biases, top<k>)")
    return out


def init(base: dict, selected: list[tuple[str, tuple[int, ...] | None]]) -> dict:
    """Float32 copies of the selected leaves (dequantized if need be), split ones holding their layers only."""
    flat = tree.flatten(base)
    out = {}
    for path, layers in selected:
        leaf = as_dense(flat[path], jnp.float32)
        out[path] = leaf if layers is None else leaf[jnp.asarray(layers)]
    return tree.unflatten(out)


def resolve(spec, base: dict, trainable: dict):
    """The `resolve` hook of partial fine-tuning: split leaves put into their stacked base leaves (`scatter`)."""
    if not spec.layers:
        return trainable, spec
    return scatter(base, trainable, spec.layers), dataclasses.replace(spec, layers=())


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


def merge(base: dict, trainable: dict, spec, dtype=None) -> dict:
    """The base with the trained leaves in place (split ones scattered into their stacks); a quantized leaf
    becomes float32 unless `dtype` is given."""
    resolved, _ = resolve(as_method(spec), base, trainable)
    flat = tree.flatten(base)
    for path, x in tree.items(resolved):
        old = flat[path]
        flat[path] = x.astype(dtype or (jnp.float32 if hasattr(old, "dequantize") else old.dtype))
    return tree.unflatten(flat)


def _build_full(key, base: dict, config, cfg, tokenizer=None):
    return init(base, [(p, None) for p in tree.flatten(base)]), MethodSpec("full")


def _build_partial(key, base: dict, config, cfg, tokenizer=None):
    selected = select(base, config.partial.select)
    split = tuple((p, layers) for p, layers in selected if layers is not None)
    return init(base, selected), MethodSpec("partial", layers=split)


def _expected_partial(spec, flat: dict, base: dict, cfg) -> dict:
    """Each leaf of `flat` at a base path, with the base's shape, or (k, ...) for k layers of a split one."""
    split = dict(as_method(spec).layers)
    return {p: base[p] if p not in split else (len(split[p]),) + base[p][1:] for p in flat if p in base}


# The methods of this module, for `jaxft.peft.method.register`.
FULL = SimpleNamespace(build=_build_full, expected=lambda spec, flat, base, cfg: dict(base), merge=merge,
                       resolve=resolve, SHAPING=())
PARTIAL = SimpleNamespace(build=_build_partial, expected=_expected_partial, merge=merge, resolve=resolve,
                          SHAPING=("select",), selection=lambda config: (f"partial.select={config.partial.select!r}",
                                                                         False))
