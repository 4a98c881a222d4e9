"""The transformers classes a PEFT adapter may be made for: how each names the modules of a family's table
(`jaxft.models.table`; each family's TABLE lives in its module), and which task head it has."""

from __future__ import annotations

from typing import NamedTuple


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
    # the experts and router by target_parameters (peft.hf_experts)
    "mixtral": _DECODER, "qwen2_moe": _DECODER, "qwen3_moe": _DECODER, "olmoe": _DECODER,
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
