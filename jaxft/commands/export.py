"""`jaxft export`: a trained adapter as a Hugging Face PEFT adapter, or merged into its base model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jaxft.commands import CommandError

DESCRIPTION = """\
Export the adapter of a training run (or any adapter) for the Hugging Face ecosystem. Paths written go to
stdout, progress to stderr. Every model family exports: LLaMA (Llama, Mistral, Qwen2), BERT, T5, and
Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE (LoRA on the experts and router as PEFT's target_parameters).

  --peft OUT    a PEFT adapter directory (adapter_config.json, adapter_model.safetensors, the tokenizer):
                peft.PeftModel.from_pretrained(<the transformers class>.from_pretrained(BASE), OUT) loads it.
                For the methods PEFT shares: lora (rsLoRA, DoRA), ia3, and for decoders prefix and prompt.
                Module names and task_type are those of the class of the run's task: ...ForCausalLM
                (causal_lm), ...ForSequenceClassification (classification), ...ForTokenClassification
                (token_classification), BertForMaskedLM (mlm), BertModel / LlamaModel (embedding),
                T5ForConditionalGeneration (seq2seq); without a task, the class of the base's config.
                --base-class names another (e.g. BertModel, whose modules have no `bert.` prefix).
                A task head goes in as PEFT's modules_to_save (classifier, or score for decoders).
                A vision-language model (LLaVA): the language model's LoRA for ...ForConditionalGeneration,
                a trained projector as modules_to_save (multi_modal_projector); LoRA on the tower or the
                projector, or a fully trained tower, export --merged.
  --merged OUT  the base model with the adapter merged into its weights: a plain transformers model
                directory (config.json, safetensors, sharded past --max-shard-gb, the tokenizer) that
                AutoModelForCausalLM (LLaMA family), AutoModelForMaskedLM (BERT with its masked-LM head) or
                T5ForConditionalGeneration loads; with a task head, AutoModelForSequenceClassification /
                AutoModelForTokenClassification, the run's labels as id2label. For lora, ia3, full and
                partial; a quantized base is merged onto its dequantized weights. A vision-language
                model's LoRA parts are merged, its fully trained parts written as they are.

Bottleneck adapters (adapter) and features heads have neither form: use them with jaxft
(jaxft generate --adapter, jaxft.peft.features.classify).

The base is --model, else the model the workdir's adapter was trained on (as adapter/adapter.json records
it, where it differs from the `model` of WORKDIR/config.json), else that `model`. OUT is written under a
temporary name and renamed into place; an existing non-empty OUT is an error unless --overwrite.

examples:
  jaxft export --workdir runs/alpaca --peft exports/alpaca-lora
  jaxft export --workdir runs/alpaca --merged exports/alpaca-merged --dtype bfloat16
  jaxft export --workdir runs/sst2 --peft exports/sst2-lora          # BertForSequenceClassification
  jaxft export --adapter some/peft-adapter --model path/to/base --merged exports/merged
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export an adapter in PEFT format, or merged into its base",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", metavar="DIR", help="a training workdir (its adapter/ and config.json)")
    source.add_argument("--adapter", metavar="PATH", help="an adapter directory: jaxft's (adapter.json) or PEFT's "
                                                          "(adapter_config.json)")
    p.add_argument("--model", metavar="PATH",
                   help="the base model: a Hugging Face directory, a .gguf file or 'default' (default: the one "
                        "the workdir or adapter records)")
    p.add_argument("--peft", metavar="OUT", help="write a PEFT adapter directory here")
    p.add_argument("--merged", metavar="OUT", help="write the merged model here")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the dtype of the merged weights (default: %(default)s)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, metavar="GB",
                   help="split the merged weights into safetensors shards of at most this size "
                        "(default: %(default)s)")
    p.add_argument("--base-model-name", metavar="NAME",
                   help="base_model_name_or_path written in the PEFT config, e.g. a Hub id (default: the base's "
                        "absolute path, or HuggingFaceTB/SmolLM2-135M-Instruct for the default model)")
    p.add_argument("--base-class", metavar="CLASS",
                   help="the transformers class the PEFT adapter is for, e.g. BertModel or "
                        "BertForSequenceClassification (default: the class of the run's task)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    if not args.peft and not args.merged:
        raise CommandError("nothing to do: pass --peft OUT and/or --merged OUT")
    if args.peft and args.merged and Path(args.peft).resolve() == Path(args.merged).resolve():
        raise CommandError("--peft and --merged name the same directory")
    if args.max_shard_gb <= 0:
        raise CommandError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    import jax.numpy as jnp

    from jaxft.checkpoint import LoadError
    from jaxft.export import AdapterError, export_merged, export_peft
    from jaxft.models.config import ConfigError
    from jaxft.peft.hf_format import check_writable

    source = args.workdir or args.adapter
    try:
        for out in (args.peft, args.merged):  # both, before either is written
            if out:
                check_writable(Path(out), args.overwrite)
        if args.peft:
            start = time.perf_counter()
            out = export_peft(source, args.peft, model=args.model, base_model_name=args.base_model_name,
                              base_class=args.base_class, overwrite=args.overwrite)
            _log(f"wrote the PEFT adapter in {time.perf_counter() - start:.1f}s")
            print(out)
        if args.merged:
            start = time.perf_counter()
            out = export_merged(source, args.merged, model=args.model, dtype=jnp.dtype(args.dtype),
                                max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
            _log(f"wrote the merged model ({args.dtype}) in {time.perf_counter() - start:.1f}s")
            print(out)
    except (AdapterError, LoadError, ConfigError, FileExistsError) as e:
        raise CommandError(e) from None
    return 0


def _log(message: str) -> None:
    print(f"jaxft export: {message}", file=sys.stderr, flush=True)
