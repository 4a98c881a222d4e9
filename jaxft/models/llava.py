"""Vision-language models of the LLaVA kind as one family: a vision tower (`jaxft.models.vit`), a connector
(`jaxft.models.connectors`: LLaVA's MLP projector or Idefics3's pixel shuffle) and a LLaMA-family decoder
(`jaxft.models.llama`, run as it is with the merged embeddings). `model_type` "llava" is
LlavaForConditionalGeneration; "idefics3" (SmolVLM) is `jaxft.models.idefics3`, this module with its own table.

Parameters: the language model's at the top (`embed/w`, `layers/...`, `final_norm/scale`, `lm_head/w`, as
`jaxft.models.llama`), so that every method for the language model reads the paths it knows, and beside them

  vision/...      the tower's tree (`jaxft.models.vit`)
  projector/...   the connector's tree (`jaxft.models.connectors`)

I images (I, C, H, W) become (I, P', E) embeddings that replace, in order, the image tokens of the prompt
(`connectors.merge_images`). A fine-tuning spec passed as `peft=` is the language model's method; where it has
`vision` / `projector` attributes (`jaxft.peft.parts`), those are the hooks of the tower's and the connector's
linear maps, and the trainable tree's `vision/` and `projector/` subtrees are theirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import connectors, llama, vit
from jaxft.models.config import ConfigError, LlamaConfig
from jaxft.models.table import Entry
from jaxft.quant import as_dense
from jaxft.tree import overlay

KIND = "decoder"  # a decoder whose prompt may hold images
LORA_TARGETS = llama.LORA_TARGETS  # the language model's (the tower has its own method: jaxft.peft.parts)
PARTS = ("vision", "projector")  # the subtrees that are not the language model's
# (text prefix, tower prefix) of each model_type's checkpoint names (transformers >= 5)
PREFIXES = {"llava": ("model.language_model.", "model.vision_tower."),
            "idefics3": ("model.text_model.", "model.vision_model.")}


@dataclasses.dataclass(frozen=True)
class Config:
    text: LlamaConfig  # the language model
    vision: vit.Config  # the tower
    projector: Any  # connectors.LlavaProjector or connectors.Idefics3Connector
    image_token_id: int
    feature_layer: int | tuple[int, ...] = -2  # LLaVA's vision_feature_layer (Idefics3: the last, post-normed)
    strategy: str = "default"  # LLaVA's vision_feature_select_strategy
    model_type: str = "llava"
    hf_json: str = "{}"  # the config.json read, for `to_hf` to keep the fields jaxft does not use

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Config":
        """From a LLaVA or Idefics3 config.json dict (its text_config must be of the LLaMA family)."""
        model_type = hf.get("model_type")
        if model_type not in PREFIXES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a vision-language model jaxft runs "
                              f"(expected one of {', '.join(PREFIXES)})")
        for key in ("text_config", "vision_config"):
            if not isinstance(hf.get(key), dict):
                raise ConfigError(f"{source}: missing field {key!r}")
        text = LlamaConfig.from_hf(hf["text_config"], source=f"{source} text_config")
        vision = vit.Config.from_hf(hf["vision_config"], source=f"{source} vision_config")
        if model_type == "llava":
            projector = connectors.LlavaProjector.from_hf(hf, source)
            image = hf.get("image_token_index", hf.get("image_token_id"))
            layer = hf.get("vision_feature_layer", -2)
            layer = layer if isinstance(layer, int) else tuple(layer)
            strategy = hf.get("vision_feature_select_strategy", "default")
            if strategy not in ("default", "full"):
                raise ConfigError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported "
                                  f"(expected 'default' or 'full')")
        else:
            projector = connectors.Idefics3Connector.from_hf(hf, source)
            image, layer, strategy = hf.get("image_token_id"), -1, "full"
        if not isinstance(image, int):
            raise ConfigError(f"{source}: missing field 'image_token_id' (the id of the image token)")
        return cls(text, vision, projector, image, layer, strategy, model_type, json.dumps(hf, sort_keys=True))

    def to_hf(self) -> dict[str, Any]:
        """The config.json read, with the text and vision configs as jaxft has them."""
        hf = json.loads(self.hf_json)
        text = {k: v for k, v in self.text.to_hf().items() if k != "architectures"}
        hf["text_config"] = {**hf.get("text_config", {}), **text}
        hf["vision_config"] = {**hf.get("vision_config", {}), **self.vision.to_hf()}
        hf["architectures"] = [{"llava": "LlavaForConditionalGeneration",
                                "idefics3": "Idefics3ForConditionalGeneration"}[self.model_type]]
        return hf

    # The language model's dimensions, as the family protocol names them (generation, sharding, methods).
    n_layers = property(lambda self: self.text.n_layers)
    dim = property(lambda self: self.text.dim)
    n_heads = property(lambda self: self.text.n_heads)
    n_kv_heads = property(lambda self: self.text.n_kv_heads)
    head_dim = property(lambda self: self.text.head_dim)
    mlp_dim = property(lambda self: self.text.mlp_dim)
    vocab_size = property(lambda self: self.text.vocab_size)
    max_seq_len = property(lambda self: self.text.max_seq_len)
    tie_embeddings = property(lambda self: self.text.tie_embeddings)
    layer_windows = property(lambda self: self.text.layer_windows)

    @property
    def n_params(self) -> int:
        """All three parts' parameters (counted from their shapes, nothing allocated)."""
        shapes = jax.eval_shape(lambda: init(jax.random.key(0), self))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    @property
    def image_tokens(self) -> int:
        """P': the embeddings (image tokens) one image becomes."""
        n = self.vision.n_patches
        if self.model_type == "llava":
            return n + (self.vision.class_token and self.strategy == "full")
        return n // self.projector.scale ** 2


def table(model_type: str) -> tuple[Entry, ...]:
    """The name table of a whole checkpoint: the language model's rows (llama.TABLE, under its prefix), the
    tower's under `vision/` and the connector's under `projector/`."""
    text, tower = PREFIXES[model_type]
    rows = [e._replace(hf=text + e.hf.removeprefix("model.")) if e.hf.startswith("model.") else e
            for e in llama.TABLE]
    rows += [Entry(tower + e.hf, "vision/" + e.path, e.transpose) for e in vit.TABLE]
    projector = connectors.LlavaProjector if model_type == "llava" else connectors.Idefics3Connector
    rows += [Entry(projector.PREFIX + e.hf, "projector/" + e.path, e.transpose) for e in projector.TABLE]
    return tuple(rows)


TABLE = table("llava")
PARAM_AXES = (*llama.PARAM_AXES, *((f"vision/{p}", a) for p, a in vit.PARAM_AXES),
              *((f"projector/{p}", a) for p, a in connectors.PARAM_AXES))


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The leaves whose checkpoint tensor is not a matrix: the patch convolution's kernel (D, C, p, p)."""
    v = cfg.vision
    return {"vision/embed/patch/w": (v.dim, v.channels, v.patch_size, v.patch_size)}


def init(key, cfg: Config, dtype=jnp.float32) -> dict:
    """Random parameters of the three parts (each as its module initializes it)."""
    k_text, k_vision, k_proj = jax.random.split(key, 3)
    return {**llama.init(k_text, cfg.text, dtype), "vision": vit.init(k_vision, cfg.vision, dtype),
            "projector": connectors.init(k_proj, cfg.projector, dtype)}


def init_cache(cfg: Config, batch: int, length: int, dtype=jnp.float32) -> dict:
    return llama.init_cache(cfg.text, batch, length, dtype)


def decode_logits(cfg: Config, base: dict, trainable, hidden, dtype, policy=None):
    return llama.decode_logits(cfg.text, base, _text_part(trainable), hidden, dtype, policy)


def output_head(cfg: Config, params: dict, hidden, dtype=jnp.float32):
    return llama.output_head(cfg.text, params, hidden, dtype)  # (train.loss_chunk)


# Token-by-token decoding with the language model's layers split (jaxft.generate): the tower's stack is left as it is.
split_layers = llama.split_layers
split_cache = llama.split_cache


def tower_features(cfg: Config, base: dict, pixel_values, *, trainable: dict | None = None, peft=None, rng=None,
                   dtype=jnp.float32, remat: bool = False, unroll: bool = False, layout=None):
    """pixel_values (I, C, H, W) -> (I, P', D_vision): what the tower gives the connector (LLaVA's selected
    layer(s), Idefics3's post-normed last layer). Of a frozen tower, the same for an image at every epoch: what
    `FeatureCache` keeps."""
    trainable = trainable or {}
    kw = dict(trainable=trainable.get("vision"), lora=getattr(peft, "vision", None), rng=rng, dtype=dtype,
              remat=remat, unroll=unroll, layout=layout)
    pixel_values = jnp.asarray(pixel_values, dtype)
    if cfg.model_type == "llava":
        return connectors.llava_features(cfg.vision, base["vision"], pixel_values, layer=cfg.feature_layer,
                                         strategy=cfg.strategy, **kw)
    return vit.forward(cfg.vision, base["vision"], pixel_values, layer=-1, post_norm=True, **kw)


def image_embeddings(cfg: Config, base: dict, pixel_values, *, trainable: dict | None = None, peft=None,
                     rng=None, dtype=jnp.float32, remat: bool = False, unroll: bool = False, layout=None,
                     features=None):
    """pixel_values (I, C, H, W), as the model's image processor makes them -> (I, P', E) embeddings: the tower's
    features (`tower_features`, or `features` (I, P', D_vision) given instead of the pixels) through the
    connector (LLaVA's MLP projector, Idefics3's pixel shuffle and linear map)."""
    trainable = trainable or {}
    if features is None:
        features = tower_features(cfg, base, pixel_values, trainable=trainable, peft=peft, rng=rng, dtype=dtype,
                                  remat=remat, unroll=unroll, layout=layout)
    return connectors.project(cfg.projector, base["projector"], jnp.asarray(features, dtype),
                              trainable=trainable.get("projector"), lora=getattr(peft, "projector", None))


class FeatureCache:
    """A frozen tower's features per image, computed once: `cache(pixel_values (I, C, H, W))` -> (I, P',
    D_vision) numpy, the images it has seen (keyed by their preprocessed pixels: the file and the model's image
    processor) read back, the others run through the tower in one call. Pass the result as
    `forward(..., image_features=...)` for a multi-epoch run whose tower is frozen (`vision.method=frozen`): the
    same numbers as the pixels give, without the tower's forward pass. `misses` counts the images the tower ran
    on, `hits` those read back. The features are held in host memory (P' x D_vision float32 per image)."""

    def __init__(self, cfg: Config, base: dict, dtype=jnp.float32):
        self._features = jax.jit(lambda b, px: tower_features(cfg, b, px, dtype=dtype))
        self._base, self._store = base, {}
        self.hits = self.misses = 0
        v = cfg.vision
        pixels = jax.ShapeDtypeStruct((1, v.channels, v.image_size, v.image_size), jnp.float32)
        self.shape = jax.eval_shape(lambda b, px: tower_features(cfg, b, px, dtype=dtype), base, pixels).shape[1:]

    def __call__(self, pixel_values) -> np.ndarray:
        pixel_values = np.ascontiguousarray(pixel_values)
        keys = [hashlib.sha1(x.tobytes()).digest() for x in pixel_values]
        first = {}  # each new image once, at its first row
        for i, k in enumerate(keys):
            if k not in self._store:
                first.setdefault(k, i)
        if first:  # (padded to a power of two: a few compilations of the tower, not one per count of new images)
            new = pixel_values[list(first.values())]
            padded = np.concatenate([new, np.zeros((_bucket(len(new)) - len(new), *new.shape[1:]), new.dtype)])
            computed = np.asarray(self._features(self._base, padded), np.float32)[:len(new)]
            self._store.update(zip(first, computed))
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        return np.stack([self._store[k] for k in keys]) if keys else np.zeros((0, *self.shape), np.float32)

    def batch(self, batch: dict) -> dict:
        """A batch with `pixel_values` (M, ...) and `image_mask` (M,) (`jaxft.data.vlm_batches`) -> the same with
        `image_features` (M, P', D_vision) in place of the pixels: the real images' features, zeros for padding."""
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        mask = np.asarray(batch["image_mask"], bool)
        features = np.zeros((len(mask), *self.shape), np.float32)
        features[mask] = self(np.asarray(batch["pixel_values"])[mask])
        out["image_features"] = features
        return out


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def forward(cfg: Config, base: dict, tokens, *, pixel_values=None, image_mask=None, trainable: dict | None = None,
            peft=None, lora=None, rng=None, dtype=jnp.float32, embeddings=None, image_features=None, **kw):
    """tokens (B, T) with `cfg.image_token_id` at each image's P' positions, pixel_values (I, C, H, W) the images
    in the order of their tokens (row by row) -> (logits (B, T, V) float32, cache), as `llama.forward` (whose
    keyword arguments `kw` go to it: positions, segment_ids, cache, remat, unroll, return_hidden, layout).

    image_mask (I,) bool marks the real images where a batch pads them to a static count (padding images come
    after the real ones, `jaxft.data.vlm_batches`). Without pixel_values the tokens are text only: the decode
    steps after a prefill with images. Outside jit, a count of image tokens other than the images' P' each is
    a ValueError naming both. image_features (I, P', D_vision), a frozen tower's output (`FeatureCache`), stand
    for pixel_values: the tower is not run.
    """
    peft = peft if peft is not None else lora
    text_trainable = _text_part(trainable)
    if embeddings is None:
        table_w = overlay(base, text_trainable)["embed"]["w"]
        embeddings = as_dense(table_w, dtype)[tokens]
    if pixel_values is not None or image_features is not None:
        vision_rng = None if rng is None else jax.random.fold_in(rng, 1)
        images = image_embeddings(cfg, base, pixel_values, trainable=trainable, peft=peft, rng=vision_rng,
                                  dtype=dtype, remat=kw.get("remat", False), unroll=kw.get("unroll", False),
                                  layout=kw.get("layout"), features=image_features)
        if image_mask is not None and not isinstance(image_mask, jax.core.Tracer):
            images = images[:int(np.sum(np.asarray(image_mask)))]  # the real ones (they come first)
        embeddings = connectors.merge_images(embeddings, tokens, images, cfg.image_token_id)
    return llama.forward(cfg.text, base, tokens, trainable=text_trainable, peft=peft, rng=rng, dtype=dtype,
                         embeddings=embeddings, **kw)


def _text_part(trainable: dict | None) -> dict | None:
    """The language model's part of a trainable tree (its method's leaves, at the paths llama knows)."""
    if not trainable:
        return trainable
    return {k: v for k, v in trainable.items() if k not in PARTS}


# What LlavaForConditionalGeneration.save_pretrained writes (and published LLaVA checkpoints hold) -> the names
# of TABLE, the modules' own (transformers' checkpoint conversion mapping for "llava").
_SAVED_NAMES = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def checkpoint_names(cfg: Config, names: list[str]) -> tuple[Config, dict[str, str]]:
    """(cfg, TABLE name -> the checkpoint's name) of a checkpoint's tensors, saved under either naming, less those
    no part reads (the tower's buffers and SigLIP's attention-pooling head, `vit.UNUSED`)."""
    _, tower = PREFIXES[cfg.model_type]
    unused = re.compile(re.escape(tower) + r"(vision_model\.)?(" + vit.UNUSED + ")")
    out = {}
    for name in names:
        new = next((new + name[len(old):] for old, new in _SAVED_NAMES if name.startswith(old)), name)
        if not unused.fullmatch(new):
            out[new] = name
    return cfg, out
