"""Adapters in Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

PEFT shares four of jaxft's methods. Each is written as PEFT's `save_pretrained` writes it, and read back
exactly. The tensors of LoRA and IA3 are named after the module paths of the transformers model, which come
from the checkpoint mapping table (<module>: e.g. `model.layers.3.self_attn.q_proj`):

  LORA           base_model.model.<module>.lora_A.weight (R, in), lora_B.weight (out, R) and, for DoRA,
                 lora_magnitude_vector (out,)
  IA3            base_model.model.<module>.ia3_l: (out, 1) scaling the output, or (1, in) scaling the input of
                 a module listed in `feedforward_modules`
  PREFIX_TUNING  prompt_embeddings (P, L*2*K*H)   } see `jaxft.peft.hf_prompts`
  PROMPT_TUNING  prompt_embeddings (P, D)         }

jaxft stacks the layers on a leading L axis and stores linear weights as (in, out), so each PEFT tensor is one
layer's slice (transposed for LoRA). Bottleneck adapters, full and partial fine-tuning and features heads have
no PEFT equivalent: `save` refuses them with what to do instead.

Reading is strict: an `adapter_config.json` option that changes what the adapter computes and that jaxft does
not implement (another method, trained biases, per-module ranks, layer subsets, ...) is an error that names
it, never ignored.
"""

from __future__ import annotations

import json
import re
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
from jaxft.peft import shapes
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, MethodSpec, as_method, method_of

__all__ = ["CONFIG", "EXPORTABLE", "WEIGHTS", "AdapterError", "check_tree", "check_writable", "is_peft_dir", "load",
           "read_config", "save"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's own module paths
EXPORTABLE = ("lora", "ia3", "prefix", "prompt")  # the jaxft methods PEFT has
PEFT_TYPES = ("LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING")  # what `load` reads
_NO_PEFT = {  # why the other methods have no PEFT export, and what to do instead
    "adapter": "PEFT has no bottleneck adapters, and they cannot be merged into the base either; keep the jaxft "
               "adapter (jaxft generate --adapter)",
    "full": "full fine-tuning replaces the base weights, which a PEFT adapter does not hold; export it merged "
            "(--merged OUT), a plain transformers model",
    "partial": "partial fine-tuning replaces base weights, which a PEFT adapter does not hold; export it merged "
               "(--merged OUT), a plain transformers model",
    "features": "a features head is a classifier beside the unchanged model, with nothing to load into it or "
                "merge; keep the jaxft adapter (jaxft.peft.features.classify)",
}

# PEFT tensor suffix -> (jaxft leaf, transposed): PEFT stores torch's (out, in) layout.
_LORA_TENSORS = {"lora_A.weight": ("lora_a", True), "lora_B.weight": ("lora_b", True),
                 "lora_magnitude_vector": ("magnitude", False)}
# Values of init_lora_weights that leave the base weights as they were: anything else (PiSSA, OLoRA, CorDA,
# LoftQ, MiCA) trains against a modified base that the adapter alone cannot reproduce.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# adapter_config.json fields of every method with no effect on what the adapter computes.
_BOOKKEEPING = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                "peft_version"}
# Per method: the fields read, or without effect on a trained adapter (matter only at initialization or inside
# PEFT's own training, or name modules whose tensors say the same); every other field must be unset.
_LORA_FIELDS = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "bias",
                "target_modules", "exclude_modules", "layers_pattern", "megatron_core", "qalora_group_size",
                "runtime_config", "ensure_weight_tying", "eva_config"}
_IA3_FIELDS = {"target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights"}


def is_peft_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def check_writable(out_dir: Path, overwrite: bool) -> None:
    """Raises FileExistsError where writing `out_dir` would replace files and `overwrite` is not set."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


def check_exportable(spec) -> None:
    """Raises AdapterError naming the method, and what to do instead, unless PEFT has its equivalent."""
    method = method_of(spec)
    if method not in EXPORTABLE:
        raise AdapterError(f"a {method} adapter has no HF PEFT equivalent (PEFT shares {', '.join(EXPORTABLE)}): "
                           f"{_NO_PEFT[method]}")


def save(out_dir, trainable: dict, spec, cfg: LlamaConfig, *, base_model: str, tokenizer=None,
         run: dict | None = None, overwrite: bool = False) -> Path:
    """Writes a trainable tree of a method PEFT shares (LoRA / rsLoRA / DoRA, IA3, prefix or prompt tuning) as a
    PEFT adapter directory that `PeftModel.from_pretrained` loads onto the transformers model of `base_model`
    (written as `base_model_name_or_path`).

    trainable, spec: as `jaxft.peft.sources.load` returns them (spec a LoraSpec or a MethodSpec; the layouts are
    in `jaxft.peft.method`). run: the training config the adapter came from (config.json, as a dict), for the
    initialization settings PEFT records and the adapter does not carry (lora.init, prefix.projection,
    prompt.init); None when unknown. The tokenizer, when given, is saved beside the adapter. The directory is
    written under a temporary name and renamed into place; an existing non-empty `out_dir` is an error unless
    `overwrite`. Raises AdapterError for another method, or a tree that does not fit a base of `cfg`.
    """
    out_dir = Path(out_dir)
    check_exportable(spec)
    check_writable(out_dir, overwrite)
    shapes.check(trainable, spec, cfg, "the trainable tree")
    flat = {p: np.asarray(x, np.float32) for p, x in tree.items(trainable)}
    run = run or {}
    method = method_of(spec)
    if method == "lora":
        tensors, config, what = _lora_save(flat, spec if isinstance(spec, LoraSpec) else spec.lora, cfg, run)
    elif method == "ia3":
        tensors, config, what = _ia3_save(flat, cfg)
    else:
        from jaxft.peft import hf_prompts
        tensors, config, what = hf_prompts.save(flat, as_method(spec), cfg, run, base_model)
    config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
              "inference_mode": True, "auto_mapping": None, **config}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(f"---\nbase_model: {base_model}\nlibrary_name: peft\n---\n\n"
                                       f"A {what} adapter exported by jaxft.\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load(path, cfg: LlamaConfig) -> tuple[dict, LoraSpec | MethodSpec]:
    """(trainable tree, spec) of the PEFT adapter directory `path`, for a base model of `cfg`: a LoraSpec for
    LORA, else the MethodSpec of ia3, prefix or prompt. The tree is float32 numpy.

    Raises AdapterError for a method or option jaxft does not implement, an unexpected or missing tensor, or one
    whose shape does not fit the config and the base model of `cfg`.
    """
    path = Path(path)
    conf = read_config(path)
    source = str(path / CONFIG)
    peft_type = conf.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported (jaxft reads LORA adapters, with "
                           f"use_rslora and use_dora, IA3, PREFIX_TUNING and PROMPT_TUNING)")
    if conf.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{source}: task_type {conf['task_type']!r} is not supported (jaxft runs CAUSAL_LM "
                           f"models)")
    file = path / WEIGHTS
    if not file.is_file():
        extra = " (adapter_model.bin is not read: re-save it with safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{file}: not found{extra}")
    arrays = _read_tensors(file)
    if peft_type == "LORA":
        spec = _lora_spec(conf, source)
        trainable = _lora_tree(arrays, spec, cfg, file)
    elif peft_type == "IA3":
        refuse_unknown(conf, _IA3_FIELDS, source, "IA3 vectors of the linear layers")
        trainable, spec = _ia3_tree(arrays, conf.get("feedforward_modules"), cfg, file), MethodSpec("ia3")
    else:
        from jaxft.peft import hf_prompts
        trainable, spec = hf_prompts.load(conf, arrays, cfg, source, file)
    shapes.check(trainable, spec, cfg, str(file))
    return trainable, spec


def check_tree(trainable: dict, spec, cfg: LlamaConfig, source: str) -> None:
    """Raises AdapterError unless `trainable` fits a base model of `cfg` (see `jaxft.peft.shapes.check`)."""
    shapes.check(trainable, spec, cfg, source)


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


def refuse_unknown(conf: dict, fields: set[str], source: str, what: str) -> None:
    """Raises AdapterError naming the first field of `conf` that is set and is neither bookkeeping nor one of
    the method's `fields`: an option that would make jaxft compute something else than PEFT."""
    for key, value in sorted(conf.items()):
        if key not in _BOOKKEEPING and key not in fields and value not in (None, False, {}, []):
            raise AdapterError(f"{source}: {key}={json.dumps(value)} is not supported by jaxft (it changes what the "
                               f"adapter computes; jaxft reads {what})")


def tensor_names(cfg: LlamaConfig, suffixes) -> dict[str, tuple[str, int, str]]:
    """Every PEFT tensor name `<PREFIX><module>.<suffix>` a model of `cfg` can have -> (jaxft module, layer,
    suffix), over its layered linear weights."""
    return {f"{PREFIX}{hf.format(i=i)}.{suffix}": (module, i, suffix) for module, hf in _modules(cfg).items()
            for i in range(cfg.n_layers) for suffix in suffixes}


def _lora_save(flat: dict, spec: LoraSpec, cfg: LlamaConfig, run: dict):
    modules = _modules(cfg)
    adapted = sorted({p.rsplit("/", 1)[0] for p in flat})
    tensors = {}
    for module in adapted:
        for suffix, (leaf, transpose) in _LORA_TENSORS.items():
            for i, x in enumerate(flat.get(f"{module}/{leaf}", ())):
                tensors[f"{PREFIX}{modules[module].format(i=i)}.{suffix}"] = x.T if transpose else x
    alpha = spec.alpha
    init = run.get("lora", {}).get("init", "kaiming")
    # As PEFT's LoraConfig writes it (its other fields keep their defaults when read).
    config = {
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": spec.dropout, "target_modules": _target_names([modules[m] for m in adapted], modules),
        "exclude_modules": None, "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.rslora,
        "use_dora": spec.dora, "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "lora_bias": False,
    }
    name = "DoRA" if spec.dora else "rsLoRA" if spec.rslora else "LoRA"
    return tensors, config, f"{name} (rank {spec.rank})"


def _lora_tree(arrays: dict, spec: LoraSpec, cfg: LlamaConfig, file: Path) -> dict:
    names = tensor_names(cfg, _LORA_TENSORS)
    adapted = {names[n][0] for n in arrays if n in names}
    wanted = {n: v for n, v in names.items()
              if v[0] in adapted and (spec.dora or _LORA_TENSORS[v[2]][0] != "magnitude")}
    _refuse_strays(arrays, wanted, file, f"LoRA{'/DoRA' if spec.dora else ''} tensors of the linear layers, all "
                                         f"{cfg.n_layers} layers of each adapted module")
    layers: dict[str, list] = {}
    for name, (module, layer, suffix) in wanted.items():
        leaf, transpose = _LORA_TENSORS[suffix]
        layers.setdefault(f"{module}/{leaf}", [None] * cfg.n_layers)[layer] = arrays[name].T if transpose else \
            arrays[name]
    return _stacked(layers, file)


def _lora_spec(conf: dict, source: str) -> LoraSpec:
    """The LoraSpec of a PEFT config, refusing any setting that would make jaxft compute something else."""
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={conf['bias']!r} (trained biases) is not supported; only bias='none'")
    init = conf.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterError(f"{source}: init_lora_weights={init!r} is not supported: that initialization changes "
                           f"the base weights (or the LoRA arithmetic), which the adapter alone does not carry; "
                           f"convert it with PEFT's path_initial_model_for_weight_conversion first")
    refuse_unknown(conf, _LORA_FIELDS, source, "plain LoRA, rsLoRA and DoRA")
    r, alpha, dropout = conf.get("r", 8), conf.get("lora_alpha", 8), conf.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{source}: r={r!r} is not a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{source}: lora_alpha={alpha!r} is not a number")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{source}: lora_dropout={dropout!r} is not a number in [0, 1)")
    return LoraSpec(rank=r, alpha=float(alpha), dropout=float(dropout), rslora=bool(conf.get("use_rslora")),
                    dora=bool(conf.get("use_dora")))


def _ia3_save(flat: dict, cfg: LlamaConfig):
    modules = _modules(cfg)
    tensors, scaled, inputs = {}, [], []
    for path, x in sorted(flat.items()):
        module, leaf = path.rsplit("/", 1)
        scaled.append(modules[module])
        if leaf == "ia3_in":
            inputs.append(modules[module])
        for i, v in enumerate(x):  # (L, in) -> (1, in) per layer; (L, out) -> (out, 1)
            tensors[f"{PREFIX}{modules[module].format(i=i)}.ia3_l"] = v[None, :] if leaf == "ia3_in" else v[:, None]
    # As PEFT's IA3Config writes it.
    config = {"peft_type": "IA3", "target_modules": _target_names(scaled, modules), "exclude_modules": None,
              "feedforward_modules": _target_names(inputs, modules), "fan_in_fan_out": False,
              "modules_to_save": None, "init_ia3_weights": True}
    return tensors, config, "IA3"


def _ia3_tree(arrays: dict, feedforward, cfg: LlamaConfig, file: Path) -> dict:
    names = tensor_names(cfg, ("ia3_l",))
    adapted = {names[n][0] for n in arrays if n in names}
    wanted = {n: v for n, v in names.items() if v[0] in adapted}
    _refuse_strays(arrays, wanted, file, f"IA3 vectors of the linear layers, all {cfg.n_layers} layers of each "
                                         f"adapted module")
    base, modules = expected_shapes(cfg), _modules(cfg)
    layers: dict[str, list] = {}
    for name, (module, layer, _) in wanted.items():
        x = arrays[name]
        _, d_in, d_out = base[f"{module}/w"]
        # Scaled at the input where PEFT's rule says so (feedforward_modules: a regex the module path must match,
        # or names it must end with); a config without the list is read from the shapes.
        hf = modules[module].format(i=layer)
        if feedforward is None:
            at_input = x.shape[:1] == (1,) and x.shape != (1, 1)
        elif isinstance(feedforward, str):
            at_input = re.fullmatch(feedforward, hf) is not None
        else:
            at_input = any(hf.endswith(f) for f in feedforward)
        want = (1, d_in) if at_input else (d_out, 1)
        if x.shape != want:
            raise AdapterError(f"{file}: {name} has shape {x.shape}, but {'a feed-forward' if at_input else 'an'} "
                               f"IA3 vector of this base needs {want}: it was made for another model")
        layers.setdefault(f"{module}/{'ia3_in' if at_input else 'ia3_out'}", [None] * cfg.n_layers)[layer] = \
            x.reshape(-1)
    for path, xs in layers.items():
        if any(x is None for x in xs):
            raise AdapterError(f"{file}: {path.rsplit('/', 1)[0]} is scaled at its input in some layers and at "
                               f"its output in others (feedforward_modules), which jaxft does not represent")
    return _stacked(layers, file)


def _refuse_strays(arrays: dict, wanted: dict, file: Path, what: str) -> None:
    unexpected = [n for n in arrays if n not in wanted]
    missing = [n for n in wanted if n not in arrays]
    if unexpected or missing:
        parts = [f"unexpected tensors {summarize(unexpected)}"] if unexpected else []
        parts += [f"missing tensors {summarize(missing)}"] if missing else []
        raise AdapterError(f"{file}: {'; '.join(parts)} (jaxft reads {what})")


def _stacked(layers: dict[str, list], file: Path) -> dict:
    """jaxft path -> per-layer arrays, stacked on L (float32)."""
    flat = {}
    for path, xs in layers.items():
        found = {x.shape for x in xs}
        if len(found) != 1:
            raise AdapterError(f"{file}: the layers of {path} have different shapes {sorted(found)}")
        flat[path] = np.stack(xs).astype(np.float32)
    return tree.unflatten(flat)


def _target_names(adapted: list[str], modules: dict[str, str]) -> list[str]:
    # PEFT matches a target against the end of a module path: the short name ('q_proj') where it is unique
    # among the model's linear layers, else the path after the layer index ('self_attn.q_proj').
    short = [m.rsplit(".", 1)[1] for m in modules.values()]
    return sorted({m.rsplit(".", 1)[1] if short.count(m.rsplit(".", 1)[1]) == 1 else m.split("{i}.", 1)[1]
                   for m in adapted})


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
