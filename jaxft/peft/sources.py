"""Adapters by path, checked against the base they go on; and `peft.init_from`, training that starts from one.

A path is a Hugging Face PEFT directory (adapter_config.json), a jaxft adapter directory (adapter.json) or a
training workdir (its adapter/). `jaxft generate --adapter`, `jaxft export`, `jaxft.multi` and
`peft.init_from` all read adapters through `load`, which refuses one made for another base (`jaxft.peft.shapes`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft import tree
from jaxft.peft import hf_format, shapes
from jaxft.peft import io as adapter_io
from jaxft.peft.features import FeatureSpec
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, MethodSpec, PeftError, implementation, method_of


def load(path, cfg) -> tuple[dict, LoraSpec | MethodSpec | FeatureSpec]:
    """(trainable tree, spec) of the adapter at `path`, checked against a base model of `cfg`.

    spec: a LoraSpec for LoRA, a FeatureSpec for a features head, the MethodSpec of any other method; the tree
    (float32, the layouts of `jaxft.peft.method`) goes to `llama.forward(cfg, base, tokens, trainable=tree,
    peft=spec)`, `generate` or further training. Raises AdapterError naming the file and what does not fit.
    """
    path = Path(path)
    if hf_format.is_peft_dir(path):
        trainable, spec = hf_format.load(path, cfg)
    elif (path / "adapter.json").is_file():
        trainable, spec, _ = adapter_io.load(path)
        shapes.check(trainable, spec, cfg, str(path / "adapter.safetensors"))
    elif (path / "adapter").is_dir():
        return load(path / "adapter", cfg)
    elif (path / "checkpoints").is_dir():
        raise AdapterError(f"{path}: the run has no adapter/ yet (it has not finished: resume it with "
                           f"`jaxft train --resume`)")
    elif path.exists():
        raise AdapterError(f"{path}: not an adapter (no adapter_config.json or adapter.json) or a training workdir")
    else:
        raise AdapterError(f"{path}: no such directory")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable), spec


def init_from(config, cfg, fresh: dict[str, tuple[int, ...]], spec: MethodSpec) -> dict:
    """The trainable tree of the adapter `config.peft.init_from`, to continue training as `config` says.

    fresh: path -> shape of the tree `jaxft.peft.build` creates for `config`; spec: its MethodSpec. The adapter
    must be that tree: same method, same shaping settings (rank, alpha, targets, lengths, ...), same leaves and
    shapes; a task head it holds (head/..., e.g. from a PEFT SEQ_CLS adapter) is returned with it. Raises
    PeftError naming the config field, its value and the adapter's.
    """
    path, method = config.peft.init_from, config.peft.method
    try:
        with jax.ensure_compile_time_eval():  # concrete arrays, also while the trainer traces `build` under jit
            trainable, loaded = load(path, cfg)
    except (AdapterError, OSError) as e:
        raise PeftError(f"peft.init_from: {e}") from None
    where = f"the adapter at {path} (peft.init_from)"
    if method_of(loaded) != method:
        raise PeftError(f"peft.method={method!r}, but {where} is a {method_of(loaded)!r} adapter")
    # The method's leaves are compared; a task head (head/...) comes back as it is, for the task to keep.
    flat = {p: tuple(x.shape) for p, x in tree.items(trainable) if method == "features" or not p.startswith("head/")}
    settings = getattr(implementation(method), "settings", None)
    for field, want, got, *hint in settings(config, loaded, flat) if settings else ():
        if want != got:
            raise PeftError(f"{field}={want!r}, but {where} has {got!r}{''.join(hint)}")
    # The leaves a config trains are chosen by a setting of the method (lora.targets, ...), which names them.
    setting, by_leaf = getattr(implementation(method), "selection", lambda c: (f"peft.method={method!r}", False))(
        config)
    if set(flat) != set(fresh):
        listed = lambda paths: ", ".join(sorted(paths if by_leaf else {p.rsplit("/", 1)[0] for p in paths}))
        raise PeftError(f"{setting} trains {listed(fresh)}, but {where} has {listed(flat)}")
    layers, loaded_layers = dict(getattr(spec, "layers", ())), dict(getattr(loaded, "layers", ()))
    if layers != loaded_layers:  # a partial fine-tuning's split leaves
        raise PeftError(f"{setting} trains the layers {layers}, but {where} has {loaded_layers}")
    for p, shape in sorted(fresh.items()):
        if flat[p] != tuple(shape):
            raise PeftError(f"{p}: the config trains shape {tuple(shape)}, but {where} has {flat[p]}")
    return trainable
