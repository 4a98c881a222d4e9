"""Connectors: image features of a vision tower -> embeddings in the language model's width, and the LLaVA merge of
those embeddings into the text's token embeddings.

Axis letters as in `jaxft.models.vit`; E is the language model's width. Parameters:

  LLaVA's projector (`multi_modal_projector`):   in_proj/{w,b} (D*k, E), (E,); out_proj/{w,b} (E, E), (E,)
      (k feature layers concatenated; biases where `multimodal_projector_bias`)
  Idefics3's connector (`connector`):            proj/w (D*s*s, E)   after a pixel shuffle by the scale s
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import tables
from jaxft.models.config import ConfigError
from jaxft.models.layers import dense
from jaxft.models import vit
from jaxft.models.table import Entry
from jaxft.models.vit import ACTIVATIONS
from jaxft.tree import overlay, unflatten

LLAVA_TABLE = (
    Entry("linear_1.weight", "in_proj/w", True), Entry("linear_1.bias", "in_proj/b", False),
    Entry("linear_2.weight", "out_proj/w", True), Entry("linear_2.bias", "out_proj/b", False),
)
IDEFICS3_TABLE = (Entry("modality_projection.proj.weight", "proj/w", True),)
PARAM_AXES = (
    (r"(in_proj|out_proj|proj)/w", (None, "embed")),
    (r"(in_proj|out_proj)/b", ("embed",)),
)


@dataclasses.dataclass(frozen=True)
class LlavaProjector:
    TABLE: ClassVar = LLAVA_TABLE
    PREFIX: ClassVar = "model.multi_modal_projector."  # where transformers 5 saves it in a LLaVA checkpoint
    vision_dim: int  # D * k: the tower's width times the number of feature layers
    text_dim: int  # E
    act: str = "gelu"
    bias: bool = True

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "LlavaProjector":
        """From a LLaVA config.json dict (its `vision_config`, `text_config` and projector fields)."""
        try:
            layers = hf.get("vision_feature_layer", -2)
            k = 1 if isinstance(layers, int) else len(layers)
            act = hf.get("projector_hidden_act", "gelu")
            if act not in ACTIVATIONS:
                raise ConfigError(f"projector_hidden_act {act!r} is not supported (expected one of "
                                  f"{', '.join(ACTIVATIONS)})")
            return cls(vision_dim=hf["vision_config"]["hidden_size"] * k, text_dim=hf["text_config"]["hidden_size"],
                       act=act, bias=hf.get("multimodal_projector_bias", True))
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {"in_proj/w": (self.vision_dim, self.text_dim), "out_proj/w": (self.text_dim, self.text_dim)}
        if self.bias:
            out.update({"in_proj/b": (self.text_dim,), "out_proj/b": (self.text_dim,)})
        return out


@dataclasses.dataclass(frozen=True)
class Idefics3Connector:
    TABLE: ClassVar = IDEFICS3_TABLE
    PREFIX: ClassVar = "model.connector."
    vision_dim: int  # D
    text_dim: int  # E
    scale: int = 2  # s: s x s neighbouring patches become one token

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Idefics3Connector":
        """From an Idefics3 / SmolVLM config.json dict."""
        try:
            return cls(vision_dim=hf["vision_config"]["hidden_size"], text_dim=hf["text_config"]["hidden_size"],
                       scale=hf.get("scale_factor", 2))
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"proj/w": (self.vision_dim * self.scale ** 2, self.text_dim)}


def init(key, cfg: LlavaProjector | Idefics3Connector, dtype=jnp.float32) -> dict:
    """Random weights (normal, std 0.02) and zero biases."""
    flat = {path: jnp.zeros(shape, dtype) if path.endswith("/b") else (0.02 * jax.random.normal(k, shape)).astype(dtype)
            for (path, shape), k in zip(sorted(cfg.shapes().items()), jax.random.split(key, len(cfg.shapes())))}
    return unflatten(flat)


def from_state_dict(cfg, tensors: Mapping, *, prefix: str | None = None, source: str = "state dict",
                    dtype=jnp.float32) -> dict:
    """The connector's parameters from a safetensors state dict (HF name -> array). prefix: where it sits in the
    file (default `cfg.PREFIX`). Raises LoadError listing missing, unexpected and misshapen tensors."""
    return tables.from_state_dict(cfg.TABLE, cfg.shapes(), tensors, prefix=cfg.PREFIX if prefix is None else prefix,
                                  source=source, what=type(cfg).__name__, dtype=dtype)


def to_state_dict(cfg, params: dict, *, prefix: str | None = None) -> dict:
    """The inverse of `from_state_dict`."""
    return tables.to_state_dict(cfg.TABLE, params, prefix=cfg.PREFIX if prefix is None else prefix)


def project(cfg, base: dict, features, *, trainable: dict | None = None, lora=None):
    """Image features (B, P, D*k) -> (B, P', E): LLaVA's MLP (P' = P), or Idefics3's pixel shuffle and linear
    map (P' = P / s^2). `trainable` is overlaid on `base`; `lora` its static LoRA spec."""
    p = overlay(base, trainable)
    if isinstance(cfg, LlavaProjector):
        return dense(ACTIVATIONS[cfg.act](dense(features, p["in_proj"], lora)), p["out_proj"], lora)
    return dense(pixel_shuffle(features, cfg.scale), p["proj"], lora)


def llava_features(tower_cfg: vit.Config, tower: dict, pixel_values, *, layer: int | tuple[int, ...] = -2,
                   strategy: str = "default", **forward_kw):
    """pixel_values (I, C, H, W) -> the image features LLaVA projects, (I, P, D*k): the hidden states of `layer`
    (LLaVA's `vision_feature_layer`; a tuple concatenates k layers), without the first token where `strategy`
    (`vision_feature_select_strategy`) is "default" (CLIP's class token; transformers drops it whatever the
    tower), all tokens where it is "full". `forward_kw` go to `vit.forward` (trainable, lora, dtype, remat, ...)."""
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (expected 'default' or 'full')")
    features = vit.forward(tower_cfg, tower, pixel_values, layer=layer, **forward_kw)
    return features[:, 1:] if strategy == "default" else features


def pixel_shuffle(x, scale: int):
    """(B, P, D) -> (B, P / s^2, D * s^2): each s x s block of the square patch grid becomes one token, its
    features in Idefics3's order (the s rows of the block, each row's s patches left to right)."""
    b, n, d = x.shape
    side = int(round(n ** 0.5))
    if side * side != n or side % scale:
        raise ValueError(f"pixel shuffle needs a square grid of patches whose side is a multiple of {scale}, "
                         f"got {n} patches")
    g = side // scale
    x = x.reshape(b, g, scale, g, scale, d)  # (B, block row, row in block, block column, column in block, D)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, scale * scale * d)


def merge_images(text_embeds, tokens, image_embeds, image_token_id: int):
    """LLaVA's merge: text_embeds (B, T, E), tokens (B, T), image_embeds (I, P', E) -> (B, T, E) where the k-th
    `image_token_id` token (in row-major order over the batch) takes the k-th row of the I * P' image embeddings,
    as `LlavaModel` does with `masked_scatter`; a prompt with several images holds P' tokens for each, in order.

    Raises ValueError naming both counts where the tokens are concrete (outside jit) and their number of image
    tokens is not I * P'. Inside jit the caller checks: extra image tokens would repeat the last row.
    """
    b, t, e = text_embeds.shape
    rows = image_embeds.reshape(-1, e)
    mask = tokens == image_token_id
    if not isinstance(tokens, jax.core.Tracer):
        n = int(np.sum(np.asarray(mask)))
        if n != rows.shape[0]:
            raise ValueError(f"the tokens hold {n} image tokens (id {image_token_id}) but there are "
                             f"{image_embeds.shape[0]} images of {image_embeds.shape[1]} embeddings each "
                             f"({rows.shape[0]} rows)")
    index = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, rows.shape[0] - 1).reshape(b, t)
    return jnp.where(mask[..., None], rows[index].astype(text_embeds.dtype), text_embeds)
