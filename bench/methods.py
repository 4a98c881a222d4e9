"""Every fine-tuning method of jaxft on the default model (SmolLM2-135M-Instruct): same data, same step budget.

Each method runs at its method defaults (`jaxft.config.METHOD_DEFAULTS`: learning rate per method); nothing
but peft.method changes between the runs (--data sst2 adds each method's size settings, SETTINGS below).

--data instruction (the default): ../shared/data/instruction/alpaca_small.json, a seeded shuffle split into
--eval-examples held-out records and the rest for training, 24 steps of 4 x 192 tokens: what a user who changes
only peft.method in configs/default_lora.py sees. Reported: the held-out eval loss before -> after and its
change in percent (accuracy and forgetting are not measured: the answers are free text).

--data sst2: SST-2 sentences (../shared/data/sentiment/train.tsv) framed as instruction tuning: the user asks whether
a sentence is positive or negative, the assistant answers with the word. A seeded shuffle of the file gives a
held-out set (--eval-examples) and a training file (--train-examples). Each method runs in a fresh process
(so that its peak RSS is its own) through jaxft's trainer for --steps steps of --batch rows of --seq tokens
(features: as many head steps, on features cached once). Reported per method:

  trainable   parameters of the trainable tree (count, % of the base model's)
  peak MB     RSS high-water mark of the process when training returns (model, data, compilation included)
  step s      median wall time of steps 3..N (from the trainer's metrics; features: of head steps, after the
              features were computed once, which wall_s includes)
  accuracy    the greedy answer's first word equals the label, on the held-out sentences (features: the head)
  eval loss   held-out loss before -> after (the trainer's evaluation; features: the head's cross-entropy)
  d ppl       forgetting: perplexity on a fixed slice of ../shared/data/causal_lm/tinyshakespeare.txt after
              fine-tuning minus before (features leave the language model unchanged: 0)

The base row is the model without fine-tuning. Everything else is configs/default_lora.py with bf16 compute
and storage.

    .venv/bin/python bench/methods.py [--data instruction|sst2] [--steps N] [--batch N] [--seq N] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import workers  # bench/workers.py (bench/ is the script's directory)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("lora", "adapter", "prefix", "prompt", "ia3", "full", "partial", "features")
QUESTION = "Is the sentiment of this sentence positive or negative?"
SYSTEM = "Classify sentiment."  # short: the template's default system prompt would not fit 64-token rows
LABELS = {"0": "negative", "1": "positive"}
# The step budget of each data set: (steps, batch, seq).
BUDGET = {"instruction": (24, 4, 192), "sst2": (30, 8, 64)}
SETTINGS = {  # --data sst2, beyond configs/default_lora.py
    "lora": ["lora.rank=16", "lora.targets=all-linear"],
    "adapter": ["adapter.size=64", "adapter.placement=houlsby"],
    "prefix": ["prefix.length=16"],
    "prompt": ["prompt.length=16", "prompt.init=text", f"prompt.init_text={QUESTION}"],
    "ia3": [],
    "full": [],
    "partial": ["partial.select=top2"],
    "features": ["features.text_field=input", "features.label_field=output", "features.layer=-1",
                 "features.pool=mean", "features.head=linear"],
}


# --------------------------------------------------------------------------------------------------------------
# Data, in the parent process.


def write_data(out: Path, kind: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    """Alpaca-style train.jsonl / eval.jsonl (seeded shuffle, disjoint) from the instruction or sentiment file."""
    if kind == "instruction":
        records = json.loads((SHARED / "instruction" / "alpaca_small.json").read_text())
        random.Random(seed).shuffle(records)
        return _write(out, records[n_eval:n_eval + n_train], records[:n_eval])
    lines = (SHARED / "sentiment" / "train.tsv").read_text().splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if "\t" in line]
    random.Random(seed).shuffle(rows)
    records = [{"instruction": QUESTION, "input": s.strip(), "output": LABELS[y.strip()]} for s, y in rows]
    return _write(out, records[n_eval:n_eval + n_train], records[:n_eval])


def _write(out: Path, train: list, held: list) -> tuple[Path, Path]:
    paths = []
    for name, part in (("train.jsonl", train), ("eval.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(out / name)
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------------------------
# Workers: one method each, in a fresh process.


def worker(method: str, kind: str, train_file: str, eval_file: str, steps: int, batch: int, seq: int,
           ppl_rows: int, ppl_seq: int) -> dict:
    import jax.numpy as jnp

    from jaxft import checkpoint, tree
    from jaxft.peft import io as adapter_io
    from jaxft.train.loop import train

    records = [json.loads(line) for line in Path(eval_file).read_text().splitlines()]
    if method == "base" and kind == "instruction":
        return {"base_params": tree.count(checkpoint.load("default", dtype=jnp.bfloat16).params),
                "peak_mb": _peak_mb()}
    if method == "base":
        model = checkpoint.load("default", dtype=jnp.bfloat16)
        return {"accuracy": accuracy(model, records), "ppl": perplexity(model, ppl_rows, ppl_seq),
                "base_params": tree.count(model.params), "peak_mb": _peak_mb()}

    config = make_config(method, kind, train_file, eval_file, steps, batch, seq)
    with tempfile.TemporaryDirectory(prefix=f"jaxft-bench-{method}-") as workdir:
        t0 = time.perf_counter()
        summary = train(config, workdir)
        wall = time.perf_counter() - t0
        peak = _peak_mb()
        trainable, spec, _ = adapter_io.load(Path(workdir) / "adapter")
        metrics = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    out = {"wall_s": wall, "peak_mb": peak, "trainable": tree.count(trainable),
           "learning_rate": config.train.learning_rate}
    if method == "features":
        history = summary["eval_history"]
        return {**out, "accuracy": summary["eval_metrics"]["accuracy"], "step_s": _head_step_time(metrics, batch),
                "eval_loss_before": history[0][1], "eval_loss_after": history[-1][1], "d_ppl": 0.0}
    history = summary["eval_history"]
    out.update(eval_loss_before=history[0][1], eval_loss_after=history[-1][1])
    if kind == "instruction":
        return {**out, "step_s": step_time(config, checkpoint.load("default").tokenizer, metrics)}
    model = checkpoint.load("default", dtype=jnp.bfloat16)
    ppl = perplexity(model, ppl_rows, ppl_seq, trainable, spec)
    return {**out, "accuracy": accuracy(model, records, trainable, spec), "ppl": ppl,
            "step_s": step_time(config, model.tokenizer, metrics),
            "skipped_too_long": summary["data"]["train"]["skipped_too_long"]}


def make_config(method: str, kind: str, train_file: str, eval_file: str, steps: int, batch: int, seq: int):
    """configs/default_lora.py with the data and the step budget; the method's own defaults for the rest."""
    from jaxft import config as config_lib

    budget = [f"train.steps={steps}", f"train.batch_size={batch}", f"train.seq_len={seq}", "train.eval_every=0",
              f"train.save_every={steps}", "train.keep_checkpoints=1"]
    extra = [] if kind == "instruction" else [f"data.system_prompt={SYSTEM}", "train.warmup_steps=3",
                                              "train.eval_batches=4", *SETTINGS[method]]
    return config_lib.load(ROOT / "configs" / "default_lora.py", [
        "model=default", f"data.train={train_file}", f"data.eval={eval_file}", f"peft.method={method}", *budget,
        *extra])


def step_time(config, tokenizer, metrics: list[dict]) -> float:
    """Median wall time of steps 3..N. The trainer logs tokens/s since the loop began; with the tokens of each
    step (the data pipeline replayed: it is seeded) that gives the time at which each step ended."""
    from jaxft import data

    batches, _, _ = data.for_training(config, tokenizer)
    seen, ends = 0, {}
    rows = {r["step"]: r for r in metrics if "tokens_per_s" in r}
    for step in sorted(rows):
        seen += int((next(batches)["segment_ids"] != 0).sum())
        ends[step] = seen / rows[step]["tokens_per_s"]
    deltas = sorted(ends[s] - ends[s - 1] for s in ends if s >= 3 and s - 1 in ends)
    return deltas[len(deltas) // 2]


def _head_step_time(metrics: list[dict], batch: int) -> float:
    """Median wall time of head steps 3..N: a features run logs rows of cached features per second (as
    tokens_per_s) since the loop began, `batch` rows a step."""
    ends = {r["step"]: r["step"] * batch / r["tokens_per_s"] for r in metrics if "tokens_per_s" in r}
    deltas = sorted(ends[s] - ends[s - 1] for s in ends if s >= 3 and s - 1 in ends)
    return deltas[len(deltas) // 2]


def accuracy(model, records: list[dict], trainable=None, spec=None, batch: int = 16) -> float:
    """Share of held-out sentences whose greedy answer starts with the right label."""
    import jax.numpy as jnp

    from jaxft.generate import generate

    tok, hits = model.tokenizer, 0
    eos = tuple(i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int))
    for lo in range(0, len(records), batch):
        prompts = []
        for r in records[lo:lo + batch]:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"{QUESTION}\n\n{r['input']}"}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        outs = generate(model.cfg, model.params, prompts, max_new_tokens=3, eos_ids=eos, trainable=trainable,
                        peft=spec, dtype=jnp.bfloat16)
        for r, o in zip(records[lo:lo + batch], outs):
            words = tok.decode(o, skip_special_tokens=True).strip().lower().split()
            hits += bool(words) and words[0].strip(string.punctuation) == r["output"]
    return hits / len(records)


def perplexity(model, rows: int, seq: int, trainable=None, spec=None) -> float:
    """exp(mean next-token loss) over the first rows * seq tokens of tinyshakespeare, float32 compute."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxft.models import llama
    from jaxft.train.step import token_loss

    text = (SHARED / "causal_lm" / "tinyshakespeare.txt").read_text()[:200_000]
    ids = np.asarray(model.tokenizer(text, add_special_tokens=False)["input_ids"][:rows * seq + 1], np.int32)
    tokens, targets = ids[:-1].reshape(rows, seq), ids[1:].reshape(rows, seq)

    @jax.jit
    def loss(params, trainable, tokens, targets):
        logits = llama.forward(model.cfg, params, tokens, trainable=trainable, peft=spec, dtype=jnp.float32)[0]
        return token_loss(logits, targets, jnp.ones_like(targets))

    total, count = loss(model.params, trainable, tokens, targets)
    return math.exp(float(total) / float(count))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(method: str, **kwargs) -> dict:
    return workers.run(__file__, {"method": method, **kwargs}, method, cwd=ROOT)


# --------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=tuple(BUDGET), default="instruction")
    ap.add_argument("--steps", type=int, help="default: 24 (instruction) or 30 (sst2)")
    ap.add_argument("--batch", type=int, help="default: 4 (instruction) or 8 (sst2)")
    ap.add_argument("--seq", type=int, help="default: 192 (instruction) or 64 (sst2)")
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--eval-examples", type=int, default=128)
    ap.add_argument("--ppl-rows", type=int, default=8, help="rows of the tinyshakespeare slice")
    ap.add_argument("--ppl-seq", type=int, default=128, help="tokens per row of the tinyshakespeare slice")
    ap.add_argument("--methods", help="comma-separated (default: all; instruction: all but features, which "
                                      "classifies and has no language-model loss)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print("WORKER " + json.dumps(worker(**spec)), flush=True)
        return
    kind = args.data
    for name, value in zip(("steps", "batch", "seq"), BUDGET[kind]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    default = [m for m in METHODS if not (kind == "instruction" and m == "features")]
    methods = [m for m in (args.methods or ",".join(default)).split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxft-bench-data-") as tmp:
        train_file, eval_file = write_data(Path(tmp), kind, args.train_examples, args.eval_examples)
        common = dict(kind=kind, train_file=str(train_file), eval_file=str(eval_file), steps=args.steps,
                      batch=args.batch, seq=args.seq, ppl_rows=args.ppl_rows, ppl_seq=args.ppl_seq)
        base = run_worker("base", **common)
        if kind == "sst2":
            print(f"base: accuracy {base['accuracy']:.3f}, ppl {base['ppl']:.2f}", file=sys.stderr, flush=True)
        rows = {}
        for m in methods:
            rows[m] = r = run_worker(m, **common)
            if kind == "sst2":
                r["d_ppl"] = r["ppl"] - base["ppl"] if "ppl" in r else r["d_ppl"]
            r["trainable_pct"] = 100 * r["trainable"] / base["base_params"]
            r["eval_loss_change_pct"] = 100 * (r["eval_loss_after"] / r["eval_loss_before"] - 1)
            print(f"{m}: {json.dumps(r)}", file=sys.stderr, flush=True)

    if kind == "instruction":
        print(f"\n{len(methods)} methods on SmolLM2-135M-Instruct, {args.steps} steps of {args.batch} x {args.seq} "
              f"(bf16), alpaca_small.json; eval loss on {args.eval_examples} held-out records\n")
        print(f"{'method':9} {'trainable':>12} {'% base':>8} {'lr':>8} {'peak MB':>8} {'step s':>7} "
              f"{'eval loss':>15} {'change':>8}")
        for m, r in rows.items():
            print(f"{m:9} {r['trainable']:12,d} {r['trainable_pct']:8.3f} {r['learning_rate']:8.0e} "
                  f"{r['peak_mb']:8.0f} {r['step_s']:7.2f} {r['eval_loss_before']:7.3f}->{r['eval_loss_after']:6.3f} "
                  f"{r['eval_loss_change_pct']:7.1f}%")
    else:
        print(f"\n{len(methods)} methods on SmolLM2-135M-Instruct, {args.steps} steps of {args.batch} x {args.seq} "
              f"(bf16), SST-2 as instructions; accuracy on {args.eval_examples} held-out sentences; forgetting on "
              f"{args.ppl_rows} x {args.ppl_seq} tokens of tinyshakespeare\n")
        print(f"{'method':9} {'trainable':>12} {'% base':>8} {'lr':>8} {'peak MB':>8} {'step s':>7} {'accuracy':>9} "
              f"{'eval loss':>15} {'d ppl':>8}")
        print(f"{'base':9} {'-':>12} {'-':>8} {'-':>8} {base['peak_mb']:8.0f} {'-':>7} {base['accuracy']:9.3f} "
              f"{'-':>15} {0.0:8.2f}   (ppl {base['ppl']:.2f})")
        for m, r in rows.items():
            print(f"{m:9} {r['trainable']:12,d} {r['trainable_pct']:8.3f} {r['learning_rate']:8.0e} "
                  f"{r['peak_mb']:8.0f} {r['step_s']:7.2f} {r['accuracy']:9.3f} "
                  f"{r['eval_loss_before']:7.3f}->{r['eval_loss_after']:6.3f} {r['d_ppl']:8.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")

    RESULTS.mkdir(exist_ok=True)
    results = {"date": date.today().isoformat(),
               "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}",
               "args": {k: v for k, v in vars(args).items() if k != "worker"},
               "settings": SETTINGS if kind == "sst2" else {}, "base": base, "methods": rows}
    name = "methods.json" if kind == "sst2" else "methods_instruction.json"
    (RESULTS / name).write_text(json.dumps(results, indent=1))
    figures = {f"{m}_eval_loss_change_pct": r["eval_loss_change_pct"] for m, r in rows.items()}
    if kind == "sst2":
        figures.update({"base_accuracy": base["accuracy"], "base_ppl": base["ppl"]})
        for m, r in rows.items():
            figures.update({f"{m}_accuracy": r["accuracy"], f"{m}_trainable_pct": r["trainable_pct"],
                            f"{m}_peak_mb": r["peak_mb"], f"{m}_step_s": r["step_s"], f"{m}_d_ppl": r["d_ppl"]})
    print("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
