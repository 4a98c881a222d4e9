"""Greedy generation on the default model: jaxft vs transformers' `generate`, same prompts, same process.

float32 on both sides, a fixed number of new tokens (EOS ignored on both sides), batch 1 and batch 8 (eight
different prompts of the same length, so that transformers needs no padding). Each side runs once to warm up
(jaxft compiles then; its compile time is that first call minus a steady one), then `--repeats` times,
alternating, and the best run counts. transformers runs with torch's default threads and with one thread,
and the faster of the two is the baseline of the ratio. Prints all with the ratio, then one
`RESULT key=value ...` line, and writes the same figures to bench/results/generate.json.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--prompt-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from jaxft import checkpoint
from jaxft.backend import decode_unrolled, resolve
from jaxft.generate import generate

RESULTS = Path(__file__).parent / "results"
TEXTS = [  # each at least 32 tokens long
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine and",
    "To bake a simple loaf of bread you need flour, water, salt and yeast. First, mix the flour with the salt "
    "in a large bowl, then dissolve the yeast in warm water and pour it into",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "sugar and oxygen. It takes place mostly in the leaves, inside small structures called",
    "In the small harbour town, the fishermen woke before dawn every morning and prepared their boats for "
    "the long day at sea, checking the nets, the engines and the weather reports from",
    "A binary search finds an item in a sorted list by repeatedly halving the part of the list that could "
    "contain it: compare the item with the middle element, and if they are not equal,",
    "The Amazon rainforest covers much of the Amazon basin of South America and is home to millions of "
    "species of insects, plants, birds and other animals, many of which have never been",
    "When learning a new language, the most useful habit is to practise a little every day, because regular "
    "short sessions help the memory far more than a long session once a week, and",
    "The first computers filled entire rooms and used vacuum tubes, which often burned out and had to be "
    "replaced by hand. Later, transistors made machines smaller, cheaper and far more",
]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}  # torch_threads: its default


def timed(fn) -> tuple[float, float, list]:
    """(wall seconds, process CPU seconds, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n_new = args.new_tokens
    host = machine()
    cores = torch.get_num_threads()

    loaded = checkpoint.load("default")
    cfg, params, tok = loaded.cfg, loaded.params, loaded.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(loaded.path.parent, gguf_file=loaded.path.name,
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of new tokens
    prompts = [tok(t)["input_ids"][:args.prompt_tokens] for t in TEXTS]
    assert all(len(p) == args.prompt_tokens for p in prompts)

    def ours(batch, unroll=False):
        return generate(cfg, params, batch, max_new_tokens=n_new, unroll=unroll)

    def theirs(batch, threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            tokens = torch.tensor(batch)
            out = hf.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False, max_new_tokens=n_new,
                              pad_token_id=0)
        return out[:, len(batch[0]):].tolist()

    # transformers runs with as many threads as cores (its default) and with one: on a busy machine its
    # threads' spin-waiting can make one thread several times faster. The faster setting is the baseline.
    # jaxft decodes with its layer scan, and with the layers unrolled over weights split once (unroll=True).
    mine = {"jaxft": ours, "jaxft_unrolled": partial(ours, unroll=True)}
    sides = {**mine, **{f"transformers_{t}t": partial(theirs, threads=t) for t in sorted({cores, 1})}}
    load_start = os.getloadavg()[0]
    results = {}
    for b in (1, 8):
        batch = prompts[:b]
        first_wall = {}
        for name, fn in mine.items():  # compiles
            first_wall[name], _, first = timed(lambda: fn(batch))
        same = {name: fn(batch) == first for name, fn in sides.items()}  # warm-up
        runs = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                runs[name].append(timed(lambda: fn(batch))[:2])
        best = {name: min(r) for name, r in runs.items()}  # by wall time
        tok_s = {name: b * n_new / wall for name, (wall, _) in best.items()}
        baseline = max((n for n in sides if n not in mine), key=tok_s.get)
        default = "jaxft_unrolled" if decode_unrolled(resolve("cpu"), b) else "jaxft"  # generate(unroll=None)
        results[f"b{b}"] = {
            "new_tokens": b * n_new, "jaxft_tok_s": tok_s["jaxft"], "transformers_tok_s": tok_s[baseline],
            "ratio": tok_s["jaxft"] / tok_s[baseline], "transformers_baseline": baseline,
            "jaxft_unrolled_tok_s": tok_s["jaxft_unrolled"],
            "ratio_unrolled": tok_s["jaxft_unrolled"] / tok_s[baseline],
            "jaxft_compile_s": first_wall["jaxft"] - best["jaxft"][0],
            "jaxft_unrolled_compile_s": first_wall["jaxft_unrolled"] - best["jaxft_unrolled"][0],
            "ratio_default": tok_s[default] / tok_s[baseline], "default": default,
            "same_tokens": all(same.values()),
            "tok_s": tok_s, "cpu_s": {name: cpu for name, (_, cpu) in best.items()},
            "runs_wall_s": {name: [round(w, 3) for w, _ in r] for name, r in runs.items()}}

    print(f"greedy generation, {cfg.n_params / 1e6:.0f}M-parameter default model, float32, prompts of "
          f"{args.prompt_tokens} tokens, {n_new} new tokens, best of {args.repeats}; {host['cpu']}, "
          f"{os.cpu_count()} cores, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
    names = list(sides)
    print(f"{'batch':>5}  " + "  ".join(f"{n + ' tok/s':>22}" for n in names)
          + f"  {'ratio':>5}  {'unrolled ratio':>14}  {'default ratio':>13}  {'compile s (unrolled)':>20}  same tokens")
    for b in (1, 8):
        r = results[f"b{b}"]
        print(f"{b:>5}  " + "  ".join(f"{r['tok_s'][n]:>22.1f}" for n in names)
              + f"  {r['ratio']:>5.2f}  {r['ratio_unrolled']:>14.2f}  {r['ratio_default']:>13.2f}  "
              f"{r['jaxft_compile_s']:>9.1f} ({r['jaxft_unrolled_compile_s']:>6.1f})  {r['same_tokens']}")
    print(f"ratio: jaxft over the faster transformers setting; default: generate's own choice (unrolled from batch "
          f"{resolve('cpu').decode_unroll_from} on the CPU); CPU seconds of the best runs: "
          + "; ".join(f"batch {b[1:]}: " + ", ".join(f"{n} {c:.1f}" for n, c in r["cpu_s"].items())
                      for b, r in results.items()))

    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": host,
              "load_average": {"start": load_start, "end": os.getloadavg()[0]},
              "settings": {"model": str(loaded.path), "dtype": "float32", "prompt_tokens": args.prompt_tokens,
                           "new_tokens": n_new, "repeats": args.repeats, "decoding": "greedy, EOS ignored"},
              "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    flat = {f"{k}_{b}": round(r[k], 2) for b, r in results.items()
            for k in ("jaxft_tok_s", "jaxft_unrolled_tok_s", "transformers_tok_s", "ratio", "ratio_unrolled", "ratio_default",
                      "jaxft_compile_s", "jaxft_unrolled_compile_s")}
    print("RESULT " + " ".join(f"{k}={v}" for k, v in flat.items()))


if __name__ == "__main__":
    main()
