"""SAMSum dialogue summarization with the default model (SmolLM2-135M-Instruct) and LoRA: the dialogue in a
prompt, the summary as the answer (task seq2seq; the loss on the summary only), scored by ROUGE on generated
summaries of held-out dialogues.

  jaxft train --config configs/samsum_lora.py --workdir runs/samsum
  jaxft eval --config configs/samsum_lora.py --workdir runs/samsum

SAMSum's validation file (818 dialogues) is the only SAMSum file in ../shared/data: a seeded tenth of it is held
out for evaluation, the rest trained on. Everything not set here is as in
default_lora.py (every key: jaxft/config/base.py).
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.task = "seq2seq"  # loss on the target given the source; generation-based evaluation
    c.data.train = "../shared/data/summarization/val.csv"  # CSV id,summary,dialogue (multi-line quoted)
    c.data.eval_fraction = 0.1  # share of the training records held out when data.eval is empty
    c.data.source_field = "dialogue"  # the source column (put into data.prompt_template)
    c.data.target_field = "summary"  # the target column (what the model learns to write)
    c.data.prompt_template = "Summarize this dialogue in one or two sentences.\n\n{source}"  # {source}: it
    c.train.seq_len = 512  # covers 99% of the dialogues with their summaries; longer ones are skipped
    c.train.steps = 150  # about 3 epochs of the 736 training dialogues
    c.train.eval_every = 50  # the evaluation generates every held-out summary
    c.eval.metrics = "rouge"  # scored on generated summaries
    c.eval.generate_max_new_tokens = 80  # the most tokens generated per held-out example
    c.eval.batch_size = 32  # prompts generated together
    return c
