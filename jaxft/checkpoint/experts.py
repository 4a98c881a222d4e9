"""Checks of a mixture-of-experts checkpoint against its own config, before any weight is read: a top-k outside
1..E, or tensors holding another number of experts than the config says, is one line naming the file and the
field (otherwise the first would fail when the step is traced and the second as a list of unexpected tensors).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from jaxft.checkpoint.assemble import LoadError

COUNT_KEYS = {"mixtral": "num_local_experts"}  # config.json's expert count field by model type (else num_experts)
_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.")  # `...experts.N.w1.weight`: one tensor per expert
_FUSED = re.compile(r".*\.experts\.(gate_up_proj|down_proj)$")  # transformers 5's fused (E, ...) stacks


def count_key(cfg) -> str:
    """The config.json field that holds the expert count of `cfg`'s family."""
    return COUNT_KEYS.get(cfg.model_type, "num_experts")


def check_routing(cfg, file: str, count: str, top_k: str = "num_experts_per_tok") -> None:
    """LoadError unless `cfg` (a MoE config) routes each token to 1 <= top_k <= n_experts experts; `count` and
    `top_k` name the file's fields."""
    if getattr(cfg, "n_experts", None) is None:
        return
    if not (isinstance(cfg.n_experts, int) and cfg.n_experts >= 1):
        raise LoadError(f"{file}: {count}={cfg.n_experts!r}, expected a positive number of experts")
    if not (isinstance(cfg.top_k, int) and 1 <= cfg.top_k <= cfg.n_experts):
        raise LoadError(f"{file}: {top_k}={cfg.top_k!r}, expected 1 <= {top_k} <= {count}={cfg.n_experts} "
                        f"(the experts each token is routed to)")


def check_count(cfg, file: str, count: str, shapes: Mapping[str, Sequence[int]], weights: str) -> None:
    """LoadError if the tensors (name -> shape, from the file headers `weights`) hold another number of experts
    per layer than `cfg.n_experts`, in either layout: one tensor per expert, or fused stacks (E, ...)."""
    if getattr(cfg, "n_experts", None) is None:
        return
    held: dict[int, str] = {}  # experts per layer -> an example tensor
    indices: dict[str, set] = {}
    for name, shape in shapes.items():
        if m := _PER_EXPERT.match(name):
            indices.setdefault(m[1], set()).add(int(m[2]))
        elif _FUSED.match(name) and len(shape) == 3:
            held.setdefault(int(shape[0]), f"{name} of shape {tuple(shape)}")
    for prefix, found in indices.items():
        held.setdefault(max(found) + 1, f"{prefix}.0 to {prefix}.{max(found)}")
    wrong = {n: example for n, example in held.items() if n != cfg.n_experts}
    if wrong:
        n, example = sorted(wrong.items())[-1]
        raise LoadError(f"{file}: {count}={cfg.n_experts}, but {weights} holds {n} experts per layer ({example}); "
                        f"the config must give the checkpoint's expert count")
