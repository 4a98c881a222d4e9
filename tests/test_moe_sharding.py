"""Expert parallelism: a Mixtral model with LoRA on attention and experts, its experts split over the `expert` mesh
axis (rules.experts), computes the loss and gradients of one device (float32, 1e-5) on 8 simulated CPU devices
for (data, fsdp, context, tensor, expert) meshes, each device storing 1/N of the experts; an expert axis that does not
divide the expert count is a one-line error.

The 8-device part runs once, in a subprocess (`python tests/test_moe_sharding.py OUT.json`), so that the rest of
the suite keeps its single device.
"""

import json
import sys

import numpy as np
import pytest

MESHES = [(1, 1, 1, 1, 8), (2, 1, 1, 1, 4), (1, 2, 1, 2, 2)]  # (data, fsdp, context, tensor, expert)
E = 8


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tiny
    return tiny.on_simulated_devices(__file__, tmp_path_factory.mktemp("moe_sharding") / "results.json")


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_expert_sharded_equals_one_device(results, mesh):
    ref, got = results["1x1x1x1x1"], results["x".join(map(str, mesh))]
    assert abs(ref["loss"] - results["no_lora_loss"]) > 1e-3  # the adapter is in the loss
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=0, atol=1e-5)
    for path, g in ref["grads"].items():
        assert np.abs(g).max() > 1e-4, path
        np.testing.assert_allclose(got["grads"][path], g, rtol=1e-5, atol=1e-5, err_msg=path)
    d, f, c, t, e = mesh
    # Each device stores 1/e of the experts (and 1/f of their width D, 1/t of F, as fsdp and tensor split them).
    assert got["expert_bytes_per_device"] * e * f * t == ref["expert_bytes_per_device"]
    # down_proj (L, E, F, D), as the rules say (embed: fsdp and context, the latter of size 1 here)
    assert got["spec"] == [None, "expert", "tensor", ["fsdp", "context"]]


def test_an_expert_axis_that_does_not_divide_the_experts_is_one_line(results):
    error = results["error"]
    assert error.startswith("layers/mlp/experts/") and "\n" not in error
    assert error.endswith("/w: dimension 1 (experts) of size 8 cannot be split over mesh axes expert=3 = 3; change "
                          "rules.experts or the mesh")


def _main(out):
    import jax
    import jax.numpy as jnp

    from jaxft import config as config_lib, parallel, tree
    from jaxft.models import mixtral
    from jaxft.peft import lora
    from jaxft.train.step import token_loss

    cfg = mixtral.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=16,
                         n_experts=E, top_k=2)
    base_host = jax.device_get(jax.tree.map(lambda a: a * 4, mixtral.init(jax.random.PRNGKey(0), cfg)))
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    trainable_host = lora.init(jax.random.PRNGKey(1), base_host, spec, lora.target_paths(base_host, "all-linear"))
    trainable_host = jax.device_get(jax.tree.map(  # B away from zero: the adapter changes the outputs
        lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), trainable_host))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (8, 12)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "mask": (rng.rand(8, 12) < 0.8).astype(np.float32)}
    rules = parallel.rules_from_config(config_lib.base.get_config().rules)

    def loss(trainable, base, b, layout):
        logits = mixtral.forward(cfg, base, b["tokens"], trainable=trainable, peft=spec.as_method(), layout=layout)[0]
        total, count = token_loss(logits, b["targets"], b["mask"])
        return total / count

    results = {}
    for shape in [(1, 1, 1, 1, 1)] + MESHES:
        n = int(np.prod(shape))
        layout = parallel.Layout(parallel.make_mesh(shape, jax.devices()[:n]), rules)
        base = jax.device_put(base_host, parallel.base_shardings(base_host, layout, mixtral.PARAM_AXES))
        trainable = jax.device_put(trainable_host, parallel.trainable_shardings(trainable_host, base_host, layout,
                                                                                mixtral.PARAM_AXES))
        b = jax.device_put(batch, layout.sharding(("batch", None)))
        value, grads = jax.jit(jax.value_and_grad(lambda t, base, b: loss(t, base, b, layout)))(trainable, base, b)
        w = base["layers"]["mlp"]["experts"]["down_proj"]["w"]
        results["x".join(map(str, shape))] = {
            "loss": float(value), "grads": {p: np.asarray(g).tolist() for p, g in tree.items(grads)},
            "expert_bytes_per_device": w.addressable_shards[0].data.nbytes,
            "spec": [None if a is None else a for a in w.sharding.spec] + [None] * (4 - len(w.sharding.spec))}
    results["no_lora_loss"] = float(jax.jit(lambda b: loss(None, base_host, b, None))(batch))
    layout = parallel.Layout(parallel.make_mesh((1, 1, 1, 1, 3), jax.devices()[:3]), rules)
    try:
        parallel.base_shardings(base_host, layout, mixtral.PARAM_AXES)
        results["error"] = None
    except parallel.ShardingError as e:
        results["error"] = str(e)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _main(sys.argv[1])
