"""One LoRA training step on the default model: jaxft vs HF PEFT on PyTorch, same settings, same run.

LoRA r=16 (alpha 32) on all linear layers, batch 4 x 256 tokens, AdamW; float32, and mixed precision
(bf16 compute with fp32 LoRA parameters; PEFT under torch.autocast("cpu", dtype=torch.bfloat16), jaxft with a
bf16 base). Reports seconds per step, tokens/s, the ratio, and each side's achieved FLOP/s as a fraction of a
matmul peak measured for that precision and framework. The jaxft side is the trainer's own step
(`jaxft.train.run.build_run` of configs/default_lora.py, with its gradient clipping) on random tokens. Each
side runs in its own fresh process (one after the other), so that one framework's idle threads never take CPU
from the other. jaxft runs with its layers scanned and unrolled (`train.layer_loop`); the ratio is that of the
loop `auto` picks for the precision (the trainer's default), the other is printed beside it.

    .venv/bin/python bench/train_step.py [--steps 3] [--batch 4] [--seq 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import workers  # bench/workers.py (bench/ is the script's directory)
from jaxft import checkpoint, config as config_lib, hub
from jaxft.backend import resolve
from jaxft.train.build import DTYPES
from jaxft.train.run import build_run

RESULTS = Path(__file__).parent / "results"
CONFIG = str(Path(__file__).parents[1] / "configs" / "default_lora.py")


def model_flops(cfg, tokens: int, rank: int) -> float:
    """FLOPs of one LoRA step: forward 2*P*tokens for the matmuls, backward 2*P*tokens (input gradients only:
    the base gets no weight gradient), LoRA's own matmuls 6*(in+out)*r*tokens, attention 3 * 4*T*D*tokens/2."""
    d, f, L = cfg.dim, cfg.mlp_dim, cfg.n_layers
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    linears = [(d, qd), (d, kd), (d, kd), (qd, d), (d, f), (d, f), (f, d)]
    p_matmul = L * sum(i * o for i, o in linears) + d * cfg.vocab_size
    p_lora = L * sum(i + o for i, o in linears) * rank
    return tokens * (4 * p_matmul + 6 * p_lora)


matmul_peak = workers.matmul_peak  # (bench/vlm.py imports it from here)


def jaxft_step_time(precision: str, batch: int, seq: int, steps: int, unroll: bool) -> tuple[float, float]:
    """(seconds per step, seconds of the first step: compilation) of the trainer's own step
    (`jaxft.train.run.build_run`: the default model, LoRA r=16 on all linear layers, AdamW with clipping) on
    random tokens."""
    dtype = "bfloat16" if precision == "bf16" else "float32"
    config = config_lib.load(CONFIG, [f"dtype={dtype}", f"param_dtype={dtype}", "lora.rank=16", "lora.alpha=32.0",
                                      "lora.targets=all-linear", "lora.dropout=0.0", f"train.batch_size={batch}",
                                      f"train.seq_len={seq}", "train.learning_rate=1e-4",
                                      f"train.layer_loop={'unroll' if unroll else 'scan'}"])
    run = build_run(config, data=False)
    timed = workers.time_steps(run, workers.lm_batch(run, batch, seq), steps)
    return timed["s"], timed["compile_s"]


def peft_step_time(gguf_path: Path, precision: str, batch: int, seq: int, steps: int) -> float:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tok = torch.tensor(np.random.RandomState(0).randint(0, model.config.vocab_size, (batch, seq + 1)))

    def one():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=tok[:, :-1], labels=tok[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    one()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t) / steps


def worker(side: str, precision: str, batch: int, seq: int, steps: int) -> dict:
    """One side's step time and its framework's matmul peak, measured in this (fresh) process. side: peft,
    jaxft-scan or jaxft-unroll."""
    torch.set_num_threads(os.cpu_count() or 1)
    gguf_path = hub.default_model_path()
    if side.startswith("jaxft"):
        s, compile_s = jaxft_step_time(precision, batch, seq, steps, unroll=side == "jaxft-unroll")
        return {"s": s, "compile_s": compile_s, "peak": matmul_peak("jax", precision)}
    return {"s": peft_step_time(gguf_path, precision, batch, seq, steps), "peak": matmul_peak("torch", precision)}


def run_worker(*args) -> dict:
    """`worker(*args)` in a fresh Python process: the two frameworks never share a process, so neither one's
    idle thread pool (torch's OpenMP threads spin after each parallel region) takes CPU from the other."""
    return workers.run(__file__, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2,
                    help="processes per side, interleaved; the fastest counts (a process's speed varies with where "
                         "the OS places its threads)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("WORKER " + json.dumps(worker(*json.loads(args.worker))), flush=True)
        return
    cfg = checkpoint.load(hub.default_model_path(), dtype=jnp.float32).cfg
    tokens = args.batch * args.seq
    flops = model_flops(cfg, tokens, 16)
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "load_average_start": os.getloadavg()[0], "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
               "model_gflops_per_step": flops / 1e9}
    print(f"{'precision':<10} {'side':<13} {'s/step':>8} {'tok/s':>8} {'GFLOP/s':>8} {'% peak':>7} {'compile':>8}")
    for precision in ("f32", "bf16"):
        dtype = DTYPES["bfloat16" if precision == "bf16" else "float32"]
        auto = "unroll" if resolve("cpu", dtype).unroll_layers else "scan"  # the trainer's default
        other = "scan" if auto == "unroll" else "unroll"
        sides = {"jaxft": f"jaxft-{auto}", f"jaxft_{other}": f"jaxft-{other}", "peft": "peft"}
        measured = {}
        for _ in range(args.rounds):  # a fresh process per side and round; each side's fastest round counts
            for key, side in sides.items():
                m = run_worker(side, precision, args.batch, args.seq, args.steps)
                if key not in measured or m["s"] < measured[key]["s"]:
                    measured[key] = m
        for key, m in measured.items():
            s, peak = m["s"], m["peak"]
            compile_s = f"{m['compile_s']:7.1f}s" if "compile_s" in m else ""
            print(f"{precision:<10} {sides[key]:<13} {s:8.2f} {tokens / s:8.0f} {flops / s / 1e9:8.1f} "
                  f"{100 * flops / s / peak:6.1f}% {compile_s:>8}")
            results[f"{precision}_{key}_s_per_step"] = s
            results[f"{precision}_{key}_tokens_per_s"] = tokens / s
            results[f"{precision}_{key}_peak_fraction"] = flops / s / peak
            results[f"{precision}_{key}_matmul_peak_gflops"] = peak / 1e9
            if "compile_s" in m:
                results[f"{precision}_{key}_compile_s"] = m["compile_s"]
        j_s, p_s = measured["jaxft"]["s"], measured["peft"]["s"]
        results[f"{precision}_jaxft_layer_loop"] = auto
        results[f"{precision}_speedup"] = p_s / j_s
        results[f"{precision}_speedup_{other}"] = p_s / measured[f"jaxft_{other}"]["s"]
        print(f"{precision:<10} jaxft/peft throughput ratio: {p_s / j_s:.2f}x with layer_loop=auto ({auto}); "
              f"{p_s / measured[f'jaxft_{other}']['s']:.2f}x {other}")
    results["load_average_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(results, indent=1))
    keys = ("f32_speedup", "bf16_speedup", "f32_jaxft_tokens_per_s", "f32_peft_tokens_per_s",
            "bf16_jaxft_tokens_per_s", "bf16_peft_tokens_per_s", "f32_jaxft_peak_fraction", "bf16_jaxft_peak_fraction",
            "f32_peft_peak_fraction", "bf16_peft_peak_fraction")
    print("RESULT " + " ".join(f"{k}={results[k]:.3f}" for k in keys)
          + f" f32_layer_loop={results['f32_jaxft_layer_loop']} bf16_layer_loop={results['bf16_jaxft_layer_loop']}")


if __name__ == "__main__":
    main()
