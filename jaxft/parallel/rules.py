"""Logical axes -> mesh axes: the one table every PartitionSpec of jaxft is derived from.

An array dimension is named with a logical axis (`batch`, `embed`, `heads`, ...: see LOGICAL_AXES); the rules
of the config map each logical axis to zero or more mesh axes (`data`, `fsdp`, `context`, `tensor`, `expert`). A
`Layout` holds a
mesh and those rules and turns names into `PartitionSpec`s and `NamedSharding`s, checking on the way that
every split dimension divides evenly. Nothing here reads a global mesh: the layout is passed explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.backend import Attention

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")  # context: the sequence split (jaxft.parallel.context)
LOGICAL_AXES = {  # name -> what it is (the axis letters of jaxft.models.layers)
    "batch": "B, rows of a batch",
    "seq": "T, positions of a row",
    "embed": "D, the residual width",
    "heads": "N*H, query heads (times head dim where fused)",
    "kv_heads": "K*H, key/value heads (times head dim where fused)",
    "head_dim": "H, within one head",
    "mlp": "F, the MLP width",
    "vocab": "V, the vocabulary",
    "layers": "L, the stacked layers (scanned over)",
    "lora_rank": "R, the LoRA rank",
    "experts": "E, the experts of a mixture of experts",
}

Names = Sequence[str | None]  # one logical axis (or None: not split) per array dimension


class ShardingError(ValueError):
    """A mesh, rules table or array that cannot be laid out; the one-line message names the axis and sizes."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A device mesh and the rules that map logical axes onto it. Hashable, so it can be static under jit.

    rules: ((logical axis, (mesh axis, ...)), ...) for every name of LOGICAL_AXES; () means replicated.
    attention: how the model's attention layers compute on this mesh (`jaxft.backend.Attention`).
    mlp_chunk: tokens of a row per chunk of the dense MLP (`train.mlp_chunk`; 0: the whole row at once).
    """

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]
    attention: Attention = Attention()
    mlp_chunk: int = 0

    def __post_init__(self):
        for name, axes in self.rules:
            if name not in LOGICAL_AXES:
                raise ShardingError(f"rules.{name}: unknown logical axis {name!r} "
                                    f"(known: {', '.join(LOGICAL_AXES)})")
            for axis in axes:
                if axis not in self.mesh.shape:
                    raise ShardingError(f"rules.{name}: unknown mesh axis {axis!r} "
                                        f"(mesh axes: {', '.join(self.mesh.axis_names)})")
        missing = [n for n in LOGICAL_AXES if n not in dict(self.rules)]
        if missing:
            raise ShardingError(f"rules: no rule for logical axes {', '.join(missing)}")

    def spec(self, names: Names, shape: Sequence[int] | None = None, what: str = "array") -> PartitionSpec:
        """The PartitionSpec of an array whose dimensions are `names`.

        A mesh axis is used at most once per array: a later dimension whose rule names an axis already used
        by an earlier one is not split over it (e.g. the residual stream (batch, seq, embed) under FSDP is
        split over batch only). With `shape`, raises ShardingError if a split does not divide its dimension.
        """
        rules, used, parts = dict(self.rules), set(), []
        if shape is not None and len(shape) != len(names):
            raise ShardingError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
        for i, name in enumerate(names):
            if name is None:
                parts.append(None)
                continue
            if name not in rules:
                raise ShardingError(f"{what}: logical axis {name!r} is not in the rules "
                                    f"(known: {', '.join(LOGICAL_AXES)})")
            axes = tuple(a for a in rules[name] if a not in used)
            used.update(axes)
            n = math.prod(self.mesh.shape[a] for a in axes)
            if shape is not None and shape[i] % n:
                sizes = " * ".join(f"{a}={self.mesh.shape[a]}" for a in axes)
                raise ShardingError(f"{what}: dimension {i} ({name}) of size {shape[i]} cannot be split over "
                                    f"mesh axes {sizes} = {n}; change rules.{name} or the mesh")
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)

    def sharding(self, names: Names, shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape, what))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def rules_from_config(rules_cfg) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """config.rules (logical axis -> 'mesh,axes' string, '' for replicated) -> the rules tuple of a Layout."""
    out = []
    for name, value in rules_cfg.items():
        if not isinstance(value, str):
            raise ShardingError(f"rules.{name}: expected a string of mesh axes like 'data,fsdp', got {value!r}")
        out.append((name, tuple(a.strip() for a in value.split(",") if a.strip())))
    return tuple(out)


def constrain(x, names: Names, layout: Layout | None):
    """x laid out as `names` say (`jax.lax.with_sharding_constraint`); x itself when there is no layout.

    The model calls this on its activations, so that the compiler keeps e.g. heads split over `tensor`
    and rows over `data`/`fsdp` instead of guessing. Checks divisibility while tracing (before compiling).
    """
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(names, x.shape, "activation"))
