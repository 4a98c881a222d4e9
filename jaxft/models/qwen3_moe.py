"""Qwen3-MoE (`Qwen3MoeForCausalLM`): the Mixtral family's model (`jaxft.models.mixtral`) with Qwen3's
attention, an RMSNorm over each head's queries and keys before RoPE (`layers/attn/{q,k}_norm/scale` (L, H),
`jaxft.models.llama`'s qk_norm="head"), no shared expert, and the top-k weights renormalized only with
`norm_topk_prob`. Its tensors are named as Qwen2-MoE's (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj` or
the fused `mlp.experts.gate_up_proj` / `down_proj`), read and written by the same views.

Dense layers among the sparse ones (`mlp_only_layers`, `decoder_sparse_step` > 1; the published Qwen3-30B-A3B
and 235B-A22B have none): every layer then holds both MLPs, the experts (L, E, D, F) and llama's dense
`layers/mlp/{gate,up,down}_proj/w` (L, D, Fd), the one a layer does not use filled with zeros when loaded,
never read, and left out of exports. `forward` then runs the layers as a Python loop over per-layer trees
(`jaxft.models.llama.split_layers`), each with its own MLP: a compilation that grows with the depth. A filler
keeps a fresh LoRA adapter at zero (it gets no gradient), so merges and exports stay exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import llama, mixtral, qwen2_moe
from jaxft.models.config import ConfigError
from jaxft.models.mixtral import (KIND, LORA_TARGETS, decode_logits, init_cache, output_head,  # noqa: F401
                                  split_cache, split_layers)
from jaxft.models.qwen2_moe import EXPERT_NAMES, MOE_PREFIX  # noqa: F401  (Qwen2-MoE's names: peft.hf_experts)

DENSE_MLP = tuple(e for e in llama.TABLE if ".mlp." in e.hf)  # llama's rows of the dense MLP
TABLE = qwen2_moe.TABLE + DENSE_MLP
PARAM_AXES = mixtral.PARAM_AXES + tuple(row for row in llama.PARAM_AXES if row[0].startswith("layers/mlp/"))


@dataclasses.dataclass(frozen=True)
class Config(mixtral.Config):
    qk_norm: str | None = "head"
    router_aux_loss_coef: float = 0.001
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP (mlp_only_layers, decoder_sparse_step)
    dense_mlp_dim: int = 0  # Fd, their width (intermediate_size)
    model_type: str = "qwen3_moe"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        if hf.get("model_type") != "qwen3_moe":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not qwen3_moe")
        # As transformers: the window holds in every layer, and only with use_sliding_window.
        windowed = dict(hf, sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None)
        common = mixtral._common(windowed, source, "mistral")
        step, only = hf.get("decoder_sparse_step", 1), list(hf.get("mlp_only_layers") or [])
        if not isinstance(step, int) or step < 1:
            raise ConfigError(f"{source}: decoder_sparse_step={step!r} is not supported (expected an integer >= 1)")
        dense = tuple(i for i in range(common["n_layers"]) if i in only or (i + 1) % step)
        if len(dense) == common["n_layers"]:
            raise ConfigError(f"{source}: decoder_sparse_step={step}, mlp_only_layers={only} leave no sparse layer "
                              f"(expected at least one layer with experts)")
        return cls(**common, **mixtral._routing(hf, source, 0.001),
                   mlp_dim=mixtral._field(hf, "moe_intermediate_size", source), qk_norm="head",
                   dense_layers=dense, dense_mlp_dim=mixtral._field(hf, "intermediate_size", source) if dense else 0,
                   model_type="qwen3_moe")

    @property
    def n_params(self) -> int:
        """Parameters of the checkpoint: the dense layers' MLP in place of their experts (fillers not counted)."""
        sparse = 3 * self.dim * self.mlp_dim * self.n_experts + self.dim * self.n_experts
        return super().n_params + len(self.dense_layers) * (3 * self.dim * self.dense_mlp_dim - sparse)

    def to_hf(self) -> dict[str, Any]:
        windows = {w for w in self.layer_windows if w}
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **mixtral._common_hf(self),
                "intermediate_size": self.dense_mlp_dim or self.mlp_dim, "moe_intermediate_size": self.mlp_dim,
                "num_experts": self.n_experts, "num_experts_per_tok": self.top_k, "norm_topk_prob": self.normalize,
                "attention_bias": self.qkv_bias, "decoder_sparse_step": 1, "mlp_only_layers": list(self.dense_layers),
                "router_aux_loss_coef": self.router_aux_loss_coef, "use_sliding_window": bool(windows),
                "sliding_window": windows.pop() if windows else None, "output_router_logits": False}


def init(key, cfg: Config, dtype=jnp.float32) -> dict:
    """Random parameters (`jaxft.models.mixtral.init`), with the dense MLP of every layer where some are dense."""
    k_moe, k_dense = jax.random.split(key)
    params = mixtral.init(k_moe, cfg, dtype)
    if cfg.dense_layers:
        L, d, f = cfg.n_layers, cfg.dim, cfg.dense_mlp_dim
        for k, (name, shape) in zip(jax.random.split(k_dense, 3), [("gate_proj", (L, d, f)), ("up_proj", (L, d, f)),
                                                                   ("down_proj", (L, f, d))]):
            params["layers"]["mlp"][name] = {"w": (0.02 * jax.random.normal(k, shape)).astype(dtype)}
    return params


def forward(cfg: Config, base: dict, tokens, *, trainable: dict | None = None, **kwargs):
    """`jaxft.models.mixtral.forward`; with dense layers, over per-layer trees each holding its own MLP."""
    if cfg.dense_layers:
        base, trainable = _by_layer(cfg, base), _by_layer(cfg, trainable)
    return mixtral.forward(cfg, base, tokens, trainable=trainable, **kwargs)


def _by_layer(cfg: Config, params):
    """params with `layers` as per-layer trees, each without the MLP its layer does not use."""
    if not params or not params.get("layers"):
        return params

    def own(i, layer):
        unused = ("router", "experts") if i in cfg.dense_layers else ("gate_proj", "up_proj", "down_proj")
        return {**layer, "mlp": {k: v for k, v in layer["mlp"].items() if k not in unused}} if "mlp" in layer else layer

    return {**params, "layers": tuple(own(i, layer) for i, layer in enumerate(split_layers(params)["layers"]))}


def aux_losses(cfg: Config, router_logits, segment_ids) -> dict:
    """`jaxft.models.mixtral.aux_losses` over the sparse layers' router logits (as transformers: dense layers have
    no router)."""
    if cfg.dense_layers:
        router_logits = router_logits[np.array([i for i in range(cfg.n_layers) if i not in cfg.dense_layers])]
    return mixtral.aux_losses(cfg, router_logits, segment_ids)


def _fillers(cfg: Config) -> dict[str, tuple[int, ...]]:
    """TABLE name -> shape (as the views present it) of the tensors a checkpoint lacks: each layer's unused MLP."""
    d, f, fd, e = cfg.dim, cfg.mlp_dim, cfg.dense_mlp_dim, cfg.n_experts
    out = {}
    for i in range(cfg.n_layers) if cfg.dense_layers else ():
        pre = qwen2_moe.MOE_PREFIX.format(i=i)
        if i in cfg.dense_layers:
            out.update({f"{pre}.gate.weight": (e, d), f"{pre}.experts.gate_proj": (e, d, f),
                        f"{pre}.experts.up_proj": (e, d, f), f"{pre}.experts.down_proj": (e, f, d)})
        else:
            out.update({f"{pre}.gate_proj.weight": (fd, d), f"{pre}.up_proj.weight": (fd, d),
                        f"{pre}.down_proj.weight": (d, fd)})
    return out


def checkpoint_view(cfg: Config, present: dict[str, str], read):
    """The checkpoint's tensors as TABLE names them (`jaxft.models.qwen2_moe.checkpoint_view`), and zeros for
    each layer's unused MLP."""
    present, read = qwen2_moe.checkpoint_view(cfg, present, read)
    fillers = {name: shape for name, shape in _fillers(cfg).items() if name not in present}
    present = {**present, **{name: name for name in fillers}}
    return present, lambda name: np.zeros(fillers[name], np.float32) if name in fillers else read(name)


def export_view(cfg: Config, plan: list, tensors):
    """Qwen3-MoE's per-expert tensors for export, without the unused MLPs' fillers."""
    fillers = _fillers(cfg)
    plan = [(name, shape) for name, shape in plan if name not in fillers]
    return qwen2_moe.export_view(cfg, plan, ((name, x) for name, x in tensors if name not in fillers))
