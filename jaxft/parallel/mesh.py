"""The device mesh (data, fsdp, context, tensor, expert) from the config, and joining the processes of a
multi-host run.

  data    replicas: the batch is split, parameters are copied (cheap when they are small, e.g. LoRA on a
          model that fits one device)
  fsdp    fully sharded data parallel: the batch is split and so are parameters and optimizer state, each
          device gathering one layer's weights when it needs them
  context context parallel: the sequence is split (rules.seq), attention passes key/value blocks around a ring
          (`jaxft.parallel.context`)
  tensor  tensor parallel: heads, MLP width and vocabulary are split within a layer (fast interconnect only)
  expert  expert parallel: a mixture of experts' experts are split (rules.experts), each device storing E/N of
          them; the grouped expert products gather a layer's experts where they need them, as fsdp gathers a
          layer's weights (no all-to-all token exchange). Tokens are split over it only where rules.batch says.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os

import jax
from jax.sharding import AxisType, Mesh

from jaxft.backend import apply_prng, attention_of, resolve
from jaxft.parallel.rules import MESH_AXES, Layout, ShardingError, rules_from_config

log = logging.getLogger("jaxft.parallel")


def make_mesh(shape: dict | tuple, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, context, tensor, expert) of the given sizes over `devices` (default: all of
    JAX's).

    shape: {"data": d, "fsdp": f, "context": c, "tensor": t, "expert": e} (a missing axis is 1), (d, f, t) or
    (d, f, c, t, e). One size may be -1 for the devices left over.
    The device order is JAX's (`jax.make_mesh`: on TPU it follows the physical torus; across hosts,
    process by process, so that the leading axes span hosts and `tensor` stays within one).
    Raises ShardingError when the sizes do not multiply to the number of devices.
    """
    sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
    if len(sizes) == 3:  # (data, fsdp, tensor): no context or expert axis
        sizes = [sizes[0], sizes[1], 1, sizes[2], 1]
    devices = list(jax.devices() if devices is None else devices)
    if len(sizes) != len(MESH_AXES) or any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh: sizes {tuple(sizes)} for axes {MESH_AXES} must be positive integers or -1")
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh: at most one axis may be -1, got {_named(sizes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"mesh: {len(devices)} devices cannot be split into {_named(sizes)} (the fixed "
                                f"axes take {known})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(f"mesh: {_named(sizes, ' * ')} = {math.prod(sizes)} devices, but there are "
                            f"{len(devices)} (use -1 for one axis to take the rest)")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _named(sizes, sep: str = " ") -> str:
    return sep.join(f"{a}={n}" for a, n in zip(MESH_AXES, sizes) if a != "expert" or n != 1)  # (dense models)


def from_config(config, devices=None) -> Layout:
    """The Layout of `config.mesh`, `config.rules` and `config.attention` (see jaxft/config/base.py). As the
    first thing a run builds, before any random key, it also sets the backend policy's PRNG (`rbg` on GPU and
    TPU, `jaxft.backend.apply_prng`)."""
    mesh = make_mesh({a: config.mesh[a] for a in MESH_AXES}, devices)
    platform = mesh.devices.flat[0].platform  # the target's (a TPU topology's when `jaxft aot` compiles for one)
    apply_prng(resolve(platform))
    return Layout(mesh, rules_from_config(config.rules), attention_of(config, platform),
                  mlp_chunk=config.train.mlp_chunk)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to a multi-process run (`jax.distributed.initialize`); call before any other JAX use.

    Explicit: all three of `coordinator` ("host:port" of process 0), `num_processes` and `process_id`.
    Automatic: with none of them, on a Cloud TPU VM (JAX reads the workers from the VM's metadata) and in a
    SLURM job step of several tasks (from SLURM's variables). Otherwise (one host) does nothing.
    Returns whether the process joined a distributed run. CPU processes talk through gloo.
    """
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ShardingError("multi-process: pass all of --coordinator, --num-processes and --process-id "
                            f"(got coordinator={coordinator}, num_processes={num_processes}, process_id={process_id})")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ShardingError(f"multi-process: --process-id {process_id} not in [0, {num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _on_tpu_vm() or _in_slurm_step():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def _on_tpu_vm() -> bool:
    # libtpu installed and TPU chips attached: the test JAX itself makes before reading the VM's metadata.
    return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or
                                                                    glob.glob("/dev/vfio/[0-9]*"))


def _in_slurm_step() -> bool:
    names = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(n in os.environ for n in names) and int(os.environ["SLURM_NTASKS"]) > 1
