"""Multi30k English -> German translation with the default model (SmolLM2-135M-Instruct) and LoRA: the English
sentence in a prompt, the German one as the answer (task seq2seq; the loss on the German only), scored by BLEU
and chrF (sacrebleu) on generated translations of the validation set.

  jaxft train --config configs/multi30k_lora.py --workdir runs/multi30k
  jaxft eval --config configs/multi30k_lora.py --workdir runs/multi30k

Parallel text files: data.train holds one English sentence a line and data.train_target its German
translation on the same line (CRLF or LF); data.eval / data.eval_target likewise (Multi30k's own validation
files, 1,014 pairs). Everything not set here is as in
default_lora.py (every key: jaxft/config/base.py).
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib

DATA = "../shared/data/translation"


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.task = "seq2seq"  # loss on the target given the source; generation-based evaluation
    c.data.train = f"{DATA}/train.en"  # source sentences, one a line
    c.data.train_target = f"{DATA}/train.de"  # their translations, line by line; empty: data.train is one
    #                                          file with data.source_field and data.target_field columns
    c.data.eval = f"{DATA}/val.en"  # held-out sources; empty: split data.eval_fraction off the training pairs
    c.data.eval_target = f"{DATA}/val.de"  # their translations
    c.data.prompt_template = "Translate this sentence from English to German.\n\n{source}"  # {source}: it
    c.train.seq_len = 256  # rows of about three packed sentence pairs
    c.train.steps = 400  # about 10,000 of the 29,000 pairs
    c.train.eval_every = 100  # the evaluation generates every validation translation
    c.eval.metrics = "bleu"  # scored on generated translations
    c.eval.generate_max_new_tokens = 64  # the most tokens generated per held-out example
    c.eval.batch_size = 64  # prompts generated together
    return c
