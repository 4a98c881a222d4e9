"""GGUF files (llama.cpp): the config from the metadata, the tensors dequantized into the jaxft tree.

GGUF names its tensors differently (`blk.3.attn_q.weight`); gguf-py's own name map translates the Hugging
Face names of the mapping table, so the table stays the one description of the model. llama.cpp also
permutes the rows of the query and key projections of `llama` models (its rotary embedding pairs adjacent
dimensions, Hugging Face's pairs the two halves); that is undone here exactly as transformers' GGUF loader
does it. Mixtral-style files are `llama` files with `llama.expert_count` / `llama.expert_used_count` and each
layer's experts stacked in one tensor per projection (`blk.N.ffn_{gate,up,down}_exps.weight`: the per-expert
Hugging Face (out, in) weights stacked to (E, out, in)); they load as the `mixtral` family. llama.cpp's `qwen3moe` and
`olmoe` files stack their experts the same way (the expert width in `expert_feed_forward_length`, no q/k
permutation: both use NeoX-style rotary) and load as `qwen3_moe` / `olmoe`, with the top-k weights renormalized
as llama.cpp does (`expert_weights_norm` if written, else Qwen3-MoE yes and OLMoE no). Only the types below are
read: they dequantize exactly with gguf-py, and the rest (k-quants, i-quants) are left for a native quantized
path rather than silently widened.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as T

from jaxft.checkpoint import experts as moe_checks
from jaxft.checkpoint.assemble import LeafFn, LoadError, assemble
from jaxft.models import config_from_hf, family_of
from jaxft.models.config import ConfigError, LlamaConfig

READABLE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1)
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE,
         "olmoe": gguf.MODEL_ARCH.OLMOE}
_MOE_ARCHS = {"llama": "mixtral", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}  # llama.cpp arch -> model_type
_ARCH_OF = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}  # model_type -> llama.cpp arch, where they differ
_PERMUTED = ("llama",)  # the architectures whose q/k rows llama.cpp's converter permutes
_REQUIRED = object()


def load(path: Path, *, dtype=jnp.float32, leaf_fn: LeafFn | None = None) -> tuple[LlamaConfig, dict, object]:
    """(config, params, tokenizer or None) of the GGUF file `path`; see `assemble` for `leaf_fn`.

    Memory: gguf-py's parsed metadata (the vocabulary as one small array per token, ~150 MB for 49k tokens) is
    freed before anything else is made, and the tokenizer is built before the weights are read, so that what
    building it allocates and frees is reused rather than added on top of the weights. Tensors are read from
    the file one at a time (not through gguf-py's memory map, whose pages would stay in the process) and
    dequantized a few MB at a time.
    """
    reader = open_reader(path)
    cfg = read_config(reader, str(path))
    unreadable = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type not in READABLE]
    if unreadable:
        raise LoadError(f"{path}: tensor type not supported: {', '.join(unreadable[:8])}"
                        f"{f' and {len(unreadable) - 8} more' if len(unreadable) > 8 else ''} "
                        f"(jaxft reads {', '.join(t.name for t in READABLE)})")
    # name -> (type, offset in the file, shape and dtype of the stored data)
    tensors = {t.name: (t.tensor_type, t.data_offset, t.data.shape, t.data.dtype) for t in reader.tensors}
    has_tokenizer, metadata_end = "tokenizer.ggml.model" in reader.fields, reader.data_offset
    del reader
    tok = _tokenizer(path, metadata_end) if has_tokenizer else None

    arch = _ARCH_OF.get(cfg.model_type, cfg.model_type)
    names = gguf.get_tensor_name_map(ARCHS[arch], cfg.n_layers)
    experts = _experts(family_of(cfg))
    to_gguf = {}
    for entry in family_of(cfg).TABLE:
        for i in range(cfg.n_layers) if "{i}" in entry.hf else [None]:
            hf = entry.hf.format(i=i)
            stacked = experts.get(entry.hf, "").format(i=i)
            to_gguf[hf] = stacked or names.get_name(hf, try_suffixes=(".weight", ".bias")) or hf
    to_hf = {g: h for h, g in to_gguf.items()}
    present = {to_hf.get(name, name): name for name in tensors}

    with open(path, "rb") as file:
        def read(name: str) -> np.ndarray:
            qtype, offset, shape, stored = tensors[name]
            data = np.empty(shape, stored)
            file.seek(offset)
            if file.readinto(data.reshape(-1).view(np.uint8)) != data.nbytes:
                raise LoadError(f"{path}: tensor {name} runs past the end of the file")
            x = dequantize(data, qtype)
            if arch in _PERMUTED and (".attn_q." in name or ".attn_k." in name):
                x = unpermute(x, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
            if "_exps." in name:  # (E, out, in) -> jaxft's (E, in, out)
                x = np.swapaxes(x, 1, 2)
            return x

        params = assemble(cfg, present, read, file=str(path), dtype=dtype, leaf_fn=leaf_fn,
                          label=lambda hf: to_gguf.get(hf, hf))
    return cfg, params, tok


def _experts(family) -> dict[str, str]:
    """A MoE family's expert stacks (TABLE names, (E, in, out)) -> llama.cpp's stacked tensors (E, out, in)."""
    prefix = getattr(family, "MOE_PREFIX", None)
    if prefix is None:
        return {}
    return {f"{prefix}.experts.{name}": f"blk.{{i}}.ffn_{gguf_name}_exps.weight"
            for name, gguf_name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))}


def open_reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader of `path`; a file that is not GGUF, or is cut short, raises a one-line LoadError."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LoadError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as e:
        # gguf-py reads fields straight out of a memory map: a file cut inside its header fails wherever
        # the data ran out, with an error about numpy views.
        raise LoadError(f"{path}: a truncated or damaged GGUF file ({path.stat().st_size} bytes; the reader "
                        f"stopped with {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                        f"copy or download it again") from None


def dequantize(data: np.ndarray, qtype: T, chunk_bytes: int = 1 << 22) -> np.ndarray:
    """data: a tensor as stored (rows of blocks of `qtype`) -> float32, as `gguf.quants.dequantize` computes it,
    `chunk_bytes` of data at a time: its intermediates are several times the size of what it dequantizes."""
    if qtype == T.F32 or data.ndim < 2 or data.nbytes <= chunk_bytes:
        return np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
    rows = max(1, chunk_bytes // (data.nbytes // data.shape[0]))
    first = gguf.quants.dequantize(data[:rows], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), np.float32)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start:start + rows] = gguf.quants.dequantize(data[start:start + rows], qtype)
    return out


def read_config(reader: gguf.GGUFReader, file: str) -> LlamaConfig:
    """The model config from the file's metadata (the keys llama.cpp writes, transformers' defaults)."""
    arch = _field(reader, "general.architecture", file)
    if arch not in ARCHS:
        raise LoadError(f"{file}: general.architecture {arch!r} is not supported (expected one of "
                        f"{', '.join(ARCHS)})")

    def get(key, default=_REQUIRED):
        return _field(reader, f"{arch}.{key}", file, default)

    tensor_names = {t.name for t in reader.tensors}
    hf = {
        "model_type": arch,
        "num_hidden_layers": get("block_count"),
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv", None),
        # llama.cpp writes the rotary width, equal to the head width for these families; transformers
        # reads it as head_dim for llama too.
        "head_dim": get("attention.key_length", get("rope.dimension_count", None) if arch == "llama" else None),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "vocab_size": get("vocab_size", None) or _vocab_size(reader) or get("vocab_size"),
        # As transformers decides it: a file without an output head reuses the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling != "none":
        raise LoadError(f"{file}: {arch}.rope.scaling.type {scaling!r} is not supported (expected none or linear)")
    for key in ("num_key_value_heads", "head_dim"):
        if isinstance(hf[key], list):  # per-layer values, which the model does not have
            raise LoadError(f"{file}: per-layer {key} {hf[key]} is not supported")
    experts = get("expert_count", 0)
    if experts and arch not in _MOE_ARCHS or arch in _MOE_ARCHS and arch != "llama" and not experts:
        raise LoadError(f"{file}: {arch}.expert_count {experts}: mixture-of-experts GGUF files are read for the "
                        f"architectures {', '.join(_MOE_ARCHS)} (with expert_count > 0)")
    try:
        if experts:
            width = get("expert_feed_forward_length", hf["intermediate_size"])  # llama.cpp's MoE width
            cfg = config_from_hf({**hf, "model_type": _MOE_ARCHS[arch], "num_local_experts": experts,
                                  "num_experts": experts, "num_experts_per_tok": get("expert_used_count"),
                                  "moe_intermediate_size": width, "intermediate_size": width,
                                  "norm_topk_prob": bool(get("expert_weights_norm", arch == "qwen3moe"))},
                                 source=file)
            moe_checks.check_routing(cfg, file, f"{arch}.expert_count", f"{arch}.expert_used_count")
            return cfg
        return LlamaConfig.from_hf(hf, source=file)
    except ConfigError as e:
        raise LoadError(str(e)) from None


def unpermute(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: x (n_heads * H, ...) with, per head, the rows of the two rotary
    halves interleaved (0, H/2, 1, H/2 + 1, ...) -> the Hugging Face order (0, 1, ..., H - 1)."""
    half = x.shape[0] // n_heads // 2
    return x.reshape(n_heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def tokenizer(path: Path, reader: gguf.GGUFReader):
    """The tokenizer (with its chat template) stored in the file, or None where it holds none."""
    return _tokenizer(path, reader.data_offset) if "tokenizer.ggml.model" in reader.fields else None


def _tokenizer(path: Path, metadata_end: int):
    """The file's tokenizer, converted by transformers once and then read back from jaxft's cache.

    Converting a GGUF vocabulary is slow (gguf-py parses it token by token: ~8 s of the default model's ~12 s
    load). The converted tokenizer is saved under `$JAXFT_CACHE/tokenizers/`, keyed by a hash of the file's
    metadata (everything before the tensor data: the vocabulary, merges, special tokens and chat template)
    and the transformers version that converted it, so that an edited file or another transformers converts
    afresh. A cache that cannot be written or read is skipped: the conversion is the fallback, never an error.
    """
    import transformers

    from jaxft.hub import cache_dir

    digest = hashlib.sha256(f"transformers {transformers.__version__}\n".encode())
    with open(path, "rb") as file:
        digest.update(file.read(metadata_end))
    cached = cache_dir() / "tokenizers" / digest.hexdigest()[:32]
    if (cached / "tokenizer_config.json").is_file():
        try:
            return transformers.AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except (OSError, ValueError):  # a damaged entry: convert again below, and replace it
            shutil.rmtree(cached, ignore_errors=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    staged = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = tempfile.mkdtemp(prefix=".tokenizer-", dir=cached.parent)
        tok.save_pretrained(staged)
        os.rename(staged, cached)  # whole or not at all; fails if another process was first
    except OSError:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
    return tok


def _field(reader: gguf.GGUFReader, key: str, file: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise LoadError(f"{file}: missing metadata field {key}")
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _vocab_size(reader: gguf.GGUFReader) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    rows = [int(t.data.shape[0]) for t in reader.tensors if t.name == "token_embd.weight"]
    return rows[0] if rows else None
