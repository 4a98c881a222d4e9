"""DoRA on the experts with expert parallelism: one training step of an OLMoE model with DoRA on every expert
projection (magnitudes (L, E, out) and factors split over the `expert` mesh axis as the experts are), through the
trainer's own step (`jaxft.train.step`, the causal LM loss with the router's load-balancing loss), gives the loss,
the router loss and the gradient of every DoRA leaf of one device (float32; 1e-5, of each leaf's largest gradient)
on 8 simulated CPU devices for (data, fsdp, expert) meshes.

The 8-device part runs once, in a subprocess (`python tests/test_moe_dora_shard.py OUT.json`), so that the rest of
the suite keeps its single device.
"""

import json
import sys

import numpy as np
import pytest

MESHES = [(1, 1, 1, 1, 8), (2, 1, 1, 1, 4), (2, 2, 1, 1, 2)]  # (data, fsdp, context, tensor, expert)
E = 8


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tiny
    return tiny.on_simulated_devices(__file__, tmp_path_factory.mktemp("moe_dora_shard") / "results.json")


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_expert_sharded_dora_step_equals_one_device(results, mesh):
    ref, got = results["1x1x1x1x1"], results["x".join(map(str, mesh))]
    assert abs(ref["loss"] - results["lora_loss"]) > 1e-3  # the magnitudes are in the loss: DoRA, not LoRA
    assert ref["moe_aux_loss"] > 0
    for key in ("loss", "moe_aux_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-5, err_msg=key)
    projections, leaves = ("gate_proj", "up_proj", "down_proj"), ("lora_a", "lora_b", "magnitude")
    assert sorted(ref["grads"]) == sorted(f"layers/mlp/experts/{m}/{x}" for m in projections for x in leaves)
    for path, g in ref["grads"].items():  # within 1e-5 of each leaf's largest gradient
        assert np.abs(g).max() > 1e-3, path
        np.testing.assert_allclose(got["grads"][path], g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=path)
    # down_proj's magnitudes (L, E, D): split over `expert` as the experts' weights are (and D over fsdp), so
    # that each device holds 1/(expert x fsdp) of them.
    assert got["magnitude_spec"] == [None, "expert", ["fsdp", "context"]]  # (L, E, D); context is 1 here
    assert got["magnitude_bytes_per_device"] * mesh[4] * mesh[1] == ref["magnitude_bytes_per_device"]


def _main(out):
    import jax
    import optax

    from jaxft import config as config_lib, parallel, tree
    from jaxft.models import olmoe
    from jaxft.peft import lora
    from jaxft.tasks import Model, causal_lm
    from jaxft.train.step import init_state, make_train_step

    cfg = olmoe.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=16,
                       n_experts=E, top_k=2)
    # Weights x2, routing well away from uniform. (At x4 this tiny model is so sharp that the order of the data
    # axis' sums moves gradients by up to 3e-5 of their largest value, plain LoRA's as much as DoRA's.)
    base_host = jax.device_get(jax.tree.map(lambda a: a * 2, olmoe.init(jax.random.PRNGKey(0), cfg)))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (1, 8, 12)).astype(np.int32)  # one micro-batch of 8 rows
    segments = np.ones_like(tokens)
    segments[:, :, 9:] = 0  # padding: outside the token loss and the router's
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 2), "loss_mask": segments.astype(np.float32),
             "segment_ids": segments, "positions": np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)}
    rules = parallel.rules_from_config(config_lib.base.get_config().rules)

    def adapter(dora):
        spec = lora.LoraSpec(rank=4, alpha=8.0, dora=dora)
        t = lora.init(jax.random.PRNGKey(1), base_host, spec,
                      lora.target_paths(base_host, r"layers/mlp/experts/.*/w", "olmoe"))
        # B and the magnitudes away from their init: the adapter changes the outputs, the magnitudes matter.
        return spec, jax.device_get(jax.tree.map(
            lambda a: a * (1 + 0.3 * jax.random.uniform(jax.random.PRNGKey(a.size), a.shape))
            + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size + 1), a.shape), t))

    # An "optimizer" whose state is the step's gradient (the trainer's own accumulation and division included).
    keep_grads = optax.GradientTransformation(lambda p: jax.tree.map(jax.numpy.zeros_like, p),
                                              lambda g, state, params=None: (jax.tree.map(jax.numpy.zeros_like, g), g))

    def step(spec, trainable_host, shape):
        n = int(np.prod(shape))
        layout = parallel.Layout(parallel.make_mesh(shape, jax.devices()[:n]), rules)
        model = Model(family=olmoe, cfg=cfg, spec=spec.as_method(), layout=layout)
        train_step = make_train_step(lambda base, t, mb, r: causal_lm.forward(model, base, t, mb, r),
                                     keep_grads, loss=causal_lm.loss, extra=causal_lm.train_metrics)
        base = jax.device_put(base_host, parallel.base_shardings(base_host, layout, olmoe.PARAM_AXES))
        trainable = jax.device_put(trainable_host, parallel.trainable_shardings(trainable_host, base_host, layout,
                                                                                olmoe.PARAM_AXES))
        state = init_state(trainable, keep_grads, jax.random.PRNGKey(2))
        b = jax.device_put(batch, layout.sharding((None, "batch", None)))
        new, metrics = jax.jit(train_step)(state, base, b)
        grads = {p: np.asarray(g).tolist() for p, g in tree.flatten(new["opt_state"]).items()}
        m = trainable["layers"]["mlp"]["experts"]["down_proj"].get("magnitude")
        return {"loss": float(metrics["loss"]), "moe_aux_loss": float(metrics["moe_aux_loss"]), "grads": grads,
                **({} if m is None else {
                    "magnitude_bytes_per_device": m.addressable_shards[0].data.nbytes,
                    "magnitude_spec": list(m.sharding.spec) + [None] * (3 - len(m.sharding.spec))})}

    spec, trainable_host = adapter(dora=True)
    results = {"x".join(map(str, shape)): step(spec, trainable_host, shape) for shape in [(1, 1, 1, 1, 1)] + MESHES}
    lora_spec, lora_host = adapter(dora=False)
    results["lora_loss"] = step(lora_spec, {p: x for p, x in lora_host.items()}, (1, 1, 1, 1, 1))["loss"]
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _main(sys.argv[1])
