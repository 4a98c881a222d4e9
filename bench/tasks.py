"""The task recipes of the example configs (issue 8), short enough for a 2-core CPU: jaxft vs HF PEFT.

Each recipe is an example config from configs/ with the overrides in RECIPES (fewer steps, smaller batches and
rows, fewer evaluation examples; the warmup scaled with the steps; seq2seq with one example per row,
data.pack=False, so that PyTorch sees the same rows without a block-diagonal mask). Its metric on the config's held-out examples is measured before training
(step 0) and after, by jaxft's trainer (`jaxft.train.loop.train`) and by the same recipe in PyTorch with HF
PEFT:

  * the same weights: MiniLM from `jaxft.hub.minilm_path()` (BertFor{Sequence,Token}Classification), the
    default model from its GGUF file (AutoModelForCausalLM; LlamaForSequenceClassification built from its
    config with the decoder's weights copied in);
  * the same head at step 0 (jaxft's initial head copied into transformers' classifier / score), so that the
    two step-0 figures must agree; LoRA A is drawn by each library (same distribution, B = 0);
  * `peft.LoraConfig` with the config's rank, alpha, dropout and target modules (jaxft's `all-linear`: every
    linear layer of the blocks, the BERT pooler and the head excluded), task type SEQ_CLS / TOKEN_CLS /
    CAUSAL_LM; the model's own dropout off, as in jaxft (LoRA dropout only);
  * torch AdamW with jaxft's learning-rate schedule (`jaxft.train.optim.schedule`), betas, weight decay and
    gradient clipping; the training batches of jaxft's task pipeline (`task.batches`), in the same order;
  * the same metric code: the task's `evaluate` (jaxft.metrics) over jaxft's evaluation batches, with a torch
    forward in place of the jitted one; for seq2seq, greedy generation (`generate`, same prompts, same stop
    tokens, same decoding) scored by `seq2seq.score`.

Compute is float32 on both sides unless --dtype bfloat16 (PEFT under torch.autocast): on a CPU without bf16
instructions, bf16 is 3-4x slower for both (bench/results/train_step.json). Wall time is the whole recipe
(load, data, compilation, both evaluations, training); step s is the median training step from step 2 on;
ratio is PEFT's wall time over jaxft's (> 1: jaxft faster).

    .venv/bin/python bench/tasks.py [--recipes sst2_minilm,conll_minilm,...] [--quick] [--dtype float32]

Figures go to bench/results/tasks.json (merged by recipe with earlier runs; --quick writes nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from jaxft import config as config_lib, tasks

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DATA_KEYS = ("train", "train_target", "eval", "eval_target")


@dataclasses.dataclass(frozen=True)
class Recipe:
    config: str  # file in configs/
    model: str  # minilm | default
    metrics: tuple  # headline metrics (keys of the task's evaluate)
    settings: dict  # overrides that fit a ~3-4 minute jaxft run on 2 quiet cores
    quick: dict  # --quick: a smoke run


_GEN = {"data.pack": False, "train.eval_batches": 1}  # seq2seq: one example per row; the eval loss on one batch
RECIPES = {
    "sst2_minilm": Recipe("minilm_sst2_lora.py", "minilm", ("accuracy", "f1"),
                          {"train.steps": 60, "train.batch_size": 32, "train.seq_len": 40,
                           "eval.max_examples": 512, "eval.batch_size": 64},
                          {"train.steps": 3, "train.batch_size": 8, "train.seq_len": 40, "eval.max_examples": 32}),
    "sst2_default": Recipe("sst2_lora.py", "default", ("accuracy",),
                           {"train.steps": 20, "train.batch_size": 16, "train.seq_len": 40,
                            "eval.max_examples": 192, "eval.batch_size": 32},
                           {"train.steps": 2, "train.batch_size": 4, "train.seq_len": 40, "eval.max_examples": 8,
                            "eval.batch_size": 8}),
    "conll_minilm": Recipe("minilm_conll_lora.py", "minilm", ("entity_f1",),
                           {"train.steps": 40, "train.batch_size": 32, "train.seq_len": 64,
                            "eval.max_examples": 512, "eval.batch_size": 64},
                           {"train.steps": 3, "train.batch_size": 8, "train.seq_len": 64, "eval.max_examples": 32}),
    "samsum_default": Recipe("samsum_lora.py", "default", ("rouge1_f1", "rouge2_f1", "rougeL_f1"),
                             {**_GEN, "train.steps": 16, "train.batch_size": 4, "train.seq_len": 256,
                              "train.learning_rate": 1e-3, "eval.max_examples": 16, "eval.batch_size": 8, "eval.generate_max_new_tokens": 64},
                             {**_GEN, "train.steps": 2, "train.batch_size": 2, "train.seq_len": 256,
                              "eval.max_examples": 2, "eval.batch_size": 2, "eval.generate_max_new_tokens": 8}),
    "multi30k_default": Recipe("multi30k_lora.py", "default", ("bleu", "chrf"),
                               {**_GEN, "train.steps": 20, "train.batch_size": 8, "train.seq_len": 128,
                                "train.learning_rate": 1e-3, "eval.max_examples": 32, "eval.batch_size": 16, "eval.generate_max_new_tokens": 48},
                               {**_GEN, "train.steps": 2, "train.batch_size": 2, "train.seq_len": 128,
                                "eval.max_examples": 4, "eval.batch_size": 4, "eval.generate_max_new_tokens": 8}),
}


def model_path(name: str) -> Path:
    from jaxft.checkpoint import resolve
    return resolve(name)


def make_config(recipe: Recipe, quick: bool, dtype: str):
    """The example config with the recipe's overrides; data paths made absolute (they are relative to the
    repository root), the warmup scaled with the steps, evaluation only at step 0 and at the end."""
    path = ROOT / "configs" / recipe.config
    base = config_lib.load(path)
    settings = dict(recipe.quick if quick else recipe.settings)
    steps = settings["train.steps"]
    warm = base.train.warmup_steps
    settings["train.warmup_steps"] = max(1, round(warm * steps / base.train.steps)) if warm else 0
    settings.update({"train.eval_every": 0, "train.save_every": steps, "train.keep_checkpoints": 1,
                     "dtype": dtype, "param_dtype": dtype})
    for key in DATA_KEYS:
        value = base.data[key] if key in base.data else ""
        if value and not Path(value).is_absolute():
            file = (ROOT / value).resolve()
            if not file.is_file():
                raise SystemExit(f"{file}: not found (this benchmark reads ../shared/data beside the repository)")
            settings[f"data.{key}"] = str(file)
    return config_lib.load(path, [f"{k}={v}" for k, v in settings.items()]), settings


# ---- jaxft ---------------------------------------------------------------------------------------------------

def jaxft_run(config) -> dict:
    from safetensors.numpy import load_file

    from jaxft.train.loop import train

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        summary = train(config, workdir)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        adapter = load_file(str(Path(workdir) / "adapter" / "adapter.safetensors"))
    before = {k[5:]: v for k, v in rows[0].items() if k.startswith("eval_")}
    return {"before": before, "after": summary["eval_metrics"], "wall_s": wall, "rows": rows,
            "trainable": int(sum(v.size for v in adapter.values())), "data": summary["data"]}


def step_seconds(rows: list[dict], tokens: list[int]) -> float:
    """Median training step of jaxft from step 2 on: the trainer logs tokens/s since its loop began, and the
    tokens of each step are known (the same batches PEFT trained on), which gives when each step ended."""
    ends = {}
    for r in rows:
        if "tokens_per_s" in r:
            ends[r["step"]] = sum(tokens[:r["step"]]) / r["tokens_per_s"]
    return float(np.median([ends[s] - ends[s - 1] for s in ends if s >= 2 and s - 1 in ends] or [math.nan]))


# ---- PEFT ----------------------------------------------------------------------------------------------------

def peft_targets(kind: str, targets: str):
    """peft target_modules equal to jaxft's lora.targets for the family."""
    if kind == "encoder":
        names = {"all-linear": r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|"
                               r"output\.dense)", "default": r"attention\.self\.(query|value)"}
        if targets in names:
            return rf".*encoder\.layer\.\d+\.{names[targets]}"
    else:
        names = {"all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 "default": ["q_proj", "v_proj"]}
        if targets in names:
            return names[targets]
    raise SystemExit(f"lora.targets={targets!r}: no PEFT equivalent written here (all-linear, default)")


def torch_model(task_name: str, kind: str, path: Path, n_labels: int, pad_id: int):
    """The transformers model of the recipe, float32, with the model's dropout off (as jaxft)."""
    import transformers

    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
    if kind == "encoder":
        cls = {"classification": transformers.BertForSequenceClassification,
               "token_classification": transformers.BertForTokenClassification}[task_name]
        return cls.from_pretrained(path, num_labels=n_labels, dtype=torch.float32, **no_dropout)
    causal = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if task_name == "seq2seq":
        return causal
    cls = {"classification": transformers.LlamaForSequenceClassification,
           "token_classification": transformers.LlamaForTokenClassification}[task_name]
    conf = causal.config
    conf.num_labels, conf.pad_token_id = n_labels, pad_id
    model = cls(conf).to(torch.float32)
    model.model.load_state_dict(causal.model.state_dict())
    return model


def copy_head(model, head: dict) -> None:
    """jaxft's initial head {name: {w (D, C), b (C,)}} into transformers' classifier / score."""
    (name, p), = head.items()
    module = getattr(model, name)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(np.array(p["w"], np.float32).T))
        if "b" in p:
            module.bias.copy_(torch.tensor(np.array(p["b"], np.float32)))


def peft_run(config, prep: dict, autocast: bool) -> dict:
    import peft

    from jaxft.data import rows
    from jaxft.tasks import seq2seq
    from jaxft.train.optim import schedule

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    name = tasks.name_of(config)
    task, kind, tokenizer = tasks.get(name), prep["kind"], prep["tokenizer"]
    train_iter, eval_batches, info = task.batches(config, tokenizer)
    eval_batches = eval_batches[:config.train.eval_batches]
    labels = info.get("labels") or []
    model = torch_model(name, kind, prep["path"], len(labels), rows.pad_id(tokenizer))
    if prep["head"] is not None:
        copy_head(model, prep["head"])
    c, t = config.lora, config.train
    task_type = {"classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "seq2seq": "CAUSAL_LM"}[name]
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=peft_targets(kind, c.targets),
        use_rslora=c.rslora, use_dora=c.dora, task_type=task_type))
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    if n_lora != prep["lora_modules"]:
        raise SystemExit(f"PEFT adapts {n_lora} modules, jaxft {prep['lora_modules']}: targets differ")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.b1, t.b2), weight_decay=t.weight_decay)
    lr_at = schedule(t.learning_rate, t.steps, t.warmup_steps, t.schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr_at(s)) / t.learning_rate)

    def out(batch):
        tok = torch.as_tensor(np.asarray(batch["tokens"]), dtype=torch.long)
        seg = torch.as_tensor(np.asarray(batch["segment_ids"]))
        extra = ({"token_type_ids": torch.zeros_like(tok)} if kind == "encoder" else
                 {"position_ids": torch.as_tensor(np.asarray(batch["positions"]), dtype=torch.long)})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=tok, attention_mask=(seg > 0).long(), **extra).logits.float()

    def loss_sum(logits, batch):
        if name == "seq2seq":
            tgt = torch.as_tensor(np.asarray(batch["targets"]), dtype=torch.long)
            nll = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
            w = torch.as_tensor(np.asarray(batch["loss_mask"]), dtype=torch.float32)
            return (nll * w).sum(), w.sum()
        gold = torch.as_tensor(np.asarray(batch["labels"]), dtype=torch.long)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1),
                                               ignore_index=rows.IGNORE, reduction="sum")
        return ce, (gold != rows.IGNORE).sum().float()

    def step(batch):
        with torch.no_grad():
            logits = out(batch)
            s, n = loss_sum(logits, batch)
        return float(s), float(n), logits.argmax(-1).numpy()

    def evaluate() -> dict:
        model.eval()
        ev = tasks.Eval(batches=eval_batches, step=step, info=info, config=config)
        if name != "seq2seq":
            result = task.evaluate(ev)
        else:  # the loss as the task computes it, then generated targets scored as seq2seq.evaluate does
            mean_loss, _ = tasks.evaluate_batches(ev)
            _, held = seq2seq.split(config)
            held = held[:rows.eval_settings(config)[1] or None]
            prompts, refs = seq2seq.texts(held, config)
            result = {"loss": mean_loss, **seq2seq.score(generate(model, tokenizer, config, prompts, autocast),
                                                          refs, config)}
        model.train()
        return result

    before = evaluate()
    tokens, ends, t1 = [], [], time.perf_counter()
    for _ in range(t.steps):
        batch = next(train_iter)
        tokens.append(int((np.asarray(batch["segment_ids"]) != 0).sum()))
        s, n = loss_sum(out(batch), batch)
        (s / n.clamp(min=1)).backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter() - t1)
    after = evaluate()
    steps = np.diff(ends)
    return {"before": before, "after": after, "wall_s": time.perf_counter() - t0,
            "step_s": float(np.median(steps)) if len(steps) else math.nan, "tokens": tokens,
            "trainable": int(sum(p.numel() for p in params))}


def generate(model, tokenizer, config, prompts: list[str], autocast: bool) -> list[str]:
    """Greedy targets as `jaxft.tasks.seq2seq.generate_texts` makes them: the same prompt ids, batches of
    eval.batch_size longest first, left padding, stopping at EOS / the end of the assistant turn."""
    import transformers

    from jaxft.data.formats import prompt_ids
    from jaxft.data import rows
    from jaxft.tasks import seq2seq

    d, e = config.data, config.eval
    ids = [prompt_ids(p, tokenizer, system_prompt=d.system_prompt, chat_template=d.chat_template) for p in prompts]
    stop, pad = seq2seq.stop_ids(tokenizer, d.chat_template), rows.pad_id(tokenizer)
    gen_config = transformers.GenerationConfig(max_new_tokens=e.generate_max_new_tokens, do_sample=False,
                                               eos_token_id=stop, pad_token_id=pad)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [""] * len(ids)
    batch = rows.eval_settings(config)[0]
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        width = len(ids[chunk[0]])
        tok = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(tok)
        for r, i in enumerate(chunk):
            tok[r, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, width - len(ids[i]):] = 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            new = model.generate(input_ids=tok, attention_mask=mask, generation_config=gen_config)[:, width:]
        for r, i in enumerate(chunk):
            row = new[r].tolist()
            row = row[:next((k for k, x in enumerate(row) if x in stop), len(row))]
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


# ---- both ----------------------------------------------------------------------------------------------------

def prepare(config, recipe: Recipe) -> dict:
    """What the PEFT side takes from jaxft's run (`build_run`): the tokenizer, the initial head, the number of
    adapted modules."""
    import jax

    from jaxft.peft.lora import target_paths
    from jaxft.train.run import build_run

    run = build_run(config, training=False)
    head = run.init_trainable().get("head")
    head = None if head is None else jax.tree.map(np.asarray, head)
    n = len(target_paths(run.base, config.lora.targets, run.cfg.model_type)) * run.cfg.n_layers
    return {"path": model_path(recipe.model), "kind": run.family.KIND, "tokenizer": run.tokenizer, "head": head,
            "lora_modules": n}


def run_recipe(name: str, recipe: Recipe, quick: bool, dtype: str) -> dict:
    config, settings = make_config(recipe, quick, dtype)
    load_before = os.getloadavg()[0]
    prep = prepare(config, recipe)
    print(f"== {name}: jaxft ({recipe.config}, {', '.join(f'{k}={v}' for k, v in settings.items())})", flush=True)
    jx = jaxft_run(config)
    print(f"== {name}: PEFT", flush=True)
    pt = peft_run(config, prep, autocast=dtype == "bfloat16")
    c = config.lora
    return {
        "config": f"configs/{recipe.config}", "overrides": settings, "metrics": list(recipe.metrics),
        "lora": {"rank": c.rank, "alpha": c.alpha, "dropout": c.dropout, "targets": c.targets},
        "learning_rate": config.train.learning_rate, "warmup_steps": config.train.warmup_steps,
        "examples_trained": config.train.steps * config.train.batch_size,
        "eval_examples": eval_count(config, jx["data"]),
        "data": jx["data"],
        "jaxft": {"before": jx["before"], "after": jx["after"], "wall_s": jx["wall_s"],
                  "step_s": step_seconds(jx["rows"], pt["tokens"]), "trainable": jx["trainable"]},
        "peft": {k: pt[k] for k in ("before", "after", "wall_s", "step_s", "trainable")},
        "load_average": [load_before, os.getloadavg()[0]], "date": date.today().isoformat()}


def eval_count(config, info: dict) -> int:
    """How many held-out examples the metric was computed on."""
    if "eval_examples" in info:  # classification
        return info["eval_examples"]
    if "eval_sentences" in info:  # token classification
        return info["eval_sentences"]
    held = (info.get("eval") or {}).get("records", 0)  # seq2seq: generation covers at most eval.max_examples
    return min(held, config.eval.max_examples or held)


def table(results: dict) -> str:
    head = ("recipe", "metric", "jaxft before", "after", "PEFT before", "after", "jaxft s", "PEFT s", "ratio",
            "step s jaxft", "PEFT")
    lines = ["  ".join(f"{h:>12}" if i > 1 else f"{h:<16}" for i, h in enumerate(head))]
    for name, r in results.items():
        j, p = r["jaxft"], r["peft"]
        for k, metric in enumerate(r["metrics"]):
            cells = [name if k == 0 else "", metric, *(side[when].get(metric, math.nan) for side in (j, p)
                                                       for when in ("before", "after"))]
            if k == 0:
                cells += [j["wall_s"], p["wall_s"], p["wall_s"] / j["wall_s"], j["step_s"], p["step_s"]]
            lines.append("  ".join(f"{c:<16}" if i <= 1 else f"{c:12.4f}" if i < 6 else f"{c:12.2f}"
                                   for i, c in enumerate(cells)))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few steps (writes no results)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and base dtype")
    args = ap.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: {', '.join(unknown)} not among {', '.join(RECIPES)}")
    torch.set_num_threads(os.cpu_count() or 1)
    results = {n: run_recipe(n, RECIPES[n], args.quick, args.dtype) for n in names}
    print(table(results))
    for name, r in results.items():  # with the same weights and head, step 0 must agree
        j, p = r["jaxft"]["before"]["loss"], r["peft"]["before"]["loss"]
        print(f"{name}: step-0 eval loss jaxft {j:.5f}, PEFT {p:.5f}; trainable parameters jaxft "
              f"{r['jaxft']['trainable']:,}, PEFT {r['peft']['trainable']:,}")
    flat = {}
    for name, r in results.items():
        for metric in r["metrics"]:
            for side in ("jaxft", "peft"):
                for when in ("before", "after"):
                    flat[f"{name}_{metric}_{side}_{when}"] = r[side][when].get(metric, math.nan)
        flat.update({f"{name}_jaxft_s": r["jaxft"]["wall_s"], f"{name}_peft_s": r["peft"]["wall_s"]})
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in flat.items()))
    if args.quick:
        print("(--quick: bench/results/tasks.json not written)")
        return
    write(results, args.dtype)


def write(results: dict, dtype: str) -> None:
    """bench/results/tasks.json: these recipes' figures, merged with the recipes an earlier run wrote."""
    import jax
    import peft
    import transformers

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "tasks.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    merged = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "versions": {"jax": jax.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__},
              "dtype": dtype, "recipes": {**old.get("recipes", {}), **results}}
    out.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
