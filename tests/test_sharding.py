"""Sharded == unsharded: LoRA and QLoRA training, greedy generation and parameter bytes on 8 simulated CPU
devices, for meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2), (1,4,2); and the one-line errors for a
mesh, rules table or dimension that cannot be laid out.

The 8-device part runs once, in a subprocess (`python tests/test_sharding.py OUT.json`, with
--xla_force_host_platform_device_count=8), so the rest of the suite keeps its single device.
"""

import json
import os
import sys

import numpy as np
import pytest

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
RULES = (("batch", ("data", "fsdp")), ("seq", ()), ("embed", ("fsdp",)), ("heads", ("tensor",)),
         ("kv_heads", ("tensor",)), ("head_dim", ()), ("mlp", ("tensor",)), ("vocab", ("tensor",)),
         ("layers", ()), ("lora_rank", ()), ("experts", ()))
STEPS = 5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tiny  # (not at the top: this file is also the subprocess's script, which needs no torch)
    return tiny.on_simulated_devices(__file__, tmp_path_factory.mktemp("sharding") / "results.json")


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_training_on_a_mesh_equals_one_device(results, mesh):
    """Five LoRA steps (dropout on, gradient clipping over the global norm) on a base whose attention weights
    are dense and MLP weights NF4 (LoRA and QLoRA in one compilation per mesh)."""
    ref, got = results["runs"]["1x1x1"], results["runs"]["x".join(map(str, mesh))]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # it did train
    assert got["max_param_diff"] < 1e-5, got["max_param_diff"]


def test_specs_follow_the_rules(results):
    specs = results["specs_2x2x2"]
    assert specs["base/layers/attn/q_proj/w"] == [None, "fsdp", "tensor"]
    assert specs["base/layers/attn/o_proj/w"] == [None, "tensor", "fsdp"]
    assert specs["base/embed/w"] == ["tensor", "fsdp"]
    assert specs["base/layers/attn_norm/scale"] == [None, None]
    # LoRA A follows the base weight's input axis, B its output axis; the rank is not split.
    assert specs["trainable/layers/attn/q_proj/lora_a"] == [None, "fsdp", None]
    assert specs["trainable/layers/attn/q_proj/lora_b"] == [None, None, "tensor"]
    assert specs["trainable/layers/mlp/down_proj/lora_a"] == [None, "tensor", None]
    assert specs["trainable/layers/mlp/down_proj/lora_b"] == [None, None, "fsdp"]
    assert specs["dora/layers/mlp/down_proj/magnitude"] == [None, "fsdp"]
    # Adam's moments as the parameters they track.
    assert specs["mu/layers/attn/q_proj/lora_b"] == specs["trainable/layers/attn/q_proj/lora_b"]
    assert specs["nu/layers/mlp/down_proj/lora_a"] == [None, "tensor", None]
    # Quantized codes (L, out, in/2) and scales (L, out, in/block) split alike: whole blocks with their scales.
    assert specs["qbase/layers/mlp/gate_proj/w/codes"] == [None, "tensor", "fsdp"]
    assert specs["qbase/layers/mlp/gate_proj/w/scales"] == [None, "tensor", "fsdp"]
    assert results["quant_blocks_consistent"]
    assert specs["batch"] == [None, ["data", "fsdp"], None]
    assert results["created_equals_host_init"]  # the jitted, sharded LoRA init gives the same numbers


def test_greedy_generation_on_a_sharded_base(results):
    gen = results["generate"]
    assert gen["sharded"] == gen["reference"]
    assert len(gen["reference"][0]) == 8


def test_fsdp_holds_an_eighth_of_the_base_per_device(results):
    b = results["bytes_fsdp8"]
    for kind in ("base", "qbase"):  # dense float32, and NF4 with double quantization
        total, copied = b[f"{kind}_total"], b[f"{kind}_replicated"]
        # Every device holds exactly 1/8 of each split leaf plus the few copied ones (norm scales, the double
        # quantization's per-layer statistics): about 1/8 of the whole.
        assert b[f"{kind}_per_device"] == [(total - copied) / 8 + copied] * 8
        assert copied < 0.02 * total
    # Adam's moments: those of A split over fsdp, those of B of q/k/v/gate/up copied (they follow their output
    # axis, heads / mlp, which this mesh does not split), the step counters copied.
    total, copied = b["opt_total"], b["opt_replicated"]
    assert b["opt_per_device"] == [(total - copied) / 8 + copied] * 8 and copied < total
    # Loading through the checkpoint hook: each device received exactly its slice.
    assert b["loaded_slices_exact"]


def test_errors_name_the_axis_and_sizes(results):
    e = results["errors"]
    assert "data=3 * fsdp=1 * context=1 * tensor=1 = 3 devices, but there are 8" in e["mesh_product"]
    assert "embed/w: dimension 1 (embed) of size 36 cannot be split over mesh axes fsdp=8 = 8" in e["param_dim"]
    assert "dimension 2 (kv_heads) of size 4 cannot be split over mesh axes tensor=8 = 8" in e["activation_dim"]
    assert "of size 4 cannot be split over mesh axes data=8 * fsdp=1 = 8" in e["batch_rows"]
    assert "(scales, blocks of 16)" in e["quant_blocks"] and "in dimension 64" in e["quant_blocks"]
    for message in e.values():
        assert "\n" not in message


def test_ahead_of_time_compile_of_the_train_step(results):
    """`jaxft aot` (`jaxft.train.aot`, the check one runs for a TPU topology, here on the 8 CPU devices)."""
    aot = results["aot"]
    assert aot["argument_bytes"] > 0 and aot["temp_bytes"] > 0
    # A batch of 6 rows over data * fsdp = 4: refused (by the config's validation) before anything is built.
    assert aot["error"] == ("train.batch_size: 6 is not a multiple of train.grad_accum=1 * the mesh's data-parallel "
                            "size 4 (mesh.data * mesh.fsdp)")


def test_unknown_names_in_the_rules_table_are_errors():
    import jax

    from jaxft import parallel

    mesh = parallel.make_mesh((1, 1, 1))
    with pytest.raises(parallel.ShardingError, match="rules.hedas: unknown logical axis 'hedas'"):
        parallel.Layout(mesh, RULES + (("hedas", ("tensor",)),))
    with pytest.raises(parallel.ShardingError, match="rules.mlp: unknown mesh axis 'model'"):
        parallel.Layout(mesh, tuple((n, ("model",) if n == "mlp" else a) for n, a in RULES))
    with pytest.raises(parallel.ShardingError, match="no rule for logical axes vocab"):
        parallel.Layout(mesh, tuple(r for r in RULES if r[0] != "vocab"))
    layout = parallel.Layout(mesh, RULES)
    with pytest.raises(parallel.ShardingError, match="logical axis 'expert' is not in the rules"):
        layout.spec(("batch", "expert"))
    with pytest.raises(parallel.ShardingError, match="data=2 \\* fsdp=1 \\* context=1 \\* tensor=1 = 2 devices, but there are 1"):
        parallel.make_mesh((2, 1, 1))
    assert jax.device_count() == 1  # the rest of the suite still sees one device


def test_default_config_rules_cover_every_logical_axis():
    from jaxft import config as config_lib, parallel

    cfg = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py"))
    layout = parallel.from_config(cfg)
    assert dict(layout.rules)["batch"] == ("data", "fsdp") and layout.mesh.shape["data"] == 1
    with pytest.raises(config_lib.ConfigFileError, match="rules.hedas"):
        config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py"),
                        ["rules.hedas=tensor"])


# ---------------------------------------------------------------------------------------------------------
# The 8-device worker.

def _worker(out_path):
    import jax
    import optax

    from jaxft import parallel, quant, tree
    from jaxft.generate import generate
    from jaxft.models import llama
    from jaxft.models.config import LlamaConfig
    from jaxft.peft import lora
    from jaxft.train.step import init_state, make_train_step

    assert jax.device_count() == 8
    cfg = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, mlp_dim=128,
                      max_seq_len=64)
    table = llama.PARAM_AXES
    spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1)
    # A realistic LoRA learning rate: at 1e-2 Adam's m / sqrt(v) magnifies the reassociation noise of sharded
    # sums on near-zero gradients to ~1e-5 in 5 steps.
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    dense_host = jax.device_get(llama.init(jax.random.PRNGKey(0), cfg))
    dense_host["lm_head"]["w"] = dense_host["lm_head"]["w"] * 10  # logits apart: greedy ties are unlikely
    # QLoRA and LoRA in one model (one compilation per mesh): NF4 MLP weights, dense attention weights.
    base_host = jax.device_get(quant.quantize_params(dense_host, "nf4", block_size=8, dense_dtype=None,
                                                     include=r"layers/mlp/.*/w"))
    lora_host = jax.device_get(lora.init(jax.random.PRNGKey(1), base_host, spec,
                                         lora.target_paths(base_host, "all-linear")))
    rng = np.random.RandomState(0)
    batches = []
    for _ in range(STEPS):
        tokens = rng.randint(1, cfg.vocab_size, (1, 8, 16)).astype(np.int32)
        batches.append({"tokens": tokens, "targets": np.roll(tokens, -1, -1),
                        "loss_mask": (rng.rand(1, 8, 16) < 0.7).astype(np.float32),
                        "segment_ids": np.ones((1, 8, 16), np.int32),
                        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 8, 16)).copy()})
    results = {"runs": {}}

    def layout_of(shape):
        devices = jax.devices()[:int(np.prod(shape))]
        return parallel.Layout(parallel.make_mesh(shape, devices), RULES)

    def place(host, layout):
        return jax.device_put(host, parallel.base_shardings(host, layout, table))

    ref = None
    for shape in [(1, 1, 1)] + MESHES:
        layout = layout_of(shape)
        base = place(base_host, layout)
        if shape == (2, 2, 2):  # created in its shards by a jitted LoRA init, as the trainer does
            build = lambda k, b: (lora.init(k, b, spec, lora.target_paths(b, "all-linear")), spec)
            trainable, _ = parallel.create_trainable(build, jax.random.PRNGKey(1), base, layout, table)
            created = tree.flatten(jax.device_get(trainable))
            results["created_equals_host_init"] = all(np.array_equal(created[p], x)
                                                       for p, x in tree.items(lora_host))
        else:
            trainable = jax.device_put(lora_host, parallel.trainable_shardings(lora_host, base_host, layout, table))
        state = parallel.create_sharded(lambda t, k: init_state(t, opt, k),
                                        lambda a: parallel.state_shardings(a, trainable, layout),
                                        trainable, jax.random.PRNGKey(2))

        def forward(base_, trainable_, mb, r, layout=layout):
            return llama.forward(cfg, base_, mb["tokens"], trainable=trainable_, positions=mb["positions"],
                                 segment_ids=mb["segment_ids"], lora=spec, rng=r, layout=layout)[0]

        state_sh = parallel.shardings_of(state)
        step = jax.jit(make_train_step(forward, opt), donate_argnums=(0,),
                       in_shardings=(state_sh, parallel.shardings_of(base), layout.sharding(parallel.MICRO_BATCH)),
                       out_shardings=(state_sh, layout.replicated))
        losses = []
        for batch in batches:
            state, m = step(state, base, parallel.put_batch(batch, layout))
            losses.append(float(m["loss"]))
        trained = tree.flatten(parallel.to_host(state["trainable"]))
        ref = ref or trained
        diff = max(float(np.max(np.abs(trained[p] - ref[p]))) for p in ref)
        results["runs"]["x".join(map(str, shape))] = {"losses": losses, "max_param_diff": diff}

        if shape == (2, 2, 2):
            specs = {f"base/{p}": _spec(x) for p, x in tree.items(base) if not isinstance(x, quant.QuantizedWeight)}
            specs.update({f"trainable/{p}": _spec(x) for p, x in tree.items(state["trainable"])})
            adam = state["opt_state"][1][0]
            specs.update({f"mu/{p}": _spec(x) for p, x in tree.items(adam.mu)})
            specs.update({f"nu/{p}": _spec(x) for p, x in tree.items(adam.nu)})
            w = base["layers"]["mlp"]["gate_proj"]["w"]
            specs["qbase/layers/mlp/gate_proj/w/codes"] = _spec(w.codes)
            specs["qbase/layers/mlp/gate_proj/w/scales"] = _spec(w.scales)
            dora = jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(1), dense_host, lora.LoraSpec(dora=True),
                                                    lora.target_paths(dense_host, "all-linear")))
            dora_sh = parallel.trainable_shardings(dora, dense_host, layout, table)
            specs["dora/layers/mlp/down_proj/magnitude"] = _spec(dora_sh["layers"]["mlp"]["down_proj"]["magnitude"])
            specs["batch"] = _spec(layout.sharding(parallel.MICRO_BATCH))
            results["specs_2x2x2"] = specs
            results["quant_blocks_consistent"] = _blocks_consistent(w)
            # Greedy decoding with the trained adapter over the sharded base, against one device.
            prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
            results["generate"] = {
                "sharded": generate(cfg, base, prompts, max_new_tokens=8, trainable=state["trainable"], lora=spec),
                "reference": generate(cfg, base_host, prompts, max_new_tokens=8,
                                      trainable=tree.unflatten(trained), lora=spec)}
        if shape == (1, 8, 1):
            dense = place(dense_host, layout)
            qbase = place(jax.device_get(quant.quantize_params(dense_host, "nf4", block_size=8, dense_dtype=None)),
                          layout)
            replicated = lambda t: sum(x.nbytes for x in jax.tree.leaves(t) if x.sharding.is_fully_replicated)
            results["bytes_fsdp8"] = {
                "base_total": sum(x.nbytes for x in jax.tree.leaves(dense)), "base_replicated": replicated(dense),
                "base_per_device": list(parallel.bytes_per_device(dense).values()),
                "qbase_total": sum(x.nbytes for x in jax.tree.leaves(qbase)), "qbase_replicated": replicated(qbase),
                "qbase_per_device": list(parallel.bytes_per_device(qbase).values()),
                "opt_total": sum(x.nbytes for x in jax.tree.leaves(state["opt_state"])),
                "opt_replicated": replicated(state["opt_state"]),
                "opt_per_device": list(parallel.bytes_per_device(state["opt_state"]).values()),
                "loaded_slices_exact": _loaded_slices_exact(layout, dense_host, table)}
    results["errors"] = _errors(cfg, dense_host, layout_of)
    results["aot"] = _aot(cfg)
    with open(out_path, "w") as f:
        json.dump(results, f)


def _spec(x):
    sharding = getattr(x, "sharding", x)
    return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def _blocks_consistent(w) -> bool:
    """Every device holds the same outputs of codes and scales, and codes for exactly the blocks it has scales of."""
    codes = {s.device: s.index for s in w.codes.addressable_shards}
    scales = {s.device: s.index for s in w.scales.addressable_shards}
    for device, (l_c, o_c, i_c) in codes.items():
        l_s, o_s, b_s = scales[device]
        start, stop, _ = i_c.indices(w.in_dim // 2)
        b_start, b_stop, _ = b_s.indices(w.in_dim // w.block_size)
        if (l_c, o_c) != (l_s, o_s) or (2 * start, 2 * stop) != (b_start * w.block_size, b_stop * w.block_size):
            return False
    return True


def _loaded_slices_exact(layout, base_host, table) -> bool:
    """shard_leaf_fn, the checkpoint hook: each device gets exactly its slice of the host array, in param_dtype."""
    import jax.numpy as jnp

    from jaxft import parallel, tree

    fn = parallel.shard_leaf_fn(layout, table, jnp.bfloat16)
    for path, host in tree.items(base_host):
        leaf = fn(path, np.asarray(host))
        for shard in leaf.addressable_shards:
            expected = np.asarray(host)[shard.index].astype(jnp.bfloat16)
            if shard.data.dtype != jnp.bfloat16 or not np.array_equal(np.asarray(shard.data), expected):
                return False
        if len(leaf.sharding.device_set) != 8:
            return False
    return True


def _errors(cfg, base_host, layout_of) -> dict:
    import dataclasses

    import jax

    from jaxft import parallel, quant
    from jaxft.models import llama

    def message(fn):
        try:
            fn()
        except parallel.ShardingError as e:
            return str(e)
        return "no error"

    fsdp8, tensor8 = layout_of((1, 8, 1)), layout_of((1, 1, 8))
    odd = jax.eval_shape(lambda: llama.init(jax.random.PRNGKey(0), dataclasses.replace(cfg, dim=36)))
    qbase16 = quant.quantize_params(base_host, "nf4", block_size=16, dense_dtype=None)
    tokens = np.zeros((8, 4), np.int32)
    return {
        "mesh_product": message(lambda: parallel.make_mesh((3, 1, 1))),
        "param_dim": message(lambda: parallel.base_shardings(odd, fsdp8, llama.PARAM_AXES)),
        "activation_dim": message(lambda: jax.jit(
            lambda b, t: llama.forward(cfg, b, t, layout=tensor8)[0]).lower(base_host, tokens)),
        "batch_rows": message(lambda: parallel.put_batch({"tokens": np.zeros((1, 4, 16), np.int32)},
                                                         layout_of((8, 1, 1)))),
        "quant_blocks": message(lambda: parallel.base_shardings(qbase16, fsdp8, llama.PARAM_AXES)),
    }


def _aot(cfg) -> dict:
    """The trainer's step for a QLoRA config, lowered and compiled from shapes alone (nothing allocated)."""
    import jax

    from jaxft import config as config_lib, parallel
    from jaxft.train import aot

    overrides = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "quant.format=nf4", "quant.block_size=8",
                 "train.batch_size=8", "train.seq_len=16", "lora.rank=4"]
    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py"), overrides)
    mem = aot.compile_train_step(config, jax.devices(), model_config=cfg).memory_analysis()
    try:
        aot.compile_train_step(config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                            "default_lora.py"), overrides + ["train.batch_size=6"]),
                               jax.devices(), model_config=cfg)
        error = "no error"
    except (config_lib.ConfigFileError, parallel.ShardingError) as e:
        error = str(e)
    return {"argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes, "error": error}


if __name__ == "__main__":
    _worker(sys.argv[1])
