"""The MoE block's grouped expert computation on this machine: the two grouped-matmul implementations of
`jaxft.models.grouped` against one dense matmul of the same rows, and a LoRA-on-experts training step of one
block (forward and backward, gradients w.r.t. the LoRA factors) against the dense gated MLP it was upcycled from.

Sizes of the default model upcycled (D 576, F 1536), 8 experts, top-2, LoRA r=16, batch 4 x 256 tokens.
Each program is compiled first, then run `--repeats` times; the best run counts. Prints a table and one
`RESULT key=value ...` line, and writes the same figures to bench/results/moe_grouped.json. The whole-model
comparison with HF PEFT (the issue's bench/moe.py) waits for an MoE family.

    .venv/bin/python bench/moe_grouped.py [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft.models import moe
from jaxft.models.grouped import grouped_matmul

RESULTS = Path(__file__).parent / "results"
D, F, E, K, R, TOKENS = 576, 1536, 8, 2, 16, 4 * 256


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    load_start = os.getloadavg()[0]
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    normal = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)

    # One grouped product: 2 x 1024 routed rows in uneven groups, (D, F) per expert.
    rows = jnp.asarray([300, 200, 256, 256, 100, 412, 268, 256], jnp.int32)
    x, w = normal((TOKENS * K, D), 1.0), normal((E, D, F))
    results = {"dense_matmul_s": best_time(jax.jit(lambda x, w: jnp.dot(x, w[0], preferred_element_type=jnp.float32)),
                                           x, w, repeats=args.repeats)}
    for impl in ("tiled", "ragged_dot"):
        fn = jax.jit(lambda x, w, impl=impl: grouped_matmul(x, w, rows, impl))
        results[f"{impl}_matmul_s"] = best_time(fn, x, w, repeats=args.repeats)

    # One block's LoRA step: the gradient w.r.t. every expert's A and B (base and router frozen).
    shapes = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    base = {"router": {"w": normal((D, E))}, "experts": {n: {"w": normal((E, *s))} for n, s in shapes.items()}}
    lora = {n: {"lora_a": normal((E, s[0], R)).astype(jnp.float32), "lora_b": jnp.full((E, R, s[1]), 0.01)}
            for n, s in shapes.items()}
    h = normal((4, 256, D), 1.0)
    for impl in ("tiled", "ragged_dot"):
        def loss(lora, base, h, impl=impl):
            p = {"router": base["router"], "experts": {n: {**base["experts"][n], **lora[n]} for n in lora}}
            y = moe.moe_block(h, p, top_k=K, normalize=True, lora_scale=2.0, grouped=impl)[0]
            return jnp.sum(y.astype(jnp.float32) ** 2)
        results[f"{impl}_lora_step_s"] = best_time(jax.jit(jax.grad(loss)), lora, base, h, repeats=args.repeats)
    dense = {n: v["w"][0] for n, v in base["experts"].items()}

    def dense_loss(h, dense):  # the dense MLP's step (gradient w.r.t. its input): the cost the experts add to
        mm = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
        y = mm((jax.nn.silu(mm(h, dense["gate_proj"])) * mm(h, dense["up_proj"])).astype(dtype), dense["down_proj"])
        return jnp.sum(y ** 2)
    results["dense_mlp_step_s"] = best_time(jax.jit(jax.grad(dense_loss)), h, dense, repeats=args.repeats)
    flops = moe.block_flops(TOKENS, D, F, E, K, rank=R)
    results["grouped_over_all_experts_flops"] = flops["grouped"] / flops["all_experts"]

    for key, value in results.items():
        print(f"{key:32s} {value:.4f}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__},
              "load_average": {"start": load_start, "end": os.getloadavg()[0]},
              "settings": {"dim": D, "mlp_dim": F, "experts": E, "top_k": K, "rank": R, "tokens": TOKENS,
                           "dtype": args.dtype, "repeats": args.repeats},
              "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_grouped.json").write_text(json.dumps(record, indent=2) + "\n")
    print("RESULT " + " ".join(f"{k}={round(v, 4)}" for k, v in results.items()))


if __name__ == "__main__":
    main()
