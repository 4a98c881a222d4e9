"""QLoRA on the default model (SmolLM2-135M-Instruct): what a 4-bit base saves, and what it costs.

  (a) storage of the base: bytes and bits per parameter, from the stored arrays, for bf16, NF4 with and
      without double quantization, and int4 (group 64) with and without it;
  (b) peak process memory (RSS high-water mark) while loading the model, bf16 vs NF4 quantized while loading
      (`jaxft.quant.leaf_fn`), each in a fresh process, beside the size of the base plus the largest tensor
      read (float32: the GGUF file is dequantized on the host): the weights alone (also with the quantizer
      compiled beforehand, to tell XLA's compilation apart) and the whole `checkpoint.load` with its tokenizer;
  (c) peak process memory of the trainer's LoRA step (`build_run`: r=16 all-linear, AdamW, random tokens) for
      fp32 LoRA, bf16 LoRA (bf16 base and compute, fp32 LoRA parameters) and NF4 QLoRA (bf16 compute), with
      and without rematerialization, each in a fresh process; the high-water mark is reset once the step is
      compiled;
  (d) step time of QLoRA relative to bf16 LoRA, both in one process, repetitions interleaved (wall and CPU
      time: on a shared machine the CPU time of the process is the steadier of the two), at batch 4 x 128 and
      4 x 256;
  (e) evaluation loss after the same short SFT run (`jaxft.train.loop.train`, configs/default_lora.py) on a
      bf16 base and on an NF4 base;
  (f) what quantization alone costs, before any training: the causal-LM loss of the base on the last
      --f-examples records of the data (instruction, input and output, at most 128 tokens each), bf16 against
      each 4-bit format and block size.

    .venv/bin/python bench/qlora.py [--parts abcdef] [--time-seqs 128,256] [--steps 30] [--batch 8] [--seq 256]
                                    [--data ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import workers  # bench/workers.py (bench/ is the script's directory)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CONFIG = str(ROOT / "configs" / "default_lora.py")  # the trainer's config, overridden per case
MB = 2 ** 20
STEP_CASES = {  # name -> (base, compute dtype, remat)
    "fp32 LoRA": ("float32", "float32", False),
    "bf16 LoRA": ("bfloat16", "bfloat16", False),
    "NF4 QLoRA": ("nf4", "bfloat16", False),
    "bf16 LoRA, remat": ("bfloat16", "bfloat16", True),
    "NF4 QLoRA, remat": ("nf4", "bfloat16", True),
}


# --------------------------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process (`--worker JSON`) and prints one line `WORKER {json}`.


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _peak_mb() -> float:
    """The RSS high-water mark: what `getrusage().ru_maxrss` reports, read as VmHWM because a child's ru_maxrss
    also counts its parent's high-water mark at the fork (the kernel keeps the larger across exec)."""
    return _status_mb("VmHWM")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Resets the RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load(base: str, record=None):
    """The default model with its base as `base` (float32, bfloat16 or a quantized format), quantized while
    loading; `record(path, x, leaf made of it)` is called once each leaf is ready (x: the host array, or the
    `Layers` the loader hands over one layer at a time)."""
    import jax
    import jax.numpy as jnp

    from jaxft import checkpoint, quant
    from jaxft.checkpoint.assemble import to_device

    inner = quant.leaf_fn(base) if base in quant.FORMATS else to_device(jnp.dtype(base))  # as `load` does

    def leaf_fn(path, x):
        leaf = inner(path, x)
        if record is not None:
            record(path, x, jax.block_until_ready(leaf))
        return leaf

    leaf_fn.by_layer = inner.by_layer
    return checkpoint.load("default", leaf_fn=leaf_fn)


def worker_load(base: str, tokenizer: str = "cached", warm: bool = False) -> dict:
    """(b): peak RSS while loading, above the RSS of the process with everything imported. `tokenizer`: "none"
    (the weights alone), "cached" (read from jaxft's cache, which part (b) fills first) or "converted" (from the
    GGUF file, as on the first load); with `warm` the quantizer's programs (one per weight shape) are compiled
    before the baseline, to tell XLA's compilation from the loading itself."""
    import jax
    import numpy as np
    import torch  # noqa: F401  (transformers' GGUF tokenizer imports both: imported before the baseline)
    import transformers  # noqa: F401

    from jaxft import quant, tree
    from jaxft.checkpoint import gguf
    from jaxft.checkpoint.assemble import Layers

    if tokenizer == "none":
        gguf._tokenizer = lambda path, metadata_end: None
    elif tokenizer == "converted":  # what `_tokenizer` does when its cache holds no entry
        gguf._tokenizer = lambda path, metadata_end: transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True)
    if warm:
        for shape in ((576, 576), (576, 192), (576, 1536), (1536, 576)):  # the default model's linear weights
            jax.block_until_ready(quant.quantize(np.zeros(shape, np.float32), base))
    largest = {"bytes": 0, "path": ""}

    def record(path, x, leaf):
        shape = x.shape[1:] if isinstance(x, Layers) else x.shape  # one tensor as read
        if 4 * math.prod(shape) > largest["bytes"]:
            largest.update(bytes=4 * math.prod(shape), path=f"{path} {list(shape)}")

    _reset_peak()
    before = _rss_mb()
    t = time.perf_counter()
    model = _load(base, record)
    jax.block_until_ready(model.params)
    return {"rss_before_mb": before, "peak_mb": _peak_mb(), "rss_after_mb": _rss_mb(),
            "params_mb": tree.nbytes(model.params) / MB, "largest_tensor_mb": largest["bytes"] / MB,
            "largest_tensor": largest["path"], "load_s": time.perf_counter() - t}


def _step_setup(base: str, compute: str, remat: bool, batch: int, seq: int, layer_loop: str = "auto"):
    """(compiled train step, state, base params, batch on the mesh) of the trainer's run (`build_run`) of the
    default model with its base as `base` (float32, bfloat16 or a quantized format, with bf16 dense leaves),
    quantized while loading: LoRA r=16 on all linear layers, AdamW, on random tokens."""
    import numpy as np

    from jaxft import config as config_lib, quant
    from jaxft.train.run import build_run

    quantized = base in quant.FORMATS
    config = config_lib.load(CONFIG, [
        f"quant.format={base if quantized else 'none'}", f"param_dtype={'bfloat16' if quantized else base}",
        f"dtype={compute}", f"train.remat={remat}", f"train.layer_loop={layer_loop}", "lora.rank=16",
        "lora.alpha=32.0", "lora.targets=all-linear", "lora.dropout=0.0", f"train.batch_size={batch}",
        f"train.seq_len={seq}", "train.learning_rate=1e-4"])
    run = build_run(config, data=False)
    tok = np.random.RandomState(0).randint(0, run.cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    mb = run.put({"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
                  "segment_ids": np.ones((batch, seq), np.int32),
                  "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()})
    step = run.train_step.lower(run.state, run.base, mb).compile()
    return step, run.state, run.base, mb


def worker_step(base: str, compute: str, remat: bool, batch: int, seq: int, layer_loop: str = "auto") -> dict:
    """(c): peak RSS of training steps (the high-water mark reset after loading and compiling)."""
    from jaxft import tree

    step, state, params, mb = _step_setup(base, compute, remat, batch, seq, layer_loop=layer_loop)
    load_and_compile_peak = _peak_mb()
    before = _rss_mb()
    reset = _reset_peak()
    losses = []
    for _ in range(3):
        state, metrics = step(state, params, mb)
        losses.append(float(metrics["loss"]))
    mem = step.memory_analysis()
    return {"rss_before_mb": before, "step_peak_mb": _peak_mb() if reset else None,
            "process_peak_mb": max(load_and_compile_peak, _peak_mb()), "params_mb": tree.nbytes(params) / MB,
            "state_mb": tree.nbytes(state) / MB, "xla_temp_mb": mem.temp_size_in_bytes / MB, "losses": losses}


def worker_time(batch: int, seq: int, reps: int, layer_loop: str = "auto") -> dict:
    """(d): bf16 LoRA and NF4 QLoRA steps in one process, repetitions interleaved; wall and CPU seconds."""
    import numpy as np

    cases = {name: list(_step_setup(base, "bfloat16", False, batch, seq, layer_loop))
             for name, base in (("bf16", "bfloat16"), ("nf4", "nf4"))}
    wall = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for rep in range(reps + 1):  # the first round warms up
        for name, case in cases.items():
            step, state, params, mb = case
            t, c = time.perf_counter(), time.process_time()
            case[1], metrics = step(state, params, mb)
            float(metrics["loss"])
            if rep:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    med = {f"{k}_{name}_s": float(np.median(v[name])) for k, v in (("wall", wall), ("cpu", cpu)) for name in cases}
    return {**med, "wall_ratio": med["wall_nf4_s"] / med["wall_bf16_s"],
            "cpu_ratio": med["cpu_nf4_s"] / med["cpu_bf16_s"],
            "wall_ratio_per_rep": float(np.median(np.divide(wall["nf4"], wall["bf16"]))),
            "cpu_ratio_per_rep": float(np.median(np.divide(cpu["nf4"], cpu["bf16"]))), "wall": wall, "cpu": cpu}


def worker_sft(quant_format: str, data: str, steps: int, batch: int, seq: int) -> dict:
    """(e): the trainer's own run with configs/default_lora.py; the base bf16, or quantized while loading."""
    from jaxft import config as config_lib
    from jaxft.hub import default_model_path
    from jaxft.train.loop import train

    config = config_lib.load(ROOT / "configs" / "default_lora.py", [
        f"model={default_model_path()}", f"data.train={data}", f"quant.format={quant_format}",
        f"train.steps={steps}", f"train.batch_size={batch}", f"train.seq_len={seq}", "train.eval_every=0",
        f"train.save_every={steps}"])
    with tempfile.TemporaryDirectory() as workdir:
        t = time.perf_counter()
        summary = train(config, workdir)
        wall = time.perf_counter() - t
    history = summary["eval_history"]
    return {"eval_loss_before": history[0][1], "eval_loss_after": history[-1][1], "wall_s": wall,
            "process_peak_mb": _peak_mb(), "eval_examples": (summary["data"]["eval"] or {}).get("examples")}


WORKERS = {"load": worker_load, "step": worker_step, "time": worker_time, "sft": worker_sft}


def run_worker(kind: str, **kwargs) -> dict:
    """Runs one worker in a fresh Python process; its progress output goes to our stderr."""
    return workers.run(__file__, {"kind": kind, **kwargs}, f"{kind} {kwargs}", cwd=ROOT)


# --------------------------------------------------------------------------------------------------------------
# (a) storage, in this process.


def storage() -> dict:
    """Bytes and bits per parameter of the linear weights and of the whole base, per storage format."""
    import jax.numpy as jnp

    from jaxft import quant, tree

    params = _load("float32").params
    linear = [p for p in tree.flatten(params) if p.startswith("layers/") and p.endswith("/w")]
    rows = {}
    for name, fmt, dq in (("bf16", None, None), ("NF4 + DQ", "nf4", True), ("NF4", "nf4", False),
                          ("int4 g64 + DQ", "int4", True), ("int4 g64", "int4", False)):
        base = (quant.quantize_params(params, fmt, block_size=64, double_quant=dq) if fmt
                else tree.map_with_path(lambda p, x: x.astype(jnp.bfloat16), params))
        flat = tree.flatten(base)
        linear_bytes = sum(tree.nbytes(flat[p]) for p in linear)
        n_linear = sum(math.prod(flat[p].shape) for p in linear)
        rows[name] = {"linear_params": n_linear, "linear_mb": linear_bytes / MB,
                      "linear_bits": quant.stored_bits(base) if fmt else 8 * linear_bytes / n_linear,
                      "base_params": tree.count(params), "base_mb": tree.nbytes(base) / MB,
                      "base_bits": 8 * tree.nbytes(base) / tree.count(params)}
    return rows


# --------------------------------------------------------------------------------------------------------------


PARTS = {"a": "storage", "b": "load", "c": "step_memory", "d": "step_time", "e": "sft", "f": "quant_loss"}


def part_a(args) -> dict:
    print("(a) storage of the base (linear weights quantized; embeddings and norms bf16)")
    rows = storage()
    print(f"{'':14} {'linear MB':>10} {'bits/param':>11} {'base MB':>9} {'bits/param':>11}")
    for name, r in rows.items():
        print(f"{name:14} {r['linear_mb']:10.1f} {r['linear_bits']:11.3f} {r['base_mb']:9.1f} {r['base_bits']:11.3f}")
    print(f"  ({rows['bf16']['linear_params'] / 1e6:.1f}M linear parameters of "
          f"{rows['bf16']['base_params'] / 1e6:.1f}M)")
    return rows


LOAD_CASES = {  # name -> (base, tokenizer, quantizer compiled before the baseline)
    "bf16, weights": ("bfloat16", "none", False),
    "NF4, weights": ("nf4", "none", False),
    "NF4, weights, compiled": ("nf4", "none", True),
    "bf16, whole load": ("bfloat16", "cached", False),
    "NF4, whole load": ("nf4", "cached", False),
    "bf16, whole load, first": ("bfloat16", "converted", False),
}


def part_b(args) -> dict:
    print("(b) peak RSS while loading, MB (fresh process each; 'above': above the RSS with everything imported,"
          "\n    torch and transformers included; 'weights': without building the tokenizer; 'compiled': the "
          "quantizer\n    compiled before the baseline; 'whole load': `checkpoint.load` with its tokenizer, read from jaxft's "
          "cache\n    or, 'first', converted from the GGUF file as on the first load)")
    from jaxft import checkpoint

    checkpoint.load("default")  # fills the tokenizer cache, as any earlier load has
    load = {name: run_worker("load", base=b, tokenizer=t, warm=w) for name, (b, t, w) in LOAD_CASES.items()}
    print(f"{'':24} {'peak':>6} {'above':>6} {'RSS after':>10} {'params':>7} {'params + largest tensor':>24} "
          f"{'s':>5}")
    for name, r in load.items():
        print(f"{name:24} {r['peak_mb']:6.0f} {r['peak_mb'] - r['rss_before_mb']:6.0f} {r['rss_after_mb']:10.0f} "
              f"{r['params_mb']:7.0f} {r['params_mb'] + r['largest_tensor_mb']:24.0f} {r['load_s']:5.1f}")
    r = load["NF4, weights"]
    print(f"  largest tensor as read: {r['largest_tensor']} float32, {r['largest_tensor_mb']:.0f} MB")
    return load


def part_c(args) -> dict:
    print(f"(c) peak RSS of LoRA r=16 training steps, batch {args.step_batch} x {args.step_seq} (fresh process each)")
    steps = {name: run_worker("step", base=b, compute=c, remat=r, batch=args.step_batch, seq=args.step_seq,
                            layer_loop=args.layer_loop)
             for name, (b, c, r) in STEP_CASES.items()}
    print(f"{'':18} {'step peak':>10} {'process peak':>13} {'params':>8} {'LoRA+Adam':>10} {'XLA temp':>9}")
    for name, r in steps.items():
        peak = "n/a" if r["step_peak_mb"] is None else f"{r['step_peak_mb']:.0f}"
        print(f"{name:18} {peak:>10} {r['process_peak_mb']:13.0f} {r['params_mb']:8.0f} {r['state_mb']:10.1f} "
              f"{r['xla_temp_mb']:9.0f}")
    return {"batch": args.step_batch, "seq": args.step_seq, "layer_loop": args.layer_loop, **steps}


def part_d(args) -> dict:
    out = {"batch": args.step_batch, "layer_loop": args.layer_loop}
    for seq in args.time_seqs:
        print(f"(d) step time, batch {args.step_batch} x {seq}, medians of {args.reps} interleaved steps, "
              f"layer loop {args.layer_loop}")
        t = out[f"seq{seq}"] = run_worker("time", batch=args.step_batch, seq=seq, reps=args.reps,
                                            layer_loop=args.layer_loop)
        print(f"{'':10} {'wall s':>8} {'CPU s':>8}")
        for name in ("bf16", "nf4"):
            print(f"{name:10} {t[f'wall_{name}_s']:8.2f} {t[f'cpu_{name}_s']:8.2f}")
        print(f"{'NF4/bf16':10} {t['wall_ratio']:8.3f} {t['cpu_ratio']:8.3f}   (median of per-step ratios: "
              f"{t['wall_ratio_per_rep']:.3f} wall, {t['cpu_ratio_per_rep']:.3f} CPU)")
    return out


def part_e(args) -> dict:
    if not Path(args.data).is_file():
        print(f"(e) SKIPPED: {args.data} is missing (this benchmark reads ../shared/data; pass --data)")
        return {"skipped": f"{args.data} missing"}
    print(f"(e) SFT, {args.steps} steps of {args.batch} x {args.seq}, {Path(args.data).name}")
    sft = {name: run_worker("sft", quant_format=fmt, data=args.data, steps=args.steps, batch=args.batch,
                            seq=args.seq) for name, fmt in (("bf16", "none"), ("NF4", "nf4"))}
    print(f"{'':6} {'eval loss before':>17} {'after':>8} {'wall s':>8} {'process peak MB':>16}")
    for name, r in sft.items():
        print(f"{name:6} {r['eval_loss_before']:17.4f} {r['eval_loss_after']:8.4f} {r['wall_s']:8.0f} "
              f"{r['process_peak_mb']:16.0f}")
    rel = sft["NF4"]["eval_loss_after"] / sft["bf16"]["eval_loss_after"] - 1
    print(f"  NF4 vs bf16 eval loss after: {100 * rel:+.2f}%")
    return {"steps": args.steps, "batch": args.batch, "seq": args.seq, **sft, "eval_loss_rel_diff": rel}


QUANT_LOSS_CASES = {  # name -> quant.quantize_params arguments (None: the bf16 base)
    "bf16": None,
    "NF4 b64 + DQ": {"format": "nf4", "block_size": 64, "double_quant": True},
    "NF4 b64": {"format": "nf4", "block_size": 64, "double_quant": False},
    "NF4 b32 + DQ": {"format": "nf4", "block_size": 32, "double_quant": True},
    "int4 g64 + DQ": {"format": "int4", "block_size": 64, "double_quant": True},
    "int4 g32 + DQ": {"format": "int4", "block_size": 32, "double_quant": True},
}


def part_f(args) -> dict:
    if not Path(args.data).is_file():
        print(f"(f) SKIPPED: {args.data} is missing (this benchmark reads ../shared/data; pass --data)")
        return {"skipped": f"{args.data} missing"}
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxft import quant
    from jaxft.models import llama

    loaded = _load("float32")
    records = json.loads(Path(args.data).read_text())[-args.f_examples:]
    seq = 128
    tokens = np.zeros((len(records), seq), np.int32)
    segments = np.zeros_like(tokens)
    for row, r in enumerate(records):
        ids = loaded.tokenizer("\n".join([r["instruction"], r.get("input", ""), r["output"]]))["input_ids"][:seq]
        tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1

    @jax.jit
    def loss(base):
        logits, _ = llama.forward(loaded.cfg, base, tokens, segment_ids=segments, dtype=jnp.bfloat16)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * segments[:, 1:]) / jnp.sum(segments[:, 1:])

    print(f"(f) loss of the base before training, {len(records)} records of {Path(args.data).name} "
          f"(<= {seq} tokens each), bf16 compute")
    rows = {}
    for name, kwargs in QUANT_LOSS_CASES.items():
        base = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), loaded.params) if kwargs is None
                else quant.quantize_params(loaded.params, **kwargs))
        rows[name] = float(loss(base))
        print(f"  {name:14} {rows[name]:.4f}  ({100 * (rows[name] / rows['bf16'] - 1):+.2f}%)")
    return {"examples": len(records), "seq": seq, "loss": rows,
            "rel_diff": {k: v / rows["bf16"] - 1 for k, v in rows.items()}}


def figures(results: dict) -> dict:
    """The RESULT line: the headline figures of whichever parts the results hold."""
    out = {}
    if "storage" in results:
        rows = results["storage"]
        out.update(nf4_dq_bits=rows["NF4 + DQ"]["linear_bits"], nf4_bits=rows["NF4"]["linear_bits"],
                   int4_g64_bits=rows["int4 g64"]["linear_bits"], bf16_base_mb=rows["bf16"]["base_mb"],
                   nf4_dq_base_mb=rows["NF4 + DQ"]["base_mb"])
    if "load" in results:
        load = results["load"]
        above = {name: r["peak_mb"] - r["rss_before_mb"] for name, r in load.items()}
        out.update(load_peak_mb_bf16=load["bf16, whole load"]["peak_mb"],
                   load_peak_mb_nf4=load["NF4, whole load"]["peak_mb"],
                   load_weights_above_mb_bf16=above["bf16, weights"], load_weights_above_mb_nf4=above["NF4, weights"],
                   load_weights_above_mb_nf4_compiled=above["NF4, weights, compiled"])
    if "step_memory" in results:
        out.update({f"step_peak_mb_{k}": results["step_memory"][n]["step_peak_mb"] for k, n in (
            ("fp32", "fp32 LoRA"), ("bf16", "bf16 LoRA"), ("nf4", "NF4 QLoRA"), ("bf16_remat", "bf16 LoRA, remat"),
            ("nf4_remat", "NF4 QLoRA, remat"))})
    for key, t in results.get("step_time", {}).items():
        if key.startswith("seq"):
            out.update({f"step_time_ratio_wall_{key}": t["wall_ratio"], f"step_time_ratio_cpu_{key}": t["cpu_ratio"]})
    if "bf16" in results.get("sft", {}):
        sft = results["sft"]
        out.update(eval_loss_bf16=sft["bf16"]["eval_loss_after"], eval_loss_nf4=sft["NF4"]["eval_loss_after"],
                   eval_loss_rel_diff=sft["eval_loss_rel_diff"])
    if "rel_diff" in results.get("quant_loss", {}):
        out.update(base_loss_rel_diff_nf4=results["quant_loss"]["rel_diff"]["NF4 b64 + DQ"],
                   base_loss_rel_diff_nf4_b32=results["quant_loss"]["rel_diff"]["NF4 b32 + DQ"])
    return out


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="abcdef", help="the parts to run; with fewer than all, the figures of the "
                    "others are kept from the last bench/results/qlora.json")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "instruction" / "alpaca_small.json"))
    ap.add_argument("--steps", type=int, default=30, help="SFT steps of (e)")
    ap.add_argument("--batch", type=int, default=8, help="SFT batch of (e)")
    ap.add_argument("--seq", type=int, default=256, help="SFT sequence length of (e)")
    ap.add_argument("--step-batch", type=int, default=4, help="batch of the steps of (c) and (d)")
    ap.add_argument("--step-seq", type=int, default=128, help="sequence length of the steps of (c)")
    ap.add_argument("--time-seqs", type=lambda v: [int(x) for x in v.split(",")], default=[128, 256],
                    help="sequence lengths of the steps of (d), comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per case in (d)")
    ap.add_argument("--layer-loop", default="auto", choices=("auto", "scan", "unroll"),
                    help="the layers of (c) and (d) scanned or unrolled, as train.layer_loop (auto: as the trainer "
                    "decides: unrolled for a bf16 base with bf16 compute on the CPU, scanned for a quantized one)")
    ap.add_argument("--f-examples", type=int, default=48, help="records of the data scored in (f)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print("WORKER " + json.dumps(WORKERS[spec.pop("kind")](**spec)), flush=True)
        return
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"--parts: unknown part(s) {''.join(sorted(unknown))} (expected letters of {''.join(PARTS)})")

    path = RESULTS / "qlora.json"
    results = json.loads(path.read_text()) if set(args.parts) != set(PARTS) and path.is_file() else {}
    runs = results.setdefault("runs", {})  # section -> where and when its figures were taken
    for letter, section in PARTS.items():
        if letter in args.parts:
            results[section] = globals()[f"part_{letter}"](args)
            runs[section] = {"date": date.today().isoformat(), "machine": _machine()}
            print()
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    kept = sorted({s for s in runs if s not in {PARTS[p] for p in args.parts}})
    if kept:
        print(f"(figures of {', '.join(kept)} kept from the previous run: see 'runs' in {path.name})")
    print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in figures(results).items()))


if __name__ == "__main__":
    main()
