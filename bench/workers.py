"""What the benchmark scripts share: a worker in a fresh process, and the timing of a run's own train step.

Each side of a comparison runs in its own Python process (`python SCRIPT --worker JSON`, printing one line
`WORKER {json}`), so that no framework's idle thread pool (torch's OpenMP threads spin after each parallel
region) takes CPU from the other. bench/ is each script's directory, so `import workers` finds this file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import numpy as np


def matmul_peak(framework: str, dtype: str = "bf16", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in `framework` ("jax" or "torch"), `dtype` "bf16" (accumulating in float32,
    as the training matmuls do) or "f32": the peak each side's fraction is taken of, measured in the same run."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), jnp.bfloat16 if dtype == "bf16" else jnp.float32)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            f(a, a).block_until_ready()
    else:
        import torch

        a = torch.ones((n, n), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        torch.mm(a, a)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, a)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def run(script: str, payload, what: str = "", cwd=None) -> dict:
    """`python script --worker json.dumps(payload)` (in `cwd`, default ours) -> the dict of its last
    `WORKER {...}` line; RuntimeError with the end of its output when it fails."""
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(payload)], stdout=subprocess.PIPE,
                         text=True, cwd=cwd)
    lines = [line for line in out.stdout.splitlines() if line.startswith("WORKER ")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker {what or payload} failed (exit {out.returncode}): {out.stdout[-2000:]}")
    return json.loads(lines[-1][len("WORKER "):])


def lm_batch(run_, batch: int, seq: int) -> dict:
    """A synthetic causal-LM batch of `run_` (a `jaxft.train.run.Run`), on its mesh: random tokens, every
    position a target."""
    tok = np.random.RandomState(0).randint(0, run_.cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return run_.put({"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
                     "segment_ids": np.ones((batch, seq), np.int32),
                     "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()})


def time_steps(run_, mb: dict, steps: int) -> dict:
    """The run's train step on `mb`: {"s": seconds a step over `steps` steps after the first, "compile_s": the
    first call, "loss": the last loss}."""
    state, base, step = run_.state, run_.base, run_.train_step
    t = time.perf_counter()
    state, m = step(state, base, mb)
    float(m["loss"])
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, base, mb)
        float(m["loss"])
    return {"s": (time.perf_counter() - t) / steps, "compile_s": compile_s, "loss": float(m["loss"])}
