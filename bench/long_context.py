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

With --steps, the whole training step instead, through the real wired path (`jaxft aot`'s compile of
the trainer's step: the families' attention seam, the backend policy's remat and PRNG for the target):
Llama-3-8B shapes, LoRA r=16 all-linear or QLoRA (NF4), bf16, fsdp over every chip, one row of T tokens a chip,
the loss over chunks of --loss-chunk tokens (train.loss_chunk), for each --topologies x --methods x --impls x
--seqs: GiB per device (arguments + temporaries + outputs - aliased) or
'needs N' where the compiler says it does not fit.

    .venv/bin/python bench/long_context.py [--seqs 4096,8192,16384] [--tpu v5e:2x2] [--time]
    .venv/bin/python bench/long_context.py --steps [--topologies v5e:2x2,v5e:4x4] [--methods lora,qlora]
        [--impls xla,splash] [--seqs 16384] [--loss-chunk 2048] [--extra mesh.context=2 ...]
    XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*" .venv/bin/python bench/long_context.py \
        --steps --layers 2 ...; .venv/bin/python bench/long_context.py --peak DIR
        (the trace: a step of fewer layers, whose buffer assignment XLA's TPU compiler dumps within a minute or
        two, then --peak lists the buffers live at the step's peak with their shapes and the ops that made them)
    .venv/bin/python bench/long_context.py --cpu-step --seqs 16384 --impls chunked [--loss-chunk 2048] [--n-steps 1]
        (the default model's own train step on this CPU: peak RSS and seconds; one setting a process)

(For the TPU rows, put libtpu on the path without installing it into the project's environment, e.g.
`pip install --target /tmp/libtpu libtpu` and PYTHONPATH=/tmp/libtpu.)
Prints a table and a `RESULT key=value ...` line; writes bench/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
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


LLAMA3_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=14336,
                 rope_theta=500000.0, max_seq_len=131072)
METHODS = {"lora": "none", "qlora": "nf4"}  # name -> quant.format
# What libtpu 0.0.42.1 offers a chip (its out-of-memory message's figure). Its compiler refuses only temporaries
# over this; a step whose arguments + temporaries exceed it compiles and would fail when loaded, so check here.
HBM_GIB = {"v5e": 15.75}


def step_gib(topology: str, method: str, impl: str, t: int, loss_chunk: int = 0, extra=(), layers: int = 32) -> dict:
    """The 8B train step compiled for `topology` (one row of t tokens a chip, fsdp over all, the loss over
    chunks of loss_chunk tokens, 0: full logits; the 8B shapes with `layers` layers): GiB per device, or what
    it needs where it does not fit."""
    from jaxft import config as config_lib
    from jaxft.models.config import LlamaConfig
    from jaxft.train.aot import compile_train_step, out_of_memory, topology_devices

    devices = topology_devices(topology)
    config = config_lib.load(Path(__file__).parent.parent / "configs" / "default_lora.py", [
        f"quant.format={METHODS[method]}", f"train.seq_len={t}", f"train.batch_size={len(devices)}", "mesh.data=1",
        "mesh.fsdp=-1", "lora.targets=all-linear", f"attention.impl={impl}",
        f"train.loss_chunk={loss_chunk}", *extra])
    start = time.perf_counter()
    try:
        mem = compile_train_step(config, devices, LlamaConfig(**{**LLAMA3_8B, "n_layers": layers})).memory_analysis()
        gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes) / 2**30
        out = {"gib": round(gib, 2), "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2),
               "args_gib": round(mem.argument_size_in_bytes / 2**30, 2)}
        hbm = HBM_GIB.get(topology.split(":")[0])
        if hbm is not None:
            out["fits"] = gib <= hbm
    except jax.errors.JaxRuntimeError as e:
        sizes = out_of_memory(str(e))
        if sizes is None:
            raise
        out = {"needs_gib": round(sizes[0] / 2**30, 2), "has_gib": round(sizes[1] / 2**30, 2)}
    return {**out, "compile_s": round(time.perf_counter() - start)}


def steps(args):
    rows = []
    for topology in args.topologies.split(","):
        for method in args.methods.split(","):
            for impl in args.impls.split(","):
                for t in (int(s) for s in args.seqs.split(",")):
                    extra = args.extra + ([f"layers={args.layers}"] if args.layers != 32 else [])  # (row key)
                    row = {"topology": topology, "method": method, "impl": impl, "seq": t,
                           "loss_chunk": args.loss_chunk, "extra": " ".join(extra),
                           **step_gib(topology, method, impl, t, args.loss_chunk, args.extra, args.layers)}
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print("\n| topology | method | attention | T | GiB per device (or needs) | temporaries | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fits = r["gib"] if "gib" in r else f"needs {r['needs_gib']} of {r['has_gib']} in temporaries"
        if r.get("fits") is False:
            fits = f"{fits}: does not fit ({HBM_GIB[r['topology'].split(':')[0]]})"
        print(f"| {r['topology']} | {r['method']} | {r['impl']} | {r['seq']} | {fits} | {r.get('temp_gib', '')} | "
              f"{r['compile_s']} |")
    RESULTS.mkdir(exist_ok=True)
    # each run adds its rows to the file (keyed by their settings), so that points compiled apart stay together
    path = RESULTS / "long_context_steps.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda r: tuple(r.get(k) for k in ("topology", "method", "impl", "seq", "loss_chunk", "extra"))  # noqa: E731
    merged = {key(r): r for r in old} | {key(r): {**r, "date": date.today().isoformat()} for r in rows}
    path.write_text(json.dumps({"jax": jax.__version__, "model": "llama3-8b", "rows": list(merged.values())},
                               indent=2) + "\n")
    print("RESULT " + " ".join(f"{r['topology']}_{r['method']}_{r['impl']}_{r['seq']}="
                               f"{r.get('gib', 'needs_' + str(r.get('needs_gib')))}" for r in rows))


def peak(dump: str, top: int = 16) -> None:
    """Prints what XLA's buffer assignment of the train step dumped into `dump` (XLA_FLAGS=--xla_dump_to) holds
    at its peak: the total, then the `top` largest buffers live there with their shapes and the op (jaxpr
    path) that made each, from the dump's live-range file and its optimized HLO."""
    dump = Path(dump)
    ranges = sorted(dump.glob("*train_step*after_optimizations-live-range.txt"))
    if not ranges:
        raise SystemExit(f"--peak: no '*train_step*after_optimizations-live-range.txt' in {dump}")
    text = ranges[-1].read_text()
    hlo = ranges[-1].with_name(ranges[-1].name.replace("-live-range", "")).read_text()
    total = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", text).group(1)
    print(f"peak (arguments included): {int(total.replace(' ', '')) / 2**30:.2f} GiB")
    live = text.split("(peak):", 1)[1]
    for name, index, size in re.findall(r"^    ([\w.-]+)\{([\d,]*)\}: (\d+) bytes", live, re.M)[:top]:
        line = re.search(rf"^\s*(?:ROOT )?%?{re.escape(name)} = (.*)$", hlo, re.M)
        line = line.group(1) if line else "?"
        shape = line.split(" ")[0] if not line.startswith("(") else line[:line.index(")") + 1]
        op = re.search(r'op_name="([^"]*)"', line)
        op = op.group(1).replace("jit(train_step)/", "") if op else ""
        print(f"{int(size) / 2**20:9.0f} MiB  {name}{{{index}}}  {shape}  {op}")


def cpu_step(t: int, impl: str, loss_chunk: int, steps: int, extra=()) -> dict:
    """The default model's own train step (configs/default_lora.py as it stands, LoRA r=16 all-linear, one row
    of t random tokens) on this CPU: seconds of the first call (compile + run) and of each next step, and the
    process's peak RSS (GiB; run one setting per process, as --cpu-step does)."""
    import resource

    import numpy as np

    from jaxft import config as config_lib
    from jaxft.train.run import build_run

    config = config_lib.load(Path(__file__).parent.parent / "configs" / "default_lora.py", [
        "train.batch_size=1", f"train.seq_len={t}", f"attention.impl={impl}", f"train.loss_chunk={loss_chunk}",
        *extra])
    run = build_run(config, data=False)
    tok = np.random.RandomState(0).randint(0, run.cfg.vocab_size, (1, t + 1)).astype(np.int32)
    batch = run.put({"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((1, t), np.float32),
                     "segment_ids": np.ones((1, t), np.int32), "positions": np.arange(t, dtype=np.int32)[None]})
    state, times = run.state, []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = run.train_step(state, run.base, batch)
        loss = float(metrics["loss"])
        times.append(round(time.perf_counter() - start, 1))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB
    return {"seq": t, "impl": impl, "loss_chunk": loss_chunk, "extra": " ".join(extra), "peak_rss_gib": round(rss, 2),
            "first_call_s": times[0], "step_s": times[1:], "loss": round(loss, 3), "dtype": config.dtype,
            "remat": run.model.remat, "layers": "unrolled" if run.model.unroll else "scanned",  # (the policy's)
            "load_avg": round(os.getloadavg()[0], 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="4096,8192,16384")
    p.add_argument("--tpu", default="v5e:2x2", help="a TPU topology for the ahead-of-time rows ('' for none)")
    p.add_argument("--time", action="store_true", help="also run the CPU attention calls once")
    p.add_argument("--steps", action="store_true", help="the 8B train step per topology, method, impl and T")
    p.add_argument("--topologies", default="v5e:2x2,v5e:4x4")
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--impls", default="auto", help="--steps: attention.impl (auto: the target's, splash on TPU)")
    p.add_argument("--loss-chunk", type=int, default=2048, help="--steps: train.loss_chunk (0: full logits)")
    p.add_argument("--extra", nargs="*", default=[], help="--steps: more config overrides, e.g. mesh.context=2")
    p.add_argument("--layers", type=int, default=32, help="--steps: the 8B shapes with this many layers")
    p.add_argument("--peak", metavar="DIR", help="list what an XLA dump's train step holds at its peak")
    p.add_argument("--cpu-step", action="store_true",
                   help="the default model's train step on this CPU at --seqs with --impls (one setting a run)")
    p.add_argument("--n-steps", type=int, default=1, help="--cpu-step: steps timed after the first call")
    args = p.parse_args()
    if args.peak:
        return peak(args.peak)
    if args.cpu_step:
        row = cpu_step(int(args.seqs), args.impls, args.loss_chunk, args.n_steps, args.extra)
        path = RESULTS / "long_context_cpu_step.json"
        old = json.loads(path.read_text())["rows"] if path.exists() else []
        key = lambda r: (r["seq"], r["impl"], r["loss_chunk"], r.get("extra", ""))  # noqa: E731
        rows = [r for r in old if key(r) != key(row)] + [row]
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps({"date": date.today().isoformat(), "jax": jax.__version__,
                                    "cpu": platform.processor() or platform.machine(), "model": "default (SmolLM2-135M)",
                                    "rows": rows}, indent=2) + "\n")
        print("RESULT " + " ".join(f"cpu_{row['impl']}_{row['seq']}_{k}={row[k]}"
                                   for k in ("peak_rss_gib", "first_call_s", "step_s")))
        return None
    if args.steps:
        return steps(args)
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
