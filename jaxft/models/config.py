"""The architecture of a decoder-only model of the LLaMA family, read from a Hugging Face `config.json`.

Llama 2/3, Mistral, Qwen2 and SmolLM2 differ only in the fields below; one model function serves them all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
    """A model configuration that jaxft cannot build: the message names the field."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # D, the residual width
    n_layers: int  # L
    n_heads: int  # N, query heads
    n_kv_heads: int  # K, key/value heads (grouped-query attention when K < N)
    head_dim: int  # H
    mlp_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # ("linear", factor) or None.
    rope_scaling: tuple | None = None
    # Sliding-window size per layer; 0 means full attention (Mistral: all layers, Qwen2: some).
    layer_windows: tuple[int, ...] = ()
    qkv_bias: bool = False  # Qwen2, and Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    tie_embeddings: bool = False  # SmolLM2: the output head is the input embedding
    # RMSNorm of queries and keys before RoPE: "head" over each head's H (Qwen3), "all" over the whole
    # projection (OLMoE); None: none.
    qk_norm: str | None = None
    max_seq_len: int = 2048
    model_type: str = "llama"

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.n_layers)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads={self.n_heads} is not a multiple of "
                              f"num_key_value_heads={self.n_kv_heads}")
        if len(self.layer_windows) != self.n_layers:
            raise ConfigError(f"{len(self.layer_windows)} layer windows for {self.n_layers} layers")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Builds the config from the dict of a Hugging Face `config.json` (transformers 4 or 5 field names)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported by the decoder model "
                              f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        n_heads = hf["num_attention_heads"]
        n_layers = hf["num_hidden_layers"]
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            mlp_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(scaling, source),
            layer_windows=_layer_windows(hf, model_type, n_layers),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
            o_bias=model_type == "llama" and bool(hf.get("attention_bias")),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf`: a `config.json` dict that transformers loads."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling and self.rope_scaling[0] == "llama3":
            _, factor, low, high, orig = self.rope_scaling
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
        elif self.rope_scaling:
            rope = {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_scaling[1]}
        hf = {
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "intermediate_size": self.mlp_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_parameters": rope,
            "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
        windows = {w for w in self.layer_windows if w}
        if self.model_type == "mistral":
            hf["sliding_window"] = windows.pop() if windows else None
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = bool(windows)
            hf["sliding_window"] = windows.pop() if windows else None
            hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in self.layer_windows]
        return hf

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.mlp_dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.n_layers * (attn + mlp + 2 * self.dim) + self.dim


def _rope_scaling(scaling: dict[str, Any], source: str) -> tuple | None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    if kind == "linear":
        return ("linear", float(scaling["factor"]))
    raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (expected default, linear or llama3)")


def _layer_windows(hf: dict[str, Any], model_type: str, n_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window") or 0
    if model_type == "mistral":
        return (window,) * n_layers
    if model_type == "qwen2" and hf.get("use_sliding_window") and window:
        types = hf.get("layer_types")
        if types:
            return tuple(window if t == "sliding_attention" else 0 for t in types)
        first_full = hf.get("max_window_layers", n_layers)
        return tuple(window if i >= first_full else 0 for i in range(n_layers))
    return (0,) * n_layers
