"""Context parallelism wired into the families: a LLaMA LoRA training step (loss and gradients of the trainable
tree) with the sequence split over `mesh.context` (ring attention in every layer) equals one device (float32
1e-5) on 8 simulated devices: context 8, data 2 x context 4, fsdp 2 x context 2 x tensor 2. Packed rows.

The 8-device part runs once, in a subprocess (`python tests/test_context_train.py OUT.json`), so the rest of the
suite keeps its single device.
"""

import json
import os
import sys

import pytest

MESHES = {"context8": (1, 1, 8, 1, 1), "data2-context4": (2, 1, 4, 1, 1), "fsdp2-context2-tensor2": (1, 2, 2, 2, 1)}
DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default_lora.py")
B, T = 2, 32


def _run(out_path):
    """In the 8-device subprocess: |split - one device| of the loss and of every gradient leaf, per mesh."""
    import logging

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxft import backend, parallel, peft
    from jaxft import config as config_lib
    from jaxft.models import llama
    from jaxft.models.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      max_seq_len=64)
    config = config_lib.load(DEFAULT, ["lora.rank=2", "lora.dropout=0.0", f"train.seq_len={T}"])
    base = llama.init(jax.random.PRNGKey(0), cfg)
    trainable, spec = peft.build(jax.random.PRNGKey(1), base, config, cfg)
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, T), 1, cfg.vocab_size)
    seg = jnp.asarray([[1] * 10 + [2] * 12 + [3] * 10, [1] * 14 + [2] * 12 + [0] * 6], jnp.int32)
    pos = jnp.asarray(np.concatenate([np.r_[0:10, 0:12, 0:10][None], np.r_[0:14, 0:12, [0] * 6][None]]), jnp.int32)

    def step(layout):
        def loss(trainable):
            logits, _ = llama.forward(cfg, base, tokens, trainable=trainable, positions=pos, segment_ids=seg,
                                      peft=spec, layout=layout)
            keep = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
            return jnp.sum(ce * keep) / jnp.sum(keep)

        return jax.value_and_grad(loss)

    want_loss, want_grads = jax.jit(step(None))(trainable)
    results = {}
    for name, shape in MESHES.items():
        mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
        layout = parallel.Layout(mesh, parallel.rules_from_config(config.rules), backend.Attention("xla"))
        logging.getLogger("jaxft").setLevel(logging.ERROR)
        got_loss, got_grads = jax.jit(step(layout))(trainable)
        diffs = jax.tree.leaves(jax.tree.map(lambda g, w: float(jnp.abs(g - w).max()), got_grads, want_grads))
        results[name] = {"loss": abs(float(got_loss) - float(want_loss)), "grads": max(diffs),
                         "grad_scale": max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_grads)),
                         "ring": "ppermute" in str(jax.make_jaxpr(step(layout))(trainable))}
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tiny  # (not at the top: this file is also the subprocess's script)
    return tiny.on_simulated_devices(__file__, tmp_path_factory.mktemp("context_train") / "results.json")


@pytest.mark.parametrize("name", list(MESHES))
def test_llama_lora_step_with_the_sequence_split_equals_one_device(results, name):
    got = results[name]
    assert got["loss"] <= 1e-5 and got["grads"] <= 1e-5 * max(1.0, got["grad_scale"]), got
    assert got["grad_scale"] > 1e-3  # the step moves the tree
    assert got["ring"]  # the layers' attention passed key/value blocks around the ring


if __name__ == "__main__":
    _run(sys.argv[1])
