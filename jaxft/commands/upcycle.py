"""`jaxft upcycle`: a dense LLaMA-family model as a Mixtral-format mixture of experts (sparse upcycling)."""

from __future__ import annotations

import argparse
import sys

from jaxft.commands import CommandError

DESCRIPTION = """\
Turn a dense LLaMA-family model into a mixture of experts in Mixtral's format (sparse upcycling, Komatsuzaki
et al. 2022): a Hugging Face directory that transformers.MixtralForCausalLM loads (config.json with
num_local_experts, num_experts_per_tok and router_aux_loss_coef, safetensors, the tokenizer).

Every expert of a layer is a copy of the layer's dense MLP (block_sparse_moe.experts.N.w1 = gate_proj, w3 =
up_proj, w2 = down_proj); attention, norms, embeddings and the head are the dense model's (a tied head stays
tied). The router (block_sparse_moe.gate) is zero, or with --router-noise STD drawn from N(0, STD^2) so that
tokens already go to different experts: either way the upcycled model's logits equal the dense model's, since
Mixtral renormalizes the top-k routing weights to sum to 1 and the experts are identical. Models with attention
biases (Qwen2) or sliding windows on some layers only are refused: Mixtral has neither.

OUT is written under a temporary name and renamed into place; an existing non-empty OUT is an error unless
--overwrite. The path written goes to stdout, sizes and time to stderr.

examples:
  jaxft upcycle --model default --experts 8 --top-k 2 --out models/smollm2-8x135m
  jaxft upcycle --model path/to/llama --experts 4 --top-k 1 --router-noise 0.01 --dtype float32 --out moe
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("upcycle", help="turn a dense model into a Mixtral-format mixture of experts",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", metavar="MODEL",
                   help="the dense model: 'default', a Hugging Face directory or a .gguf file (default: "
                        "%(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="write the Mixtral directory here")
    p.add_argument("--experts", type=int, default=8, metavar="E", help="experts per layer, >= 2 (default: "
                                                                       "%(default)s)")
    p.add_argument("--top-k", type=int, default=2, metavar="K", help="experts each token is routed to, 1..E "
                                                                     "(default: %(default)s)")
    p.add_argument("--router-noise", type=float, default=0.0, metavar="STD",
                   help="standard deviation of the router's initial weights; 0 = all experts tied (default: "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router noise (default: %(default)s)")
    p.add_argument("--router-aux-loss-coef", type=float, default=0.02, metavar="C",
                   help="router_aux_loss_coef written in config.json (default: %(default)s, Mixtral-8x7B's)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the dtype of the weights written (default: %(default)s; float32 keeps a float32 or "
                        "dequantized GGUF model's values exactly)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, metavar="GB",
                   help="split the weights into safetensors shards of at most this size (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    import jax.numpy as jnp

    from jaxft.checkpoint import LoadError
    from jaxft.models.config import ConfigError
    from jaxft.upcycle import UpcycleError, check_options, upcycle

    try:
        check_options(args.experts, args.top_k, args.router_noise)  # before the model is read
        if args.max_shard_gb <= 0:
            raise UpcycleError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
        done = upcycle(args.model, args.out, experts=args.experts, top_k=args.top_k, dtype=jnp.dtype(args.dtype),
                       router_noise=args.router_noise, seed=args.seed,
                       router_aux_loss_coef=args.router_aux_loss_coef,
                       max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    except (UpcycleError, LoadError, ConfigError, FileExistsError) as e:
        raise CommandError(e) from None
    print(f"jaxft upcycle: {args.experts} experts, top-{args.top_k}: {done['params'] / 1e6:.0f}M parameters "
          f"({done['active_params'] / 1e6:.0f}M active per token; dense {done['dense_params'] / 1e6:.0f}M), "
          f"{done['bytes'] / 2**30:.2f} GiB of {args.dtype}, in {done['seconds']:.1f}s", file=sys.stderr)
    print(done["out"])
    return 0
