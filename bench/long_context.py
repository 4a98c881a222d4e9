"""Long sequences: the memory XLA plans for one attention call and for the token loss, forward and backward,
by implementation (`jaxft.models.attention`, `jaxft.models.loss`), at T = 4k / 8k / 16k tokens.

For each model's shapes (the default model, SmolLM2-135M: 9 heads / 3 kv heads of 64, D=576, V=49152; and
Llama-3-8B: 32 / 8 of 128, D=4096, V=128256), one row of T tokens, bfloat16:
  attention  the gradient of one causal attention call (q, k, v), xla vs chunked on this CPU, and splash
             compiled ahead of time for one TPU chip of --tpu (when `libtpu` can be imported);
  loss       the gradient (of the hidden states; the head is frozen) of the token cross-entropy: the full
             (T, V) float32 logits against `chunked_cross_entropy` (chunks of 1024 tokens).
Figures are XLA's `compiled.memory_analysis()` temporaries (no array is allocated), in MiB. With --time, the
CPU rows also run the default model's attention call once (seconds, forward + backward), where it plans at
most RUN_LIMIT_MIB of temporaries.

    .venv/bin/python bench/long_context.py [--seqs 4096,8192,16384] [--tpu v5e:2x2] [--time]

(For the TPU rows, put libtpu on the path without installing it into the project's environment, e.g.
`pip install --target /tmp/libtpu libtpu` and PYTHONPATH=/tmp/libtpu.)
Prints a table and a `RESULT key=value ...` line; writes bench/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft.models.attention import attention
from jaxft.models.layers import einsum
from jaxft.models.loss import chunked_cross_entropy
from jaxft.train.step import token_loss

RESULTS = Path(__file__).parent / "results"
MIB = 2 ** 20
MODELS = {  # name -> (query heads, kv heads, head dim, model width, vocab)
    "smollm2-135m": (9, 3, 64, 576, 49152),
    "llama3-8b": (32, 8, 128, 4096, 128256),
}
BF16 = jnp.bfloat16
RUN_LIMIT_MIB = 2048  # --time runs no call that plans more temporaries than this


def _temp_mib(fn, args, device=None):
    """MiB of temporaries XLA plans for fn(*args), or for a TPU chip that cannot hold them, 'needs N GiB'."""
    if device is not None:  # abstract arguments placed on a compile-only device of a TPU topology
        sharding = jax.sharding.SingleDeviceSharding(device)
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    try:
        return round(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB, 1)
    except jax.errors.JaxRuntimeError as e:
        needs = re.search(r"temporaries \(([\d.]+G)\)", str(e))
        if device is None or needs is None:
            raise
        return f"needs_{needs.group(1)}"


def attention_grad(impl: str, backend: str | None = None):
    def loss(q, k, v):
        out = attention(q, k, v, impl=impl, block_q=512, block_k=512, backend=backend)
        return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, (0, 1, 2))


def loss_grad(chunked: bool):
    def loss(h, w, targets, mask):
        if chunked:
            return chunked_cross_entropy(h, w, targets, mask, chunk=1024)[0]
        return token_loss(einsum("btd,dv->btv", h, w), targets, mask)[0]
    return jax.grad(loss)  # the head is frozen under LoRA / QLoRA: the gradient of the hidden states alone


def _tpu_device(name: str):
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(name, "tpu").devices[0]
    except Exception as e:  # libtpu missing or too old: the TPU rows are left out, and said so
        print(f"no TPU rows ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="4096,8192,16384")
    p.add_argument("--tpu", default="v5e:2x2", help="a TPU topology for the ahead-of-time rows ('' for none)")
    p.add_argument("--time", action="store_true", help="also run the CPU attention calls once")
    args = p.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    tpu = _tpu_device(args.tpu) if args.tpu else None

    rows = []
    for model, (n, kv, h, d, v) in MODELS.items():
        for t in seqs:
            q = jax.ShapeDtypeStruct((1, t, n, h), BF16)
            k = jax.ShapeDtypeStruct((1, t, kv, h), BF16)
            row = {"model": model, "seq": t}
            for impl in ("xla", "chunked"):
                row[f"attn_{impl}_cpu_mib"] = _temp_mib(attention_grad(impl), (q, k, k))
            if tpu is not None:
                for impl in ("xla", "splash"):
                    row[f"attn_{impl}_tpu_mib"] = _temp_mib(attention_grad(impl, "tpu"), (q, k, k), tpu)
            loss_args = (jax.ShapeDtypeStruct((1, t, d), BF16), jax.ShapeDtypeStruct((d, v), BF16),
                         jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.int32))
            row["loss_full_cpu_mib"] = _temp_mib(loss_grad(False), loss_args)
            row["loss_chunked_cpu_mib"] = _temp_mib(loss_grad(True), loss_args)
            if args.time and model == "smollm2-135m":
                arrays = [jax.random.normal(jax.random.PRNGKey(i), s.shape, BF16) for i, s in enumerate((q, k, k))]
                for impl in ("xla", "chunked"):
                    if row[f"attn_{impl}_cpu_mib"] > RUN_LIMIT_MIB:  # this machine's memory is shared
                        continue
                    fn = jax.jit(attention_grad(impl))
                    jax.block_until_ready(fn(*arrays))
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*arrays))
                    row[f"attn_{impl}_cpu_s"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            print(" ".join(f"{key}={val}" for key, val in row.items()), flush=True)

    keys = [key for key in rows[0] if key not in ("model", "seq")]
    print("\n| model | T | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['model']} | {row['seq']} | " + " | ".join(str(row.get(key, "")) for key in keys) + " |")
    record = {"date": date.today().isoformat(), "jax": jax.__version__,
              "cpu": platform.processor() or platform.machine(), "tpu": args.tpu if tpu is not None else None,
              "dtype": "bfloat16", "batch": 1, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_context.json").write_text(json.dumps(record, indent=2) + "\n")
    flat = {f"{r['model']}_{r['seq']}_{key}": r[key] for r in rows for key in keys if key in r}
    print("RESULT " + " ".join(f"{key}={val}" for key, val in flat.items()))


if __name__ == "__main__":
    main()
