"""The upcycled MoE with LoRA on its experts and router vs the dense default model with LoRA of the same trainable
size: same data, same steps, held-out eval loss (issue 18, item 7).

MoE: the default model upcycled to 8 experts, top-2, router noise 0.02 (`jaxft upcycle`, cached in
bench/.cache/), configs/moe_lora.py (LoRA on attention, every expert's gate/up/down and the router; the
load-balancing loss at the checkpoint's 0.02, router z-loss 1e-3) at rank --moe-rank. Dense: the default
model, configs/default_lora.py with LoRA on all linear layers at the rank whose trainable size is closest to the
MoE's (both counts are printed). Both: ../shared/data/instruction/alpaca_small.json, a seeded shuffle with
--eval-examples held out, --steps steps of --batch x --seq tokens, the same learning rate and schedule, bf16.
Each model trains in its own fresh process through the trainer (`jaxft.train.loop.train`); the eval loss is the
trainer's (token loss only, no router loss) before and after training.

    .venv/bin/python bench/moe_vs_dense.py [--steps 16] [--batch 4] [--seq 96] [--moe-rank 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DATA = ROOT.parent / "shared" / "data" / "instruction" / "alpaca_small.json"
sys.path.insert(0, str(Path(__file__).parent))
from moe import MOE_DIR, ensure_model  # noqa: E402  (the benchmark scripts are not a package)
import workers  # noqa: E402  (bench/workers.py)


def lora_sizes(cfg) -> tuple[int, int]:
    """Trainable parameters per LoRA rank: (MoE: attention + experts + router, dense: all linear layers)."""
    d, f, L = cfg.dim, cfg.mlp_dim, cfg.n_layers
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attn = (d + qd) + 2 * (d + kd) + (qd + d)
    mlp = 2 * (d + f) + (f + d)
    return L * (attn + cfg.n_experts * mlp + d + cfg.n_experts), L * (attn + mlp)


def write_data(out: Path, data: Path, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    records = json.loads(data.read_text())
    random.Random(seed).shuffle(records)
    paths = []
    for name, part in (("train.jsonl", records[n_eval:]), ("eval.jsonl", records[:n_eval])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(str(out / name))
    return paths[0], paths[1]


def worker(side: str, rank: int, train_file: str, eval_file: str, steps: int, batch: int, seq: int,
           lr: float) -> dict:
    from jaxft import config as config_lib, tree
    from jaxft.peft import io as adapter_io
    from jaxft.train.loop import train

    moe = side == "moe"
    overrides = ["dtype=bfloat16", "param_dtype=bfloat16", f"lora.rank={rank}", f"lora.alpha={2.0 * rank}",
                 "lora.dropout=0.0", f"data.train={train_file}", f"data.eval={eval_file}", f"train.steps={steps}",
                 f"train.batch_size={batch}", f"train.seq_len={seq}", f"train.learning_rate={lr}",
                 "train.eval_every=0", f"train.save_every={steps}", "train.keep_checkpoints=1",
                 "train.layer_loop=scan"]  # one compiled layer: minutes less to compile on a CPU
    overrides += [f"model={MOE_DIR}"] if moe else ["model=default", "lora.targets=all-linear"]
    config = config_lib.load(str(ROOT / "configs" / ("moe_lora.py" if moe else "default_lora.py")), overrides)
    with tempfile.TemporaryDirectory(prefix=f"jaxft-bench-{side}-") as workdir:
        t = time.perf_counter()
        summary = train(config, workdir)
        wall = time.perf_counter() - t
        trainable, _, _ = adapter_io.load(Path(workdir) / "adapter")
        metrics = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    history = summary["eval_history"]
    ratios = [v for m in metrics[-1:] for k, v in m.items() if k.startswith("moe_expert_ratio")]
    return {"rank": rank, "trainable": tree.count(trainable), "eval_loss_before": history[0][1],
            "eval_loss_after": history[-1][1], "wall_s": wall,
            "final_max_expert_ratio": max(ratios) if ratios else None}


def run_worker(*args) -> dict:
    return workers.run(__file__, args, args[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--moe-rank", type=int, default=4)
    ap.add_argument("--eval-examples", type=int, default=32)
    ap.add_argument("--data", default=str(DATA), help="alpaca-style JSON (default: %(default)s)")
    ap.add_argument("--tag", default="", help="results go to bench/results/moe_vs_dense[_TAG].json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("WORKER " + json.dumps(worker(*json.loads(args.worker))), flush=True)
        return
    from jaxft.checkpoint.hf import read_config

    moe_per_rank, dense_per_rank = lora_sizes(read_config(ensure_model()))
    dense_rank = max(1, round(args.moe_rank * moe_per_rank / dense_per_rank))
    load_start = os.getloadavg()[0]
    out = {}
    with tempfile.TemporaryDirectory(prefix="jaxft-moe-vs-dense-") as tmp:
        train_file, eval_file = write_data(Path(tmp), Path(args.data), args.eval_examples)
        for side, rank in (("moe", args.moe_rank), ("dense", dense_rank)):
            out[side] = run_worker(side, rank, train_file, eval_file, args.steps, args.batch, args.seq, args.lr)
            r = out[side]
            print(f"{side:<6} r={rank:<3} trainable {r['trainable']:>10,}  eval loss {r['eval_loss_before']:.4f} -> "
                  f"{r['eval_loss_after']:.4f}  ({r['wall_s']:.0f} s)", flush=True)
    gap = out["moe"]["eval_loss_after"] - out["dense"]["eval_loss_after"]
    print(f"the MoE's held-out eval loss is {abs(gap):.4f} {'below' if gap < 0 else 'above'} the dense model's")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": vars(args) | {
        "dense_rank": dense_rank}, "load_average": {"start": load_start, "end": os.getloadavg()[0]}, **out,
        "moe_minus_dense_eval_loss": gap}
    record["settings"].pop("worker")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"moe_vs_dense{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"RESULT moe_eval_loss={out['moe']['eval_loss_after']:.4f} dense_eval_loss={out['dense']['eval_loss_after']:.4f}"
          f" moe_minus_dense={gap:.4f} moe_trainable={out['moe']['trainable']} dense_trainable="
          f"{out['dense']['trainable']} moe_before={out['moe']['eval_loss_before']:.4f} "
          f"dense_before={out['dense']['eval_loss_before']:.4f}")


if __name__ == "__main__":
    main()
