"""`llava.FeatureCache`: a frozen tower's features, computed once per image, give the logits and the gradients
(of the language model's LoRA and the projector) that the pixels give; a seen image is read back, not recomputed."""

import jax
import numpy as np

from jaxft import checkpoint, config as config_lib, peft
from jaxft.models import llava
from test_vlm_interop import CONFIG
from test_vlm_generate import setup  # noqa: F401  (the tiny LLaVA directory, a module fixture)


def test_cached_features_equal_pixels(setup):  # noqa: F811
    root = setup[0]
    loaded = checkpoint.load(root / "model")
    cfg, base = loaded.cfg, loaded.params
    config = config_lib.load(CONFIG, [f"model={root / 'model'}", "data.train=x.json", "lora.rank=4",
                                      "lora.dropout=0.0"])
    trainable, spec = peft.build(jax.random.PRNGKey(0), base, config, cfg)  # LoRA + projector full, tower frozen
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    rs = np.random.RandomState(0)
    pixels = rs.randn(3, 3, 32, 32).astype(np.float32)
    n = cfg.image_tokens
    tokens = np.array([[5] + [cfg.image_token_id] * n + [6, 7] + [cfg.image_token_id] * n,
                       [8, 9] + [cfg.image_token_id] * n + [10] + [13] * n])  # 2 images, then 1
    cache = llava.FeatureCache(cfg, base)
    features = cache(pixels)
    assert (cache.misses, cache.hits) == (3, 0)
    again = cache(pixels[[2, 0, 2]])
    assert (cache.misses, cache.hits) == (3, 3)
    np.testing.assert_array_equal(again, features[[2, 0, 2]])

    def loss(t, **images):
        return llava.forward(cfg, base, tokens, trainable=t, peft=spec, **images)[0].std()

    want, want_grad = jax.value_and_grad(loss)(trainable, pixel_values=pixels)
    got, got_grad = jax.value_and_grad(loss)(trainable, image_features=features)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
