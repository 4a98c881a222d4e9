"""Vision transformers (the image towers of CLIP and SigLIP, as LLaVA and Idefics3 use them) as pure functions.

Axis letters as in `jaxft.models.layers`, plus C channels, P patches (tokens of one image: the patches, and
CLIP's class token first), p patch side. Parameters (pre-norm blocks; the L layers stacked, run with `lax.scan`):

  embed/patch/w                     (C*p*p, D)   the patch convolution as a matmul over flattened patches
  embed/patch/b                     (D,)         SigLIP only
  embed/class                       (D,)         CLIP only: the class token
  embed/position/w                  (P, D)       learned positions
  pre_norm/{scale,bias}             (D,)         CLIP only ("pre_layrnorm")
  layers/attn_norm/{scale,bias}     (L, D)
  layers/attn/{q,k,v,o}_proj/{w,b}  (L, D, D), (L, D)
  layers/mlp_norm/{scale,bias}      (L, D)
  layers/mlp/up_proj/{w,b}          (L, D, F), (L, F)
  layers/mlp/down_proj/{w,b}        (L, F, D), (L, D)
  post_norm/{scale,bias}            (D,)

`forward(..., layer=k)` returns what transformers' `hidden_states[k]` is (0: the embeddings, after CLIP's
pre-norm; k: the output of block k; negative counts from the end), running only the blocks it needs; `post_norm`
adds the final LayerNorm (SigLIP's and Idefics3's `last_hidden_state`). SigLIP's attention-pooling head is not
read: vision-language models take the hidden states.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.models import tables
from jaxft.models.bert import ENCODER_LAYER_AXES, layer_norm  # the one LayerNorm (it belongs in layers.py)
from jaxft.models.config import ConfigError
from jaxft.models.table import Entry, module_rows
from jaxft.models.attention import attention
from jaxft.models.layers import dense, layer_loop
from jaxft.parallel.rules import constrain
from jaxft.tree import overlay, unflatten

KIND = "vision"
LORA_TARGETS = r"layers/attn/(q_proj|v_proj)/w"  # PEFT's default for CLIP / SigLIP
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x), "gelu": partial(jax.nn.gelu, approximate=False),
               "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
               "gelu_new": partial(jax.nn.gelu, approximate=True), "relu": jax.nn.relu}
# transformers' model_type of a vision config -> (class token and pre-norm, bias on the patch convolution).
_VARIANTS = {"clip_vision_model": (True, False), "siglip_vision_model": (False, True), "idefics3_vision": (False, True)}


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    mlp_dim: int  # F
    image_size: int  # the side of the square images the positions are learned for
    patch_size: int  # p
    channels: int = 3  # C
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    model_type: str = "clip_vision_model"

    def __post_init__(self):
        if self.model_type not in _VARIANTS:
            raise ConfigError(f"model_type {self.model_type!r} is not a vision tower jaxft runs (expected one of "
                              f"{', '.join(_VARIANTS)})")
        if self.dim % self.n_heads:
            raise ConfigError(f"hidden_size={self.dim} is not a multiple of num_attention_heads={self.n_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")

    @property
    def class_token(self) -> bool:  # CLIP: a class token before the patches, and a LayerNorm before the blocks
        return _VARIANTS[self.model_type][0]

    @property
    def patch_bias(self) -> bool:
        return _VARIANTS[self.model_type][1]

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:  # P, the rows of the position table
        return self.n_patches + self.class_token

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        """The config of a transformers vision config dict (CLIPVisionConfig, SiglipVisionConfig, or the
        `vision_config` of a LLaVA / Idefics3 config.json)."""
        model_type = hf.get("model_type")
        if model_type not in _VARIANTS:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a vision tower jaxft runs (expected one "
                              f"of {', '.join(_VARIANTS)})")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                    "patch_size"):
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r}")
        try:
            return cls(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       mlp_dim=hf["intermediate_size"], image_size=hf["image_size"], patch_size=hf["patch_size"],
                       channels=hf.get("num_channels", 3), norm_eps=hf.get("layer_norm_eps", 1e-5),
                       act=hf.get("hidden_act", "quick_gelu" if model_type == "clip_vision_model"
                                  else "gelu_pytorch_tanh"), model_type=model_type)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf`."""
        return {"model_type": self.model_type, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "intermediate_size": self.mlp_dim,
                "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.channels,
                "layer_norm_eps": self.norm_eps, "hidden_act": self.act}


_L = "encoder.layers.{i}."
# CLIPVisionModel / SiglipVisionModel names (transformers >= 5; earlier ones put `vision_model.` first).
TABLE = (
    *module_rows("embeddings.patch_embedding", "embed/patch"),
    Entry("embeddings.class_embedding", "embed/class", False),
    Entry("embeddings.position_embedding.weight", "embed/position/w", False),
    *module_rows("pre_layrnorm", "pre_norm"),
    *module_rows(_L + "layer_norm1", "layers/attn_norm"),
    *module_rows(_L + "self_attn.q_proj", "layers/attn/q_proj"),
    *module_rows(_L + "self_attn.k_proj", "layers/attn/k_proj"),
    *module_rows(_L + "self_attn.v_proj", "layers/attn/v_proj"),
    *module_rows(_L + "self_attn.out_proj", "layers/attn/o_proj"),
    *module_rows(_L + "layer_norm2", "layers/mlp_norm"),
    *module_rows(_L + "mlp.fc1", "layers/mlp/up_proj"),
    *module_rows(_L + "mlp.fc2", "layers/mlp/down_proj"),
    *module_rows("post_layernorm", "post_norm"),
)
# Read by nothing here: buffers, and SigLIP's attention-pooling head (`vision_use_head`).
UNUSED = r"embeddings\.position_ids|head\..*"

PARAM_AXES = (
    (r"embed/patch/w", (None, "embed")),
    (r"embed/(patch/b|class)", ("embed",)),
    (r"embed/position/w", (None, "embed")),
    (r"(pre|post)_norm/(scale|bias)", (None,)),
    *ENCODER_LAYER_AXES,
)


def shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """jaxft path -> shape of every parameter of `cfg`."""
    d, f, L = cfg.dim, cfg.mlp_dim, cfg.n_layers
    out = {"embed/patch/w": (cfg.channels * cfg.patch_size ** 2, d), "embed/position/w": (cfg.n_tokens, d),
           "post_norm/scale": (d,), "post_norm/bias": (d,)}
    if cfg.patch_bias:
        out["embed/patch/b"] = (d,)
    if cfg.class_token:
        out.update({"embed/class": (d,), "pre_norm/scale": (d,), "pre_norm/bias": (d,)})
    for name, (d_in, d_out) in {"attn/q_proj": (d, d), "attn/k_proj": (d, d), "attn/v_proj": (d, d),
                                "attn/o_proj": (d, d), "mlp/up_proj": (d, f), "mlp/down_proj": (f, d)}.items():
        out[f"layers/{name}/w"], out[f"layers/{name}/b"] = (L, d_in, d_out), (L, d_out)
    for norm in ("attn_norm", "mlp_norm"):
        out[f"layers/{norm}/scale"] = out[f"layers/{norm}/bias"] = (L, d)
    return out


def init(key, cfg: Config, dtype=jnp.float32) -> dict:
    """Random parameters: weights, positions and the class token normal (std 0.02), biases zero, norms one."""
    flat = {}
    for (path, shape), k in zip(sorted(shapes(cfg).items()), jax.random.split(key, len(shapes(cfg)))):
        if path.endswith("/scale"):
            flat[path] = jnp.ones(shape, dtype)
        elif path.endswith("/bias") or path.endswith("/b"):
            flat[path] = jnp.zeros(shape, dtype)
        else:
            flat[path] = (0.02 * jax.random.normal(k, shape)).astype(dtype)
    return unflatten(flat)


def _hf_shapes(cfg: Config) -> dict[str, tuple]:
    return {"embed/patch/w": (cfg.dim, cfg.channels, cfg.patch_size, cfg.patch_size)}


def from_state_dict(cfg: Config, tensors: Mapping, *, prefix: str = "", source: str = "state dict",
                    dtype=jnp.float32) -> dict:
    """The tower's parameters from a safetensors state dict (HF name -> array, e.g. `safetensors.numpy.load_file`).

    prefix: where the tower sits in the file ("" for CLIPVisionModel / SiglipVisionModel, "model.vision_tower."
    in a LLaVA checkpoint, "model.vision_model." in an Idefics3 one); tensors outside it are left alone.
    Raises LoadError listing missing, unexpected and misshapen tensors.
    """
    return tables.from_state_dict(TABLE, shapes(cfg), tensors, prefix=prefix, strip=("vision_model.",),
                                  ignore=UNUSED, hf_shapes=_hf_shapes(cfg), source=source,
                                  what=f"{cfg.model_type} with {cfg.n_layers} layers", dtype=dtype)


def to_state_dict(cfg: Config, params: dict, *, prefix: str = "") -> dict:
    """The inverse of `from_state_dict`: HF name -> float32 numpy array, as CLIPVisionModel / SiglipVisionModel
    (`load_state_dict`) take them."""
    return tables.to_state_dict(TABLE, params, prefix=prefix, hf_shapes=_hf_shapes(cfg))


def patches(cfg: Config, pixel_values):
    """pixel_values (B, C, H, W), channels first as transformers' image processors give them -> (B, P', C*p*p),
    the patches in row-major order, each flattened as the convolution kernel is (C, p, p)."""
    b, c, h, w = pixel_values.shape
    p = cfg.patch_size
    if (c, h, w) != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}, expected (batch, {cfg.channels}, "
                         f"{cfg.image_size}, {cfg.image_size}) for this vision tower")
    x = pixel_values.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def embed(cfg: Config, params: dict, pixel_values, dtype=jnp.float32):
    """pixel_values (B, C, H, W) -> (B, P, D): patch embeddings (+ class token), positions, CLIP's pre-norm."""
    emb = params["embed"]
    x = dense(patches(cfg, pixel_values).astype(dtype), emb["patch"])
    if cfg.class_token:
        cls = jnp.broadcast_to(emb["class"].astype(dtype), (x.shape[0], 1, cfg.dim))
        x = jnp.concatenate([cls, x], axis=1)
    x = x + emb["position"]["w"].astype(dtype)
    return layer_norm(x, params["pre_norm"], cfg.norm_eps) if cfg.class_token else x


def forward(cfg: Config, base: dict, pixel_values, *, layer: int | tuple[int, ...] = -1, post_norm: bool = False,
            trainable: dict | None = None, lora=None, rng=None, dtype=jnp.float32, remat: bool = False,
            unroll: bool = False, layout=None):
    """pixel_values (B, C, H, W) -> hidden states (B, P, D) of `layer` (transformers' `hidden_states[layer]`).

    A tuple of layers gives their hidden states concatenated on the last axis, (B, P, len * D) (LLaVA's
    multi-layer features). post_norm: apply the final LayerNorm. `trainable` (adapter or replaced leaves at the
    paths of `base`) is overlaid layer by layer; `lora` is its static LoRA spec, passed to `layers.dense`, and
    `rng` its dropout key. Images must have the tower's size (no interpolation of the positions).
    """
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    for k in layers:
        if not -cfg.n_layers - 1 <= k <= cfg.n_layers:
            raise ValueError(f"layer {k} is out of range for a vision tower of {cfg.n_layers} layers "
                             f"(hidden states 0..{cfg.n_layers}, or negative from the end)")
    wanted = [k % (cfg.n_layers + 1) for k in layers]
    depth = max(wanted)  # the blocks after the deepest wanted layer are never run
    params = overlay(base, trainable)
    x = constrain(embed(cfg, params, pixel_values, dtype), ("batch", "seq", "embed"), layout)
    layer = partial(_layer, cfg, lora, layout=layout)

    def block(x, p, rng_l):
        x = layer(x, p, rng_l)
        return x, (x if len(wanted) > 1 else None)  # several layers: every block's output, up to the deepest

    def first(tree):
        return jax.tree.map(lambda a: a[:depth], tree)

    rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)[:depth]
    last, states = layer_loop(block, x, first(base["layers"]), first((trainable or {}).get("layers", {})), rngs,
                              remat=remat, unroll=unroll)
    hidden = [last] if len(wanted) == 1 else [x if k == 0 else states[k - 1] for k in wanted]
    if post_norm:
        hidden = [layer_norm(h, params["post_norm"], cfg.norm_eps) for h in hidden]
    return hidden[0] if len(hidden) == 1 else jnp.concatenate(hidden, axis=-1)


def _layer(cfg: Config, lora, x, p, rng, *, layout=None):
    """One pre-norm block with bidirectional attention over all P tokens: x (B, P, D) -> x."""
    b, t, _ = x.shape
    n, h = cfg.n_heads, cfg.dim // cfg.n_heads
    rngs = [None] * 6 if rng is None else list(jax.random.split(rng, 6))
    attn = p["attn"]
    y = layer_norm(x, p["attn_norm"], cfg.norm_eps)
    q = constrain(dense(y, attn["q_proj"], lora, rngs[0]).reshape(b, t, n, h), ("batch", "seq", "heads", "head_dim"),
                  layout)
    k = dense(y, attn["k_proj"], lora, rngs[1]).reshape(b, t, n, h)
    v = dense(y, attn["v_proj"], lora, rngs[2]).reshape(b, t, n, h)
    o = attention(q, k, v, causal=False, layout=layout).reshape(b, t, n * h)
    x = x + dense(o, attn["o_proj"], lora, rngs[3])
    y = layer_norm(x, p["mlp_norm"], cfg.norm_eps)
    up = ACTIVATIONS[cfg.act](dense(y, p["mlp"]["up_proj"], lora, rngs[4]))
    up = constrain(up, ("batch", "seq", "mlp"), layout)
    x = x + dense(up, p["mlp"]["down_proj"], lora, rngs[5])
    return constrain(x, ("batch", "seq", "embed"), layout)
