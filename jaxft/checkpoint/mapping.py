"""One declarative table per model family from Hugging Face tensor names to jaxft paths, used both ways.

An entry is (HF name, jaxft path, transpose). A `{i}` in the HF name means one tensor per layer, stacked on
the leading L axis of the jaxft leaf. HF stores linear weights as (out, in); jaxft as (in, out), hence the
transpose. Which entries apply to a given model is decided by the parameter shapes of that model (biases only
where the config has them, no lm_head with tied embeddings), so that one table serves every variant.

The LLaMA family's table is here; BERT's and T5's live in their family modules (look any up as
`jaxft.models.family(model_type).TABLE`). `PEFT_CLASSES` says how each transformers class a PEFT adapter may
be made for names the modules of those tables (`bert.` or not), and which task head it has.
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


# --- The transformers classes PEFT wraps ----------------------------------------------------------------------
# PEFT names a tensor after the module path inside the model class it wraps, and that path depends on the class:
# BertModel holds the encoder at `encoder.layer.{i}...`, every BertFor... class under `bert.`; LlamaModel holds
# the decoder at `layers.{i}...`, every LlamaFor... class under `model.`. A family's TABLE names the backbone as
# one of them (its `backbone` prefix below); each class row says what prefix replaces it. (Family knowledge:
# it could live in the family modules, beside TABLE.)


class PeftClass(NamedTuple):
    name: str  # the transformers class, e.g. "BertForSequenceClassification"
    prefix: str  # what the class puts before the backbone's module names ("bert.")
    task_type: str | None  # PEFT's task_type for it (None: PEFT's plain PeftModel)
    head: str | None  # the task head module PEFT keeps in `modules_to_save` ("classifier", "score"), or None


# model_type -> (the prefix the TABLE's layered names carry, {jaxft task: class}); "{A}" is the architecture
# name of the config's own class ("Llama", "Mistral", "Qwen2"), and the first class is the one a model of no
# known task is exported for where its config's `architectures` names none of them.
_DECODER = ("model.", {
    "causal_lm": PeftClass("{A}ForCausalLM", "model.", "CAUSAL_LM", None),
    "seq2seq": PeftClass("{A}ForCausalLM", "model.", "CAUSAL_LM", None),
    "classification": PeftClass("{A}ForSequenceClassification", "model.", "SEQ_CLS", "score"),
    "token_classification": PeftClass("{A}ForTokenClassification", "model.", "TOKEN_CLS", "score"),
    "embedding": PeftClass("{A}Model", "", "FEATURE_EXTRACTION", None),
})
PEFT_CLASSES = {
    "llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER,
    "bert": ("", {
        "mlm": PeftClass("BertForMaskedLM", "bert.", None, None),
        "embedding": PeftClass("BertModel", "", "FEATURE_EXTRACTION", None),
        "classification": PeftClass("BertForSequenceClassification", "bert.", "SEQ_CLS", "classifier"),
        "token_classification": PeftClass("BertForTokenClassification", "bert.", "TOKEN_CLS", "classifier"),
    }),
    "t5": ("", {"seq2seq": PeftClass("T5ForConditionalGeneration", "", "SEQ_2_SEQ_LM", None)}),
}


def peft_classes(cfg) -> tuple[str, dict[str, PeftClass]]:
    """(the prefix of the backbone in the TABLE of `cfg`'s family, {task: the class PEFT wraps for it})."""
    if cfg.model_type not in PEFT_CLASSES:
        raise KeyError(f"no transformers classes known for model_type {cfg.model_type!r}")
    backbone, classes = PEFT_CLASSES[cfg.model_type]
    arch = cfg.to_hf()["architectures"][0]
    stem = arch.removesuffix("ForCausalLM")
    return backbone, {task: c._replace(name=c.name.format(A=stem)) for task, c in classes.items()}


def peft_class(cfg, task: str | None = None, name: str | None = None) -> PeftClass:
    """The class PEFT wraps for an adapter of `cfg`: the one named `name` (a transformers class name), else the
    one of the jaxft `task`, else the class `cfg.to_hf()` names (the first of the family when it names none).

    Raises KeyError naming the classes there are.
    """
    _, classes = peft_classes(cfg)
    by_name = {c.name: c for c in classes.values()}
    if name is not None:
        if name not in by_name:
            raise KeyError(f"{name!r} is not a {cfg.model_type} class jaxft exports PEFT adapters for (expected one "
                           f"of {', '.join(sorted(by_name))})")
        return by_name[name]
    if task is not None and task in classes:
        return classes[task]
    return by_name.get(cfg.to_hf()["architectures"][0], next(iter(classes.values())))
