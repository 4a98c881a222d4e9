"""Shardings of every tree the trainer holds, derived from a model's path -> logical-axes table and a Layout.

  base         the model's table (`jaxft.models.llama.PARAM_AXES`); a QuantizedWeight (..., in, out) has its
               codes (..., out, in // 2) and scales (..., out, in // block) split like the dense weight, so a
               device holds whole blocks together with their scales; the double-quantization statistics
               (a few bytes per layer) follow the leading axes only
  trainable    a leaf at a base path (full fine-tuning) as the base; LoRA A (L, in, R) follows the base
               weight's input axis, B (L, R, out) its output axis, the rank is `lora_rank`; DoRA's magnitude
               (L, out) the output axis; other leaves the model table, else replicated (small by nature)
  state        optimizer moments as the trainable leaf they track (found by path); counters, RNG replicated
  batches      (A, B, T) micro-batches: (None, batch, seq); evaluation batches (B, T): (batch, seq)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft import tree
from jaxft.parallel.rules import Layout, Names, ShardingError
from jaxft.quant import QuantizedWeight

AxesTable = Sequence[tuple[str, tuple]]  # (path regex, logical axis names) pairs, first full match wins
MICRO_BATCH = (None, "batch", "seq")  # (A, B, T): gradient-accumulation steps, rows, positions
BATCH = ("batch", "seq")  # (B, T)
_LORA = {"lora_a": lambda n: (*n[:-1], "lora_rank"), "lora_b": lambda n: (*n[:-2], "lora_rank", n[-1]),
         "magnitude": lambda n: (*n[:-2], n[-1])}


def param_names(path: str, table: AxesTable) -> tuple | None:
    """The logical axes of the parameter at `path` by the first regex of `table` that fully matches, or None."""
    for pattern, names in table:
        if re.fullmatch(pattern, path):
            return tuple(names)
    return None


def leaf_sharding(leaf, names: Names, layout: Layout, path: str):
    """The sharding of one parameter leaf: a NamedSharding, or for a QuantizedWeight the same dataclass with a
    NamedSharding in each array field. Raises ShardingError naming `path` if a split does not divide."""
    if len(names) != len(leaf.shape):
        raise ShardingError(f"{path}: {len(names)} logical axes {tuple(names)} for shape {tuple(leaf.shape)}")
    if not isinstance(leaf, QuantizedWeight):
        return layout.sharding(names, leaf.shape, path)
    *lead, n_in, n_out = names
    split = (*lead, n_out, n_in)  # codes and scales are stored (..., out, in // k)
    try:
        codes = layout.sharding(split, leaf.codes.shape, f"{path} (codes)")
        scales = layout.sharding(split, leaf.scales.shape, f"{path} (scales, blocks of {leaf.block_size})")
    except ShardingError as e:
        raise ShardingError(f"{e}; a quantized weight is split on whole blocks of its in dimension "
                            f"{leaf.in_dim}") from None
    stats = lambda x: None if x is None else layout.sharding((*lead, None)[:x.ndim], x.shape, path)
    return leaf.replace(codes=codes, scales=scales, nested_scales=stats(leaf.nested_scales),
                        offset=stats(leaf.offset))


def base_shardings(base: dict, layout: Layout, table: AxesTable) -> dict:
    """The sharding of every leaf of the frozen base (arrays or ShapeDtypeStructs); unknown paths are an error."""
    out = {}
    for path, leaf in tree.items(base):
        names = param_names(path, table)
        if names is None:
            raise ShardingError(f"{path}: no logical axes for this parameter in the model's table")
        out[path] = leaf_sharding(leaf, names, layout, path)
    return tree.unflatten(out)


def trainable_shardings(trainable: dict, base: dict, layout: Layout, table: AxesTable) -> dict:
    """The sharding of every trainable leaf (arrays or ShapeDtypeStructs), from the base weight it adapts."""
    flat_base, out = tree.flatten(base), {}
    for path, leaf in tree.items(trainable):
        module, name = path.rsplit("/", 1) if "/" in path else ("", path)
        weight = f"{module}/w"
        if path in flat_base:
            names = param_names(path, table)
        elif name in _LORA and weight in flat_base:
            names = _LORA[name](param_names(weight, table) or (None,) * len(flat_base[weight].shape))
        else:
            names = param_names(path, table)
        if names is None or len(names) != len(leaf.shape):
            names = (None,) * len(leaf.shape)
        out[path] = leaf_sharding(leaf, names, layout, path)
    return tree.unflatten(out)


def state_shardings(state, trainable, layout: Layout):
    """Shardings for a training state (e.g. {"step", "trainable", "opt_state", "rng"}, arrays or abstract):
    a leaf whose path ends with the path of a trainable leaf of the same shape takes that leaf's sharding
    (Adam's moments, the trainable tree itself); everything else (step counters, RNG keys) is replicated.
    trainable: the trainable tree, arrays or ShapeDtypeStructs that carry their sharding."""
    by_path = dict(tree.items(trainable))

    def pick(key_path, leaf):
        keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        for i in range(len(keys)):
            match = by_path.get("/".join(keys[i:]))
            if match is not None and tuple(match.shape) == tuple(leaf.shape):
                return match.sharding
        return layout.replicated

    return jax.tree_util.tree_map_with_path(pick, state)


def create_trainable(build: Callable, key, base: dict, layout: Layout, table: AxesTable):
    """build(key, base) -> (trainable tree, static spec), e.g. `jaxft.peft.build`, run under jit so that the
    trainable tree is created in its shards (see `trainable_shardings`). Returns (trainable, spec)."""
    static = {}

    def arrays(key, base):
        trainable, static["spec"] = build(key, base)
        return trainable

    trainable = create_sharded(arrays, lambda a: trainable_shardings(a, base, layout, table), key, base)
    return trainable, static["spec"]


def shard_leaf_fn(layout: Layout, table: AxesTable, dtype, inner: Callable | None = None) -> Callable:
    """A `leaf_fn(path, host array) -> leaf` for `jaxft.checkpoint.load` that creates each leaf directly in its
    shards (`jax.make_array_from_callback`: each device receives only its slice, from host memory).

    dtype: the dtype of floating leaves when `inner` is None. inner: another leaf_fn (e.g. `jaxft.quant.leaf_fn`)
    applied first, one layer at a time for stacked `layers/...` leaves as the checkpoint is read (a float32
    stack of a quantized leaf never exists), its result brought back to the host before it is split, so no
    device ever holds a whole stacked leaf.
    """
    def host_leaf(path: str, x: np.ndarray):
        if inner is None:
            return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x
        return jax.device_get(inner(path, x))

    def fn(path: str, x):
        names = param_names(path, table)
        if names is None:
            raise ShardingError(f"{path}: no logical axes for this parameter in the model's table")
        if path.startswith("layers/"):  # x: the checkpoint's layers, each read as it is indexed (`Layers`)
            parts = [host_leaf(path, np.asarray(x[i])) for i in range(len(x))]
            host = jax.tree.map(lambda *a: np.stack(a), *parts)
        else:
            host = host_leaf(path, np.asarray(x))
        return jax.tree.map(_from_host, host, leaf_sharding(host, names, layout, path))

    fn.by_layer = True  # `jaxft.checkpoint.assemble` hands stacked leaves over layer by layer
    return fn


def create_sharded(fn: Callable, shardings: Callable, *args):
    """fn(*args) run under `jax.jit` with out_shardings = shardings(abstract output), so that every array of
    the result is created in its shards (never whole on one device).
    On a single device `fn` runs as it is (op by op) and its result is placed: the same numbers as without a
    mesh, and no compilation of an initializer that runs once.
    """
    out_shardings = shardings(jax.eval_shape(fn, *args))
    if all(len(s.device_set) == 1 for s in jax.tree.leaves(out_shardings)):
        return jax.device_put(fn(*args), out_shardings)
    return jax.jit(fn, out_shardings=out_shardings)(*args)


def shardings_of(tree_) -> Any:
    """The tree of `.sharding`s of a tree of jax Arrays (for jit's in/out_shardings)."""
    return jax.tree.map(lambda x: x.sharding, tree_)


def put_batch(batch: dict[str, np.ndarray], layout: Layout, names: Names = MICRO_BATCH) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays on the mesh (`make_array_from_process_local_data`).

    Each process holds batch_size / process_count rows (see `jaxft.data`); the mesh must give each process's
    devices exactly those rows, which holds when data * fsdp is a multiple of the process count (the mesh
    puts processes along its leading axes). Raises ShardingError before anything is transferred otherwise.
    """
    axis = list(names).index("batch")
    out = {}
    for key, local in batch.items():
        shape = list(local.shape)
        shape[axis] *= jax.process_count()
        sharding = layout.sharding(names, shape, f"batch[{key!r}] (train.batch_size / grad_accum rows)")
        if jax.process_count() > 1:
            _check_rows_per_process(sharding, tuple(shape), axis)
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(shape))
    return out


def to_host(tree_):
    """A tree of (possibly multi-process) global arrays as numpy arrays on every process; a collective:
    every process must call it."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree_)):
        return jax.device_get(tree_)
    return multihost_utils.process_allgather(tree_, tiled=True)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process must call it; no collective on one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def bytes_per_device(tree_) -> dict:
    """device -> bytes of the tree's shards on it (addressable devices only)."""
    out: dict = {}
    for x in jax.tree.leaves(tree_):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def _from_host(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _check_rows_per_process(sharding, shape: tuple, axis: int) -> None:
    rows = {}
    for device, index in sharding.devices_indices_map(shape).items():
        start, stop, _ = index[axis].indices(shape[axis])
        rows.setdefault(device.process_index, set()).add((start, stop))
    local = shape[axis] // jax.process_count()
    for process, spans in rows.items():
        covered = sum(b - a for a, b in spans)
        if covered != local:
            raise ShardingError(f"batch: process {process} would feed {covered} of {shape[axis]} rows but loads "
                                f"{local} (batch split over {jax.process_count()} processes); make mesh.data * "
                                f"mesh.fsdp a multiple of the process count")
