"""Adapters in and out of jaxft: read any adapter (jaxft's own or HF PEFT's), export a run's adapter in PEFT
format, or merged into its base as a plain transformers checkpoint.

A source is a training workdir (its config.json names the base, its adapter/ holds the adapter), a jaxft
adapter directory (adapter.json) or a PEFT adapter directory (adapter_config.json). Every adapter is checked
against the base it is put on: a tree made for another architecture or size is refused with the first leaf
that does not fit, not run. (An adapter for a different model of the same shape cannot be told apart.)

What exports: in PEFT's format, the methods PEFT shares (LoRA / rsLoRA / DoRA, IA3, prefix tuning, prompt
tuning), for the transformers class of the run's task (a task head as PEFT's `modules_to_save`; see
`jaxft.peft.hf_format`); merged, the methods whose effect base weights can hold (LoRA, IA3, full, partial), as
the family's own class (`Config.to_hf`: ...ForCausalLM, BertForMaskedLM or BertModel, T5ForConditionalGeneration).
Every family exports: LLaMA (Llama, Mistral, Qwen2), BERT, T5 and the mixtures of experts (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE: LoRA on the experts and router as PEFT's `target_parameters`, see `jaxft.peft.hf_experts`);
prefix and prompt tuning for decoders only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import checkpoint, peft, tree
from jaxft.checkpoint.assemble import LeafFn, LoadError
from jaxft.checkpoint.hf import _replace_dir
from jaxft.models.config import LlamaConfig
from jaxft.peft import hf_format, sources
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, MethodSpec, PeftError, method_of

__all__ = ["AdapterError", "export_merged", "export_peft", "load_adapter"]

# What `base_model_name_or_path` says for jaxft's default model (a GGUF build of this model), so that PEFT
# and transformers users find the base on the Hub.
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TASK_FILE = "task.json"  # what a task run writes beside its adapter (`jaxft.train.loop.TASK_FILE`)
# PEFT task_type -> the jaxft task whose transformers class an imported adapter is exported for.
_PEFT_TASKS = {"SEQ_CLS": "classification", "TOKEN_CLS": "token_classification", "SEQ_2_SEQ_LM": "seq2seq",
               "FEATURE_EXTRACTION": "embedding"}


def load_adapter(path, cfg: LlamaConfig) -> tuple[dict, LoraSpec | MethodSpec]:
    """(trainable tree, spec) of the adapter at `path`, checked against a base model of `cfg`.

    path: a PEFT adapter directory, a jaxft adapter directory or a training workdir. spec: a LoraSpec for LoRA
    (`<module>/lora_a` (L, in, R), `lora_b` (L, R, out), `magnitude` (L, out) for DoRA), the MethodSpec of any
    other method (the layouts of `jaxft.peft.method`; a FeatureSpec for a features head). The tree is float32,
    ready for `llama.forward(cfg, base, tokens, trainable=tree, peft=spec)`, `generate` or further training.
    Raises AdapterError naming the file and what does not fit.
    """
    return sources.load(path, cfg)


def export_peft(source, out, *, model=None, base_model_name: str | None = None, base_class: str | None = None,
                overwrite: bool = False) -> Path:
    """Writes the adapter of `source` (a workdir or adapter directory) as a PEFT adapter directory `out`,
    with the base model's tokenizer beside it: LoRA (rsLoRA, DoRA), IA3, prefix and prompt tuning, and the
    task head (classification, token classification) as PEFT's `modules_to_save`.

    model: the base (default: the one the workdir or adapter records); only its config and tokenizer are read.
    base_model_name: `base_model_name_or_path` for PEFT (default: the base's absolute path, or the Hub name
    of jaxft's default model). base_class: the transformers class PEFT will wrap, which fixes the module names
    and task_type (default: the class of the run's task, e.g. BertForSequenceClassification for
    classification, BertForMaskedLM for mlm; without a task, the class of the base's config). Raises
    AdapterError for a method PEFT does not have, saying what to do instead, or a class the adapter does not fit.
    """
    hf_format.check_writable(Path(out), overwrite)
    model, run = _base_of(source, model)
    cfg, tokenizer, path = _describe(model)
    trainable, spec = load_adapter(source, cfg)
    hf_format.check_exportable(spec)
    name = base_model_name or (DEFAULT_MODEL_NAME if str(model) == "default" else str(path.resolve()))
    return hf_format.save(out, trainable, spec, cfg, base_model=name, tokenizer=tokenizer, run=run,
                          overwrite=overwrite, base_class=base_class)


def export_merged(source, out, *, model=None, dtype=jnp.bfloat16, max_shard_bytes: int = 5 * 2**30,
                  leaf_fn: LeafFn | None = None, overwrite: bool = False) -> Path:
    """Writes base + adapter merged (`jaxft.peft.merge`: LoRA, IA3, full, partial) as a Hugging Face model
    directory `out`: config, tokenizer, safetensors (sharded with an index past `max_shard_bytes`) of `dtype`.

    transformers loads it as the family's class (`Config.to_hf`): AutoModelForCausalLM for the LLaMA family,
    AutoModelForMaskedLM (BERT with its masked-LM head; AutoModel without one), T5ForConditionalGeneration.
    A run's task head goes with it: classification and token classification heads as the class's own module
    (BertForSequenceClassification's classifier, LlamaForSequenceClassification's score, ...), with the run's
    labels as id2label (AutoModelForSequenceClassification / ...TokenClassification load it); a masked-LM head
    trained from scratch as BertForMaskedLM's.

    model: the base (default: the one the workdir or adapter records). leaf_fn: how to load it, as training did
    (e.g. `jaxft.quant.leaf_fn("nf4")` for QLoRA): a quantized base is merged onto its dequantized weights, the
    ones the adapter was trained with. The base is read in `dtype` (unless `leaf_fn` says otherwise); the merge
    itself is computed in float32. Raises AdapterError for a method that no base weights can express, or a head
    its transformers class would compute otherwise.
    """
    out = Path(out)
    hf_format.check_writable(out, overwrite)
    model, run = _base_of(source, model)
    base = checkpoint.load(model, dtype=dtype, leaf_fn=leaf_fn)
    trainable, spec = load_adapter(source, base.cfg)
    head = {}
    if method_of(spec) != "features":  # (a features adapter is all head/, and cannot be merged)
        head = {p: x for p, x in tree.items(trainable) if p.startswith("head/")}
        trainable = {k: v for k, v in trainable.items() if k != "head"}
    # Only the weights the adapter changes go through the merge, jitted (one program rather than op by op,
    # dequantization included); the other leaves are passed on as they are, not copied.
    flat, changed = tree.flatten(base.params), tree.flatten(trainable)
    modules = {p.rsplit("/", 1)[0] for p in changed}
    needed = tree.unflatten({p: x for p, x in flat.items() if p in changed or p.rsplit("/", 1)[0] in modules})
    try:
        merged = jax.jit(peft.merge, static_argnums=(2, 3))(needed, trainable, spec, jnp.dtype(dtype))
    except PeftError as e:  # a method that no base weights can express, and why
        raise AdapterError(f"{source}: {e}") from None
    merged = tree.unflatten({**flat, **tree.flatten(merged)})
    cfg = base.cfg
    if head and {p.split("/")[1] for p in head} <= {"transform", "norm", "bias"}:  # a new masked-LM head
        merged["mlm"] = tree.unflatten({p.split("/", 1)[1]: x for p, x in head.items()})
        cfg, head = dataclasses.replace(cfg, mlm_head=True), {}
    if not head:
        return checkpoint.save_hf(cfg, merged, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                  tokenizer=base.tokenizer, overwrite=overwrite)
    target = hf_format.target_class(cfg, run.get("task"))
    tensors = hf_format.task_head({p: np.asarray(x, np.float32) for p, x in head.items()}, target, cfg, run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = checkpoint.save_hf(cfg, merged, tmp / "model", dtype=dtype, max_shard_bytes=max_shard_bytes,
                                     tokenizer=base.tokenizer)
        _add_head(written, tensors, target, _task_file(Path(source)).get("labels"), base.tokenizer, dtype)
        _replace_dir(written, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _add_head(path: Path, tensors: dict, target, labels, tokenizer, dtype) -> None:
    """Turns the model directory `path` into one of the class `target`: its head's tensors as one more
    safetensors shard (the others renumbered, the index written), its class and labels in config.json."""
    from safetensors.numpy import save_file

    from jaxft.checkpoint.hf import INDEX, SINGLE

    if (path / INDEX).is_file():
        index = json.loads((path / INDEX).read_text())
    else:
        header = _header(path / SINGLE)
        index = {"metadata": {"total_size": sum(e - b for b, e in (v["data_offsets"] for v in header.values()))},
                 "weight_map": {name: SINGLE for name in header}}
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards) + 1
    renamed = {old: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k, old in enumerate(shards)}
    for old, new in renamed.items():
        os.rename(path / old, path / new)
    last = f"model-{n:05d}-of-{n:05d}.safetensors"
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.dtype(jnp.dtype(dtype)))) for k, v in tensors.items()}
    save_file(arrays, str(path / last), metadata={"format": "pt"})
    weight_map = {name: renamed[file] for name, file in index["weight_map"].items()}
    weight_map.update({name: last for name in arrays})
    total = index["metadata"].get("total_size", 0) + sum(x.nbytes for x in arrays.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                              + "\n")
    hf = json.loads((path / "config.json").read_text())
    n_labels = next(x.shape[0] for k, x in arrays.items() if k.endswith(".weight"))
    names = list(labels) if labels and len(labels) == n_labels else [f"LABEL_{i}" for i in range(n_labels)]
    hf.update(architectures=[target.name], id2label={str(i): x for i, x in enumerate(names)},
              label2id={x: i for i, x in enumerate(names)})
    if hf.get("pad_token_id") is None and tokenizer is not None and tokenizer.pad_token_id is not None:
        hf["pad_token_id"] = tokenizer.pad_token_id  # ...ForSequenceClassification finds the last token by it
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def _header(file: Path) -> dict:
    """name -> {dtype, shape, data_offsets} of a safetensors file."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _base_of(source, model) -> tuple[str, dict]:
    """(base model, training config) for `source`: the model given, else the one its workdir config, jaxft
    adapter metadata or PEFT config records (the latter only where it is a local path); the config (the
    workdir's config.json, {} for an adapter directory, with the task of its task.json) supplies the task and
    the settings PEFT records (`hf_format.save`)."""
    model, run = _base_and_run(source, model)
    task = _task_file(Path(source))
    if task and "task" not in run:
        run = {**run, "task": task.get("task"), "head": {"pool": task.get("pool", "default")}}
    elif "task" not in run and hf_format.is_peft_dir(source):  # a PEFT adapter says its task by task_type
        task_type = hf_format.read_config(source).get("task_type")
        run = {**run, "task": _PEFT_TASKS[task_type]} if task_type in _PEFT_TASKS else run
    return model, run


def _task_file(source: Path) -> dict:
    """The task.json a task run writes beside its adapter (task, labels, pool), or {}."""
    for file in (source / "adapter" / TASK_FILE, source / TASK_FILE):
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise AdapterError(f"{file}: not valid JSON ({e})") from None
    return {}


def _base_and_run(source, model) -> tuple[str, dict]:
    source = Path(source)
    run_config = source / "config.json"
    if run_config.is_file() and ((source / "adapter").is_dir() or (source / "checkpoints").is_dir()):
        try:
            run = json.loads(run_config.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(f"{run_config}: not valid JSON ({e})") from None
        if "model" not in run:
            raise AdapterError(f"{run_config}: names no model")
        return model or _trained_on(source, run["model"]), run
    if model is not None:
        return model, {}
    if (source / "adapter.json").is_file():
        return json.loads((source / "adapter.json").read_text())["model"], {}
    if hf_format.is_peft_dir(source):
        recorded = hf_format.read_config(source).get("base_model_name_or_path")
        if recorded == DEFAULT_MODEL_NAME:
            return "default", {}
        if recorded and Path(recorded).expanduser().exists():
            return recorded, {}
        raise AdapterError(f"{source}: its base {recorded!r} is not a local model; name the base model "
                           f"(--model PATH)")
    raise AdapterError(f"{source}: not a training workdir (config.json and adapter/), a jaxft adapter directory "
                       f"(adapter.json) or a PEFT adapter directory (adapter_config.json)")


def _trained_on(workdir: Path, configured: str) -> str:
    """The base the run in `workdir` trained on: the path its adapter records (the model it loaded), where
    that differs from the `model` of its config.json (a relative path read from another directory, or a
    config.json that an older jaxft replaced on a refused --resume); else the config's own value."""
    try:
        trained = json.loads((workdir / "adapter" / "adapter.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return configured
    if not trained or configured == "default" or Path(configured).resolve() == Path(trained).resolve():
        return configured
    return trained


def _describe(model) -> tuple[LlamaConfig, object, Path]:
    """(config, tokenizer or None, path) of a base model, without reading its weights."""
    from jaxft.checkpoint import gguf, hf, resolve

    path = resolve(model)
    if path.is_dir():
        return hf.read_config(path), hf.tokenizer(path), path
    if path.is_file() and path.suffix == ".gguf":
        reader = gguf.open_reader(path)
        return gguf.read_config(reader, str(path)), gguf.tokenizer(path, reader), path
    raise LoadError(f"{path}: " + ("not a model directory or a .gguf file" if path.exists() else
                                   "no such file or directory"))
