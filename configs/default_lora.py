"""LoRA instruction tuning of the default model (SmolLM2-135M-Instruct) on an alpaca-style data set.

  jaxft train --config configs/default_lora.py --workdir runs/alpaca \
      --config.data.train=../shared/data/instruction/alpaca_small.json

This is the base config as it stands (jaxft/config/base.py declares every key, with its default and what it
means): task causal_lm, LoRA r=16 on every linear layer, at LoRA's default learning rate. With another
--config.peft.method, the learning rate is that method's default (jaxft/config/defaults.py) unless set here
or on the command line.
"""

import ml_collections

from jaxft.config import base


def get_config() -> ml_collections.ConfigDict:
    return base.get_config()
