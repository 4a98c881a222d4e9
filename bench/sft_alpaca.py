"""LoRA SFT of the default model on alpaca_small: jaxft vs HF PEFT with the same recipe and the same batches.

Both sides see exactly the batches of jaxft's data pipeline (one example per row, loss on the response only,
a seeded held-out split of the file) and the same recipe: LoRA r=16, alpha 32, dropout 0.05 on all linear
layers, AdamW lr 2e-4 with 10 warmup steps and cosine decay, clipping at 1.0, bf16 compute (PEFT under
torch.autocast). Reports evaluation loss before and after, and wall time, for each.

    .venv/bin/python bench/sft_alpaca.py [--steps 60] [--data ../shared/data/instruction/alpaca_small.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from jaxft import checkpoint, config as config_lib, data
from jaxft.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def make_config(args, workdir_model: str):
    overrides = [f"model={workdir_model}", f"data.train={args.data}", "data.pack=False",
                 f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
                 "train.eval_every=0", f"train.eval_batches={args.eval_batches}", f"train.save_every={args.steps}"]
    return config_lib.load(ROOT / "configs" / "default_lora.py", overrides)


def peft_run(config, tokenizer, gguf_path: Path) -> dict:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    c, t = config.lora, config.train
    model = peft.get_peft_model(model, peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                       target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.b1, t.b2), weight_decay=t.weight_decay)
    warm, total = t.warmup_steps, t.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else
                                              0.5 * (1 + np.cos(np.pi * (s - warm) / max(total - warm, 1))))
    train_iter, eval_batches, _ = data.for_training(config, tokenizer)

    def loss_sum(batch):
        tok = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
        mask = torch.tensor(np.asarray(batch["segment_ids"]) > 0).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=tok, attention_mask=mask).logits
        logp = torch.log_softmax(logits.float(), -1)
        tgt = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long)
        nll = -logp.gather(-1, tgt[..., None])[..., 0]
        w = torch.tensor(np.asarray(batch["loss_mask"]))
        return (nll * w).sum(), w.sum()

    def evaluate():
        model.eval()
        with torch.no_grad():
            sums = [loss_sum(b) for b in eval_batches]
        model.train()
        return float(sum(s for s, _ in sums) / sum(n for _, n in sums))

    before = evaluate()
    t0 = time.perf_counter()
    for _ in range(total):
        s, n = loss_sum(next(train_iter))
        (s / n.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {"eval_loss_before": before, "eval_loss_after": evaluate(), "train_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "instruction" / "alpaca_small.json"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=8)
    args = ap.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data}: not found (this benchmark reads ../shared/data; pass --data)")
    torch.set_num_threads(os.cpu_count() or 1)
    from jaxft.hub import default_model_path

    gguf_path = default_model_path()
    config = make_config(args, str(gguf_path))
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        summary = train(config, workdir)
        jax_s = time.perf_counter() - t0
    history = summary["eval_history"]
    tokenizer = checkpoint.load(gguf_path).tokenizer
    ref = peft_run(config, tokenizer, gguf_path)
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "jaxft_eval_loss_before": history[0][1], "jaxft_eval_loss_after": history[-1][1],
               "jaxft_wall_s": jax_s, "peft_eval_loss_before": ref["eval_loss_before"],
               "peft_eval_loss_after": ref["eval_loss_after"], "peft_train_s": ref["train_s"],
               "eval_examples": (summary["data"]["eval"] or {}).get("examples")}
    print(f"{'':8} {'eval loss before':>17} {'after':>8}")
    print(f"{'jaxft':8} {results['jaxft_eval_loss_before']:17.4f} {results['jaxft_eval_loss_after']:8.4f}")
    print(f"{'peft':8} {results['peft_eval_loss_before']:17.4f} {results['peft_eval_loss_after']:8.4f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sft_alpaca.json").write_text(json.dumps(results, indent=1))
    print("RESULT " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in results.items() if k not in ("date", "machine")))


if __name__ == "__main__":
    main()
