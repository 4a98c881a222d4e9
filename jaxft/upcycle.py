"""Sparse upcycling (Komatsuzaki et al. 2022): a dense LLaMA-family model as a Mixtral-format mixture of experts.

Every expert of every layer is a copy of that layer's dense MLP (Mixtral's `w1` = gate_proj, `w3` = up_proj,
`w2` = down_proj, one tensor per expert as the published Mixtral checkpoints store them), and attention, norms,
embeddings and head are the dense model's. Mixtral's router takes the softmax of `x @ gate.T` over the E
experts, keeps the top k and renormalizes those k weights to sum to 1; since the k chosen experts are identical,
the layer's output is the dense MLP's output whatever the router's weights, so the upcycled model computes the
dense model's logits at the start (up to float rounding). A zero router (the default) ties every expert; a small
random one (`router_noise`) breaks the tie so that tokens already go to different experts, which then drift
apart in training, and still leaves the logits equal.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from jaxft import checkpoint
from jaxft.checkpoint.assemble import hf_names, hf_tensors
from jaxft.checkpoint.hf import _replace_dir, read_config, write_shards
from jaxft.tree import flatten

__all__ = ["UpcycleError", "upcycle", "mixtral_config"]

# The dense MLP's tensors -> Mixtral's per-expert names (the layout of mistralai/Mixtral-8x7B-v0.1).
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MOE = "model.layers.{i}.block_sparse_moe"
ROUTER_AUX_LOSS_COEF = 0.02  # the value of Mixtral-8x7B's config.json (transformers' MixtralConfig says 0.001)


class UpcycleError(ValueError):
    """A model or option that cannot be upcycled; the one-line message names the file, field or option."""


def check_options(experts: int, top_k: int, router_noise: float = 0.0) -> None:
    """Raises UpcycleError naming the option (as the command line spells it) whose value cannot be used."""
    if experts < 2:
        raise UpcycleError(f"--experts must be at least 2 (a mixture of one expert is the dense model), got {experts}")
    if top_k < 1:
        raise UpcycleError(f"--top-k must be at least 1, got {top_k}")
    if top_k > experts:
        raise UpcycleError(f"--top-k ({top_k}) must not exceed --experts ({experts})")
    if not (math.isfinite(router_noise) and router_noise >= 0):
        raise UpcycleError(f"--router-noise must be a finite number >= 0, got {router_noise}")


def mixtral_config(dense_hf: dict, *, experts: int, top_k: int, source: str,
                   router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF) -> dict:
    """The config.json of the upcycled model, from the dense model's (`Config.to_hf()`, transformers 5 names).

    Raises UpcycleError where Mixtral cannot express the dense model: attention biases (Qwen2, Llama with
    attention_bias) or sliding windows on some layers only. A tied head stays tied (transformers' Mixtral
    honours tie_word_embeddings).
    """
    if dense_hf.get("model_type") == "qwen2" or dense_hf.get("attention_bias"):
        raise UpcycleError(f"{source}: {dense_hf.get('model_type')} has attention biases, which Mixtral's attention "
                           f"does not have (expected a llama or mistral model without attention_bias)")
    types = set(dense_hf.get("layer_types") or ())
    if dense_hf.get("use_sliding_window") and len(types) > 1:
        raise UpcycleError(f"{source}: sliding windows on some layers only (layer_types), which Mixtral cannot "
                           f"express (it applies sliding_window to every layer)")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
            "tie_word_embeddings", "max_position_embeddings", "hidden_act", "sliding_window",
            "bos_token_id", "eos_token_id", "pad_token_id")
    hf = {k: dense_hf[k] for k in keep if k in dense_hf}
    hf.setdefault("sliding_window", None)
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **hf,
            "num_local_experts": experts, "num_experts_per_tok": top_k,
            "router_aux_loss_coef": router_aux_loss_coef, "output_router_logits": False, "router_jitter_noise": 0.0}


def upcycle(model, out, *, experts: int = 8, top_k: int = 2, dtype=jnp.bfloat16, router_noise: float = 0.0,
            seed: int = 0, router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False) -> dict:
    """Writes the dense `model` ("default", an HF directory or a .gguf file) upcycled to `experts` experts as a
    Mixtral Hugging Face directory `out` that `transformers.MixtralForCausalLM.from_pretrained` loads.

    out holds config.json, model.safetensors (or shards past `max_shard_bytes`, with an index), the tokenizer
    and, from an HF directory, its generation_config.json. Router: (E, D) per layer, zeros, or
    N(0, router_noise^2) drawn from `seed`. The dense weights are read in float32 (a quantized GGUF
    dequantized) and written in `dtype`. The directory is written beside `out` and renamed into place; an
    existing non-empty `out` is an error unless `overwrite`, and nothing is written on any error.
    Returns a summary: {"out", "params", "active_params", "dense_params", "bytes", "seconds"}.
    """
    check_options(experts, top_k, router_noise)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    start = time.perf_counter()
    if (path := checkpoint.resolve(model)).is_dir():  # refuse what Mixtral cannot express before reading weights
        mixtral_config(read_config(path).to_hf(), experts=experts, top_k=top_k, source=str(path / "config.json"))
    dense = checkpoint.load(model, dtype=jnp.float32)
    cfg, path = dense.cfg, dense.path
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise UpcycleError(f"{path}: model_type {cfg.model_type!r} has no dense MLP to upcycle (expected a "
                           f"llama, mistral or qwen2 decoder)")
    hf = _dense_hf(cfg, path, dense.tokenizer)
    config = mixtral_config(hf, experts=experts, top_k=top_k, source=str(path),
                            router_aux_loss_coef=router_aux_loss_coef)
    np_dtype = np.dtype(jnp.dtype(dtype))
    routers = _routers(cfg.n_layers, experts, cfg.dim, router_noise, seed, np_dtype)
    plan = list(_names(hf_names(cfg), experts))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(dict(config, dtype=str(np_dtype)), indent=2) + "\n")
        tensors = _tensors(hf_tensors(cfg, flatten(dense.params), np_dtype), experts, routers)
        size = write_shards(tmp, plan, tensors, np_dtype, max_shard_bytes)  # an expert copy: a reference
        if dense.tokenizer is not None:
            dense.tokenizer.save_pretrained(str(tmp))
        if path.is_dir() and (path / "generation_config.json").is_file():
            shutil.copy(path / "generation_config.json", tmp / "generation_config.json")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mlp = 3 * cfg.dim * cfg.mlp_dim * cfg.n_layers
    router = experts * cfg.dim * cfg.n_layers
    return {"out": out, "dense_params": cfg.n_params, "params": cfg.n_params + (experts - 1) * mlp + router,
            "active_params": cfg.n_params + (top_k - 1) * mlp + router, "bytes": size,
            "seconds": time.perf_counter() - start}


def _dense_hf(cfg, path: Path, tokenizer) -> dict:
    """The dense model's config.json fields, with its special token ids (from its own config.json where it
    has one, else from its tokenizer) so that generation stops where the dense model's does."""
    hf = dict(cfg.to_hf())
    if tokenizer is not None:
        hf.update({f"{t}_token_id": getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")})
    if path.is_dir():
        own = json.loads((path / "config.json").read_text())
        hf.update({k: own[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in own})
    return hf


def _routers(n_layers: int, experts: int, dim: int, noise: float, seed: int, dtype) -> np.ndarray:
    """(L, E, D) router weights (HF layout (E, D) per layer): zeros, or N(0, noise^2)."""
    if noise == 0:
        return np.zeros((n_layers, experts, dim), dtype)
    return (noise * np.random.default_rng(seed).standard_normal((n_layers, experts, dim))).astype(dtype)


def _rename(name: str, experts: int) -> list[str]:
    """The upcycled model's names for the dense tensor `name`: E expert copies of an MLP tensor, else itself."""
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3] == "mlp" and parts[4] in _EXPERT_NAMES:
        moe = _MOE.format(i=parts[2])
        return [f"{moe}.experts.{e}.{_EXPERT_NAMES[parts[4]]}.weight" for e in range(experts)]
    return [name]


def _router_of(name: str) -> str | None:
    """The router written right after the dense tensor `name`: each layer's after its gate_proj."""
    parts = name.split(".")
    if len(parts) == 6 and parts[3:5] == ["mlp", "gate_proj"]:
        return f"{_MOE.format(i=parts[2])}.gate.weight"
    return None


def _names(dense_names: dict, experts: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the upcycled model, in the order `_tensors` yields them."""
    for name, (_, _, shape) in dense_names.items():
        yield from ((new, shape) for new in _rename(name, experts))
        if (router := _router_of(name)) is not None:
            yield router, (experts, shape[1])


def _tensors(dense: Iterator[tuple[str, np.ndarray]], experts: int, routers: np.ndarray):
    """(name, array) of every tensor of the upcycled model; the expert copies are one array, not E."""
    for name, x in dense:
        yield from ((new, x) for new in _rename(name, experts))
        if (router := _router_of(name)) is not None:
            yield router, routers[int(name.split(".")[2])]
