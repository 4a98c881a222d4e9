"""Vision towers and connectors against transformers: tiny random CLIP and SigLIP towers give the hidden states of
CLIPVisionModel / SiglipVisionModel (selected layer, last, multi-layer) on images preprocessed by transformers' own
image processors; LLaVA's projector and Idefics3's pixel-shuffle connector equal transformers' modules; the name
tables load and export both ways and name what is missing or unexpected."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny
from jaxft import tree
from jaxft.checkpoint import LoadError
from jaxft.models import connectors, llama, vit
from jaxft.models.config import ConfigError
from jaxft.peft.lora import LoraSpec

QUICK = {"xla_backend_optimization_level": 0}  # numbers, not speed
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _images():
    """Two RGB images of other sizes than the tower's, so that the processors resize (and CLIP's crops)."""
    rs = np.random.RandomState(0)
    grad = np.linspace(0, 255, 52)[None, :, None] * np.ones((40, 1, 3))
    one = Image.fromarray((0.5 * grad + 0.5 * 255 * rs.rand(40, 52, 3)).astype(np.uint8))
    two = Image.fromarray((255 * rs.rand(61, 45, 3)).astype(np.uint8))
    return [one, two]


def _pixels(processor):
    return processor(images=_images(), return_tensors="np")["pixel_values"]


def _perturbed(model, seed=0):
    """Non-trivial biases, norms and class token (transformers initializes biases at 0 and norms at 1)."""
    return tiny.perturbed(model, seed, also=("norm", "class_embedding"))


def _state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "post_norm"), compiler_options=QUICK)
def _forward(cfg, params, pixels, layer, post_norm=False):
    return vit.forward(cfg, params, pixels, layer=layer, post_norm=post_norm)


def _close(ours, theirs, atol=1e-4):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = _perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER)))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, _pixels(processor)


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(1)
    model = _perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER)), seed=1)
    processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    return model, _pixels(processor)


def test_clip_hidden_states_equal_transformers(clip):
    model, pixels = clip
    cfg = vit.Config.from_hf(model.config.to_dict())
    assert (cfg.model_type, cfg.act, cfg.class_token) == ("clip_vision_model", "quick_gelu", True)
    params = vit.from_state_dict(cfg, _state(model))
    with torch.no_grad():
        out = model(torch.tensor(pixels), output_hidden_states=True)
    assert pixels.shape == (2, 3, 32, 32) and out.hidden_states[-2].shape == (2, 17, 32)
    _close(_forward(cfg, params, pixels, -2), out.hidden_states[-2])  # LLaVA's choice
    last = _forward(cfg, params, pixels, -1)
    _close(last, out.last_hidden_state)
    _close(_forward(cfg, params, pixels, 0), out.hidden_states[0])  # embeddings after the pre-norm
    _close(_forward(cfg, params, pixels, (1, -1)), torch.cat([out.hidden_states[1], out.hidden_states[-1]], -1))
    # CLIP's post-norm is what its pooler applies to the class token
    pooled = vit.layer_norm(last[:, 0], params["post_norm"], cfg.norm_eps)
    _close(pooled, out.pooler_output)


def test_siglip_hidden_states_equal_transformers(siglip):
    model, pixels = siglip
    cfg = vit.Config.from_hf(model.config.to_dict())
    assert (cfg.model_type, cfg.act, cfg.class_token, cfg.patch_bias) == ("siglip_vision_model",
                                                                          "gelu_pytorch_tanh", False, True)
    params = vit.from_state_dict(cfg, _state(model))  # the attention-pooling head (`head.*`) is not read
    with torch.no_grad():
        out = model(torch.tensor(pixels), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 16, 32)
    _close(_forward(cfg, params, pixels, -2), out.hidden_states[-2])
    _close(_forward(cfg, params, pixels, -1), out.hidden_states[-1])
    _close(_forward(cfg, params, pixels, -1, post_norm=True), out.last_hidden_state)


def test_tables_both_ways(clip, siglip):
    """Export gives back exactly the state dict (less what is not read); a LLaVA-style `vision_model.` inner
    prefix (checkpoints saved before transformers 5) loads the same."""
    for model, _ in (clip, siglip):
        cfg = vit.Config.from_hf(model.config.to_dict())
        state = _state(model)
        params = vit.from_state_dict(cfg, state)
        back = vit.to_state_dict(cfg, params, prefix="vision_tower.")
        kept = {k: v for k, v in state.items() if not k.startswith("head.")}
        assert set(back) == {"vision_tower." + k for k in kept}
        for k, v in kept.items():
            np.testing.assert_array_equal(back["vision_tower." + k], v)
        old = {"vision_tower.vision_model." + k: v for k, v in state.items()} | {"lm_head.weight": np.zeros(2)}
        again = vit.from_state_dict(cfg, old, prefix="vision_tower.")
        jax.tree.map(np.testing.assert_array_equal, again, params)


def test_missing_unexpected_and_misshapen_tensors_are_named(clip):
    model, _ = clip
    cfg = vit.Config.from_hf(model.config.to_dict())
    state = _state(model)
    bad = {k: v for k, v in state.items() if "layers.1.mlp.fc1" not in k} | {"encoder.layers.0.extra.weight": 0}
    with pytest.raises(LoadError, match=r"towers\.safetensors: missing tensors encoder\.layers\.1\.mlp\.fc1\.weight, "
                                        r"encoder\.layers\.1\.mlp\.fc1\.bias; unexpected tensors "
                                        r"encoder\.layers\.0\.extra\.weight \(for a clip_vision_model with 3 layers"):
        vit.from_state_dict(cfg, bad, source="towers.safetensors")
    wrong = dict(state, **{"embeddings.patch_embedding.weight": np.zeros((32, 3, 4, 4), np.float32)})
    with pytest.raises(LoadError, match=r"embeddings\.patch_embedding\.weight has shape \(32, 3, 4, 4\), expected "
                                        r"\(32, 3, 8, 8\)"):
        vit.from_state_dict(cfg, wrong)
    with pytest.raises(ConfigError, match="x.json: model_type 'vit' is not a vision tower"):
        vit.Config.from_hf({"model_type": "vit"}, source="x.json")
    with pytest.raises(ValueError, match=r"pixel_values have shape \(1, 3, 16, 16\), expected \(batch, 3, 32, 32\)"):
        vit.patches(cfg, jnp.zeros((1, 3, 16, 16)))


def _llava(vision_config, **kw):
    torch.manual_seed(2)
    cfg = transformers.LlavaConfig(vision_config=vision_config.to_dict(),
                                   text_config=transformers.LlamaConfig(**TEXT).to_dict(), image_token_id=63, **kw)
    return _perturbed(transformers.LlavaForConditionalGeneration(cfg), seed=2)


def test_llava_image_features_equal_transformers(clip, siglip):
    """The tower and the 2-layer GELU projector, both read from the LLaVA state dict, give
    LlavaModel.get_image_features: a CLIP tower with LLaVA's defaults (layer -2, class token dropped), and a SigLIP
    tower with two feature layers concatenated, strategy "full" and a projector without biases."""
    multi = dict(vision_feature_layer=[-3, -1], multimodal_projector_bias=False, vision_feature_select_strategy="full")
    cases = ((transformers.CLIPVisionConfig, clip[1], {}, 32), (transformers.SiglipVisionConfig, siglip[1], multi, 64))
    for config_class, pixels, kw, width in cases:
        model = _llava(config_class(**TOWER), **kw)
        hf, state = model.config.to_dict(), _state(model)
        tower_cfg = vit.Config.from_hf(hf["vision_config"])
        tower = vit.from_state_dict(tower_cfg, state, prefix="model.vision_tower.")
        proj_cfg = connectors.LlavaProjector.from_hf(hf)
        assert proj_cfg == connectors.LlavaProjector(vision_dim=width, text_dim=24, act="gelu", bias=not kw)
        proj = connectors.from_state_dict(proj_cfg, state)
        layer, strategy = hf["vision_feature_layer"], hf["vision_feature_select_strategy"]
        layer = layer if isinstance(layer, int) else tuple(layer)
        features = connectors.llava_features(tower_cfg, tower, pixels, layer=layer, strategy=strategy)
        ours = connectors.project(proj_cfg, proj, features)
        with torch.no_grad():
            theirs = model.model.get_image_features(torch.tensor(pixels), vision_feature_layer=layer,
                                                    vision_feature_select_strategy=strategy)
        _close(ours, torch.stack(list(theirs.pooler_output)))
        back = connectors.to_state_dict(proj_cfg, proj)
        assert set(back) == {k for k in state if k.startswith("model.multi_modal_projector.")}
        for k, v in back.items():
            np.testing.assert_array_equal(v, state[k])


def test_idefics3_tower_and_connector_equal_transformers(siglip):
    """Idefics3's SigLIP-like tower (read from the Idefics3 state dict, final LayerNorm applied), the pixel
    shuffle (scale 2 on the 4 x 4 patch grid) and the linear map give Idefics3Model.get_image_features, for
    full-size tiles (no padded pixels: jaxft has no patch attention mask)."""
    _, pixels = siglip
    torch.manual_seed(3)
    cfg = transformers.Idefics3Config(vision_config=dict(TOWER), text_config=transformers.LlamaConfig(**TEXT).to_dict(),
                                      scale_factor=2)
    model = _perturbed(transformers.Idefics3ForConditionalGeneration(cfg), seed=3)
    hf, state = cfg.to_dict(), _state(model)
    tower_cfg = vit.Config.from_hf(hf["vision_config"])
    assert (tower_cfg.model_type, tower_cfg.class_token, tower_cfg.act) == ("idefics3_vision", False,
                                                                            "gelu_pytorch_tanh")
    tower = vit.from_state_dict(tower_cfg, state, prefix="model.vision_model.")
    ours_cfg = connectors.Idefics3Connector.from_hf(hf)
    assert ours_cfg == connectors.Idefics3Connector(vision_dim=32, text_dim=24, scale=2)
    params = connectors.from_state_dict(ours_cfg, state)
    ours = connectors.project(ours_cfg, params, _forward(tower_cfg, tower, pixels, -1, post_norm=True))
    with torch.no_grad():  # one prompt with two images
        theirs = model.model.get_image_features(torch.tensor(pixels)[None]).pooler_output[0]
    assert theirs.shape == (2 * 4, 24)
    _close(ours.reshape(-1, 24), theirs)
    np.testing.assert_array_equal(connectors.to_state_dict(ours_cfg, params)["model.connector.modality_projection"
                                                                               ".proj.weight"],
                                  state["model.connector.modality_projection.proj.weight"])
    with pytest.raises(ValueError, match="square grid of patches whose side is a multiple of 2, got 9 patches"):
        connectors.pixel_shuffle(jnp.zeros((1, 9, 4)), 2)


def test_llava_logits_equal_transformers(clip):
    """Tower, projector and merge feeding jaxft's llama.forward(embeddings=...) give the logits of
    LlavaForConditionalGeneration: row 0 holds two images, row 1 one (three images in all, in order)."""
    _, pixels = clip
    pixels = np.concatenate([pixels, pixels[:1, :, ::-1]])  # a third image: the first upside down
    model = _llava(transformers.CLIPVisionConfig(**TOWER))
    hf, state = model.config.to_dict(), _state(model)
    image = hf["image_token_index"]  # config.json's name of LlavaConfig.image_token_id
    n = 16  # image tokens per image: the 4 x 4 patches, class token dropped
    rs = np.random.RandomState(4)
    text = lambda k: list(rs.randint(1, image, k))  # noqa: E731
    tokens = np.array([text(3) + [image] * n + text(2) + [image] * n + text(3),
                       text(5) + [image] * n + text(19)])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels)).logits

    tower_cfg, tower, proj_cfg, proj, lm_cfg, lm = tiny.llava_parts(hf, state)

    @functools.partial(jax.jit, compiler_options=QUICK)
    def logits(tower, proj, lm, pixels, tokens, embeds):
        features = connectors.llava_features(tower_cfg, tower, pixels, layer=hf["vision_feature_layer"])
        merged = connectors.merge_images(embeds, tokens, connectors.project(proj_cfg, proj, features), image)
        return llama.forward(lm_cfg, lm, tokens, embeddings=merged)[0]

    embeds = lm["embed"]["w"][tokens]
    connectors.merge_images(embeds, tokens, jnp.zeros((3, n, 24)), image)  # counts agree outside jit
    _close(logits(tower, proj, lm, pixels, tokens, embeds), theirs)
    with pytest.raises(ValueError, match=r"the tokens hold 48 image tokens \(id 63\) but there are 2 images of 16 "
                                         r"embeddings each \(32 rows\)"):
        connectors.merge_images(embeds, tokens, jnp.zeros((2, n, 24)), image)


def test_trainable_overlay_lora_and_remat(siglip):
    """LoRA leaves beside the stacked q/v weights (the trainable tree, overlaid layer by layer) give the tower with
    the merged weights w + s * A @ B, scanned or unrolled, with or without remat."""
    model, pixels = siglip
    cfg = vit.Config.from_hf(model.config.to_dict())
    base = vit.from_state_dict(cfg, _state(model))
    spec = LoraSpec(rank=2, alpha=4.0)
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 4))
    lora = {name: {"lora_a": 0.3 * jax.random.normal(next(keys), (3, 32, 2)),
                   "lora_b": 0.3 * jax.random.normal(next(keys), (3, 2, 32))} for name in ("q_proj", "v_proj")}
    merged = jax.tree.map(lambda x: x, base)
    for name, p in lora.items():
        w = base["layers"]["attn"][name]["w"]
        merged["layers"]["attn"][name]["w"] = w + spec.scaling * p["lora_a"] @ p["lora_b"]
    want = _forward(cfg, merged, pixels, -1)
    assert float(jnp.max(jnp.abs(want - _forward(cfg, base, pixels, -1)))) > 1e-2  # the adapter matters

    @functools.partial(jax.jit, static_argnames=("remat", "unroll"), compiler_options=QUICK)
    def adapted(trainable, remat, unroll):
        return vit.forward(cfg, base, pixels, trainable=trainable, lora=spec, remat=remat, unroll=unroll)

    for remat, unroll in ((False, False), (True, False), (True, True)):
        np.testing.assert_allclose(adapted({"layers": {"attn": lora}}, remat, unroll), want, atol=1e-5, rtol=0)


def test_param_axes_cover_every_leaf():
    """Each parameter's first matching PARAM_AXES rule names one logical axis per dimension (for sharding)."""
    towers = [vit.Config(dim=32, n_layers=2, n_heads=4, mlp_dim=48, image_size=32, patch_size=8, model_type=t)
              for t in ("clip_vision_model", "siglip_vision_model")]
    parts = [(vit, c, vit.shapes(c)) for c in towers]
    parts += [(connectors, c, c.shapes())
              for c in (connectors.LlavaProjector(64, 24), connectors.Idefics3Connector(32, 24))]
    for module, cfg, shapes in parts:
        made = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), cfg))  # noqa: B023 (called at once)
        assert {p: x.shape for p, x in tree.items(made)} == shapes
        for path, shape in shapes.items():
            axes = next((a for pattern, a in module.PARAM_AXES if re.fullmatch(pattern, path)), None)
            assert axes is not None and len(axes) == len(shape), (path, shape, axes)


def test_sharded_tower_equals_one_device():
    """The tower's and the projector's weights laid out by their PARAM_AXES on a (data, fsdp, tensor) = (1, 2, 2)
    mesh of 4 simulated devices, activations constrained, give the unsharded features (in a subprocess, so that
    the rest of the suite keeps its single device)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    worker = os.path.join(os.path.dirname(__file__), "vit_sharded_worker.py")
    proc = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == "sharded==unsharded", proc.stdout[-2000:]
