"""Nested-dict parameter trees addressed by '/'-joined paths (`layers/attn/q_proj/w`).

The frozen base and the trainable tree are separate objects; `overlay` is the one place they meet, inside
the model, so that a base weight is never copied per adapter.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

import jax


def overlay(base: dict, trainable: dict | None) -> dict:
    """The tree the model reads: base leaves, with trainable leaves added beside them or replacing them.

    LoRA adds `lora_a` / `lora_b` next to `w`; full or partial fine-tuning replaces `w` itself. No array
    is copied: the result shares every leaf with its inputs.
    """
    if not trainable:
        return base
    out = dict(base)
    for key, value in trainable.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = overlay(base[key], value)
        else:
            out[key] = value
    return out


def is_leaf(x) -> bool:
    """Dicts are inner nodes; everything else (arrays, quantized weights) is a leaf of a parameter tree."""
    return not isinstance(x, dict)


def items(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs in a stable (sorted) order."""
    for key in sorted(tree):
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(tree[key], dict):
            yield from items(tree[key], path)
        else:
            yield path, tree[key]


def flatten(tree: dict) -> dict[str, Any]:
    return dict(items(tree))


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def select(tree: dict, pattern: str) -> list[str]:
    """Paths whose full text matches the regex `pattern` (re.fullmatch)."""
    rx = re.compile(pattern)
    return [p for p, _ in items(tree) if rx.fullmatch(p)]


def map_with_path(fn: Callable[[str, Any], Any], tree: dict) -> dict:
    return unflatten({p: fn(p, x) for p, x in items(tree)})


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def count(tree) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))
