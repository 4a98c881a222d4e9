"""Mixture-of-experts decoders of the LLaMA family: Mixtral (`MixtralForCausalLM`), and the pieces Qwen2-MoE
(`jaxft.models.qwen2_moe`) shares with it.

The attention, norms, embeddings, head, KV cache and decode step are `jaxft.models.llama`'s; each block's MLP
is the sparse MoE block of `jaxft.models.moe` (top-k routing, dropless, experts grouped with ragged_dot or
tiles). Parameters: llama's layout with `layers/mlp` replaced by (E experts, F each expert's width):

  layers/mlp/router/w                   (L, D, E)       Mixtral's `gate`, transposed
  layers/mlp/experts/{gate,up}_proj/w   (L, E, D, F)    w1, w3 of each expert, transposed
  layers/mlp/experts/down_proj/w        (L, E, F, D)    w2
  layers/mlp/shared/..., shared_gate/w  (L, D, Fs), (L, Fs, D), (L, D, 1)   Qwen2-MoE's shared expert

On disk the experts come in either layout, both read through one table (`checkpoint_view`): one tensor per
expert (`experts.{e}.w1.weight`, the published checkpoints and what transformers 5 saves) or transformers 5's
fused in-memory one (`experts.gate_up_proj` (E, 2F, D), `experts.down_proj` (E, D, F)).
Export writes the per-expert layout (`export_view`). `forward(..., return_aux=True)` also returns the router
logits (L, B, T, E) float32 for the losses of `jaxft.models.moe_losses` (`aux_losses`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import llama, moe, moe_losses
from jaxft.models.config import ConfigError, LlamaConfig, _layer_windows, _rope_scaling
from jaxft.models.layers import dense
from jaxft.models.table import Entry

KIND = "decoder"
init_cache, decode_logits, split_layers, split_cache, output_head = (llama.init_cache, llama.decode_logits,
    llama.split_layers, llama.split_cache, llama.output_head)
# PEFT's default LoRA targets for Mixtral (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): q_proj, v_proj.
LORA_TARGETS = llama.LORA_TARGETS

EXPERT_AXES = (
    (r"layers/mlp/router/w", ("layers", "embed", None)),
    (r"layers/mlp/experts/(gate|up)_proj/w", ("layers", "experts", "embed", "mlp")),
    (r"layers/mlp/experts/down_proj/w", ("layers", "experts", "mlp", "embed")),
    (r"layers/mlp/shared/(gate|up)_proj/w", ("layers", "embed", "mlp")),
    (r"layers/mlp/shared/down_proj/w", ("layers", "mlp", "embed")),
    (r"layers/mlp/shared_gate/w", ("layers", "embed", None)),
)
PARAM_AXES = tuple(row for row in llama.PARAM_AXES if not row[0].startswith("layers/mlp/")) + EXPERT_AXES


@dataclasses.dataclass(frozen=True)
class Config(LlamaConfig):
    """LlamaConfig (mlp_dim: F, each routed expert's width) and the routing."""
    n_experts: int = 8  # E
    top_k: int = 2  # k, experts per token
    normalize: bool = True  # rescale the k routing weights to sum to 1 (Mixtral; Qwen2-MoE's norm_topk_prob)
    shared_dim: int = 0  # Fs, the shared expert's width (Qwen2-MoE); 0: none
    router_aux_loss_coef: float = 0.02  # the load-balancing loss weight (the checkpoint's; moe.aux_loss_coef)
    router_z_loss_coef: float = 0.0  # the router z-loss weight (moe.router_z_loss_coef)
    capacity_factor: float | None = None  # rows per expert: ceil(factor N k / E), the rest dropped; None: dropless
    model_type: str = "mixtral"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        """Mixtral's config.json (transformers 4 or 5 names)."""
        if hf.get("model_type") != "mixtral":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not mixtral")
        return cls(**_common(hf, source, "mistral"), mlp_dim=hf["intermediate_size"],
                   n_experts=_field(hf, "num_local_experts", source), top_k=_field(hf, "num_experts_per_tok", source),
                   normalize=True, router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                   model_type="mixtral")

    def to_hf(self) -> dict[str, Any]:
        hf = _common_hf(self)
        windows = {w for w in self.layer_windows if w}
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **hf,
                "intermediate_size": self.mlp_dim, "num_local_experts": self.n_experts,
                "num_experts_per_tok": self.top_k, "router_aux_loss_coef": self.router_aux_loss_coef,
                "sliding_window": windows.pop() if windows else None, "output_router_logits": False,
                "router_jitter_noise": 0.0}

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.mlp_dim * self.n_experts + self.dim * self.n_experts
        mlp += 3 * self.dim * self.shared_dim + (self.dim if self.shared_dim else 0)
        qk = {"head": 2 * self.head_dim, "all": (self.n_heads + self.n_kv_heads) * self.head_dim}
        attn += qk.get(self.qk_norm, 0)
        attn += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0
        attn += self.dim if self.o_bias else 0
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.n_layers * (attn + mlp + 2 * self.dim) + self.dim


def _field(hf: dict, key: str, source: str, alias: str | None = None):
    """hf[key] (or hf[alias], the name some transformers versions save it under); ConfigError naming key."""
    if key not in hf and alias in hf:
        return hf[alias]
    if key not in hf:
        raise ConfigError(f"{source}: missing field {key!r}")
    return hf[key]


def _common(hf: dict, source: str, windows_as: str) -> dict:
    """The LlamaConfig fields of a MoE config.json (attention, rope, norms, head); `windows_as` names the dense
    model type whose sliding-window fields it follows."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        _field(hf, key, source)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    n_heads, n_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    rope = dict(hf.get("rope_parameters") or {})
    return dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_scaling=_rope_scaling(hf.get("rope_scaling") or rope, source),
                layer_windows=_layer_windows(hf, windows_as, n_layers),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_seq_len=hf.get("max_position_embeddings", 2048))


def _routing(hf: dict, source: str, aux_loss_coef: float) -> dict:
    """The Config fields of a Qwen3-MoE or OLMoE config.json past `_common`: experts, top-k, norm_topk_prob,
    attention_bias (q, k, v and o alike) and the load-balancing weight (`aux_loss_coef` where it has none)."""
    bias = bool(hf.get("attention_bias", False))
    return dict(n_experts=_field(hf, "num_experts", source, alias="num_local_experts"),
                top_k=_field(hf, "num_experts_per_tok", source), normalize=bool(hf.get("norm_topk_prob", False)),
                qkv_bias=bias, o_bias=bias,
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", aux_loss_coef)))


def _common_hf(cfg: Config) -> dict:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:  # written as llama writes it
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LlamaConfig)}
        rope = dict(LlamaConfig(**dict(fields, model_type="llama")).to_hf()["rope_parameters"])
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
            "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "silu"}


def attention_rows(prefix: str = "model.layers.{i}") -> tuple[Entry, ...]:
    """The table rows a MoE decoder shares with llama: everything but the MLP."""
    return tuple(e for e in llama.TABLE if ".mlp." not in e.hf)


def expert_rows(moe_prefix: str) -> tuple[Entry, ...]:
    """Rows of the router and the experts under `moe_prefix` (e.g. 'model.layers.{i}.block_sparse_moe'). The
    experts' names are the ones `checkpoint_view` presents: (E, in, out) stacks in jaxft's layout."""
    return (Entry(f"{moe_prefix}.gate.weight", "layers/mlp/router/w", True),
            *(Entry(f"{moe_prefix}.experts.{name}", f"layers/mlp/experts/{name}/w", False)
              for name in ("gate_proj", "up_proj", "down_proj")))


MOE_PREFIX = "model.layers.{i}.block_sparse_moe"
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # jaxft -> Mixtral's per-expert names
TABLE = attention_rows() + expert_rows(MOE_PREFIX)


def init(key, cfg: Config, dtype=jnp.float32) -> dict:
    """Random parameters (normal, std 0.02; norms at one), in the layout of the module docstring."""
    k_dense, k_moe = jax.random.split(key)
    params = llama.init(k_dense, cfg, dtype)
    L, d, f, e = cfg.n_layers, cfg.dim, cfg.mlp_dim, cfg.n_experts
    shapes = {"router/w": (L, d, e), "experts/gate_proj/w": (L, e, d, f), "experts/up_proj/w": (L, e, d, f),
              "experts/down_proj/w": (L, e, f, d)}
    if cfg.shared_dim:
        fs = cfg.shared_dim
        shapes.update({"shared/gate_proj/w": (L, d, fs), "shared/up_proj/w": (L, d, fs),
                       "shared/down_proj/w": (L, fs, d), "shared_gate/w": (L, d, 1)})
    mlp: dict = {}
    for k, (path, shape) in zip(jax.random.split(k_moe, len(shapes)), sorted(shapes.items())):
        node = mlp
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = (0.02 * jax.random.normal(k, shape)).astype(dtype)
    params["layers"]["mlp"] = mlp
    return params


def forward(cfg: Config, base: dict, tokens, *, return_aux: bool = False, **kwargs):
    """`jaxft.models.llama.forward` (same arguments and results) with the sparse MoE block as every MLP.
    With `return_aux`, a third result: the router logits (L, B, T, E) float32."""
    return llama.forward(cfg, base, tokens, mlp=moe_mlp, return_aux=return_aux, **kwargs)


def moe_mlp(cfg: Config, hooks, p: dict, h, rngs, layout=None):
    """One block's MoE MLP: h (B, T, D) normed -> (output (B, T, D), router logits (B, T, E) float32).

    The router and the shared expert go through the method's `linear` hook, the experts through its
    `grouped_linear` hook (LoRA's per-expert factors; `jaxft.models.hooks`). A layer without experts (a dense
    layer of Qwen3-MoE, `jaxft.models.qwen3_moe`) is llama's MLP, with router logits of zeros."""
    mlp = p["mlp"]
    if "experts" not in mlp:
        return llama.mlp_block(cfg, hooks, p, h, rngs, layout)[0], jnp.zeros(h.shape[:2] + (cfg.n_experts,))
    y, aux = moe.moe_block(h, mlp, top_k=cfg.top_k, normalize=cfg.normalize, capacity_factor=cfg.capacity_factor,
                           dense=lambda x, q: dense(x, q, hooks, None), expert_linear=hooks.grouped_linear)
    return hooks.block_output(mlp, y), aux["router_logits"]


def aux_losses(cfg: Config, router_logits, segment_ids) -> dict:
    """The router's losses of one batch, padding (segment id 0) excluded, as transformers computes them:
    {"loss": router_aux_loss_coef * load balancing + router_z_loss_coef * z-loss (what training adds to the
    token loss), "load_balancing", "router_z", "expert_ratio" (L,) (each layer's max / min expert token share)},
    float32. router_logits: (L, B, T, E) as `forward(return_aux=True)` gives them; segment_ids (B, T)."""
    mask = (segment_ids > 0).astype(jnp.float32)
    balance = moe_losses.load_balancing_loss(router_logits, cfg.top_k, mask)
    z = moe_losses.router_z_loss(router_logits, mask)
    _, ratio = moe_losses.expert_share(router_logits, cfg.top_k, mask)
    return {"loss": cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z, "load_balancing": balance,
            "router_z": z, "expert_ratio": ratio}


def checkpoint_view(cfg: Config, present: dict[str, str], read):
    """The checkpoint's tensors as TABLE names them (see `expert_view`), Mixtral's names."""
    present = {_mixtral_name(n): f for n, f in present.items()}
    return expert_view(cfg, present, read, MOE_PREFIX + ".experts", EXPERT_NAMES)


def _mixtral_name(name: str) -> str:
    # transformers 5 keeps Mixtral's MoE block as `mlp` in memory and may save it under that name.
    parts = name.split(".")
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "mlp":
        return ".".join(parts[:3] + ["block_sparse_moe"] + parts[4:])
    return name


def expert_view(cfg: Config, present: dict[str, str], read, prefix: str, per_expert: dict[str, str]):
    """(present, read) with each layer's experts presented as three stacks `{prefix}.{gate,up,down}_proj`,
    (E, in, out) in jaxft's layout, from either on-disk layout: one tensor per expert,
    `{prefix}.{e}.{per_expert[name]}.weight` (out, in), or fused `{prefix}.gate_up_proj` (E, 2F, D) and
    `{prefix}.down_proj` (E, D, F). `prefix` has a `{i}` for the layer. Tensors of neither layout (an expert
    past the config's count, a layer missing one) are left as they are, so that the loader names them."""
    present, how = dict(present), {}
    for i in range(cfg.n_layers):
        pre = prefix.format(i=i)
        split = {name: [f"{pre}.{e}.{hf}.weight" for e in range(cfg.n_experts)] for name, hf in per_expert.items()}
        if all(n in present for names in split.values() for n in names):
            for name, names in split.items():
                files = [present.pop(n) for n in names]
                how[f"{pre}.{name}"] = lambda files=files: np.stack([read(f).T for f in files])
        elif f"{pre}.gate_up_proj" in present and f"{pre}.down_proj" in present:
            gate_up, down = present.pop(f"{pre}.gate_up_proj"), present.pop(f"{pre}.down_proj")
            how[f"{pre}.gate_proj"] = lambda f=gate_up: _half(read(f), 0)
            how[f"{pre}.up_proj"] = lambda f=gate_up: _half(read(f), 1)
            how[f"{pre}.down_proj"] = lambda f=down: np.swapaxes(read(f), 1, 2)
    present.update({name: name for name in how})
    return present, lambda name: how[name]() if name in how else read(name)


def export_view(cfg: Config, plan: list, tensors):
    """The tensors a checkpoint of `cfg` is written with (`jaxft.checkpoint.save_hf`): Mixtral's per-expert ones
    (see `expert_export`)."""
    return expert_export(plan, tensors, MOE_PREFIX + ".experts", EXPERT_NAMES)


def expert_export(plan: list, tensors, prefix: str, per_expert: dict[str, str]):
    """The inverse of `expert_view`: (plan, tensors) of TABLE names, with each layer's expert stacks
    `{prefix}.{gate,up,down}_proj` (E, in, out) replaced by one tensor per expert, `{prefix}.{e}.{name}.weight`
    (out, in), the published layout transformers loads. plan: [(name, shape)]; tensors: (name, array) pairs."""
    pattern = re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)") + r"\.(gate_proj|up_proj|down_proj)")

    def names(name: str, n_experts: int):
        m = pattern.fullmatch(name)
        return [(f"{prefix.format(i=m[1])}.{e}.{per_expert[m[2]]}.weight", e) for e in range(n_experts)]

    out_plan = []
    for name, shape in plan:
        if pattern.fullmatch(name) is None:
            out_plan.append((name, shape))
        else:
            out_plan += [(n, (shape[2], shape[1])) for n, _ in names(name, shape[0])]

    def out_tensors():
        for name, x in tensors:
            if pattern.fullmatch(name) is None:
                yield name, x
            else:
                yield from ((n, np.ascontiguousarray(x[e].T)) for n, e in names(name, x.shape[0]))

    return out_plan, out_tensors()


def _half(gate_up: np.ndarray, which: int) -> np.ndarray:
    """gate (0) or up (1) of a fused (E, 2F, D) tensor, as (E, D, F)."""
    f = gate_up.shape[1] // 2
    return np.swapaxes(gate_up[:, which * f:(which + 1) * f], 1, 2)
