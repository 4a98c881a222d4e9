"""Several LoRA adapters over one frozen base, chosen per call or per row of a batch (serving many fine-tunes).

The N adapters are stacked on a new axis after the layer axis. For every module that any of them adapts:

  lora_a      (L, N, in, R)   R the largest rank; smaller ones padded with zeros, which add nothing
  lora_b      (L, N, R, out)  each adapter's scaling (alpha / r or alpha / sqrt(r)) folded in
  dora_scale  (L, N, out)     DoRA's m / ||W + s B A||, computed once here; ones for plain LoRA adapters
                              (present only where some adapter is DoRA)

An adapter that leaves a module alone has zeros there. `MultiLora.rows(choice)` adds which adapter each batch
row uses, and `jaxft.peft.lora.lora_delta` gathers the rows' A and B one layer at a time inside the model. The
base is never copied: memory grows by the stacked adapters (plus one int per row and module).

  multi = jaxft.multi.load(base, cfg, {"sql": "runs/sql", "chat": "exports/chat-peft"})
  logits, _ = llama.forward(cfg, base, tokens, trainable=multi.rows(["sql", "chat", None]), peft=PER_ROW)
  jaxft.generate.generate(cfg, base, prompts, trainable=multi.rows(["chat"] * len(prompts)), peft=PER_ROW, ...)

(None in `rows` is the base alone.)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import tree
from jaxft.models.config import LlamaConfig
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, MethodSpec, method_of
from jaxft.quant import as_dense

PER_ROW = MethodSpec("lora")  # the `peft=` of a `MultiLora.rows` tree: LoRA whose leaves carry their own scaling


@dataclasses.dataclass(frozen=True)
class MultiLora:
    names: tuple[str, ...]  # adapter n of the stacked axis N
    stacked: dict  # the trainable-shaped tree of the module docstring

    def rows(self, choice: Sequence[str | None]) -> dict:
        """The trainable tree for `llama.forward` or `generate` (with `peft=PER_ROW`): batch row b uses the
        adapter named choice[b], or none (the base alone) where it is None. Shares the stacked arrays."""
        if not choice:
            raise ValueError("choice must name an adapter (or None) for each row of the batch")
        index = {name: n for n, name in enumerate(self.names)}
        unknown = sorted({c for c in choice if c is not None and c not in index})
        if unknown:
            raise KeyError(f"no adapter named {', '.join(map(repr, unknown))} (loaded: {', '.join(self.names)})")
        ids = np.asarray([len(self.names) if c is None else index[c] for c in choice], np.int32)
        flat = tree.flatten(self.stacked)
        n_layers = next(iter(flat.values())).shape[0]
        rows = jnp.asarray(np.broadcast_to(ids, (n_layers, len(ids))))  # (L, B): scanned over layers with the rest
        modules = {p.rsplit("/", 1)[0] for p in flat}
        return tree.unflatten({**flat, **{f"{m}/rows": rows for m in modules}})


def stack(base: dict, adapters: Mapping[str, tuple[dict, LoraSpec]]) -> MultiLora:
    """Stacks named (trainable tree, LoraSpec) adapters of the base `base` (needed for DoRA's norms only).

    The stacking is done on the host (adapters are small): one device array per stacked leaf, no compilation
    per shape; DoRA's norms, which read the base weights, are computed where those are.
    """
    if not adapters:
        raise ValueError("stack needs at least one adapter")
    flat = {name: tree.flatten(t) for name, (t, _) in adapters.items()}
    rank = max(spec.rank for _, spec in adapters.values())
    modules = sorted({p.rsplit("/", 1)[0] for f in flat.values() for p in f})
    base_flat = tree.flatten(base)
    out = {}
    for module in modules:
        w = base_flat[f"{module}/w"]
        n_layers, d_in, d_out = w.shape
        a = np.zeros((n_layers, len(adapters), d_in, rank), np.float32)
        b = np.zeros((n_layers, len(adapters), rank, d_out), np.float32)
        scale = np.ones((n_layers, len(adapters), d_out), np.float32)
        for n, (name, (_, spec)) in enumerate(adapters.items()):
            if f"{module}/lora_a" not in flat[name]:
                continue  # zeros: this adapter leaves the module alone
            la, lb = flat[name][f"{module}/lora_a"], flat[name][f"{module}/lora_b"]
            a[:, n, :, :spec.rank] = np.asarray(la, np.float32)
            b[:, n, :spec.rank, :] = np.asarray(lb, np.float32) * np.float32(spec.scaling)
            if spec.dora:
                scale[:, n] = np.asarray(_dora_scale(w, la, lb, flat[name][f"{module}/magnitude"], spec.scaling))
        out[f"{module}/lora_a"] = jnp.asarray(a)
        out[f"{module}/lora_b"] = jnp.asarray(b)
        if any(spec.dora and f"{module}/magnitude" in flat[name] for name, (_, spec) in adapters.items()):
            out[f"{module}/dora_scale"] = jnp.asarray(scale)
    return MultiLora(names=tuple(adapters), stacked=tree.unflatten(out))


@jax.jit
def _dora_scale(w, a, b, magnitude, scaling):
    """(L, out): m / ||W + s A B|| per output column, as `lora_delta` and `merge` compute it."""
    merged = as_dense(w, jnp.float32) + scaling * jnp.einsum("lir,lro->lio", a, b).astype(jnp.float32)
    return magnitude.astype(jnp.float32) / jnp.linalg.norm(merged, axis=-2)


def load(base: dict, cfg: LlamaConfig, paths: Mapping[str, str]) -> MultiLora:
    """Loads named LoRA adapters (PEFT or jaxft directories, or workdirs; see `jaxft.export.load_adapter`) onto
    the base `base` of config `cfg` and stacks them. Adapters of other methods are used one per call
    (`generate(..., trainable=, peft=)`): loading one here is an AdapterError naming it."""
    from jaxft.export import load_adapter

    adapters = {}
    for name, path in paths.items():
        trainable, spec = load_adapter(path, cfg)
        if not isinstance(spec, LoraSpec):
            raise AdapterError(f"{path}: adapter {name!r} is a {method_of(spec)} adapter; only LoRA adapters are "
                               f"stacked and chosen per row (pass the others to generate one call at a time)")
        adapters[name] = (trainable, spec)
    return stack(base, adapters)
