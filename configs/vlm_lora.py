"""The vision-language end-to-end run: the default language model (SmolLM2-135M-Instruct) joined with a small
vision tower and projector trained from scratch, on the generated shapes-and-colours images (jaxft.vlm_task).

  python -m jaxft.vlm_task runs/vlm          # data, model, exact match before, training, exact match after

or, with a LLaVA directory and LLaVA JSON files of your own:

  jaxft train --config configs/vlm_lora.py --workdir runs/vlm --config.model=DIR \
      --config.data.train=train.json --config.data.eval=eval.json

The language model trains LoRA; the tower and the projector, random at the start, train in full (one
optimizer, one learning rate for all three parts).
"""

import ml_collections

from jaxft.config import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = "runs/vlm/model"  # a LLaVA directory: what `python -m jaxft.vlm_task runs/vlm` builds
    c.vision.method = "full"  # the tower is random: it learns everything it sees here
    c.projector.method = "full"
    c.peft.method = "lora"
    c.lora.rank = 16
    c.lora.dropout = 0.0
    c.train.learning_rate = 1e-3  # for the tower trained from scratch; LoRA tolerates it on a short run
    c.train.warmup_steps = 10
    c.train.steps = 120
    c.train.batch_size = 8
    c.train.seq_len = 96
    c.train.eval_every = 40
    c.train.save_every = 120
    c.train.eval_batches = 4
    return c
