"""The main job (`jaxft demo`): LoRA on the default model for a generated date-rewriting task.

Everything not set here is as in
default_lora.py (every key: jaxft/config/base.py).
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.data.system_prompt = "You rewrite dates."  # short: the template's default system prompt is long
    c.train.steps = 30
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 5
    c.train.eval_every = 15
    c.train.eval_batches = 2
    c.train.save_every = 30
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.demo.train_examples = 2000  # generated training dates
    c.demo.eval_examples = 48  # held-out dates for exact match (and eval loss)
    return c
