"""The MoE block's grouped expert computation on this machine: the grouped-matmul implementations of
`jaxft.models.grouped` against one dense matmul of the same rows, one LoRA projection (forward and backward) with
LoRA fused into the tile loop or as three grouped products, tile sizes, and a LoRA-on-experts training step of one
block (forward and backward, gradients w.r.t. the LoRA factors and the block's input) against the dense gated MLP
with LoRA on as many rows (the cost of routing and grouping).

Sizes of the default model upcycled (D 576, F 1536), 8 experts, top-2, LoRA r=16, batch 4 x 256 tokens.
`--before COMMIT` also times jaxft/models/grouped.py as it was at COMMIT (read with `git show`; where its
`grouped_matmul` takes no `lora`, a LoRA projection is three separate grouped products, as before that file fused
them), in the same run.
Each program is compiled first, then the programs run in turn `--repeats` times; the best run counts (wall
seconds, and the process's CPU seconds: on a shared machine the latter moves less with the load). Prints a table
and one `RESULT key=value ...` line, and writes the same figures to bench/results/moe_grouped.json.

    .venv/bin/python bench/moe_grouped.py [--repeats 5] [--dtype bfloat16|float32] [--before COMMIT]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft.models import grouped, moe
from jaxft.models.layers import einsum

RESULTS = Path(__file__).parent / "results"
D, F, E, K, R, TOKENS = 576, 1536, 8, 2, 16, 4 * 256


def load_before(commit: str):
    """jaxft/models/grouped.py at `commit`, as a module of its own."""
    source = subprocess.run(["git", "show", f"{commit}:jaxft/models/grouped.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "grouped_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("grouped_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unfused(matmul):
    """A grouped LoRA projection as three grouped products (base, x @ A, h @ B), each its own loop."""
    def project(x, w, sizes, impl, lora=None, **kw):
        y = matmul(x, w, sizes, impl, **kw)
        if lora is not None:
            a, b, scale = lora
            h = matmul(x, a.astype(x.dtype), sizes, impl, **kw).astype(x.dtype)
            y = y + scale * matmul(h, b.astype(x.dtype), sizes, impl, **kw)
        return y
    return project


def time_all(programs: dict, repeats: int) -> dict:
    """{name: (fn, args)} -> {name: (best wall s, best CPU s)}, each compiled first, then run in turn."""
    for fn, args in programs.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (fn, args) in programs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (min(w for w, _ in v), min(c for _, c in v)) for name, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--before", metavar="COMMIT", help="also time jaxft/models/grouped.py of this commit")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    load_start = os.getloadavg()[0]
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    normal = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)

    # One grouped product and one LoRA projection: 2 x 1024 routed rows in uneven groups, (D, F) per expert.
    sizes = jnp.asarray([300, 200, 256, 256, 100, 412, 268, 256], jnp.int32)
    x, w = normal((TOKENS * K, D), 1.0), normal((E, D, F))
    a, b, dy = normal((E, D, R)).astype(jnp.float32), jnp.full((E, R, F), 0.01), normal((TOKENS * K, F), 1.0)
    programs = {"dense_matmul": (jax.jit(lambda x, w: jnp.dot(x, w[0], preferred_element_type=jnp.float32)), (x, w))}
    impls = {"tiled": (grouped.grouped_matmul, "tiled"), "ragged_dot": (grouped.grouped_matmul, "ragged_dot"),
             "tiled_unfused": (unfused(grouped.grouped_matmul), "tiled")}
    for block in (64, 256):
        impls[f"tiled_block{block}"] = (partial(grouped.grouped_matmul, block=block), "tiled")
    if args.before:
        before = load_before(args.before).grouped_matmul
        fused = "lora" in inspect.signature(before).parameters
        impls["before"] = (before if fused else unfused(before), "tiled")
    for name, (matmul, impl) in impls.items():
        def projection(x, w, a, b, matmul=matmul, impl=impl):  # forward and backward: x, A and B's gradients
            y, pull = jax.vjp(lambda x, a, b: matmul(x, w, sizes, impl, lora=(a, b, 2.0)), x, a, b)
            return jnp.sum(y), pull(dy.astype(y.dtype))
        programs[f"{name}_matmul"] = (jax.jit(lambda x, w, m=matmul, i=impl: m(x, w, sizes, i)), (x, w))
        programs[f"{name}_lora_projection"] = (jax.jit(projection), (x, w, a, b))

    # One block's LoRA step: the gradients w.r.t. every expert's A and B and the block's input (base, router frozen).
    shapes = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    base = {"router": {"w": normal((D, E))}, "experts": {n: {"w": normal((E, *s))} for n, s in shapes.items()}}
    lora = {n: {"lora_a": normal((E, s[0], R)).astype(jnp.float32), "lora_b": jnp.full((E, R, s[1]), 0.01)}
            for n, s in shapes.items()}
    h = normal((4, 256, D), 1.0)
    for name, (matmul, impl) in impls.items():
        if name.startswith("tiled_block") or name == "ragged_dot" and dtype == jnp.bfloat16:
            continue  # ragged_dot's block step on the CPU: E times the FLOPs, minutes in bf16

        def loss(lora, h, matmul=matmul, impl=impl):
            p = {"router": base["router"], "experts": {n: {**base["experts"][n], **lora[n]} for n in lora}}
            hook = lambda x, q, sizes, impl: matmul(x, q["w"], sizes, impl, lora=(q["lora_a"], q["lora_b"], 2.0))
            y = moe.moe_block(h, p, top_k=K, normalize=True, grouped=impl, expert_linear=hook)[0]
            return jnp.sum(y.astype(jnp.float32) ** 2)
        programs[f"{name}_lora_step"] = (jax.jit(jax.grad(loss, argnums=(0, 1))), (lora, h))

    def dense_loss(lora, x):  # the dense MLP with LoRA on TOKENS * K rows: the FLOPs of the routed rows
        def linear(x, n):
            q = {k: v[0] for k, v in {**base["experts"][n], **lora[n]}.items()}
            hid = einsum("md,dr->mr", x, q["lora_a"].astype(dtype)).astype(dtype)
            return einsum("md,df->mf", x, q["w"]) + 2.0 * einsum("mr,rf->mf", hid, q["lora_b"].astype(dtype))
        y = linear((jax.nn.silu(linear(x, "gate_proj")) * linear(x, "up_proj")).astype(dtype), "down_proj")
        return jnp.sum(y ** 2)
    programs["dense_mlp_lora_step"] = (jax.jit(jax.grad(dense_loss, argnums=(0, 1))), (lora, x))

    timed = time_all(programs, args.repeats)
    results = {f"{name}_s": wall for name, (wall, _) in timed.items()}
    results.update({f"{name}_cpu_s": cpu for name, (_, cpu) in timed.items()})
    flops = moe.block_flops(TOKENS, D, F, E, K, rank=R)
    results["grouped_over_all_experts_flops"] = flops["grouped"] / flops["all_experts"]

    print(f"{'program':34s} {'wall s':>8s} {'CPU s':>8s}")
    for name, (wall, cpu) in timed.items():
        print(f"{name:34s} {wall:8.4f} {cpu:8.4f}")
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor())
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_name, "cores": os.cpu_count(), "backend": jax.default_backend(),
                          "jax": jax.__version__},
              "load_average": {"start": load_start, "end": os.getloadavg()[0]},
              "settings": {"dim": D, "mlp_dim": F, "experts": E, "top_k": K, "rank": R, "tokens": TOKENS,
                           "dtype": args.dtype, "repeats": args.repeats, "before": args.before},
              "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_grouped.json").write_text(json.dumps(record, indent=2) + "\n")
    print("RESULT " + " ".join(f"{k}={round(v, 4)}" for k, v in results.items()))


if __name__ == "__main__":
    main()
