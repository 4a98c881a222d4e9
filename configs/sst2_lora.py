"""SST-2 sentiment classification with the default model (SmolLM2-135M-Instruct) + LoRA: the hidden state of
the last token feeds a 2-class head without bias (as LlamaForSequenceClassification), trained with the adapter.

  jaxft train --config configs/sst2_lora.py --workdir runs/sst2
  jaxft eval --config configs/sst2_lora.py --workdir runs/sst2

Everything not set here is as in minilm_sst2_lora.py (data, head, evaluation) and default_lora.py.
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("minilm_sst2_lora.py"))
    c.model = "default"
    c.train.batch_size = 16
    c.train.learning_rate = 5e-4
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = "all-linear"
    return c
