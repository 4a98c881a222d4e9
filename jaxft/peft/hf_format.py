"""Adapters in Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

PEFT shares four of jaxft's methods. Each is written as PEFT's `save_pretrained` writes it, and read back
exactly. The tensors of LoRA and IA3 are named after the module paths inside the transformers class PEFT wraps,
which come from the family's checkpoint mapping table (`jaxft.models.family(model_type).TABLE`) and the class
(`jaxft.checkpoint.mapping.peft_class`): <module> is e.g. `model.layers.3.self_attn.q_proj` (LlamaFor...),
`bert.encoder.layer.3.attention.self.query` (BertFor...; `encoder.layer.3...` in BertModel) or
`decoder.block.3.layer.1.EncDecAttention.q` (T5ForConditionalGeneration):

  LORA           base_model.model.<module>.lora_A.weight (R, in), lora_B.weight (out, R) and, for DoRA,
                 lora_magnitude_vector (out,); on a mixture of experts' experts and router, PEFT's
                 `target_parameters` (see `jaxft.peft.hf_experts`)
  IA3            base_model.model.<module>.ia3_l: (out, 1) scaling the output, or (1, in) scaling the input of
                 a module listed in `feedforward_modules`
  PREFIX_TUNING  prompt_embeddings (P, L*2*K*H)   } see `jaxft.peft.hf_prompts` (T5: (P, 2*Ld*2*N*H) and
  PROMPT_TUNING  prompt_embeddings (P, D)         }  (2P, D), PEFT's SEQ_2_SEQ_LM layout)

  a task head    base_model.model.<classifier|score>.weight (C, D) and .bias (C,), listed in `modules_to_save`
                 (jaxft's head/classifier or head/score: the class's own module, which PEFT saves whole);
                 base_model.<classifier|score>... beside prefix and prompt tuning

Export writes for the class of the adapter's task (`run["task"]`: classification -> ...ForSequenceClassification,
mlm -> BertForMaskedLM, seq2seq -> T5ForConditionalGeneration, ...) or the class named by `base_class`; import
reads either naming (with or without `bert.`, with or without `model.`).

jaxft stacks the layers on a leading L axis and stores linear weights as (in, out), so each PEFT tensor is one
layer's slice (transposed for LoRA). Bottleneck adapters, full and partial fine-tuning and features heads have
no PEFT equivalent: `save` refuses them with what to do instead.

Reading is strict: an `adapter_config.json` option that changes what the adapter computes and that jaxft does
not implement (another method, trained biases, per-module ranks, layer subsets, ...) is an error that names
it, never ignored.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxft import tree
from jaxft.checkpoint import mapping
from jaxft.checkpoint.assemble import expected_shapes, summarize
from jaxft.checkpoint.hf import _replace_dir
from jaxft.models import family_of
from jaxft.models.config import LlamaConfig
from jaxft.peft import hf_experts, hf_prompts, parts, shapes
from jaxft.peft.hf_prompts import refuse_unknown
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, MethodSpec, as_method, method_of

__all__ = ["CONFIG", "EXPORTABLE", "WEIGHTS", "AdapterError", "check_tree", "check_writable", "is_peft_dir", "load",
           "read_config", "save", "target_class", "task_head"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's own module paths
PROMPT_PREFIX = "base_model."  # the same under prefix and prompt tuning, which wrap no tuner around the model
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
# Per method: the fields read, or without effect on a trained adapter (matter only at initialization or inside
# PEFT's own training, or name modules whose tensors say the same); every other field must be unset.
_LORA_FIELDS = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "bias",
                "target_modules", "exclude_modules", "layers_pattern", "megatron_core", "qalora_group_size",
                "runtime_config", "ensure_weight_tying", "eva_config",
                "target_parameters", "rank_pattern", "alpha_pattern"}  # the last three: read by hf_experts
_IA3_FIELDS = {"target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights"}
# PEFT task_type -> the model kinds (`family.KIND`) jaxft reads it for (None: any).
_TASK_TYPES = {None: None, "CAUSAL_LM": ("decoder",), "SEQ_2_SEQ_LM": ("encoder-decoder",),
               "SEQ_CLS": ("encoder", "decoder"), "TOKEN_CLS": ("encoder", "decoder"), "FEATURE_EXTRACTION": None}
_HEADS = ("classifier", "score")  # the transformers modules of jaxft's task heads (head/classifier, head/score)


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


def target_class(cfg, task: str | None = None, base_class: str | None = None) -> mapping.PeftClass:
    """The transformers class an adapter of `cfg` is exported for (see `jaxft.checkpoint.mapping.peft_class`):
    `base_class` where given, else the class of the jaxft `task`, else the class `cfg.to_hf()` names."""
    try:
        return mapping.peft_class(cfg, task, base_class)
    except KeyError as e:
        raise AdapterError(f"base class: {e.args[0]}") from None


def save(out_dir, trainable: dict, spec, cfg: LlamaConfig, *, base_model: str, tokenizer=None,
         run: dict | None = None, overwrite: bool = False, base_class: str | None = None) -> Path:
    """Writes a trainable tree of a method PEFT shares (LoRA / rsLoRA / DoRA, IA3, prefix or prompt tuning) as a
    PEFT adapter directory that `PeftModel.from_pretrained` loads onto the transformers model of `base_model`
    (written as `base_model_name_or_path`).

    trainable, spec: as `jaxft.peft.sources.load` returns them (spec a LoraSpec or a MethodSpec; the layouts are
    in `jaxft.peft.method`), with the task head under `head/` where the run trained one (written as PEFT's
    `modules_to_save`). run: the training config the adapter came from (config.json, as a dict), for the task
    (`run["task"]`, which picks the transformers class: see `target_class`; `run["head"]["pool"]`) and the
    initialization settings PEFT records and the adapter does not carry (lora.init, prefix.projection,
    prompt.init); None when unknown. base_class: the transformers class to write for (e.g. "BertModel"),
    instead of the task's. The tokenizer, when given, is saved beside the adapter. The directory is written under
    a temporary name and renamed into place; an existing non-empty `out_dir` is an error unless `overwrite`.
    Raises AdapterError for another method, a head the class has no module for, or a tree that does not fit a
    base of `cfg`.
    """
    out_dir = Path(out_dir)
    check_exportable(spec)
    check_writable(out_dir, overwrite)
    shapes.check(trainable, spec, cfg, "the trainable tree")
    run = run or {}
    flat = {p: np.asarray(x, np.float32) for p, x in tree.items(trainable)}
    saved_parts: dict = {}
    if isinstance(spec, parts.PartsSpec):  # the language model's method on its own, the parts as modules_to_save
        saved_parts, flat, target = _parts_save(flat, spec, cfg, base_class)
        cfg, spec = cfg.text, parts.text_spec(spec)
    else:
        target = target_class(cfg, run.get("task"), base_class)
    head = {p: x for p, x in flat.items() if p.startswith("head/")}
    flat = {p: x for p, x in flat.items() if not p.startswith("head/")}
    method = method_of(spec)
    head_prefix = PREFIX if method in ("lora", "ia3") else PROMPT_PREFIX
    head_tensors = {head_prefix + k: v for k, v in task_head(head, target, cfg, run).items()}
    if method == "lora":
        tensors, config, what = _lora_save(flat, spec if isinstance(spec, LoraSpec) else spec.lora, cfg, run,
                                           target.prefix)
    elif method == "ia3":
        tensors, config, what = _ia3_save(flat, cfg, target.prefix)
    else:
        tensors, config, what = hf_prompts.save(flat, as_method(spec), cfg, run, base_model, target)
    if saved_parts:  # a regex over whole paths: the tower's q_proj / v_proj must not match the language model's
        adapted = sorted({re.sub(r"\.\d+\.", ".{i}.", n.removeprefix(PREFIX).rsplit(".", 2)[0], count=1)
                          for n in tensors if n.endswith("lora_A.weight")})
        config["target_modules"] = "(" + "|".join(re.escape(t).replace(r"\{i\}", r"\d+") for t in adapted) + ")"
        tensors.update(saved_parts["tensors"])
    auto = None
    if target.task_type is None:  # PEFT records the class it wrapped where no task type says it
        module = saved_parts.get("model_type", cfg.model_type)
        auto = {"base_model_class": target.name, "parent_library": f"transformers.models.{module}.modeling_{module}"}
    config = {"task_type": target.task_type, "base_model_name_or_path": base_model, "revision": None,
              "inference_mode": True, "auto_mapping": auto, **config}
    if head_tensors:
        tensors.update(head_tensors)
        config["modules_to_save"] = [target.head]
    if saved_parts.get("modules"):
        config["modules_to_save"] = saved_parts["modules"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(f"---\nbase_model: {base_model}\nlibrary_name: peft\n---\n\n"
                                       f"A {what} adapter for {target.name}, exported by jaxft.\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _parts_save(flat: dict, spec, cfg, base_class: str | None):
    """A vision-language model's parts for PEFT: ({"tensors": the trained projector's weights under their module
    path, "modules": its module for `modules_to_save`, "model_type"}, the language model's leaves, the class PEFT
    wraps). Raises AdapterError for what has no PEFT export yet (a LoRA part, a fully trained tower)."""
    from_class = {"llava": "LlavaForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}
    name = from_class[cfg.model_type]
    if base_class not in (None, name):
        raise AdapterError(f"base class: {base_class!r} is not the class of a {cfg.model_type} model ({name})")
    if spec.method != "lora":
        raise AdapterError(f"a {cfg.model_type} adapter exports to PEFT with LoRA on the language model, not "
                           f"{spec.method}; export it merged (--merged OUT) where its method merges")
    methods = dict(spec.part_methods)
    for part, method in methods.items():
        if method == "lora" or (part == "vision" and method == "full"):
            raise AdapterError(f"{part}.method={method!r} has no PEFT export yet (PEFT exports the language model's "
                               f"LoRA and a trained projector); export it merged (--merged OUT)")
    tensors, modules = {}, []
    if methods.get("projector") == "full":
        rows = [e for e in family_of(cfg).table(cfg.model_type) if e.path.startswith("projector/")]
        for e in rows:
            if e.path in flat:
                tensors[PREFIX + e.hf] = flat[e.path].T if e.transpose else flat[e.path]
        modules = [rows[0].hf.split(".")[1]]  # "multi_modal_projector" (the module PEFT saves whole)
    text_prefix = family_of(cfg).PREFIXES[cfg.model_type][0]
    target = mapping.PeftClass(name, text_prefix, None, None)
    rest = {p: x for p, x in flat.items() if p.split("/", 1)[0] not in parts.DEFAULTS}
    return {"tensors": tensors, "modules": modules, "model_type": cfg.model_type}, rest, target


def _parts_load(path: Path, conf: dict, cfg, source: str) -> tuple[dict, parts.PartsSpec]:
    """A PEFT LORA adapter of a vision-language model (what `_parts_save` writes, or PEFT over transformers'
    class): the language model's LoRA, and the projector where `modules_to_save` names it (the tower frozen)."""
    if conf.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: peft_type {conf.get('peft_type')!r}: jaxft reads LORA adapters of a "
                           f"{cfg.model_type} model")
    file = path / WEIGHTS
    if not file.is_file():
        raise AdapterError(f"{file}: not found")
    arrays = _read_tensors(file)
    conf = dict(conf)
    saved = conf.pop("modules_to_save", None) or []
    saved = [saved] if isinstance(saved, str) else list(saved)
    rows = [e for e in family_of(cfg).table(cfg.model_type) if e.path.startswith("projector/")]
    module = rows[0].hf.split(".")[1]
    if saved not in ([], [module]):
        raise AdapterError(f"{source}: modules_to_save={json.dumps(saved)} is not supported by jaxft (it reads "
                           f"the projector, {module!r}, there)")
    trainable: dict = {}
    if saved:
        flat = {}
        for e in rows:
            name = PREFIX + e.hf
            if name in arrays:
                x = arrays.pop(name)
                flat[e.path.split("/", 1)[1]] = x.T if e.transpose else x
        trainable["projector"] = tree.unflatten(flat)
    text_prefix = PREFIX + family_of(cfg).PREFIXES[cfg.model_type][0]
    arrays = {PREFIX + "model." + k[len(text_prefix):] if k.startswith(text_prefix) else k: v
              for k, v in arrays.items()}  # the language model's names as LlamaForCausalLM's
    spec = _lora_spec(conf, source)
    trainable.update(_lora_tree(arrays, spec, cfg.text, file, conf, source))
    text = as_method(spec)
    spec = parts.PartsSpec(**{f: getattr(text, f) for f in text.__dataclass_fields__},
                           part_methods=(("vision", "frozen"), ("projector", "full" if saved else "frozen")))
    shapes.check(trainable, spec, cfg, str(file))
    return trainable, spec


def load(path, cfg: LlamaConfig) -> tuple[dict, LoraSpec | MethodSpec]:
    """(trainable tree, spec) of the PEFT adapter directory `path`, for a base model of `cfg`: a LoraSpec for
    LORA, else the MethodSpec of ia3, prefix or prompt. The tree is float32 numpy; a task head PEFT saved in
    `modules_to_save` (classifier / score) is in it under head/classifier or head/score ({w (D, C), b (C,)}).

    Module names are read as any transformers class of the family names them (`bert.encoder...` and
    `encoder...`). Raises AdapterError for a method or option jaxft does not implement, an unexpected or missing
    tensor, or one whose shape does not fit the config and the base model of `cfg`.
    """
    path = Path(path)
    conf = read_config(path)
    source = str(path / CONFIG)
    peft_type = conf.get("peft_type")
    if parts.is_multimodal(cfg):
        return _parts_load(path, conf, cfg, source)
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported (jaxft reads LORA adapters, with "
                           f"use_rslora and use_dora, IA3, PREFIX_TUNING and PROMPT_TUNING)")
    task_type, kind = conf.get("task_type"), family_of(cfg).KIND
    if task_type not in _TASK_TYPES:
        raise AdapterError(f"{source}: task_type {task_type!r} is not supported (jaxft reads "
                           f"{', '.join(t for t in _TASK_TYPES if t)} adapters, or none)")
    if _TASK_TYPES[task_type] and kind not in _TASK_TYPES[task_type]:
        raise AdapterError(f"{source}: task_type {task_type!r} is for {' or '.join(_TASK_TYPES[task_type])} "
                           f"models, and this base is {_a(kind)} model ({cfg.model_type})")
    file = path / WEIGHTS
    if not file.is_file():
        extra = " (adapter_model.bin is not read: re-save it with safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{file}: not found{extra}")
    arrays = _read_tensors(file)
    conf = dict(conf)
    head, arrays = _head_load(arrays, conf.pop("modules_to_save", None), task_type, cfg, source, file,
                              PREFIX if peft_type in ("LORA", "IA3") else PROMPT_PREFIX)
    if peft_type == "LORA":
        spec = _lora_spec(conf, source)
        trainable = _lora_tree(arrays, spec, cfg, file, conf, source)
    elif peft_type == "IA3":
        refuse_unknown(conf, _IA3_FIELDS, source, "IA3 vectors of the linear layers")
        trainable, spec = _ia3_tree(arrays, conf.get("feedforward_modules"), cfg, file), MethodSpec("ia3")
    else:
        trainable, spec = hf_prompts.load(conf, arrays, cfg, source, file)
    if head:
        trainable["head"] = head
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


def tensor_names(cfg: LlamaConfig, suffixes, prefix: str | None = None) -> dict[str, tuple[str, int, str]]:
    """Every PEFT tensor name `<PREFIX><module>.<suffix>` a model of `cfg` can have -> (jaxft module, layer,
    suffix), over its layered linear weights, with the module paths of the class whose backbone prefix is
    `prefix` (None: the TABLE's own naming)."""
    return {f"{PREFIX}{hf.format(i=i)}.{suffix}": (module, i, suffix)
            for module, (hf, n_layers) in _modules(cfg, prefix).items()
            for i in range(n_layers) for suffix in suffixes}


def task_head(head: dict, target: mapping.PeftClass, cfg, run: dict) -> dict[str, np.ndarray]:
    """The transformers tensors ('classifier.weight' (C, D), 'classifier.bias' (C,)) of the task head `head`
    (path -> array: head/<name>/w (D, C), b (C,)) in the class `target`; {} for no head.

    Raises AdapterError where the class has no such module, has a head and the adapter none (it would stay as
    transformers initializes it), or would compute it from other hidden states (head.pool, from run["head"]).
    """
    if not head:
        if target.head:
            raise AdapterError(f"{target.name} has a task head ({target.head}), which PEFT saves with the adapter, "
                               f"and this adapter has none: it would stay as transformers initializes it; export "
                               f"for a class without one (base_class / --base-class)")
        return {}
    names = sorted({p.split("/")[1] for p in head})
    listed = ", ".join(sorted(head))
    if set(names) <= {"transform", "norm", "bias"}:  # a masked-LM head trained from scratch (no checkpoint had one)
        raise AdapterError(f"the adapter's masked-LM head ({listed}) has no form in PEFT's format (PEFT would save "
                           f"the head with its tied embedding); export it merged (--merged OUT)")
    if target.head is None:
        raise AdapterError(f"{target.name} has no task head for the adapter's head ({listed}); export for the "
                           f"class of the task it was trained for (base_class / --base-class)")
    if names != [target.head]:
        raise AdapterError(f"the adapter's head ({listed}) is not {target.name}'s {target.head}")
    pool = run.get("head", {}).get("pool", "default")
    if target.task_type == "SEQ_CLS" and pool != "default":
        expected = "cls" if family_of(cfg).KIND == "encoder" else "last"
        if pool != expected:
            raise AdapterError(f"head.pool={pool!r}: {target.name} reads the {expected} position, so PEFT would "
                               f"compute other logits; train with head.pool='default' to export the head")
    if target.task_type == "SEQ_CLS" and family_of(cfg).KIND == "encoder" and not getattr(cfg, "pooler", True):
        raise AdapterError(f"this base has no pooler, which {target.name} puts before its classifier (jaxft "
                           f"mean-pools instead): PEFT would compute other logits")
    name = target.head
    tensors = {f"{name}.weight": np.asarray(head[f"head/{name}/w"]).T}
    if f"head/{name}/b" in head:
        tensors[f"{name}.bias"] = np.asarray(head[f"head/{name}/b"])
    return tensors


def _head_load(arrays: dict, modules_to_save, task_type, cfg, source: str, file: Path,
               prefix: str) -> tuple[dict, dict]:
    """(the head tree {name: {w, b}} or {}, the other tensors) of a PEFT adapter whose config lists
    `modules_to_save` (PEFT lists the heads twice under prompt learning): jaxft reads the task heads
    (classifier, score) there, named `prefix` + module, nothing else."""
    listed = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    if any(m not in _HEADS for m in listed):
        raise AdapterError(f"{source}: modules_to_save={json.dumps(modules_to_save)} is not supported by jaxft (it "
                           f"changes what the adapter computes; jaxft reads the task heads {' and '.join(_HEADS)} "
                           f"there)")
    found = list(dict.fromkeys(m for m in listed if f"{prefix}{m}.weight" in arrays))
    if not found:
        if task_type in ("SEQ_CLS", "TOKEN_CLS"):
            raise AdapterError(f"{source}: task_type {task_type!r} comes with the task head PEFT saves beside the "
                               f"adapter ({' or '.join(f'{prefix}{m}.weight' for m in _HEADS)}, listed in "
                               f"modules_to_save), and {file.name} holds none")
        return {}, arrays
    kind = family_of(cfg).KIND
    ours = {"encoder": "classifier", "decoder": "score"}.get(kind)
    if found != [ours]:
        raise AdapterError(f"{file}: holds the head {', '.join(found)}; the head of {_a(kind)} model is "
                           f"{ours or 'not read by jaxft'}")
    name = f"{prefix}{ours}"
    head = {"w": arrays[f"{name}.weight"].T}
    if f"{name}.bias" in arrays:
        head["b"] = arrays[f"{name}.bias"]
    rest = {k: v for k, v in arrays.items() if k not in (f"{name}.weight", f"{name}.bias")}
    return {ours: head}, rest


def _lora_save(flat: dict, spec: LoraSpec, cfg: LlamaConfig, run: dict, prefix: str):
    modules = _modules(cfg, prefix)
    moe, flat = hf_experts.split(flat, cfg)  # the experts and router: target_parameters
    adapted = sorted({p.rsplit("/", 1)[0] for p in flat})
    tensors = {}
    for module in adapted:
        for suffix, (leaf, transpose) in _LORA_TENSORS.items():
            for i, x in enumerate(flat.get(f"{module}/{leaf}", ())):
                tensors[f"{PREFIX}{modules[module][0].format(i=i)}.{suffix}"] = x.T if transpose else x
    alpha = spec.alpha
    init = run.get("lora", {}).get("init", "kaiming")
    # As PEFT's LoraConfig writes it (its other fields keep their defaults when read).
    config = {
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": spec.dropout, "target_modules": _target_names(adapted, modules, cfg),
        "exclude_modules": None, "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.rslora,
        "use_dora": spec.dora, "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "lora_bias": False,
    }
    if moe:
        moe_tensors, fields = hf_experts.save(moe, spec, cfg, prefix)
        tensors.update(moe_tensors)
        config.update(fields)
        config["target_modules"] = config["target_modules"] or None
        # PEFT's ParamWrapper refuses dropout; jaxft applies none on the experts, and a trained adapter computes
        # the same without it.
        config["lora_dropout"] = 0.0
    name = "DoRA" if spec.dora else "rsLoRA" if spec.rslora else "LoRA"
    return tensors, config, f"{name} (rank {spec.rank})"


def _lora_tree(arrays: dict, spec: LoraSpec, cfg: LlamaConfig, file: Path, conf: dict, source: str) -> dict:
    backbone, classes = _classes(cfg)
    prefixes = [backbone] + sorted({c.prefix for c in classes.values()} - {backbone})
    linear = [hf.format(i=i) for p in prefixes for m, (hf, n) in _modules(cfg, p).items()
              if not hf_experts.is_moe_leaf(m + "/") for i in range(n)]
    moe, arrays = hf_experts.load(arrays, conf, spec, cfg, prefixes, linear, file, source)
    names = _recognized(arrays, cfg, _LORA_TENSORS)
    adapted = {names[n][0] for n in arrays if n in names}
    # a router adapted as a Linear (transformers 4's `gate`): a Qwen3-MoE's dense layers have none (filler zeros)
    no_router = set(getattr(cfg, "dense_layers", ()))
    wanted = {n: v for n, v in names.items()
              if v[0] in adapted and (spec.dora or _LORA_TENSORS[v[2]][0] != "magnitude")
              and not (v[1] in no_router and hf_experts.is_moe_leaf(v[0] + "/"))}
    _refuse_strays(arrays, wanted, file, f"LoRA{'/DoRA' if spec.dora else ''} tensors of the linear layers, every "
                                         f"layer of each adapted module")
    layers: dict[str, list] = {}
    for name, (module, layer, suffix) in wanted.items():
        leaf, transpose = _LORA_TENSORS[suffix]
        layers.setdefault(f"{module}/{leaf}", [None] * _n_layers(cfg, module))[layer] = \
            arrays[name].T if transpose else arrays[name]
    for xs in layers.values():  # the fillers: zeros shaped as the adapted layers' factors
        like = next(x for x in xs if x is not None)
        xs[:] = [np.zeros_like(like) if x is None else x for x in xs]
    return tree.unflatten({**tree.flatten(_stacked(layers, file)), **moe})


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


def _ia3_save(flat: dict, cfg: LlamaConfig, prefix: str):
    modules = _modules(cfg, prefix)
    tensors, scaled, inputs = {}, [], []
    for path, x in sorted(flat.items()):
        module, leaf = path.rsplit("/", 1)
        scaled.append(module)
        if leaf == "ia3_in":
            inputs.append(module)
        for i, v in enumerate(x):  # (L, in) -> (1, in) per layer; (L, out) -> (out, 1)
            tensors[f"{PREFIX}{modules[module][0].format(i=i)}.ia3_l"] = v[None, :] if leaf == "ia3_in" else v[:, None]
    # As PEFT's IA3Config writes it. PEFT reads a feed-forward name as a plain end of the module path.
    config = {"peft_type": "IA3", "target_modules": _target_names(scaled, modules, cfg), "exclude_modules": None,
              "feedforward_modules": _target_names(inputs, modules, cfg, dotted=False), "fan_in_fan_out": False,
              "modules_to_save": None, "init_ia3_weights": True}
    return tensors, config, "IA3"


def _ia3_tree(arrays: dict, feedforward, cfg: LlamaConfig, file: Path) -> dict:
    names = _recognized(arrays, cfg, ("ia3_l",))
    adapted = {names[n][0] for n in arrays if n in names}
    wanted = {n: v for n, v in names.items() if v[0] in adapted}
    _refuse_strays(arrays, wanted, file, "IA3 vectors of the linear layers, every layer of each adapted module")
    base = _shapes(cfg)
    layers: dict[str, list] = {}
    for name, (module, layer, _) in wanted.items():
        x = arrays[name]
        _, d_in, d_out = base[f"{module}/w"]
        # Scaled at the input where PEFT's rule says so (feedforward_modules: a regex the module path must match,
        # or names it must end with); a config without the list is read from the shapes.
        hf = name.removeprefix(PREFIX).removesuffix(".ia3_l")
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
        layers.setdefault(f"{module}/{'ia3_in' if at_input else 'ia3_out'}",
                          [None] * _n_layers(cfg, module))[layer] = x.reshape(-1)
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


def _target_names(chosen: list[str], modules: dict, cfg, dotted: bool = True) -> list[str] | str:
    """PEFT's `target_modules` (or `feedforward_modules`, `dotted=False`) naming exactly the jaxft modules
    `chosen` among the model's linear layers. PEFT takes a module whose path ends with '.' + a name (a plain
    end for feed-forward names): each module is named by the shortest end of its path after the layer index
    that names only chosen modules ('q_proj'; 'output.dense', which BERT's attention.output.dense also ends
    with), and where no end does (T5's encoder and decoder self-attention end alike), by a regex over full
    paths, which PEFT matches whole."""
    if not chosen:
        return []
    # The model's other linear layers (pooler, heads): a name must not reach them either.
    others = [e.hf.rsplit(".", 1)[0] for e in family_of(cfg).TABLE if e.transpose and "{i}" not in e.hf]
    paths = {t for t, _ in modules.values()} | set(others) | set(_HEADS)
    picked = {modules[m][0] for m in chosen}
    ends = lambda path, name: path.endswith(("." if dotted else "") + name)
    names = set()
    for template in sorted(picked):
        parts = template.split("{i}.", 1)[-1].split(".")
        for k in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[k:])
            if all(p in picked for p in paths if ends(p, name)):
                names.add(name)
                break
        else:
            return "(" + "|".join(re.escape(t).replace(r"\{i\}", r"\d+") for t in sorted(picked)) + ")"
    return sorted(names)


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    # Through JAX rather than numpy: adapters saved from a bfloat16 model hold bfloat16 tensors.
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    try:
        return {k: np.asarray(v, np.float32) for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None


@functools.lru_cache(maxsize=16)
def _shapes(cfg) -> dict[str, tuple[int, ...]]:
    return expected_shapes(cfg)


def _n_layers(cfg, module: str) -> int:
    return _shapes(cfg)[f"{module}/w"][0]


def _modules(cfg, prefix: str | None = None) -> dict[str, tuple[str, int]]:
    """jaxft module path -> (HF module path with `{i}` for the layer, number of layers), for each layered linear
    weight of `cfg`, named inside the class whose backbone prefix is `prefix` (None: the TABLE's naming):
    'layers/attn/q_proj' -> ('model.layers.{i}.self_attn.q_proj', L)."""
    backbone, _ = _classes(cfg)
    prefix = backbone if prefix is None else prefix
    shapes = _shapes(cfg)
    return {e.path.rsplit("/", 1)[0]: (prefix + e.hf.rsplit(".", 1)[0].removeprefix(backbone), shapes[e.path][0])
            for e in family_of(cfg).TABLE
            if e.transpose and "{i}" in e.hf and e.path.endswith("/w") and e.path in shapes}


def _classes(cfg):
    try:
        return mapping.peft_classes(cfg)
    except KeyError as e:
        raise AdapterError(str(e.args[0])) from None


def _recognized(arrays: dict, cfg, suffixes) -> dict[str, tuple[str, int, str]]:
    """`tensor_names` under the naming of the class that names most of `arrays` (the TABLE's on a tie): PEFT
    adapters for BertModel and for BertFor... (`bert.`) both load."""
    backbone, classes = _classes(cfg)
    prefixes = [backbone] + sorted({c.prefix for c in classes.values()} - {backbone})
    candidates = [tensor_names(cfg, suffixes, p) for p in prefixes]
    return max(candidates, key=lambda names: sum(n in names for n in arrays))


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
