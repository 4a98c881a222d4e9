"""Sharded LoRA training on 8 simulated CPU devices: per-device bytes of the base, trainable tree and optimizer
state, and step time, for each mesh (data, fsdp, tensor).

A small random Llama (D=256, 4 layers, 8 heads / 4 kv heads, F=1024, V=4096: ~7M parameters), LoRA r=16 on
every linear layer, AdamW, batch 16 x 128 tokens, float32. The CPU "devices" share this machine's cores, so
step times measure the cost of the partitioned program and its collectives, not a speed-up; the bytes are what
a real mesh would hold per device.

    .venv/bin/python bench/sharding.py [--steps 5]

Prints a table and a final `RESULT key=value ...` line; writes bench/results/sharding.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxft import parallel  # noqa: E402
from jaxft.models import llama  # noqa: E402
from jaxft.models.config import LlamaConfig  # noqa: E402
from jaxft.peft import lora  # noqa: E402
from jaxft.train.step import init_state, make_train_step  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4)]
RULES = (("batch", ("data", "fsdp")), ("seq", ()), ("embed", ("fsdp",)), ("heads", ("tensor",)),
         ("kv_heads", ("tensor",)), ("head_dim", ()), ("mlp", ("tensor",)), ("vocab", ("tensor",)),
         ("layers", ()), ("lora_rank", ()), ("experts", ()))  # as configs/default_lora.py
CFG = LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, mlp_dim=1024)
BATCH, SEQ, RANK = 16, 128, 16


def run(shape, steps: int, base_host, lora_host, batch) -> dict:
    layout = parallel.Layout(parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))]), RULES)
    spec = lora.LoraSpec(rank=RANK, alpha=2.0 * RANK)
    opt = optax.adamw(1e-4)
    base = jax.device_put(base_host, parallel.base_shardings(base_host, layout, llama.PARAM_AXES))
    trainable = jax.device_put(lora_host, parallel.trainable_shardings(lora_host, base_host, layout,
                                                                       llama.PARAM_AXES))
    state = parallel.create_sharded(lambda t, k: init_state(t, opt, k),
                                    lambda a: parallel.state_shardings(a, trainable, layout),
                                    trainable, jax.random.PRNGKey(2))

    def forward(base_, trainable_, mb, rng):
        return llama.forward(CFG, base_, mb["tokens"], trainable=trainable_, positions=mb["positions"],
                             segment_ids=mb["segment_ids"], lora=spec, rng=rng, layout=layout)[0]

    state_sh = parallel.shardings_of(state)
    step = jax.jit(make_train_step(forward, opt), donate_argnums=(0,),
                   in_shardings=(state_sh, parallel.shardings_of(base), layout.sharding(parallel.MICRO_BATCH)),
                   out_shardings=(state_sh, layout.replicated))
    placed = parallel.put_batch(batch, layout)
    t0 = time.perf_counter()
    compiled = step.lower(state, base, placed).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, base, placed)  # warm-up
    float(m["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, base, placed)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    per_device = lambda tree: max(parallel.bytes_per_device(tree).values())
    return {"mesh": "x".join(map(str, shape)), "devices": int(np.prod(shape)),
            "base_bytes_per_device": per_device(base), "trainable_bytes_per_device": per_device(state["trainable"]),
            "opt_bytes_per_device": per_device(state["opt_state"]), "step_s": statistics.median(times),
            "compile_s": compile_s, "loss": float(m["loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per mesh (after one warm-up step)")
    args = p.parse_args()
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()} (XLA_FLAGS={os.environ.get('XLA_FLAGS')})")
    base_host = jax.device_get(llama.init(jax.random.PRNGKey(0), CFG))
    lora_host = jax.device_get(lora.init(jax.random.PRNGKey(1), base_host, lora.LoraSpec(rank=RANK),
                                         lora.target_paths(base_host, "all-linear")))
    tokens = np.random.RandomState(0).randint(1, CFG.vocab_size, (1, BATCH, SEQ)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": np.ones(tokens.shape, np.float32),
             "segment_ids": np.ones(tokens.shape, np.int32),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape).copy()}
    rows = [run(shape, args.steps, base_host, lora_host, batch) for shape in MESHES]

    mib = lambda n: n / 2**20
    print(f"{'mesh d x f x t':>15} {'base MiB/dev':>13} {'LoRA MiB/dev':>13} {'Adam MiB/dev':>13} "
          f"{'step ms':>9} {'compile s':>10} {'loss':>9}")
    for r in rows:
        print(f"{r['mesh']:>15} {mib(r['base_bytes_per_device']):>13.2f} {mib(r['trainable_bytes_per_device']):>13.3f} "
              f"{mib(r['opt_bytes_per_device']):>13.3f} {1e3 * r['step_s']:>9.1f} {r['compile_s']:>10.1f} "
              f"{r['loss']:>9.4f}")
    one = rows[0]
    result = {"params": sum(x.size for x in jax.tree.leaves(base_host)), "batch": BATCH, "seq": SEQ, "rank": RANK,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "date": str(date.today()),
              "jax": jax.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sharding.json").write_text(json.dumps(result, indent=1) + "\n")
    fields = " ".join(f"{r['mesh']}_base_frac={r['base_bytes_per_device'] / one['base_bytes_per_device']:.3f} "
                      f"{r['mesh']}_step_ms={1e3 * r['step_s']:.1f}" for r in rows)
    print(f"RESULT params={result['params']} {fields}")


if __name__ == "__main__":
    main()
