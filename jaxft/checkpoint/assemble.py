"""Applying a mapping table: Hugging Face-named tensors <-> the jaxft parameter tree, one stacked leaf at a time.

Both readers (safetensors directories and GGUF files) present their tensors under Hugging Face names and leave
the rest to this module, so that missing, unexpected and misshapen tensors are found and reported the same way
for every format, and so that export uses the very table that loading does.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.host import Layers, device_array
from jaxft.models import family_of
from jaxft.models.table import Entry, LoadError, summarize
from jaxft.quant import as_dense
from jaxft.tree import items, unflatten

LeafFn = Callable[[str, Any], Any]  # (jaxft path, host array, or Layers if it sets `by_layer`) -> the leaf to keep

# Tensors some checkpoints carry that hold nothing the model needs: rotary tables that older transformers
# versions saved as buffers (recomputed from the config).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def to_device(dtype) -> LeafFn:
    """The leaf_fn of `assemble` when none is given: each leaf as a jax Array of `dtype`, the values of
    `jnp.asarray(x, dtype)`, stacked leaves built layer by layer in `dtype` (see `device_array`)."""
    def fn(path: str, x) -> jax.Array:
        return device_array(x, dtype)

    fn.by_layer = True
    return fn


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """jaxft path -> shape of every leaf the model has under `cfg`; nothing is allocated."""
    tree = jax.eval_shape(lambda: family_of(cfg).init(jax.random.PRNGKey(0), cfg))
    return {path: tuple(x.shape) for path, x in items(tree)}


def hf_names(cfg) -> dict[str, tuple[Entry, int | None, tuple[int, ...]]]:
    """HF tensor name -> (table entry, layer or None, HF shape) for every tensor a checkpoint of `cfg` holds.

    Ordered entry by entry and, within an entry, layer by layer, so that consecutive names share a jaxft leaf.
    Entries whose path the model does not have under `cfg` (biases, an untied head) are left out.
    """
    shapes = expected_shapes(cfg)
    reshaped = _hf_shapes(cfg)
    names = {}
    for entry in family_of(cfg).TABLE:
        if entry.path not in shapes:
            continue
        shape = shapes[entry.path]
        n_layers = shape[0]  # a stacked leaf: (L, ...); families with two stacks (T5) may differ in L
        if "{i}" in entry.hf:
            shape = shape[1:]
        if entry.transpose:
            shape = shape[::-1]
        shape = reshaped.get(entry.path, shape)
        if "{i}" in entry.hf:
            names.update({entry.hf.format(i=i): (entry, i, shape) for i in range(n_layers)})
        else:
            names[entry.hf] = (entry, None, shape)
    return names


def assemble(cfg, present: Mapping[str, str], read: Callable[[str], np.ndarray], *, file: str,
             dtype=jnp.float32, leaf_fn: LeafFn | None = None,
             label: Callable[[str], str] | None = None) -> dict:
    """The parameter tree of `cfg` from the tensors of one checkpoint.

    present: HF name -> the tensor's name in the file (the same for safetensors; tensors with no HF name
      are passed under their own name, and so are reported as unexpected).
    read: file name -> host array in HF layout ((out, in) for linear weights). Called once per tensor.
    leaf_fn: applied to each assembled leaf, e.g. (L, D, N*H) for `layers/attn/q_proj/w`, as soon as it is
      complete, so that peak host memory is about one stacked leaf (default: `to_device(dtype)`, i.e.
      `jnp.asarray(x, dtype)`). A leaf_fn with the attribute `by_layer = True` is given the `Layers` of a
      stacked leaf instead, to read one at a time.
    label: the file's name for an HF name, for the list of missing tensors.
    Raises LoadError listing every missing or unexpected tensor before anything is read, and naming any
    tensor whose shape does not match `cfg`.
    """
    leaf_fn = leaf_fn or to_device(dtype)
    label = label or (lambda name: name)
    wanted = hf_names(cfg)
    missing = [label(n) for n in wanted if n not in present]
    unexpected = [present[n] for n in present if n not in wanted and not _ignored(cfg, n)]
    if missing or unexpected:
        parts = [f"missing tensors {summarize(missing)}"] if missing else []
        parts += [f"unexpected tensors {summarize(unexpected)}"] if unexpected else []
        raise LoadError(f"{file}: {'; '.join(parts)} (for a {cfg.model_type} model with {cfg.n_layers} layers, "
                        f"tie_embeddings={cfg.tie_embeddings})")

    n_stacked = {path: shape[0] for path, shape in expected_shapes(cfg).items()}
    reshaped = _hf_shapes(cfg)
    by_layer = getattr(leaf_fn, "by_layer", False)
    groups: dict[str, dict] = {}  # jaxft path -> {layer or None: HF name}, in the order of the names
    for name, (entry, layer, _) in wanted.items():
        groups.setdefault(entry.path, {})[layer] = name

    def get(name: str) -> np.ndarray:
        entry, _, shape = wanted[name]
        x = read(present[name])
        if tuple(x.shape) != shape:
            raise LoadError(f"{file}: tensor {present[name]} has shape {tuple(x.shape)}, expected {shape} "
                            f"from the config")
        if entry.path in reshaped:  # a kernel kept as a matrix (a patch convolution's (D, C, p, p))
            x = x.reshape(x.shape[0], -1)
        return x.T if entry.transpose else x

    flat = {}
    for path, names in groups.items():
        if None in names:
            flat[path] = leaf_fn(path, get(names[None]))
            continue
        entry, _, shape = wanted[names[0]]
        layers = Layers(path, (n_stacked[path], *(shape[::-1] if entry.transpose else shape)),
                        lambda i, names=names: get(names[i]))
        flat[path] = leaf_fn(path, layers if by_layer else np.asarray(layers))
    return unflatten(flat)


def hf_tensors(cfg, flat: Mapping[str, Any], dtype):
    """The inverse of `assemble`: yields (HF name, host array in HF layout) one tensor at a time.

    flat: jaxft path -> leaf (dense or quantized: quantized leaves are dequantized to `dtype` once per leaf).
    Raises ValueError listing leaves that are not parameters of `cfg` (e.g. adapters not merged) or missing.
    """
    shapes = expected_shapes(cfg)
    extra, absent = sorted(set(flat) - set(shapes)), sorted(set(shapes) - set(flat))
    if extra or absent:
        raise ValueError(f"params do not match the config: unexpected leaves {extra}, missing leaves {absent}")
    dense, dense_path = None, None
    for name, (entry, layer, shape) in hf_names(cfg).items():
        if dense_path != entry.path:
            dense, dense_path = np.asarray(as_dense(flat[entry.path], dtype)), entry.path
        x = dense if layer is None else dense[layer]
        yield name, np.ascontiguousarray((x.T if entry.transpose else x).reshape(shape))


def _hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """jaxft path -> checkpoint shape of the leaves a family keeps in another shape than the tensor's (its
    optional `hf_shapes(cfg)`: a convolution kernel kept as a matrix)."""
    fn = getattr(family_of(cfg), "hf_shapes", None)
    return {} if fn is None else fn(cfg)


def _ignored(cfg, name: str) -> bool:
    # Some tied checkpoints also store the head, as a copy of the embedding that the model never reads.
    return bool(_IGNORED.fullmatch(name)) or (cfg.tie_embeddings and name == "lm_head.weight")
