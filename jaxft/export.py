"""Adapters in and out of jaxft: read any adapter (jaxft's own or HF PEFT's), export a run's adapter in PEFT
format, or merged into its base as a plain transformers checkpoint.

A source is a training workdir (its config.json names the base, its adapter/ holds the adapter), a jaxft
adapter directory (adapter.json) or a PEFT adapter directory (adapter_config.json). Every adapter is checked
against the base it is put on: a tree made for another architecture or size is refused with the first leaf
that does not fit, not run. (An adapter for a different model of the same shape cannot be told apart.)

What exports: in PEFT's format, the methods PEFT shares (LoRA / rsLoRA / DoRA, IA3, prefix tuning, prompt
tuning); merged, the methods whose effect base weights can hold (LoRA, IA3, full, partial).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft import checkpoint, peft, tree
from jaxft.checkpoint.assemble import LeafFn, LoadError
from jaxft.models.config import LlamaConfig
from jaxft.peft import hf_format, sources
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, MethodSpec, PeftError

__all__ = ["AdapterError", "export_merged", "export_peft", "load_adapter"]

# What `base_model_name_or_path` says for jaxft's default model (a GGUF build of this model), so that PEFT
# and transformers users find the base on the Hub.
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def load_adapter(path, cfg: LlamaConfig) -> tuple[dict, LoraSpec | MethodSpec]:
    """(trainable tree, spec) of the adapter at `path`, checked against a base model of `cfg`.

    path: a PEFT adapter directory, a jaxft adapter directory or a training workdir. spec: a LoraSpec for LoRA
    (`<module>/lora_a` (L, in, R), `lora_b` (L, R, out), `magnitude` (L, out) for DoRA), the MethodSpec of any
    other method (the layouts of `jaxft.peft.method`; a FeatureSpec for a features head). The tree is float32,
    ready for `llama.forward(cfg, base, tokens, trainable=tree, peft=spec)`, `generate` or further training.
    Raises AdapterError naming the file and what does not fit.
    """
    return sources.load(path, cfg)


def export_peft(source, out, *, model=None, base_model_name: str | None = None, overwrite: bool = False) -> Path:
    """Writes the adapter of `source` (a workdir or adapter directory) as a PEFT adapter directory `out`,
    with the base model's tokenizer beside it: LoRA (rsLoRA, DoRA), IA3, prefix and prompt tuning.

    model: the base (default: the one the workdir or adapter records); only its config and tokenizer are read.
    base_model_name: `base_model_name_or_path` for PEFT (default: the base's absolute path, or the Hub name
    of jaxft's default model). Raises AdapterError for a method PEFT does not have, saying what to do instead.
    """
    hf_format.check_writable(Path(out), overwrite)
    model, run = _base_of(source, model)
    cfg, tokenizer, path = _describe(model)
    trainable, spec = load_adapter(source, cfg)
    hf_format.check_exportable(spec)
    name = base_model_name or (DEFAULT_MODEL_NAME if str(model) == "default" else str(path.resolve()))
    return hf_format.save(out, trainable, spec, cfg, base_model=name, tokenizer=tokenizer, run=run,
                          overwrite=overwrite)


def export_merged(source, out, *, model=None, dtype=jnp.bfloat16, max_shard_bytes: int = 5 * 2**30,
                  leaf_fn: LeafFn | None = None, overwrite: bool = False) -> Path:
    """Writes base + adapter merged (`jaxft.peft.merge`: LoRA, IA3, full, partial) as a Hugging Face model
    directory `out` that `transformers.AutoModelForCausalLM.from_pretrained` loads: config, tokenizer,
    safetensors (sharded with an index past `max_shard_bytes`) of `dtype`.

    model: the base (default: the one the workdir or adapter records). leaf_fn: how to load it, as training did
    (e.g. `jaxft.quant.leaf_fn("nf4")` for QLoRA): a quantized base is merged onto its dequantized weights, the
    ones the adapter was trained with. The base is read in `dtype` (unless `leaf_fn` says otherwise); the merge
    itself is computed in float32. Raises AdapterError for a method that no base weights can express.
    """
    hf_format.check_writable(Path(out), overwrite)
    model, _ = _base_of(source, model)
    base = checkpoint.load(model, dtype=dtype, leaf_fn=leaf_fn)
    trainable, spec = load_adapter(source, base.cfg)
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
    return checkpoint.save_hf(base.cfg, merged, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                              tokenizer=base.tokenizer, overwrite=overwrite)


def _base_of(source, model) -> tuple[str, dict]:
    """(base model, training config) for `source`: the model given, else the one its workdir config, jaxft
    adapter metadata or PEFT config records (the latter only where it is a local path); the config (the
    workdir's config.json, {} for an adapter directory) supplies the settings PEFT records (`hf_format.save`)."""
    source = Path(source)
    run_config = source / "config.json"
    if run_config.is_file() and ((source / "adapter").is_dir() or (source / "checkpoints").is_dir()):
        try:
            run = json.loads(run_config.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(f"{run_config}: not valid JSON ({e})") from None
        if "model" not in run:
            raise AdapterError(f"{run_config}: names no model")
        return model or run["model"], run
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


def _describe(model) -> tuple[LlamaConfig, object, Path]:
    """(config, tokenizer or None, path) of a base model, without reading its weights."""
    from jaxft.checkpoint import gguf, hf

    if str(model) == "default":
        from jaxft.hub import default_model_path

        model = default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return hf.read_config(path), hf.tokenizer(path), path
    if path.is_file() and path.suffix == ".gguf":
        import gguf as gguf_lib

        try:
            reader = gguf_lib.GGUFReader(path)
        except (ValueError, OSError) as e:
            raise LoadError(f"{path}: not a readable GGUF file ({e})") from None
        return gguf.read_config(reader, str(path)), gguf.tokenizer(path, reader), path
    raise LoadError(f"{path}: " + ("not a model directory or a .gguf file" if path.exists() else
                                   "no such file or directory"))
