"""PEFT's prompt-learning adapters, prefix tuning and prompt tuning, to and from jaxft's trainable trees.

Each is one tensor, `prompt_embeddings`, with its dimensions in adapter_config.json:

  PREFIX_TUNING  (P, L*2*K*H), read as (P, L, 2, K*H): layer l's past keys, then its values, over the K
                 key/value heads (PEFT provisions one prefix per KV head under grouped-query attention and writes
                 num_attention_heads=K, token_dim=K*H)        <-> layers/attn/prefix_k, prefix_v (L, P, K*H)
  PROMPT_TUNING  (P, D) (num_attention_heads=N, token_dim=D)  <-> prompt/embeddings (P, D)

PEFT's `prefix_projection` trains a reparameterization MLP but saves what it computes, the prefixes, as jaxft
does (`jaxft.peft.finalize`): both settings read and write the same tensor, and PEFT loads either for inference.
(PEFT cannot continue training an adapter saved with prefix_projection: it would rebuild the MLP.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxft import tree
from jaxft.models import family_of
from jaxft.models.config import LlamaConfig
from jaxft.peft.hf_format import refuse_unknown
from jaxft.peft.method import AdapterError, MethodSpec

_COMMON = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"}
# Fields read, or that matter only when PEFT initializes a new adapter.
_FIELDS = {"PREFIX_TUNING": _COMMON | {"encoder_hidden_size", "prefix_projection", "init_weights"},
           "PROMPT_TUNING": _COMMON | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                       "tokenizer_kwargs"}}
_PROMPT_INITS = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}  # prompt.init -> PEFT's


def save(flat: dict, spec: MethodSpec, cfg: LlamaConfig, run: dict, base_model: str):
    """(tensors, adapter_config.json fields, description) of a prefix or prompt adapter, as PEFT writes them.

    flat: the trainable tree by path (numpy); run: the training config, for prefix.projection (PEFT records
    the MLP's width) and prompt.init / init_text (PEFT records how the prompt started).
    """
    _decoder_only(cfg, "jaxft exports")
    n = spec.virtual_tokens
    common = {"num_virtual_tokens": n, "num_layers": cfg.n_layers, "num_transformer_submodules": 1,
              "modules_to_save": None}
    if spec.method == "prefix":
        if "prefix/embedding" in flat:  # not finalized: compute the prefixes from the reparameterization MLP
            from jaxft.peft import prefix
            flat = {p: np.asarray(x) for p, x in tree.items(prefix.project(tree.unflatten(flat)))}
        kv = cfg.n_kv_heads * cfg.head_dim
        pair = np.stack([flat["layers/attn/prefix_k"], flat["layers/attn/prefix_v"]], 1)  # (L, 2, P, K*H)
        projection = int(run.get("prefix", {}).get("projection", 0) or 0)
        config = {"peft_type": "PREFIX_TUNING", **common, "num_attention_heads": cfg.n_kv_heads, "token_dim": kv,
                  "encoder_hidden_size": projection or kv, "prefix_projection": bool(projection), "init_weights": None}
        return ({"prompt_embeddings": pair.transpose(2, 0, 1, 3).reshape(n, -1)}, config,
                f"prefix-tuning ({n} virtual tokens)")
    prompt = run.get("prompt", {})
    init = _PROMPT_INITS.get(prompt.get("init"), "RANDOM")
    text = init == "TEXT"  # PEFT then records the text and where its tokenizer is
    config = {"peft_type": "PROMPT_TUNING", **common, "num_attention_heads": cfg.n_heads, "token_dim": cfg.dim,
              "prompt_tuning_init": init, "prompt_tuning_init_text": prompt.get("init_text") if text else None,
              "tokenizer_name_or_path": base_model if text else None, "tokenizer_kwargs": None}
    return {"prompt_embeddings": flat["prompt/embeddings"]}, config, f"prompt-tuning ({n} virtual tokens)"


def load(conf: dict, arrays: dict, cfg: LlamaConfig, source: str, file: Path) -> tuple[dict, MethodSpec]:
    """(trainable tree, MethodSpec) of a PEFT PREFIX_TUNING or PROMPT_TUNING adapter for a base of `cfg`.

    Raises AdapterError for an option jaxft does not implement, or dimensions of another model.
    """
    peft_type = conf["peft_type"]
    prefix = peft_type == "PREFIX_TUNING"
    _decoder_only(cfg, f"{source}: jaxft reads")
    refuse_unknown(conf, _FIELDS[peft_type], source, f"{peft_type} of decoder-only models")
    n = conf.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise AdapterError(f"{source}: num_virtual_tokens={n!r} is not a positive integer")
    if conf.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError(f"{source}: num_transformer_submodules={conf['num_transformer_submodules']} is not "
                           f"supported (2 is for encoder-decoder models; jaxft runs decoder-only ones)")
    kv = cfg.n_kv_heads * cfg.head_dim
    dims = ({"num_layers": cfg.n_layers, "num_attention_heads": cfg.n_kv_heads, "token_dim": kv} if prefix else
            {"num_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "token_dim": cfg.dim})
    for field, want in dims.items():
        if conf.get(field) not in (None, want):
            raise AdapterError(f"{source}: {field}={conf[field]}, but this base has {want}: the adapter was made for "
                               f"another model")
    if sorted(arrays) != ["prompt_embeddings"]:
        raise AdapterError(f"{file}: holds {', '.join(sorted(arrays)) or 'nothing'}; a {peft_type} adapter holds "
                           f"prompt_embeddings alone")
    x = arrays["prompt_embeddings"]
    shape = (n, cfg.n_layers * 2 * kv) if prefix else (n, cfg.dim)
    if x.shape != shape:
        raise AdapterError(f"{file}: prompt_embeddings has shape {x.shape}, but {n} virtual tokens over this base "
                           f"need {shape}: the adapter was made for another model")
    if not prefix:
        return {"prompt": {"embeddings": x.astype(np.float32)}}, MethodSpec("prompt", virtual_tokens=n)
    pair = x.reshape(n, cfg.n_layers, 2, kv).transpose(1, 2, 0, 3).astype(np.float32)  # (L, 2, P, K*H)
    return ({"layers": {"attn": {"prefix_k": pair[:, 0], "prefix_v": pair[:, 1]}}},
            MethodSpec("prefix", virtual_tokens=n))


def _decoder_only(cfg, what: str) -> None:
    """PEFT lays prompts out per task class (two sets for encoder-decoders, none through a plain PeftModel);
    jaxft matches its layout for decoder-only models."""
    kind = family_of(cfg).KIND
    if kind != "decoder":
        raise AdapterError(f"{what} prefix and prompt tuning in PEFT's format for decoder-only models; this base "
                           f"is {'an' if kind[0] in 'aeiou' else 'a'} {kind} model ({cfg.model_type}): keep the "
                           f"jaxft adapter")
