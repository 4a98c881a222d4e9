"""Ahead-of-time check: lower and compile a run's train step for a target topology, without its devices.

  jaxft aot --topology v5e:4x4 --config configs/default_lora.py [--model DIR_OR_CONFIG_JSON] \
      [--config.mesh.fsdp=-1 ...]          (or: python -m jaxft.train.aot ...)

The run is the one `jaxft train` builds (`jaxft.train.run.build_run(abstract=True)`: any family, method and
task), but abstract: shapes, dtypes and shardings, no weight or data read, nothing run. A config that does not
fit, or a mesh / rules table that does not divide the model, fails here in seconds instead of on a pod.
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

from jaxft import config as config_lib
from jaxft.checkpoint.hf import read_config
from jaxft.parallel import MESH_AXES
from jaxft.train.run import build_run


def topology_devices(name: str) -> list:
    """The devices of a topology: 'cpu' (this machine's), or a TPU one like 'v5e:4x4', 'v4:2x2x2',
    'v5p:2x2x4', 'v6e:8x8' (compile-only devices from libtpu; v4 and v5p in megacore mode, one device a chip)."""
    if name == "cpu":
        return jax.devices("cpu")
    from jax.experimental import topologies  # (only for TPU topologies: needs libtpu)

    kwargs = {}
    if name.startswith(("v4", "v5p")):
        kwargs["chip_config_name"] = "megacore"
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)


def compile_train_step(config, devices=None, model_config=None):
    """The run's train step lowered and compiled for `devices` (default: JAX's) from shapes alone
    (`.memory_analysis()` gives per-device bytes). model_config: the family Config to use instead of
    config.model's config.json. Raises ShardingError for a mesh or rules that do not fit."""
    run = build_run(config, abstract=True, devices=devices, model_config=model_config)
    return run.train_step.lower(run.state, run.base, run.batch).compile()


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


# What one chip holds (GiB) by libtpu's device_kind: v5e as libtpu reports it usable (15.75 of 16); the others
# their HBM. The compiler does not refuse every program above it (libtpu 0.0.42.1 compiled 8B steps planning
# 19 GiB for a v5e chip), so `check` compares the plan itself.
DEVICE_GIB = {"TPU v5 lite": 15.75, "TPU v4": 32.0, "TPU v5": 95.0, "TPU v5p": 95.0, "TPU v6 lite": 32.0}


def planned_bytes(mem) -> int:
    """What a compiled step holds on one device at its peak: arguments + outputs + temporaries, less the
    outputs that reuse a donated argument's buffer (XLA's `memory_analysis()`)."""
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)


def check(config, topology: str, model: str | None = None, memory_gib: float | None = None) -> int:
    """Compiles `config`'s train step for `topology` and prints the per-device memory plan as one JSON line
    (exit code 0), or one line on stderr when it does not fit (exit code 1): when the compiler refuses it, or
    when the plan (`planned_bytes`) exceeds `memory_gib` per device (default: the chip's, DEVICE_GIB; none for
    the CPU). model: an HF model directory or its config.json, for the shapes (default: config.model's)."""
    cfg = None
    if model:
        path = Path(model)
        cfg = read_config(path if path.is_dir() else path.parent)
    devices = topology_devices(topology)
    try:
        compiled = compile_train_step(config, devices, cfg)
    except jax.errors.JaxRuntimeError as e:
        sizes = out_of_memory(str(e))
        if sizes is None:
            raise
        print(f"jaxft aot: the train step does not fit {topology}: needs {sizes[0] / 2**30:.2f} GiB per "
              f"device, has {sizes[1] / 2**30:.2f} GiB", file=sys.stderr)
        return 1
    mem = compiled.memory_analysis()
    has = memory_gib if memory_gib is not None else DEVICE_GIB.get(devices[0].device_kind)
    if mem is not None and has is not None and planned_bytes(mem) > has * 2**30:
        print(f"jaxft aot: the train step does not fit {topology}: needs {planned_bytes(mem) / 2**30:.2f} GiB per "
              f"device, has {has:.2f} GiB", file=sys.stderr)
        return 1
    report = {"topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
              "processes": len({d.process_index for d in devices}), "task": config.task,
              "method": config.peft.method, "mesh": {a: config.mesh[a] for a in MESH_AXES}}
    if mem is not None:
        report.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                      temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
    print(json.dumps(report))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxft.train.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", required=True, help="'cpu', or a TPU topology like v5e:4x4, v4:2x2x2, v6e:8x8")
    p.add_argument("--config", required=True, help="a jaxft training config file")
    p.add_argument("--model", help="an HF model directory or its config.json (shapes only; default config.model)")
    p.add_argument("--memory-gib", type=float, help="memory per device (default: the TPU chip's; none for cpu)")
    args, extra = p.parse_known_args(argv)
    return check(config_lib.load(args.config, [a.removeprefix("--config.") for a in extra]), args.topology,
                 args.model, args.memory_gib)


if __name__ == "__main__":
    raise SystemExit(main())
