"""The `llava` and `idefics3` families against transformers: tiny random LlavaForConditionalGeneration (CLIP and
SigLIP towers) and Idefics3ForConditionalGeneration saved with save_pretrained, loaded by `jaxft.checkpoint.load`
through the family protocol, give transformers' logits with one and with several images per prompt (images
preprocessed by the models' own image processors; Idefics3's tiled), greedy generation over the KV cache (images
prefilled once) is token-equal to `generate`, and the export loads back in transformers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny
from jaxft import checkpoint, generate
from jaxft.data import images
from jaxft.models import family_of, llava

QUICK = {"xla_backend_optimization_level": 0}  # numbers, not speed
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
IMAGE = 63  # the image token


def _images():
    rs = np.random.RandomState(0)
    grad = np.linspace(0, 255, 52)[None, :, None] * np.ones((40, 1, 3))
    return [Image.fromarray((0.5 * grad + 0.5 * 255 * rs.rand(40, 52, 3)).astype(np.uint8)),
            Image.fromarray((255 * rs.rand(61, 45, 3)).astype(np.uint8)),
            Image.fromarray((255 * rs.rand(20, 60, 3)).astype(np.uint8))]


def _text(rs, k):
    return list(rs.randint(1, IMAGE, k))


def _save(model, path):
    tiny.perturbed(model, 2, also=("norm", "class_embedding"))
    model.save_pretrained(path)
    return checkpoint.load(path)


@functools.partial(jax.jit, static_argnames="cfg", compiler_options=QUICK)
def _logits(cfg, params, tokens, pixels, mask):
    return family_of(cfg).forward(cfg, params, tokens, pixel_values=pixels, image_mask=mask)[0]


def _close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def llava_model(request, tmp_path_factory):
    torch.manual_seed(2)
    if request.param == "clip":
        vision, kw = transformers.CLIPVisionConfig(**TOWER), {}
        proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:  # two feature layers, all tokens kept, no projector biases
        vision = transformers.SiglipVisionConfig(**TOWER)
        kw = dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full", multimodal_projector_bias=False)
        proc = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    text = transformers.LlamaConfig(**TEXT).to_dict()
    cfg = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=IMAGE, **kw)
    model = transformers.LlavaForConditionalGeneration(cfg)
    loaded = _save(model, tmp_path_factory.mktemp(request.param))
    return model.eval(), loaded, proc(images=_images(), return_tensors="np")["pixel_values"]


def test_llava_logits_equal_transformers(llava_model):
    """One image in one prompt; then two prompts holding two images and one (three in all, in order), with a
    padding image after them (image_mask) as a static-size batch has."""
    model, loaded, pixels = llava_model
    cfg = loaded.cfg
    assert (type(cfg), cfg.image_token_id, cfg.text.n_layers) == (llava.Config, IMAGE, 2)
    n = cfg.image_tokens
    rs = np.random.RandomState(4)
    one = np.array([_text(rs, 3) + [IMAGE] * n + _text(rs, 4)])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(one), pixel_values=torch.tensor(pixels[:1])).logits
    _close(_logits(cfg, loaded.params, one, pixels[:1], None), theirs)

    rows = np.array([_text(rs, 3) + [IMAGE] * n + _text(rs, 2) + [IMAGE] * n + _text(rs, 3),
                     _text(rs, 5) + [IMAGE] * n + _text(rs, n + 3)])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(rows), pixel_values=torch.tensor(pixels)).logits
    padded = np.concatenate([pixels, np.zeros_like(pixels[:1])])
    _close(_logits(cfg, loaded.params, rows, padded, np.array([1, 1, 1, 0], bool)), theirs)
    with pytest.raises(ValueError, match=rf"the tokens hold {3 * n} image tokens \(id {IMAGE}\) but there are 2 "
                                         rf"images of {n} embeddings each"):
        family_of(cfg).forward(cfg, loaded.params, rows, pixel_values=pixels[:2])


def _greedy(cfg, params, tokens, pixels, steps):
    """Greedy decoding with the family's KV cache: one prefill with the images, then one token per step."""
    fam = family_of(cfg)
    b, t = tokens.shape
    cache = fam.init_cache(cfg, b, t + steps)
    prefill = jax.jit(lambda p, x, px, c: fam.forward(cfg, p, x, pixel_values=px, cache=c), compiler_options=QUICK)
    step = jax.jit(lambda p, x, pos, c: fam.forward(cfg, p, x, positions=pos, cache=c), compiler_options=QUICK)
    logits, cache = prefill(params, tokens, pixels, cache)
    out = [jnp.argmax(logits[:, -1], -1)]
    for k in range(steps - 1):
        logits, cache = step(params, out[-1][:, None], jnp.full((b, 1), t + k, jnp.int32), cache)
        out.append(jnp.argmax(logits[:, -1], -1))
    return np.stack([np.asarray(x) for x in out], 1)


def test_llava_greedy_generation_equals_transformers(llava_model):
    model, loaded, pixels = llava_model
    n = loaded.cfg.image_tokens
    rs = np.random.RandomState(5)
    tokens = np.array([_text(rs, 2) + [IMAGE] * n + _text(rs, 3) + [IMAGE] * n + _text(rs, 2)])
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels[:2]),
                                max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, tokens.shape[1]:]
    np.testing.assert_array_equal(_greedy(loaded.cfg, loaded.params, tokens, pixels[:2], 8)[0], theirs.numpy())
    # a text-only prompt through jaxft.generate's decode loop (layers scanned and unrolled)
    text = [_text(rs, 6)]
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor(text), max_new_tokens=6, do_sample=False,
                              min_new_tokens=6)[0, 6:].tolist()
    for unroll in (False, True):
        assert generate.generate(loaded.cfg, loaded.params, text, max_new_tokens=6, unroll=unroll)[0] == want


def test_llava_export_loads_in_transformers(llava_model, tmp_path):
    model, loaded, pixels = llava_model
    out = checkpoint.save_hf(loaded.cfg, loaded.params, tmp_path / "out", dtype=jnp.float32)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    tokens = torch.tensor([[5, 6] + [IMAGE] * loaded.cfg.image_tokens + [7]])
    with torch.no_grad():
        want = model(input_ids=tokens, pixel_values=torch.tensor(pixels[:1])).logits
        got = again(input_ids=tokens, pixel_values=torch.tensor(pixels[:1])).logits
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_idefics3_logits_and_generation_equal_transformers(tmp_path):
    """Two prompts, each with one image that Idefics3's image processor tiles (4 tiles + the global image, and
    2 + 1 padded to 5 with empty images): the tiles' embeddings replace the image tokens in order."""
    torch.manual_seed(3)
    cfg = transformers.Idefics3Config(vision_config=dict(TOWER), text_config=transformers.LlamaConfig(**TEXT).to_dict(),
                                      scale_factor=2, image_token_id=IMAGE)
    model = transformers.Idefics3ForConditionalGeneration(cfg)
    loaded = _save(model, tmp_path)
    assert loaded.cfg.model_type == "idefics3" and loaded.cfg.image_tokens == 4
    proc = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    pixels = proc(images=[[_images()[0]], [_images()[2]]], return_tensors="np")["pixel_values"]
    real = pixels.reshape(*pixels.shape[:2], -1).any(-1)
    assert pixels.shape == (2, 5, 3, 32, 32) and real.sum(1).tolist() == [5, 3]
    rs = np.random.RandomState(6)
    rows = np.array([_text(rs, 3) + [IMAGE] * 20 + _text(rs, 4), _text(rs, 5) + [IMAGE] * 12 + _text(rs, 10)])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(rows), pixel_values=torch.tensor(pixels)).logits
    flat = pixels.reshape(-1, 3, 32, 32)
    order = np.argsort(~real.reshape(-1), kind="stable")  # the real tiles first, in order
    _close(_logits(loaded.cfg, loaded.params, rows, flat[order], real.reshape(-1)[order]), theirs)
    settings = dict(proc.to_dict(), image_processor_type="Idefics3ImageProcessor")
    ours = images.pixel_values(images.image_processor(settings), [_images()[0], _images()[2]])
    np.testing.assert_array_equal(ours, flat[order][:8])  # jaxft's preprocessing: the real tiles, in order
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor(rows[:1]), pixel_values=torch.tensor(pixels[:1]),
                              max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, rows.shape[1]:]
    np.testing.assert_array_equal(_greedy(loaded.cfg, loaded.params, rows[:1], flat[:5], 6)[0], want.numpy())


def test_param_axes_cover_every_leaf(llava_model):
    """Every leaf of the family's tree (language model, vision/, projector/) has a sharding rule of its rank, and
    the table names each leaf exactly once (what loading and export apply)."""
    import re

    from jaxft import tree
    from jaxft.checkpoint.assemble import hf_names

    cfg = llava_model[1].cfg
    shapes = {p: x.shape for p, x in tree.items(jax.eval_shape(lambda: llava.init(jax.random.PRNGKey(0), cfg)))}
    for path, shape in shapes.items():
        axes = next((a for pattern, a in llava.PARAM_AXES if re.fullmatch(pattern, path)), None)
        assert axes is not None and len(axes) == len(shape), (path, shape, axes)
    assert {entry.path for entry, _, _ in hf_names(cfg).values()} == set(shapes)
