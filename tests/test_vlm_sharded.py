"""Sharded == unsharded for a vision-language model: a tiny random LLaVA (CLIP tower, MLP projector, llama
decoder) laid out by the family's PARAM_AXES on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 simulated devices,
its trainable tree (language-model LoRA, tower LoRA, full projector) created in its shards as the trainer does,
gives the one-device loss and gradients of a batch with images.

The 8-device part runs in a subprocess (`python tests/test_vlm_sharded.py OUT.json`), so the rest of the suite
keeps its single device.
"""

import json
import os
import sys

import numpy as np

RULES = (("batch", ("data", "fsdp")), ("seq", ()), ("embed", ("fsdp",)), ("heads", ("tensor",)),
         ("kv_heads", ("tensor",)), ("head_dim", ()), ("mlp", ("tensor",)), ("vocab", ("tensor",)),
         ("layers", ()), ("lora_rank", ()), ("experts", ()))


def test_sharded_llava_equals_one_device(tmp_path):
    import tiny  # (not at the top: this file is also the subprocess's script, which needs no torch)

    got = tiny.on_simulated_devices(__file__, tmp_path / "results.json")
    assert got["q_spec"] == [None, "fsdp", "tensor"] and got["vision_lora_spec"][1] == "fsdp", got
    assert abs(got["loss_sharded"] - got["loss"]) <= 1e-5, got
    assert got["max_grad_diff"] <= 1e-5 and got["grad_norm"] > 1e-3, got


def _worker(out: str) -> None:
    import jax
    import jax.numpy as jnp

    from jaxft import config as config_lib, parallel, peft, tree
    from jaxft.models import connectors, llava, vit
    from jaxft.models.config import LlamaConfig
    from jaxft.tasks import Model, causal_lm

    assert jax.device_count() == 8
    text = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
    tower = vit.Config(dim=32, n_layers=2, n_heads=4, mlp_dim=48, image_size=16, patch_size=8)
    cfg = llava.Config(text, tower, connectors.LlavaProjector(vision_dim=32, text_dim=32), image_token_id=63,
                       feature_layer=-1)
    base = llava.init(jax.random.PRNGKey(0), cfg)
    base = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), base)
    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py"),
                             ["vision.method=lora", "lora.rank=4", "lora.dropout=0.0"])
    rs = np.random.RandomState(0)
    n = cfg.image_tokens  # 4 per image
    tokens = np.array([list(rs.randint(1, 63, 3)) + [63] * n + list(rs.randint(1, 63, 9)) for _ in range(4)] +
                      [list(rs.randint(1, 63, 2)) + [63] * n + list(rs.randint(1, 63, 2)) + [63] * n +
                       list(rs.randint(1, 63, 4)) for _ in range(4)], np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": (tokens != 63).astype(np.float32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)), "segment_ids": np.ones((8, 16), np.int32),
             "pixel_values": rs.randn(12, 3, 16, 16).astype(np.float32), "image_mask": np.ones(12, bool)}

    def build(key, b):
        trainable, spec = peft.build(key, b, config, cfg)
        trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B != 0: the LoRA paths matter to the gradient
        return trainable, spec

    def loss_and_grads(base, trainable, batch, spec):
        model = Model(family=llava, cfg=cfg, spec=spec)

        def loss(t):
            s, c = causal_lm.loss(causal_lm.forward(model, base, t, batch), batch)
            return s / c
        return jax.value_and_grad(loss)(trainable)

    trainable, spec = build(jax.random.PRNGKey(2), base)
    want_loss, want_grads = jax.jit(loss_and_grads, static_argnums=3)(base, trainable, batch, spec)

    layout = parallel.Layout(parallel.make_mesh((2, 2, 2)), RULES)
    base_s = jax.device_put(base, parallel.base_shardings(base, layout, llava.PARAM_AXES))
    trainable_s, spec_s = parallel.create_trainable(build, jax.random.PRNGKey(2), base_s, layout, llava.PARAM_AXES)
    got_loss, got_grads = jax.jit(loss_and_grads, static_argnums=3)(base_s, trainable_s, batch, spec_s)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got_grads, want_grads)
    flat = tree.flatten(trainable_s)
    spec_of = lambda x: [a[0] if isinstance(a, tuple) else a for a in x.sharding.spec]  # noqa: E731
    result = {"loss": float(want_loss), "loss_sharded": float(got_loss), "max_grad_diff": max(jax.tree.leaves(diffs)),
              "grad_norm": float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(want_grads)))),
              "q_spec": spec_of(base_s["vision"]["layers"]["attn"]["q_proj"]["w"]),
              "vision_lora_spec": spec_of(flat["vision/layers/attn/q_proj/lora_a"])}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _worker(sys.argv[1])
