"""The row of a family's declarative table from Hugging Face tensor names to jaxft paths, used both ways.

An entry is (HF name, jaxft path, transpose). A `{i}` in the HF name means one tensor per layer, stacked on
the leading L axis of the jaxft leaf. HF stores linear weights as (out, in); jaxft as (in, out), hence the
transpose. Which entries apply to a given model is decided by the parameter shapes of that model (biases only
where the config has them, no lm_head with tied embeddings), so that one table serves every variant. Each family
module holds its table as TABLE (`jaxft.models.family(model_type).TABLE`); `jaxft.checkpoint` applies it.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Entry(NamedTuple):
    hf: str  # HF tensor name; `{i}` = layer index
    path: str  # jaxft parameter path
    transpose: bool  # HF (out, in) <-> jaxft (in, out)


def module_rows(hf: str, path: str) -> tuple[Entry, Entry]:
    """The rows of a module with a weight and a bias: a LayerNorm's (scale, bias) where `path` ends in "norm",
    else a linear map's (w transposed, b)."""
    if path.endswith("norm"):
        return Entry(f"{hf}.weight", f"{path}/scale", False), Entry(f"{hf}.bias", f"{path}/bias", False)
    return Entry(f"{hf}.weight", f"{path}/w", True), Entry(f"{hf}.bias", f"{path}/b", False)


class LoadError(ValueError):
    """A checkpoint jaxft cannot load. The one-line message names the file and the tensors or field."""


def summarize(names: list[str]) -> str:
    """Names listed in one line, one per layered pattern: 'model.layers.{0-29}.mlp.up_proj.bias, lm_head.weight'."""
    groups: dict[str, list[int]] = {}
    for name in names:
        m = re.search(r"(?<=\.)\d+(?=\.)", name)
        key = name if m is None else name[:m.start()] + "{}" + name[m.end():]
        groups.setdefault(key, []).extend([] if m is None else [int(m.group())])
    out = []
    for key, layers in groups.items():
        if not layers:
            out.append(key)
            continue
        layers = sorted(set(layers))
        if len(layers) == 1:
            out.append(key.replace("{}", str(layers[0])))
            continue
        contiguous = layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2
        span = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))
        out.append(key.replace("{}", "{" + span + "}"))
    return ", ".join(out)
