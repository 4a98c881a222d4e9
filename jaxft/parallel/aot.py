"""Ahead-of-time check: lower and compile the sharded train step for a target topology, without the devices.

  python -m jaxft.parallel.aot --topology v5e:4x4 --config configs/default_lora.py --model DIR_OR_CONFIG_JSON \
      [--config.mesh.fsdp=-1 ...]

Everything is abstract (shapes, dtypes and shardings: no weight is read, nothing runs), so a config that does
not fit, or a mesh / rules table that does not divide the model, fails here in seconds instead of on a pod.
TPU topologies need `libtpu` installed (`pip install 'jax[tpu]'`; no TPU is needed to compile for one);
`--topology cpu` compiles for this machine's devices. Prints the per-device memory XLA plans for the step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft.parallel import mesh as mesh_lib
from jaxft.parallel.partition import MICRO_BATCH, base_shardings, state_shardings, trainable_shardings
from jaxft.parallel.rules import MESH_AXES, Layout, rules_from_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def topology_devices(name: str) -> list:
    """The devices of a topology: 'cpu' (this machine's), or a TPU one like 'v5e:4x4', 'v4:2x2x2',
    'v5p:2x2x4', 'v6e:8x8' (compile-only devices from libtpu; v4 and v5p in megacore mode, one device a chip)."""
    if name == "cpu":
        return jax.devices("cpu")
    from jax.experimental import topologies

    kwargs = {}
    if name.startswith(("v4", "v5p")):
        kwargs["chip_config_name"] = "megacore"
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)


def compile_train_step(config, cfg, devices):
    """Lowers and compiles the trainer's step (as `jaxft.train.loop` builds it: keep the two in step) for
    `devices`, abstractly.

    config: a jaxft training config; cfg: the model's LlamaConfig. Returns the compiled step
    (`.memory_analysis()` gives per-device bytes). Raises ShardingError for a mesh or rules that do not fit.
    """
    from jaxft import peft, quant
    from jaxft.models import llama
    from jaxft.train.build import unroll_layers
    from jaxft.train.optim import make_optimizer
    from jaxft.train.step import init_state, make_train_step

    from jaxft import backend

    dtype, param_dtype = DTYPES[config.dtype], DTYPES[config.param_dtype]
    platform = devices[0].platform  # the attention kernel, remat and dropout PRNG of the target's policy
    policy = backend.resolve(platform, dtype, config.quant.format != "none", config.train.layer_loop,
                             config.train.remat)
    backend.apply_prng(policy)
    layout = Layout(mesh_lib.make_mesh({a: config.mesh[a] for a in MESH_AXES}, devices),
                    rules_from_config(config.rules), backend.attention_of(config, platform))

    def make_base():
        base = llama.init(jax.random.PRNGKey(0), cfg, param_dtype)
        if config.quant.format != "none":
            base = quant.quantize_params(base, config.quant.format, block_size=config.quant.block_size,
                                         double_quant=config.quant.double_quant, include=config.quant.include,
                                         dense_dtype=param_dtype)
        return base

    base = _with_shardings(jax.eval_shape(make_base), lambda a: base_shardings(a, layout, llama.PARAM_AXES))
    static = {}

    def build(key, base):
        trainable, static["spec"] = peft.build(key, base, config, cfg)
        return trainable

    trainable = _with_shardings(jax.eval_shape(build, jax.random.PRNGKey(0), base),
                                lambda a: trainable_shardings(a, base, layout, llama.PARAM_AXES))
    optimizer, _ = make_optimizer(config.train)
    state = _with_shardings(jax.eval_shape(lambda t: init_state(t, optimizer, jax.random.PRNGKey(0)), trainable),
                            lambda a: state_shardings(a, trainable, layout))
    t = config.train
    unroll = unroll_layers(config, dtype, devices[0].platform)
    shape = (t.grad_accum, t.batch_size // t.grad_accum, t.seq_len)
    batch_sharding = layout.sharding(MICRO_BATCH, shape, "batch (train.batch_size / grad_accum rows)")
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sharding)
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}

    def forward(base_, trainable_, mb, rng):
        logits, _ = llama.forward(cfg, base_, mb["tokens"], trainable=trainable_, positions=mb["positions"],
                                  segment_ids=mb["segment_ids"], peft=static["spec"], rng=rng, dtype=dtype,
                                  remat=policy.remat, unroll=unroll, layout=layout)
        return logits

    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    step = jax.jit(make_train_step(forward, optimizer, peft.penalty(static["spec"], t.l2sp)), donate_argnums=(0,),
                   in_shardings=(shardings(state), shardings(base), batch_sharding),
                   out_shardings=(shardings(state), layout.replicated))
    return step.lower(state, base, batch).compile()


# How XLA's TPU compiler says that a program does not fit: "the total memory required for HLO temporaries
# (28.00G) exceeds available HBM (15.75G)" (libtpu 0.0.42) or "Used 20.81G of 15.48G hbm" (older releases).
_OUT_OF_MEMORY = (re.compile(r"required for .*?\(([\d.]+)([KMGT])\) exceeds available \w+ \(([\d.]+)([KMGT])\)"),
                  re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) \w+"))
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) per device from a compiler's out-of-memory error, None for other errors."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    for pattern in _OUT_OF_MEMORY:
        m = pattern.search(message)
        if m:
            need, need_unit, have, have_unit = m.groups()
            return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])
    return None


def _with_shardings(abstract, shardings_fn):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        shardings_fn(abstract))


def main(argv=None) -> int:
    from jaxft import config as config_lib
    from jaxft.checkpoint.hf import read_config

    p = argparse.ArgumentParser(prog="python -m jaxft.parallel.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", required=True, help="'cpu', or a TPU topology like v5e:4x4, v4:2x2x2, v6e:8x8")
    p.add_argument("--config", required=True, help="a jaxft training config file")
    p.add_argument("--model", required=True, help="an HF model directory or its config.json (shapes only)")
    args, extra = p.parse_known_args(argv)
    config = config_lib.load(args.config, [a.removeprefix("--config.") for a in extra])
    model = Path(args.model)
    cfg = read_config(model if model.is_dir() else model.parent)
    devices = topology_devices(args.topology)
    try:
        compiled = compile_train_step(config, cfg, devices)
    except jax.errors.JaxRuntimeError as e:
        sizes = out_of_memory(str(e))
        if sizes is None:
            raise
        print(f"jaxft aot: the train step does not fit {args.topology}: needs {sizes[0] / 2**30:.2f} GiB per "
              f"device, has {sizes[1] / 2**30:.2f} GiB", file=sys.stderr)
        return 1
    mem = compiled.memory_analysis()
    report = {"topology": args.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
              "processes": len({d.process_index for d in devices}),
              "mesh": {a: config.mesh[a] for a in MESH_AXES}}
    if mem is not None:
        report.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                      temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
