"""Adapters in Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

Tensors are named as PEFT's `save_pretrained` names them, after the module paths of the transformers model:
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (R, in), `...lora_B.weight` (out, R) and, for
DoRA, `...lora_magnitude_vector` (out,). The module paths come from the checkpoint mapping table. jaxft stacks
the layers on a leading L axis and stores (in, out), so each PEFT tensor is one layer's slice, transposed: the
conversion is exact both ways.

Reading is strict: an `adapter_config.json` option that changes what the adapter computes and that jaxft does
not implement (another method, trained biases, per-module ranks, layer subsets, ...) is an error that names
it, never ignored. Only LoRA (with rsLoRA and DoRA) exists in jaxft today; another method adds its own
`peft_type` with a config writer and a tensor table beside `_lora_config` and `_LORA_TENSORS`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxft import tree
from jaxft.checkpoint.assemble import expected_shapes, summarize
from jaxft.checkpoint.hf import _replace_dir
from jaxft.checkpoint.mapping import TABLES, hf_module
from jaxft.models.config import LlamaConfig
from jaxft.peft.lora import LoraSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's own module paths

# PEFT tensor suffix -> (jaxft leaf, transposed): PEFT stores torch's (out, in) layout.
_LORA_TENSORS = {"lora_A.weight": ("lora_a", True), "lora_B.weight": ("lora_b", True),
                 "lora_magnitude_vector": ("magnitude", False)}
# Values of init_lora_weights that leave the base weights as they were: anything else (PiSSA, OLoRA, CorDA,
# LoftQ, MiCA) trains against a modified base that the adapter alone cannot reproduce.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# adapter_config.json fields with no effect on what a trained adapter computes (bookkeeping, or settings that
# matter only at initialization or inside PEFT's own training); every other field must be unset.
_INERT = {"auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
          "target_modules", "exclude_modules", "layers_pattern", "megatron_core", "qalora_group_size",
          "runtime_config", "ensure_weight_tying", "eva_config"}
_READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
         "init_lora_weights", "bias"}


class AdapterError(ValueError):
    """An adapter jaxft cannot use as it stands; the one-line message names the file and the field or tensor."""


def is_peft_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def check_writable(out_dir: Path, overwrite: bool) -> None:
    """Raises FileExistsError where writing `out_dir` would replace files and `overwrite` is not set."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


def save(out_dir, trainable: dict, spec: LoraSpec, cfg: LlamaConfig, *, base_model: str, tokenizer=None,
         init_lora_weights: bool | str = True, overwrite: bool = False) -> Path:
    """Writes a LoRA/rsLoRA/DoRA trainable tree as a PEFT adapter directory that `PeftModel.from_pretrained`
    loads onto the transformers model of `base_model` (written as `base_model_name_or_path`).

    trainable: `<module>/lora_a` (L, in, R), `lora_b` (L, R, out), `magnitude` (L, out) for DoRA. The tokenizer,
    when given, is saved beside the adapter. The directory is written under a temporary name and renamed into
    place; an existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)
    check_tree(trainable, spec, cfg, "the trainable tree")
    modules = _modules(cfg)
    flat = tree.flatten(trainable)
    adapted = sorted({p.rsplit("/", 1)[0] for p in flat})
    tensors = {}
    for module in adapted:
        for suffix, (leaf, transpose) in _LORA_TENSORS.items():
            if f"{module}/{leaf}" not in flat:
                continue
            stacked = np.asarray(flat[f"{module}/{leaf}"], np.float32)
            for i, x in enumerate(stacked):
                tensors[f"{PREFIX}{modules[module].format(i=i)}.{suffix}"] = np.ascontiguousarray(
                    x.T if transpose else x)
    config = _lora_config(spec, _target_names([modules[m] for m in adapted], list(modules.values())), base_model,
                          init_lora_weights)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(f"---\nbase_model: {base_model}\nlibrary_name: peft\n---\n\n"
                                       f"A {_method_name(spec)} adapter (rank {spec.rank}) exported by jaxft.\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load(path, cfg: LlamaConfig) -> tuple[dict, LoraSpec]:
    """(trainable tree, LoraSpec) of the PEFT adapter directory `path`, for a base model of `cfg`.

    Raises AdapterError for an option jaxft does not implement, an unexpected or missing tensor, or one whose
    shape does not fit the config's rank and the base model of `cfg`.
    """
    path = Path(path)
    conf = read_config(path)
    spec = _lora_spec(conf, str(path / CONFIG))
    file = path / WEIGHTS
    if not file.is_file():
        extra = " (adapter_model.bin is not read: re-save it with safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{file}: not found{extra}")
    arrays = _read_tensors(file)
    names = {}  # every LoRA tensor name a model of `cfg` can have -> (jaxft module, leaf, layer, transposed)
    for module, hf in _modules(cfg).items():
        for i in range(cfg.n_layers):
            for suffix, (leaf, transpose) in _LORA_TENSORS.items():
                names[f"{PREFIX}{hf.format(i=i)}.{suffix}"] = (module, leaf, i, transpose)
    adapted = {names[n][0] for n in arrays if n in names}
    wanted = {n: v for n, v in names.items() if v[0] in adapted and (spec.dora or v[1] != "magnitude")}
    unexpected = [n for n in arrays if n not in wanted]
    missing = [n for n in wanted if n not in arrays]
    if unexpected or missing:
        parts = [f"unexpected tensors {summarize(unexpected)}"] if unexpected else []
        parts += [f"missing tensors {summarize(missing)}"] if missing else []
        raise AdapterError(f"{file}: {'; '.join(parts)} (jaxft reads LoRA{'/DoRA' if spec.dora else ''} tensors "
                           f"of the linear layers, all {cfg.n_layers} layers of each adapted module)")
    layers: dict[str, list] = {}
    for name, (module, leaf, layer, transpose) in wanted.items():
        x = arrays[name]
        layers.setdefault(f"{module}/{leaf}", [None] * cfg.n_layers)[layer] = x.T if transpose else x
    flat = {}
    for jpath, xs in layers.items():
        shapes = {x.shape for x in xs}
        if len(shapes) != 1:
            raise AdapterError(f"{file}: the layers of {jpath} have different shapes {sorted(shapes)}")
        flat[jpath] = np.stack(xs).astype(np.float32)
    trainable = tree.unflatten(flat)
    check_tree(trainable, spec, cfg, str(file))
    return trainable, spec


def check_tree(trainable: dict, spec: LoraSpec, cfg: LlamaConfig, source: str) -> None:
    """Raises AdapterError unless `trainable` is a LoRA tree of rank `spec.rank` for a base model of `cfg`."""
    shapes = expected_shapes(cfg)
    about = (f"this base is a {cfg.model_type} model with {cfg.n_layers} layers, width {cfg.dim}, mlp width "
             f"{cfg.mlp_dim}, {cfg.n_heads} heads of {cfg.head_dim}, {cfg.n_kv_heads} kv heads")
    flat = tree.flatten(trainable)
    if not flat:
        raise AdapterError(f"{source}: the adapter holds no tensors")
    modules = sorted({p.rsplit("/", 1)[0] for p in flat})
    for module in modules:
        w = shapes.get(f"{module}/w")
        if w is None or len(w) != 3:
            raise AdapterError(f"{source}: {module} is not a linear layer of the base model ({about})")
        n_layers, d_in, d_out = w
        want = {"lora_a": (n_layers, d_in, spec.rank), "lora_b": (n_layers, spec.rank, d_out)}
        if spec.dora:
            want["magnitude"] = (n_layers, d_out)
        leaves = {p.rsplit("/", 1)[1] for p in flat if p.rsplit("/", 1)[0] == module}
        if leaves != set(want):
            raise AdapterError(f"{source}: {module} holds {sorted(leaves)}, expected {sorted(want)} for a "
                               f"{'DoRA' if spec.dora else 'LoRA'} adapter")
        for leaf, shape in want.items():
            got = tuple(flat[f"{module}/{leaf}"].shape)
            if got != shape:
                raise AdapterError(f"{source}: {module}/{leaf} has shape {got}, but a rank-{spec.rank} adapter "
                                   f"of this base needs {shape}: it was made for another model ({about})")


def read_config(path) -> dict:
    """The parsed adapter_config.json of the directory `path`."""
    file = Path(path) / CONFIG
    try:
        conf = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{file}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return conf


def _lora_config(spec: LoraSpec, target_modules: list[str], base_model: str, init_lora_weights) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (its other fields keep their defaults when read)."""
    alpha = spec.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": spec.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": spec.dropout, "target_modules": target_modules, "exclude_modules": None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.rslora, "use_dora": spec.dora,
        "init_lora_weights": init_lora_weights, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "auto_mapping": None,
    }


def _target_names(adapted: list[str], every: list[str]) -> list[str]:
    # PEFT matches a target against the end of a module path: the short name ('q_proj') where it is unique
    # among the model's linear layers, else the path after the layer index ('self_attn.q_proj').
    short = [m.rsplit(".", 1)[1] for m in every]
    return sorted(m.rsplit(".", 1)[1] if short.count(m.rsplit(".", 1)[1]) == 1 else m.split("{i}.", 1)[1]
                  for m in adapted)


def _lora_spec(conf: dict, file: str) -> LoraSpec:
    """The LoraSpec of a PEFT config, refusing any setting that would make jaxft compute something else."""
    if conf.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type {conf.get('peft_type')!r} is not supported (jaxft reads LORA "
                           f"adapters, with use_rslora and use_dora)")
    if conf.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{file}: task_type {conf['task_type']!r} is not supported (jaxft runs CAUSAL_LM "
                           f"models)")
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={conf['bias']!r} (trained biases) is not supported; only bias='none'")
    init = conf.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterError(f"{file}: init_lora_weights={init!r} is not supported: that initialization changes the "
                           f"base weights (or the LoRA arithmetic), which the adapter alone does not carry; convert "
                           f"it with PEFT's path_initial_model_for_weight_conversion first")
    for key, value in sorted(conf.items()):
        if key not in _INERT and key not in _READ and value not in (None, False, {}, []):
            raise AdapterError(f"{file}: {key}={json.dumps(value)} is not supported by jaxft (it changes what the "
                               f"adapter computes; jaxft reads plain LoRA, rsLoRA and DoRA)")
    r, alpha, dropout = conf.get("r", 8), conf.get("lora_alpha", 8), conf.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{file}: r={r!r} is not a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{file}: lora_alpha={alpha!r} is not a number")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{file}: lora_dropout={dropout!r} is not a number in [0, 1)")
    return LoraSpec(rank=r, alpha=float(alpha), dropout=float(dropout), rslora=bool(conf.get("use_rslora")),
                    dora=bool(conf.get("use_dora")))


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    # Through JAX rather than numpy: adapters saved from a bfloat16 model hold bfloat16 tensors.
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    try:
        return {k: np.asarray(v, np.float32) for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None


def _modules(cfg: LlamaConfig) -> dict[str, str]:
    """jaxft module path -> HF module path with `{i}` for the layer, for each layered linear weight of `cfg`:
    'layers/attn/q_proj' -> 'model.layers.{i}.self_attn.q_proj'."""
    table = TABLES[cfg.model_type]
    return {e.path.rsplit("/", 1)[0]: hf_module(e.path, table) for e in table
            if e.transpose and "{i}" in e.hf and e.path.endswith("/w")}


def _method_name(spec: LoraSpec) -> str:
    return "DoRA" if spec.dora else "rsLoRA" if spec.rslora else "LoRA"
