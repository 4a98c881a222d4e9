"""Qwen2-MoE (`Qwen2MoeForCausalLM`): the Mixtral family's model (`jaxft.models.mixtral`) with Qwen2's q/k/v
biases, top-k weights renormalized only with `norm_topk_prob`, and a shared expert gated by sigmoid(x @ w) that
every token goes through. Its layer parameters are Mixtral's plus `layers/mlp/shared/...` and
`layers/mlp/shared_gate/w`.

Every layer must be sparse (decoder_sparse_step 1, no mlp_only_layers: the published Qwen1.5-MoE and Qwen2-MoE
checkpoints); a config with dense layers among the sparse ones is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.models import mixtral
from jaxft.models.config import ConfigError
from jaxft.models.mixtral import (KIND, LORA_TARGETS, PARAM_AXES, aux_losses, decode_logits, forward,  # noqa: F401
                                  init, init_cache, output_head, split_cache, split_layers)
from jaxft.models.table import Entry

MOE_PREFIX = "model.layers.{i}.mlp"
EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
TABLE = mixtral.attention_rows() + mixtral.expert_rows(MOE_PREFIX) + tuple(
    Entry(f"{MOE_PREFIX}.shared_expert.{name}.weight", f"layers/mlp/shared/{name}/w", True)
    for name in ("gate_proj", "up_proj", "down_proj")) + (
    Entry(f"{MOE_PREFIX}.shared_expert_gate.weight", "layers/mlp/shared_gate/w", True),)


@dataclasses.dataclass(frozen=True)
class Config(mixtral.Config):
    model_type: str = "qwen2_moe"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        if hf.get("model_type") != "qwen2_moe":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not qwen2_moe")
        step, dense_layers = hf.get("decoder_sparse_step", 1), list(hf.get("mlp_only_layers") or [])
        if step != 1 or dense_layers:
            raise ConfigError(f"{source}: decoder_sparse_step={step}, mlp_only_layers={dense_layers}: dense layers "
                              f"among the sparse ones are not supported (expected 1 and [])")
        shared = mixtral._field(hf, "shared_expert_intermediate_size", source)
        return cls(**mixtral._common(hf, source, "qwen2"), mlp_dim=mixtral._field(hf, "moe_intermediate_size", source),
                   n_experts=mixtral._field(hf, "num_experts", source),
                   top_k=mixtral._field(hf, "num_experts_per_tok", source),
                   normalize=bool(hf.get("norm_topk_prob", False)), shared_dim=shared,
                   qkv_bias=bool(hf.get("qkv_bias", True)),
                   router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), model_type="qwen2_moe")

    def to_hf(self) -> dict[str, Any]:
        windows = {w for w in self.layer_windows if w}
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **mixtral._common_hf(self),
                "intermediate_size": self.mlp_dim, "moe_intermediate_size": self.mlp_dim,
                "shared_expert_intermediate_size": self.shared_dim, "num_experts": self.n_experts,
                "num_experts_per_tok": self.top_k, "norm_topk_prob": self.normalize, "qkv_bias": self.qkv_bias,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": self.router_aux_loss_coef,
                "use_sliding_window": bool(windows), "sliding_window": windows.pop() if windows else None,
                "layer_types": ["sliding_attention" if w else "full_attention" for w in self.layer_windows],
                "output_router_logits": False}


def checkpoint_view(cfg: Config, present: dict[str, str], read):
    """The checkpoint's tensors as TABLE names them (`jaxft.models.mixtral.expert_view`)."""
    return mixtral.expert_view(cfg, present, read, MOE_PREFIX + ".experts", EXPERT_NAMES)


def export_view(cfg: Config, plan: list, tensors):
    """Qwen2-MoE's per-expert tensors for export (`jaxft.models.mixtral.expert_export`)."""
    return mixtral.expert_export(plan, tensors, MOE_PREFIX + ".experts", EXPERT_NAMES)
