"""`jaxft.generate.generate(extras=...)`: inputs passed to a family's forward at the prefill only, as a
vision-language family puts image embeddings into the prompt once. The family is defined here: LLaMA whose
IMAGE placeholder tokens take projected image features instead of their embeddings (LLaVA's processor repeats
the placeholder once per image position)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import generate as gen
from jaxft import models
from jaxft.models import llama
from jaxft.models.config import LlamaConfig

IMAGE = 63  # the placeholder token id
CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                  model_type="tiny_picture")
PROMPTS = [[5, IMAGE, IMAGE, IMAGE, 9, 3, 17], [4, IMAGE, IMAGE, IMAGE, 8]]
SEEN = []  # per trace of the forward: whether it was given pixel_values


def _forward(cfg, base, tokens, *, pixel_values=None, dtype=jnp.float32, **kw):
    """llama.forward with the embedding of the i-th IMAGE token of a row replaced by pixel_values[row, i] (I, C)
    projected by base["project"]["w"] (C, D); IMAGE tokens past the I-th keep their embedding."""
    SEEN.append(pixel_values is not None)
    if pixel_values is not None:
        x = base["embed"]["w"][tokens].astype(dtype)
        slot = jnp.cumsum(tokens == IMAGE, axis=1) - 1
        image = (tokens == IMAGE) & (slot < pixel_values.shape[1])
        features = jnp.einsum("bic,cd->bid", pixel_values, base["project"]["w"]).astype(dtype)
        picked = jnp.take_along_axis(features, jnp.clip(slot, 0, pixel_values.shape[1] - 1)[..., None], axis=1)
        kw["embeddings"] = jnp.where(image[..., None], picked, x)
    return llama.forward(cfg, base, tokens, dtype=dtype, **kw)


PICTURE = SimpleNamespace(Config=LlamaConfig, TABLE=llama.TABLE, PARAM_AXES=llama.PARAM_AXES, KIND="decoder",
                          init=llama.init, forward=_forward, init_cache=llama.init_cache,
                          decode_logits=llama.decode_logits)


@pytest.fixture
def picture(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "tiny_picture", PICTURE)
    base = llama.init(jax.random.key(0), CFG)
    base["lm_head"]["w"] = base["lm_head"]["w"] * 20  # spread the logits: no greedy near-ties
    base["project"] = {"w": jax.random.normal(jax.random.key(1), (4, CFG.dim))}
    pixels = jax.random.normal(jax.random.key(2), (len(PROMPTS), 3, 4))
    return base, pixels


def _greedy_alone(base, prompt, pixels, n):
    """n greedy tokens by running the whole sequence through the forward (no cache) at every step."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = _forward(CFG, base, jnp.asarray([seq]), pixel_values=pixels[None])
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_extras_reach_the_prefill_only(picture):
    base, pixels = picture
    SEEN.clear()
    ours = gen.generate(CFG, base, PROMPTS, max_new_tokens=6, extras={"pixel_values": pixels})
    assert SEEN == [True, False]  # traced once for the prefill (with the images), once for the decode step
    assert ours == [_greedy_alone(base, p, pixels[i], 6) for i, p in enumerate(PROMPTS)]
    # The images change what is generated: the comparison above is not blind to them.
    assert ours != gen.generate(CFG, base, PROMPTS, max_new_tokens=6, extras={"pixel_values": -pixels})


def test_unrolled_decoding_needs_split_layers(picture):
    base, _ = picture
    with pytest.raises(ValueError, match=r"^unroll=True: the tiny_picture family has no split_layers"):
        gen.generate(CFG, base, PROMPTS, max_new_tokens=2, unroll=True)
