"""One LoRA training step of a LLaVA-shaped model: jaxft vs transformers + PEFT, same batches, same run.

The model (`jaxft.vlm_task.build_model`): the default language model (SmolLM2-135M-Instruct) with a random
ViT-B/16-shaped CLIP tower (12 blocks of width 768, 224 x 224 pixels in 16 x 16 patches: 196 image tokens per
image) and a random 2-layer projector. The methods are the defaults of a vision-language run: LoRA r=16 (alpha
32) on every linear layer of the language model, the projector trained in full, the tower frozen; AdamW, float32.
Each row: one example of the shapes-and-colours task (`vlm_task.generate`: a 64 x 64 image, resized to 224, and
its question and answer), padded to --seq tokens, the loss on the answer; both sides take the same batch.
Reports seconds per step, each process's peak memory (max RSS: host memory, as this runs on CPU), and each
side's achieved FLOP/s as a fraction of the matmul peak of its framework measured in the same process. jaxft
runs the trainer's own step (`jaxft.train.run.build_run` of configs/default_lora.py with the LLaVA directory as
`model`, the run's first batch). Each side runs in a
fresh process, one after the other.

    .venv/bin/python bench/vlm.py [--steps 2] [--batch 2] [--seq 256] [--layers 12] [--cache] [--jaxft-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from train_step import matmul_peak, model_flops  # (bench/ is the script's directory)
import workers  # bench/workers.py

RESULTS = Path(__file__).parent / "results"
CONFIG = str(Path(__file__).parents[1] / "configs" / "default_lora.py")
LM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _trainer_run(model: Path, data: Path, rows: int, seq: int, *extra: str):
    """(the run `jaxft train` builds for the benchmark's model and data, its first batch on the mesh, that batch
    on the host); `extra` config overrides."""
    from jaxft import config as config_lib
    from jaxft.train.run import build_run

    config = config_lib.load(CONFIG, [f"model={model}", f"data.train={data}", f"data.eval={data}", "data.pack=false",
                                      "dtype=float32", "param_dtype=float32", "lora.rank=16", "lora.alpha=32.0",
                                      "lora.targets=all-linear", "lora.dropout=0.0", f"train.batch_size={rows}",
                                      f"train.seq_len={seq}", "train.learning_rate=1e-4", *extra])
    run = build_run(config)
    host = next(iter(run.train_data))
    return run, run.put(host), host


def jaxft_side(model: Path, data: Path, rows: int, seq: int, steps: int, out: Path) -> dict:
    """The trainer's step on the first batch of the run's own data (written to `out` for the other side)."""
    run, mb, host = _trainer_run(model, data, rows, seq)
    np.savez(out, **{k: np.asarray(v) for k, v in host.items()})
    state, base, step = run.state, run.base, run.train_step
    t = time.perf_counter()
    state, m = step(state, base, mb)
    first = float(m["loss"])
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, base, mb)
        float(m["loss"])
    return {"s": (time.perf_counter() - t) / steps, "compile_s": compile_s, "loss": first}


def peft_side(model: Path, data: Path, rows: int, seq: int, steps: int, out: Path) -> dict:
    """PEFT's step on the batch the jaxft side wrote: each row one example, padded (attention mask)."""
    import peft
    import transformers

    b = dict(np.load(out))
    m = transformers.LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LM_TARGETS,
                                               modules_to_save=["multi_modal_projector"]))
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.tensor(b["tokens"], dtype=torch.long)
    mask = torch.tensor(b["segment_ids"] > 0, dtype=torch.long)
    # transformers shifts labels itself: label[t + 1] is jaxft's target[t] where the loss counts
    labels = np.full(b["tokens"].shape, -100, np.int64)
    labels[:, 1:] = np.where(b["loss_mask"][:, :-1] > 0, b["targets"][:, :-1], -100)
    labels = torch.tensor(labels)
    pixels = torch.tensor(b["pixel_values"][np.asarray(b["image_mask"], bool)])

    def one():
        loss = m(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    first = one()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return {"s": (time.perf_counter() - t) / steps, "loss": first}


def cache_side(model: Path, data: Path, rows: int, seq: int, steps: int, out: Path) -> dict:
    """A second epoch with vision.cache_features=true against the same step from pixels, in one process, the
    two steps taking turns (so that a changing load falls on both): the trainer's step on the run's first
    batch, with the batch's tower features read from the cache (filled when the run was built) or not."""
    runs = {"pixels": _trainer_run(model, data, rows, seq),
            "cached": _trainer_run(model, data, rows, seq, "vision.cache_features=true")}
    states, times, first = {}, {name: [] for name in runs}, {}
    for name, (run, mb, _) in runs.items():
        states[name], m = run.train_step(run.state, run.base, mb)  # compilation
        first[name] = float(m["loss"])
    for _ in range(steps):
        for name, (run, mb, _) in runs.items():
            t = time.perf_counter()
            states[name], m = run.train_step(states[name], run.base, mb)
            float(m["loss"])
            times[name].append(time.perf_counter() - t)
    cache = runs["cached"][0].feature_cache
    return {"pixels_s": float(np.median(times["pixels"])), "s": float(np.median(times["cached"])),
            "loss": first["cached"], "pixels_loss": first["pixels"], "computed": cache.misses, "reused": cache.hits}


def flops(hf: dict, rows: int, seq: int) -> float:
    """One step's FLOPs: the language model's LoRA step (`train_step.model_flops`), the frozen tower's forward
    (2 * its matmul parameters * its tokens, + attention), the projector's forward and backward (6 P tokens)."""
    from jaxft.models.config import LlamaConfig

    v = hf["vision_config"]
    d, f, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    t = (v["image_size"] // v["patch_size"]) ** 2 + 1
    tower = rows * (2 * t * layers * (4 * d * d + 2 * d * f) + 4 * layers * t * t * d)
    e = hf["text_config"]["hidden_size"]
    projector = 6 * rows * (t - 1) * (d * e + e * e)
    return model_flops(LlamaConfig.from_hf(hf["text_config"]), rows * seq, 16) + tower + projector


def worker(side: str, model: str, data: str, rows: int, seq: int, steps: int, batch_file: str) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    run = {"jaxft": jaxft_side, "peft": peft_side, "cache": cache_side}[side]
    out = run(Path(model), Path(data), rows, seq, steps, Path(batch_file))
    out["peak"] = matmul_peak("torch" if side == "peft" else "jax", "f32")
    out["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def run_worker(*args) -> dict:
    return workers.run(__file__, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12, help="the tower's blocks (ViT-B: 12)")
    ap.add_argument("--cache", action="store_true",
                    help="also time jaxft's step in a second epoch with vision.cache_features (the tower's features "
                         "cached) against the step from pixels")
    ap.add_argument("--jaxft-only", action="store_true",
                    help="skip transformers + PEFT (with --cache: the cache's effect alone, in results/vlm_cache.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("WORKER " + json.dumps(worker(*json.loads(args.worker))), flush=True)
        return
    from jaxft import vlm_task

    with tempfile.TemporaryDirectory() as tmp:
        model = vlm_task.build_model(Path(tmp) / "llava", image_size=224, patch_size=16, width=768,
                                     layers=args.layers)
        data, _ = vlm_task.generate(Path(tmp) / "data", 4 * args.batch, seed=0, n_eval=args.batch)
        hf = json.loads((model / "config.json").read_text())
        total = flops(hf, args.batch, args.seq)
        results = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                   "load_average_start": os.getloadavg()[0], "batch": args.batch, "seq": args.seq,
                   "tower_layers": args.layers, "model_gflops_per_step": total / 1e9}
        print(f"{'side':<6} {'s/step':>8} {'GFLOP/s':>8} {'% peak':>7} {'max RSS':>8} {'compile':>8} {'loss':>7}")
        for side in ("jaxft",) if args.jaxft_only else ("jaxft", "peft"):
            m = run_worker(side, str(model), str(data), args.batch, args.seq, args.steps, str(Path(tmp) / "b.npz"))
            compile_s = f"{m['compile_s']:7.1f}s" if "compile_s" in m else ""
            print(f"{side:<6} {m['s']:8.2f} {total / m['s'] / 1e9:8.1f} {100 * total / m['s'] / m['peak']:6.1f}% "
                  f"{m['max_rss_gb']:7.2f}G {compile_s:>8} {m['loss']:7.3f}")
            results.update({f"{side}_s_per_step": m["s"], f"{side}_peak_fraction": total / m["s"] / m["peak"],
                            f"{side}_matmul_peak_gflops": m["peak"] / 1e9, f"{side}_max_rss_gb": m["max_rss_gb"],
                            f"{side}_first_loss": m["loss"]})
            if "compile_s" in m:
                results["jaxft_compile_s"] = m["compile_s"]
            if args.cache and side == "jaxft":
                c = run_worker("cache", str(model), str(data), args.batch, args.seq, args.steps,
                               str(Path(tmp) / "b.npz"))
                print(f"jaxft, a second epoch with vision.cache_features: {c['s']:.2f} s/step from cached features, "
                      f"{c['pixels_s']:.2f} from pixels (turn about, medians of {args.steps}; {c['computed']} "
                      f"image(s) through the tower, {c['reused']} read back), loss {c['loss']:.4f} / "
                      f"{c['pixels_loss']:.4f}")
                results.update({"cache_s_per_step": c["s"], "cache_pixels_s_per_step": c["pixels_s"],
                                "cache_images_computed": c["computed"], "cache_first_loss": c["loss"],
                                "cache_pixels_first_loss": c["pixels_loss"], "cache_speedup": c["pixels_s"] / c["s"]})
    results["load_average_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    if args.jaxft_only:
        (RESULTS / "vlm_cache.json").write_text(json.dumps(results, indent=1))
        return
    results["speedup"] = results["peft_s_per_step"] / results["jaxft_s_per_step"]
    (RESULTS / "vlm.json").write_text(json.dumps(results, indent=1))
    keys = ("speedup", "jaxft_s_per_step", "peft_s_per_step", "jaxft_peak_fraction", "peft_peak_fraction",
            "jaxft_max_rss_gb", "peft_max_rss_gb")
    print("RESULT " + " ".join(f"{k}={results[k]:.3f}" for k in keys))


if __name__ == "__main__":
    main()
