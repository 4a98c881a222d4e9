"""Qwen3-MoE (`Qwen3MoeForCausalLM`): the Mixtral family's model (`jaxft.models.mixtral`) with Qwen3's
attention, an RMSNorm over each head's queries and keys before RoPE (`layers/attn/{q,k}_norm/scale` (L, H),
`jaxft.models.llama`'s qk_norm="head"), no shared expert, and the top-k weights renormalized only with
`norm_topk_prob`. Its tensors are named as Qwen2-MoE's (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj` or
the fused `mlp.experts.gate_up_proj` / `down_proj`), read and written by the same views.

Every layer must be sparse (decoder_sparse_step 1, no mlp_only_layers: the published Qwen3-30B-A3B and
Qwen3-235B-A22B); a config with dense layers among the sparse ones is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import mixtral, qwen2_moe
from jaxft.models.config import ConfigError
from jaxft.models.mixtral import (KIND, LORA_TARGETS, PARAM_AXES, aux_losses, decode_logits, forward,  # noqa: F401
                                  init, init_cache, output_head, split_cache, split_layers)
from jaxft.models.qwen2_moe import TABLE, checkpoint_view, export_view  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Config(mixtral.Config):
    qk_norm: str | None = "head"
    router_aux_loss_coef: float = 0.001
    model_type: str = "qwen3_moe"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        if hf.get("model_type") != "qwen3_moe":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not qwen3_moe")
        qwen2_moe.sparse_only(hf, source)
        # As transformers: the window holds in every layer, and only with use_sliding_window.
        windowed = dict(hf, sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None)
        bias = bool(hf.get("attention_bias", False))
        return cls(**mixtral._common(windowed, source, "mistral"),
                   mlp_dim=mixtral._field(hf, "moe_intermediate_size", source),
                   n_experts=mixtral._field(hf, "num_experts", source, alias="num_local_experts"),
                   top_k=mixtral._field(hf, "num_experts_per_tok", source),
                   normalize=bool(hf.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias, qk_norm="head",
                   router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), model_type="qwen3_moe")

    def to_hf(self) -> dict[str, Any]:
        windows = {w for w in self.layer_windows if w}
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **mixtral._common_hf(self),
                "intermediate_size": self.mlp_dim, "moe_intermediate_size": self.mlp_dim,
                "num_experts": self.n_experts, "num_experts_per_tok": self.top_k, "norm_topk_prob": self.normalize,
                "attention_bias": self.qkv_bias, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "router_aux_loss_coef": self.router_aux_loss_coef, "use_sliding_window": bool(windows),
                "sliding_window": windows.pop() if windows else None, "output_router_logits": False}
