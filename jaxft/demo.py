"""The main job: fine-tune the default model with LoRA on a task it does badly, and show before and after.

The task is generated here, so the demo needs no data set: rewrite an ISO date ("2031-07-04") in words
("July 4, 2031"). SmolLM2-135M-Instruct knows month names but rarely answers in exactly this form; a few
minutes of LoRA on a CPU teach it. The metric is exact match on held-out dates the model never saw.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import sys
import time
from pathlib import Path

import jax.numpy as jnp

from jaxft import checkpoint, config as config_lib
from jaxft.generate import generate, stop_ids
from jaxft.peft import io as adapter_io
from jaxft.train.loop import train

log = logging.getLogger("jaxft.demo")
INSTRUCTION = "Write this date in words, like 'January 5, 1999'."
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_dates.py"


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    start = datetime.date(1900, 1, 1).toordinal()
    out = []
    for _ in range(n):
        d = datetime.date.fromordinal(start + rng.randrange(73000))
        out.append({"instruction": INSTRUCTION, "input": d.isoformat(), "output": f"{d:%B} {d.day}, {d.year}"})
    return out


def write_task(data_dir: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path, list[dict]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    records = make_records(n_train + n_eval, seed)
    seen, unique = set(), []
    for r in records:  # held-out dates never appear in training
        if r["input"] not in seen:
            seen.add(r["input"])
            unique.append(r)
    train_recs, eval_recs = unique[n_eval:], unique[:n_eval]
    paths = []
    for name, recs in (("train.jsonl", train_recs), ("eval.jsonl", eval_recs)):
        path = data_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths.append(path)
    return paths[0], paths[1], eval_recs


def exact_match(model, records, system_prompt, trainable=None, spec=None, dtype=jnp.float32, batch=16):
    """(accuracy, generations): greedy answers to the chat-rendered prompts, compared after stripping."""
    tok = model.tokenizer
    answers = []
    for i in range(0, len(records), batch):
        prompts = []
        for r in records[i:i + batch]:
            messages = [{"role": "system", "content": system_prompt},
                        {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}]
            prompts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        outs = generate(model.cfg, model.params, [list(_ids(p)) for p in prompts], max_new_tokens=12,
                        eos_ids=stop_ids(tok, chat_template=True), trainable=trainable, lora=spec, dtype=dtype)
        answers += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    hits = sum(a == r["output"] for a, r in zip(answers, records))
    return hits / len(records), answers


def main(workdir: str = "runs/demo", overrides: tuple[str, ...] = ()) -> int:
    t0 = time.time()
    workdir = Path(workdir)
    config = config_lib.load(CONFIG, overrides)
    train_file, eval_file, eval_recs = write_task(workdir / "data", config.demo.train_examples,
                                                  config.demo.eval_examples)
    with config.unlocked():
        config.data.train, config.data.eval = str(train_file), str(eval_file)
    model = checkpoint.load(config.model, dtype=jnp.bfloat16)
    shown = eval_recs[: config.demo.eval_examples]
    before, before_out = exact_match(model, shown, config.data.system_prompt, dtype=jnp.bfloat16)
    print(f"exact match before fine-tuning: {before:.1%} on {len(shown)} held-out dates", file=sys.stderr)
    summary = train(config, workdir / "run", overwrite=True)  # an earlier demo's run is moved aside
    trainable, spec, _ = adapter_io.load(summary["adapter"])
    after, after_out = exact_match(model, shown, config.data.system_prompt, trainable, spec, dtype=jnp.bfloat16)
    print(f"\nTask: {INSTRUCTION}")
    print(f"{'input':<12} {'expected':<20} {'before':<28} after")
    for r, b, a in list(zip(shown, before_out, after_out))[:6]:
        print(f"{r['input']:<12} {r['output']:<20} {b[:27]:<28} {a}")
    print(f"\nexact match on {len(shown)} held-out dates: before {before:.1%}, after {after:.1%} "
          f"(eval loss {summary['eval_history'][0][1]:.3f} -> {summary['eval_history'][-1][1]:.3f}; "
          f"{time.time() - t0:.0f} s in all; adapter in {summary['adapter']})")
    result = {"exact_match_before": before, "exact_match_after": after, "seconds": time.time() - t0,
              "eval_loss": summary["eval_history"]}
    (workdir / "demo.json").write_text(json.dumps(result, indent=1))
    return 0


def _ids(p):
    return p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p
