"""The row of a family's declarative table from Hugging Face tensor names to jaxft paths, used both ways.

An entry is (HF name, jaxft path, transpose). A `{i}` in the HF name means one tensor per layer, stacked on
the leading L axis of the jaxft leaf. HF stores linear weights as (out, in); jaxft as (in, out), hence the
transpose. Which entries apply to a given model is decided by the parameter shapes of that model (biases only
where the config has them, no lm_head with tied embeddings), so that one table serves every variant. Each family
module holds its table as TABLE (`jaxft.models.family(model_type).TABLE`); `jaxft.checkpoint` applies it.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    hf: str  # HF tensor name; `{i}` = layer index
    path: str  # jaxft parameter path
    transpose: bool  # HF (out, in) <-> jaxft (in, out)
