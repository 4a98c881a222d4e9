"""`llava.FeatureCache`: a frozen tower's features, computed once per image, give the logits and the gradients
(of the language model's LoRA and the projector) that the pixels give; a seen image is read back, not recomputed."""

import json

import jax
import numpy as np
import pytest

from jaxft import checkpoint, config as config_lib, peft
from jaxft.models import llava
from test_vlm_interop import CONFIG
from jaxft.train.loop import train
from test_vlm_generate import setup  # noqa: F401  (the tiny LLaVA directory, a module fixture)
from test_vlm_train import _config as train_config, make_setup


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


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_trainer_with_cached_features_equals_pixels(tmp_path):
    """vision.cache_features=true through `jaxft.train`: three epochs of 24 training images (and 8 held out) give
    the losses and evaluation losses the pixels give (1e-5), with the tower run once per distinct image (the
    cache's count: 24 + 8) and every later use of an image read back."""
    setup = make_setup(tmp_path)
    extra = ("train.steps=6", "train.eval_every=3", "train.eval_batches=8", "train.learning_rate=1e-2",
             "data.pack=false", "train.batch_size=12")
    plain = train(train_config(setup, *extra), tmp_path / "plain")
    cached = train(train_config(setup, *extra, "vision.cache_features=true"), tmp_path / "cached")
    assert "feature_cache" not in plain
    want, got = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert len(want[0]) == 6 and len(want[1]) == 3
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=0)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=0)
    # 6 steps of 12 rows of one image each (and the peeked first batch), 8 held-out images evaluated once each
    assert cached["feature_cache"] == {"computed": 24 + 8, "reused": 7 * 12 - 24}
    with pytest.raises(ValueError, match=r"^vision.cache_features: True needs vision.method=frozen \(a 'lora' "
                                         r"tower's features change as it trains\)$"):
        train(train_config(setup, "vision.cache_features=true", "vision.method=lora"), tmp_path / "x")


def test_cache_on_a_text_only_model_is_refused(tmp_path):
    import tiny
    from jaxft.train.run import build_run

    model = tiny.llama_dir(tmp_path / "llama")
    config = config_lib.load(CONFIG, [f"model={model}", f"data.train={tiny.alpaca_file(tmp_path / 'a.jsonl', 8)}",
                                      "data.format=alpaca", "train.batch_size=2", "train.seq_len=32",
                                      "vision.cache_features=true"])
    with pytest.raises(ValueError, match=r"^vision.cache_features=True: model_type 'llama' is a text-only model, "
                                         r"with no vision tower \(leave vision.cache_features at False\)$"):
        build_run(config)
