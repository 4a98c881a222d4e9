"""PEFT's prompt-learning adapters, prefix tuning and prompt tuning, to and from jaxft's trainable trees.

Each is one tensor, `prompt_embeddings`, with its dimensions in adapter_config.json, laid out as PEFT's task
classes read it (peft 0.21, transformers 5):

  decoder-only and BERT
  PREFIX_TUNING  (P, L*2*K*H), read as (P, L, 2, K*H): layer l's past keys, then its values, over the K
                 key/value heads (PEFT provisions one prefix per KV head under grouped-query attention and writes
                 num_attention_heads=K, token_dim=K*H)        <-> layers/attn/prefix_k, prefix_v (L, P, K*H)
  PROMPT_TUNING  (P, D) (num_attention_heads=N, token_dim=D)  <-> prompt/embeddings (P, D)

  T5 (SEQ_2_SEQ_LM, num_transformer_submodules=2)
  PREFIX_TUNING  (P, M*2*N*H), M = num_layers (key, value) pairs; PEFT repeats the list and hands it out four
                 entries a decoder layer (self-attention, then a cross-attention cache it resets), so decoder
                 layer j's self-attention reads pair 2j mod M, and M < Ld does not run. PEFT's own files
                 (M = the encoder's layers) give layers j and j + M/2 the same pair; jaxft writes M = 2*Ld, layer
                 j at pair 2j and the odd pairs zero, so that each layer keeps its own
                                                              <-> decoder/layers/self_attn/prefix_k, prefix_v
                                                                  (Ld, P, N*H)
  PROMPT_TUNING  (2P, D): the encoder's P rows                <-> prompt/embeddings (P, D)
                 then the decoder's, which PEFT's prompt tuning never reads (written as zeros)

PEFT applies either only through the PeftModel class of a task_type; a plain PeftModel loads the adapter and
ignores it, so neither direction goes without one. BertForSequenceClassification under PEFT's prompt tuning
pools the first virtual token (the prompt comes before [CLS]), where jaxft's classification head pools the
text's [CLS]: that pair is refused both ways.

PEFT's `prefix_projection` trains a reparameterization MLP but saves what it computes, the prefixes, as jaxft
does (`jaxft.peft.finalize`): both settings read and write the same tensor, and PEFT loads either for inference.
(PEFT cannot continue training an adapter saved with prefix_projection: it would rebuild the MLP.)
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
from packaging.version import Version

from jaxft import tree
from jaxft.checkpoint.mapping import PeftClass, peft_classes
from jaxft.models import family_of
from jaxft.models.config import LlamaConfig
from jaxft.peft import prefix as prefix_lib
from jaxft.peft.method import AdapterError, MethodSpec

# The first transformers release whose BertModel.forward has no past_key_values, where PEFT puts a prefix.
_NO_BERT_PAST = Version("5.24.0.dev0")
_COMMON = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"}
# Fields read, or that matter only when PEFT initializes a new adapter.
_FIELDS = {"PREFIX_TUNING": _COMMON | {"encoder_hidden_size", "prefix_projection", "init_weights"},
           "PROMPT_TUNING": _COMMON | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                       "tokenizer_kwargs"}}
_PROMPT_INITS = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}  # prompt.init -> PEFT's
# Model kind -> the task types whose PEFT class computes what jaxft's model does with a prefix or a soft prompt.
_TASKS = {"decoder": ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION"),
          "encoder": ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION"), "encoder-decoder": ("SEQ_2_SEQ_LM",)}

_BOOKKEEPING = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                "peft_version"}



def save(flat: dict, spec: MethodSpec, cfg: LlamaConfig, run: dict, base_model: str, target: PeftClass):
    """(tensors, adapter_config.json fields, description) of a prefix or prompt adapter, as PEFT writes them
    for the transformers class `target`.

    flat: the trainable tree by path (numpy); run: the training config, for prefix.projection (PEFT records
    the MLP's width) and prompt.init / init_text (PEFT records how the prompt started). Raises AdapterError
    where PEFT would apply the adapter otherwise than jaxft (see `_unequal`).
    """
    reason = _unequal(cfg, spec.method, target.task_type)
    if reason:
        fix = ("export for a class with a task_type (base_class / --base-class: "
               f"{', '.join(c.name for c in peft_classes(cfg)[1].values() if c.task_type)})"
               if target.task_type is None else "keep the jaxft adapter")
        raise AdapterError(f"{spec.method} tuning for {target.name} (task_type {target.task_type}): {reason}; "
                           f"{fix}")
    seq2seq = family_of(cfg).KIND == "encoder-decoder"
    n = spec.virtual_tokens
    common = {"num_virtual_tokens": n, "num_layers": cfg.n_layers, "num_transformer_submodules": 1 + seq2seq,
              "modules_to_save": None}
    if spec.method == "prefix":
        if "prefix/embedding" in flat:  # not finalized: compute the prefixes from the reparameterization MLP
            flat = {p: np.asarray(x) for p, x in tree.items(prefix_lib.project(tree.unflatten(flat)))}
        path, _ = prefix_lib.where(cfg)
        kv = cfg.n_kv_heads * cfg.head_dim
        pair = np.stack([flat[f"{path}/prefix_k"], flat[f"{path}/prefix_v"]], 1)  # (L, 2, P, K*H)
        if seq2seq:  # decoder layer j reads pair 2j of 2*Ld
            pair = np.stack([pair, np.zeros_like(pair)], 1).reshape(-1, *pair.shape[1:])
        projection = int(run.get("prefix", {}).get("projection", 0) or 0)
        config = {"peft_type": "PREFIX_TUNING", **common, "num_layers": len(pair),
                  "num_attention_heads": cfg.n_kv_heads, "token_dim": kv, "encoder_hidden_size": projection or kv,
                  "prefix_projection": bool(projection), "init_weights": None}
        return ({"prompt_embeddings": pair.transpose(2, 0, 1, 3).reshape(n, -1)}, config,
                f"prefix-tuning ({n} virtual tokens)")
    prompt = run.get("prompt", {})
    init = _PROMPT_INITS.get(prompt.get("init"), "RANDOM")
    text = init == "TEXT"  # PEFT then records the text and where its tokenizer is
    config = {"peft_type": "PROMPT_TUNING", **common, "num_attention_heads": cfg.n_heads, "token_dim": cfg.dim,
              "prompt_tuning_init": init, "prompt_tuning_init_text": prompt.get("init_text") if text else None,
              "tokenizer_name_or_path": base_model if text else None, "tokenizer_kwargs": None}
    x = flat["prompt/embeddings"]
    if seq2seq:  # the decoder's set, unread
        x = np.concatenate([x, np.zeros_like(x)])
    return {"prompt_embeddings": x}, config, f"prompt-tuning ({n} virtual tokens)"


def load(conf: dict, arrays: dict, cfg: LlamaConfig, source: str, file: Path) -> tuple[dict, MethodSpec]:
    """(trainable tree, MethodSpec) of a PEFT PREFIX_TUNING or PROMPT_TUNING adapter for a base of `cfg`.

    Raises AdapterError for an option jaxft does not implement, a task class PEFT applies it in otherwise than
    jaxft, or dimensions of another model.
    """
    peft_type, task_type = conf["peft_type"], conf.get("task_type")
    prefix = peft_type == "PREFIX_TUNING"
    reason = _unequal(cfg, "prefix" if prefix else "prompt", task_type)
    if reason:
        raise AdapterError(f"{source}: {peft_type} with task_type {task_type!r} on {cfg.model_type}: {reason}")
    refuse_unknown(conf, _FIELDS[peft_type], source, f"plain {peft_type}")
    n = conf.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise AdapterError(f"{source}: num_virtual_tokens={n!r} is not a positive integer")
    seq2seq = family_of(cfg).KIND == "encoder-decoder"
    sets = conf.get("num_transformer_submodules") or 1 + seq2seq  # (None: PEFT's default for the task)
    if sets not in ((1, 2) if seq2seq and not prefix else (1 + seq2seq,)):
        raise AdapterError(f"{source}: num_transformer_submodules={sets} is not supported (PEFT runs "
                           f"{peft_type} of {cfg.model_type} with {1 + seq2seq})")
    path, n_layers = prefix_lib.where(cfg)
    kv = cfg.n_kv_heads * cfg.head_dim
    pairs = conf.get("num_layers") or cfg.n_layers  # (T5: PEFT's default is the encoder's layers)
    if prefix and seq2seq and (not isinstance(pairs, int) or pairs < n_layers):
        raise AdapterError(f"{source}: num_layers={pairs}, but PEFT gives each of this base's {n_layers} decoder "
                           f"layers a pair of its own among num_layers, and runs no fewer")
    dims = {"num_attention_heads": cfg.n_kv_heads, "token_dim": kv} if prefix else \
        {"num_attention_heads": cfg.n_heads, "token_dim": cfg.dim}
    if not (prefix and seq2seq):
        dims["num_layers"] = cfg.n_layers
    for field, want in dims.items():
        if conf.get(field) not in (None, want):
            raise AdapterError(f"{source}: {field}={conf[field]}, but this base has {want}: the adapter was made for "
                               f"another model")
    if sorted(arrays) != ["prompt_embeddings"]:
        raise AdapterError(f"{file}: holds {', '.join(sorted(arrays)) or 'nothing'}; a {peft_type} adapter holds "
                           f"prompt_embeddings alone")
    x = arrays["prompt_embeddings"]
    shape = (n, pairs * 2 * kv) if prefix else (sets * n, cfg.dim)
    if x.shape != shape:
        raise AdapterError(f"{file}: prompt_embeddings has shape {x.shape}, but {n} virtual tokens over this base "
                           f"need {shape}: the adapter was made for another model")
    if not prefix:
        return {"prompt": {"embeddings": x[:n].astype(np.float32)}}, MethodSpec("prompt", virtual_tokens=n)
    pair = x.reshape(n, pairs, 2, kv).transpose(1, 2, 0, 3).astype(np.float32)  # (L, 2, P, K*H)
    if seq2seq:
        pair = pair[[2 * j % pairs for j in range(n_layers)]]
    return (tree.unflatten({f"{path}/prefix_k": pair[:, 0], f"{path}/prefix_v": pair[:, 1]}),
            MethodSpec("prefix", virtual_tokens=n))


def transformers_version() -> str:
    """The installed transformers release (the one PEFT would load an exported adapter with here)."""
    return metadata.version("transformers")


def _unequal(cfg, method: str, task_type: str | None) -> str | None:
    """Why PEFT, wrapping the class of `task_type`, would apply a `method` adapter otherwise than jaxft's model
    and task heads (None where it computes the same)."""
    kind = family_of(cfg).KIND
    if task_type is None:
        return ("PEFT applies prefix and prompt tuning only through the PeftModel class of a task_type, and a "
                "plain PeftModel would load the adapter and ignore it")
    if task_type not in _TASKS[kind]:
        return f"jaxft reads prefix and prompt tuning of {cfg.model_type} as {' or '.join(_TASKS[kind])} only"
    if kind == "encoder" and method == "prefix" and Version(transformers_version()) >= _NO_BERT_PAST:
        return (f"PEFT hands the prefix to BertModel as past_key_values, which transformers "
                f"{transformers_version()} no longer takes (5.24 removed it); PEFT loads it with "
                f"transformers>=5.0,<=5.23 (the version locks/ pins)")
    if kind == "encoder" and method == "prompt" and task_type == "SEQ_CLS":
        return ("PEFT puts the soft prompt before [CLS], so BertForSequenceClassification pools the first virtual "
                "token, where jaxft's classification head pools the text's [CLS]: the logits would differ")
    return None


def refuse_unknown(conf: dict, fields: set[str], source: str, what: str) -> None:
    """Raises AdapterError naming the first field of `conf` that is set and is neither bookkeeping nor one of
    the method's `fields`: an option that would make jaxft compute something else than PEFT."""
    for key, value in sorted(conf.items()):
        if key not in _BOOKKEEPING and key not in fields and value not in (None, False, {}, []):
            raise AdapterError(f"{source}: {key}={json.dumps(value)} is not supported by jaxft (it changes what the "
                               f"adapter computes; jaxft reads {what})")
