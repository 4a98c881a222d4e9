"""OLMoE (`OlmoeForCausalLM`): the Mixtral family's model (`jaxft.models.mixtral`) with OLMo's attention, an
RMSNorm over the whole query and key projections before RoPE (`layers/attn/q_norm/scale` (L, N*H),
`k_norm/scale` (L, K*H): `jaxft.models.llama`'s qk_norm="all"), no shared expert, top-k weights not
renormalized unless `norm_topk_prob` (OLMoE-1B-7B: 8 of 64 experts, not renormalized) and a load-balancing
weight of 0.01 by default. Its tensors are named as Qwen2-MoE's (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`
or the fused `mlp.experts.gate_up_proj` / `down_proj`), read and written by the same views.

`clip_qkv` (clamping q, k and v) is not supported: a config that sets it is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import mixtral
from jaxft.models.config import ConfigError
from jaxft.models.mixtral import (KIND, LORA_TARGETS, PARAM_AXES, aux_losses, decode_logits, forward,  # noqa: F401
                                  init, init_cache, output_head, split_cache, split_layers)
from jaxft.models.qwen2_moe import (EXPERT_NAMES, MOE_PREFIX, TABLE, checkpoint_view,  # noqa: F401
                                    export_view)


@dataclasses.dataclass(frozen=True)
class Config(mixtral.Config):
    qk_norm: str | None = "all"
    normalize: bool = False
    router_aux_loss_coef: float = 0.01
    model_type: str = "olmoe"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        if hf.get("model_type") != "olmoe":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not olmoe")
        if hf.get("clip_qkv") is not None:
            raise ConfigError(f"{source}: clip_qkv={hf['clip_qkv']} is not supported (expected null)")
        common = mixtral._common(hf, source, "olmoe")
        if common["n_heads"] * common["head_dim"] != common["dim"]:  # q_norm's width is hidden_size
            raise ConfigError(f"{source}: head_dim={common['head_dim']} times num_attention_heads="
                              f"{common['n_heads']} is not hidden_size={common['dim']}, which OLMoE's q_norm needs")
        return cls(**common, **mixtral._routing(hf, source, 0.01),
                   mlp_dim=mixtral._field(hf, "intermediate_size", source), qk_norm="all", model_type="olmoe")

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **mixtral._common_hf(self),
                "intermediate_size": self.mlp_dim, "num_experts": self.n_experts, "num_experts_per_tok": self.top_k,
                "norm_topk_prob": self.normalize, "attention_bias": self.qkv_bias, "clip_qkv": None,
                "router_aux_loss_coef": self.router_aux_loss_coef, "output_router_logits": False}
