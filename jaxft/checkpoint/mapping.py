"""One declarative table per model family from Hugging Face tensor names to jaxft paths, used both ways.

An entry is (HF name, jaxft path, transpose). A `{i}` in the HF name means one tensor per layer, stacked on
the leading L axis of the jaxft leaf. HF stores linear weights as (out, in); jaxft as (in, out), hence the
transpose. Which entries apply to a given model is decided by the parameter shapes of that model (biases only
where the config has them, no lm_head with tied embeddings), so that one table serves every variant.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    hf: str  # HF tensor name; `{i}` = layer index
    path: str  # jaxft parameter path
    transpose: bool  # HF (out, in) <-> jaxft (in, out)


LLAMA = (
    Entry("model.embed_tokens.weight", "embed/w", False),
    Entry("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", False),
    Entry("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/q_proj/w", True),
    Entry("model.layers.{i}.self_attn.q_proj.bias", "layers/attn/q_proj/b", False),
    Entry("model.layers.{i}.self_attn.k_proj.weight", "layers/attn/k_proj/w", True),
    Entry("model.layers.{i}.self_attn.k_proj.bias", "layers/attn/k_proj/b", False),
    Entry("model.layers.{i}.self_attn.v_proj.weight", "layers/attn/v_proj/w", True),
    Entry("model.layers.{i}.self_attn.v_proj.bias", "layers/attn/v_proj/b", False),
    Entry("model.layers.{i}.self_attn.o_proj.weight", "layers/attn/o_proj/w", True),
    Entry("model.layers.{i}.self_attn.o_proj.bias", "layers/attn/o_proj/b", False),
    Entry("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", False),
    Entry("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/gate_proj/w", True),
    Entry("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/up_proj/w", True),
    Entry("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/down_proj/w", True),
    Entry("model.norm.weight", "final_norm/scale", False),
    Entry("lm_head.weight", "lm_head/w", True),
)

TABLES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}


def hf_module(path: str, table=LLAMA) -> str:
    """The HF module path of a jaxft linear weight path, with `{i}` for the layer: used by PEFT export.

    'layers/attn/q_proj/w' -> 'model.layers.{i}.self_attn.q_proj'.
    """
    for entry in table:
        if entry.path == path:
            return entry.hf.rsplit(".", 1)[0]
    raise KeyError(f"no Hugging Face name for jaxft path {path!r}")
