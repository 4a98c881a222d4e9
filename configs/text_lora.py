"""LoRA domain adaptation of the default model on a plain-text corpus (causal LM, loss on every token).

  jaxft train --config configs/text_lora.py --workdir runs/shakespeare \
      --config.data.train=../shared/data/causal_lm/tinyshakespeare.txt

Everything not set here is as in
default_lora.py (every key: jaxft/config/base.py).
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.data.format = "text"  # .txt files are read whole and cut into seq_len chunks
    c.data.eval_fraction = 0.02  # held-out chunks of the same text
    c.train.seq_len = 512
    c.train.learning_rate = 1e-4
    c.lora.targets = "all-linear"
    return c
