"""The base config: every key jaxft reads, with its default and a one-line comment.

Every config file is applied on top of this one (`jaxft.config.load`), so a file sets only what it changes and
a key that is not declared here is an error. Keys whose default is `None` take their value from the run's
method (`jaxft.config.defaults.METHOD_DEFAULTS`) unless the config file or an override sets them.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "causal_lm"  # causal_lm (SFT / text), classification, token_classification, embedding, mlm or
    #                       seq2seq: what is trained and measured (jaxft.tasks)
    c.model = "default"  # HF model directory, .gguf file, 'default' (SmolLM2-135M-Instruct) or 'minilm'
    c.seed = 0  # seeds the method's init, dropout and data order
    c.dtype = "bfloat16"  # compute dtype of the forward/backward pass (trainable params stay float32)
    c.param_dtype = "bfloat16"  # storage dtype of the frozen base weights

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # training file: .json/.jsonl/.csv/.tsv/.parquet/.txt (CoNLL columns for NER)
    c.data.eval = ""  # held-out file; empty: split data.eval_fraction off the training file
    c.data.eval_fraction = 0.05  # share of training records held out when data.eval is empty
    c.data.format = "alpaca"  # causal_lm: alpaca (instruction/input/output), messages (chat turns) or text
    c.data.instruction_field = "instruction"  # alpaca: the instruction field
    c.data.input_field = "input"  # alpaca: the optional input field
    c.data.output_field = "output"  # alpaca: the response field
    c.data.messages_field = "messages"  # messages: the list of {role, content}
    c.data.text_field = "text"  # the text (text format: .txt files are read whole; classification, embedding:
    #                             the text column; token_classification: the list of words)
    c.data.system_prompt = ""  # system message prepended to chat renderings; empty: the template's default
    c.data.pack = True  # pack several examples into each row (segment ids keep them apart)
    c.data.label_field = "label"  # classification: the class column; token_classification: the list of tags
    c.data.labels = ""  # classification / NER: the classes in class-index order, comma-separated; "": collected
    c.data.tag_scheme = "iob2"  # token_classification: how the files write tags, iob1 or iob2 (read as IOB2)
    c.data.pair_field = ""  # embedding: the text each data.text_field should embed close to (required there)
    c.data.score_field = ""  # embedding: a similarity score per evaluation pair (adds Spearman); "": none
    c.data.train_target = ""  # seq2seq: a line-aligned target file beside data.train; "": one file with columns
    c.data.eval_target = ""  # seq2seq: the target file beside data.eval, as data.train_target
    c.data.source_field = "source"  # seq2seq: the source column (put into data.prompt_template)
    c.data.target_field = "target"  # seq2seq: the target column (what the model learns to write)
    c.data.prompt_template = "{source}"  # seq2seq: the prompt around the source; must contain {source}
    c.data.chat_template = True  # seq2seq: the prompt as a user turn of the chat template; False: prompt + target

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200  # optimizer steps (0: evaluate and save the starting point)
    c.train.batch_size = 8  # rows per optimizer step (split over train.grad_accum micro-batches)
    c.train.grad_accum = 1  # micro-batches per step; the loss is normalized over the whole window
    c.train.seq_len = 256  # tokens per row
    c.train.learning_rate = placeholder(float)  # peak learning rate; None: the method's default
    c.train.schedule = "cosine"  # cosine, linear or constant (after warmup)
    c.train.warmup_steps = 10  # linear warmup from 0
    c.train.weight_decay = 0.0  # AdamW decoupled weight decay
    c.train.b1 = 0.9  # AdamW beta1
    c.train.b2 = 0.999  # AdamW beta2
    c.train.max_grad_norm = 1.0  # global-norm gradient clipping; 0 disables
    c.train.remat = "auto"  # true: rematerialize each layer in the backward pass (less memory, more compute);
    # false; auto: the backend policy's choice (jaxft.backend: on for GPU / TPU; on the CPU from 4,096 tokens
    # of a micro-batch per device, off below)
    c.train.layer_loop = "auto"  # scan (one compiled layer), unroll (straight-line layers: slower compile), or
    # auto: unroll for bfloat16 on CPU (XLA:CPU's scan converts bf16 slices to f32 every step), scan elsewhere
    # and for a quantized base (unrolled, XLA:CPU keeps dequantized weights alive: QLoRA would save no memory)
    # or rematerialized layers (unrolled, XLA:CPU keeps much of what remat drops)
    c.train.loss_chunk = 0  # causal LM / seq2seq: the cross-entropy over chunks of N tokens, the output head inside
    # each chunk and recomputed in the backward pass, only rows with a target (jaxft.models.loss); 0: full logits
    c.train.mlp_chunk = 0  # LLaMA-family dense MLPs over chunks of N tokens of a row (strided, each chunk's
    # intermediates recomputed in the backward pass): less memory at long T for ~1/3 more MLP forward; 0: off
    c.train.eval_every = 50  # evaluate every N steps (and at step 0 and at the end); 0: only start and end
    c.train.eval_batches = 8  # at most this many evaluation batches
    c.train.early_stopping_patience = 0  # stop after this many evaluations without improvement; 0: never
    c.train.save_every = 100  # checkpoint every N steps (and at the end)
    c.train.keep_checkpoints = 2  # checkpoints kept in WORKDIR/checkpoints
    c.train.log_every = 1  # metrics.jsonl / TensorBoard every N steps
    c.train.l2sp = 0.0  # L2-SP: adds l2sp/2 * ||theta - theta_pretrained||^2 to the loss (full and partial only)

    c.guard = ml_collections.ConfigDict()  # the divergence guard: stops a run whose training has collapsed
    c.guard.enabled = True  # stop on a non-finite loss or parameters, or on a collapse as below
    c.guard.patience = 10  # steps of collapse (gradient norm 0, or loss above guard.loss_factor) before stopping
    c.guard.loss_factor = 4.0  # a loss above this multiple of the step-0 loss counts as collapse

    c.eval = ml_collections.ConfigDict()  # evaluation of the tasks (not causal_lm's loss-only evaluation)
    c.eval.batch_size = 0  # rows (seq2seq: prompts generated together) per evaluation batch; 0: train.batch_size
    c.eval.max_examples = 0  # evaluate at most this many held-out examples; 0: all
    c.eval.metrics = ""  # seq2seq, comma-separated: rouge (ROUGE-1/2/L), bleu (BLEU, chrF); "": loss only
    c.eval.generate_max_new_tokens = 64  # seq2seq: the most tokens generated per held-out example
    c.eval.temperature = 0.0  # seq2seq: 0 greedy decoding; > 0 sampling (seeded by config.seed)
    c.eval.top_k = 0  # seq2seq sampling: only the k most likely tokens (0: all)
    c.eval.top_p = 1.0  # seq2seq sampling: the smallest set of tokens reaching this probability (1: all)

    c.head = ml_collections.ConfigDict()  # the task head of classification and embedding
    c.head.pool = "default"  # default (encoders: the pooler on [CLS], or mean for embedding; decoders: the last
    #                          token), cls, mean or last

    c.demo = ml_collections.ConfigDict()  # `jaxft demo` (configs/demo_dates.py)
    c.demo.train_examples = 2000  # generated training dates
    c.demo.eval_examples = 48  # held-out dates for exact match (and eval loss)

    c.quant = ml_collections.ConfigDict()
    c.quant.format = "none"  # frozen base: none (param_dtype), nf4 or int4 (QLoRA); quantized while loading
    c.quant.block_size = 64  # values per scale (nf4 block / int4 group), along each weight's input axis
    c.quant.double_quant = True  # nf4: quantize the scales too (8-bit, blocks of 256), ~0.37 bits/param saved
    c.quant.include = "((encoder|decoder)/)?layers/.*/w"  # regex over weight paths to quantize (T5: both stacks;
    # embeddings, norms and the head stay dense); one that matches no weight of the model is an error

    c.moe = ml_collections.ConfigDict()  # mixture-of-experts models only (Mixtral, Qwen2-MoE): the router's losses
    c.moe.aux_loss_coef = placeholder(float)  # load-balancing loss weight; None: the model's router_aux_loss_coef
    c.moe.router_z_loss_coef = placeholder(float)  # router z-loss weight in training; None: 0 (the models define none)
    c.moe.capacity_factor = placeholder(float)  # rows per expert ceil(factor*tokens*top_k/E), extra ones dropped
    # (in training and evaluation, per micro-batch, first choices first); None or 0: dropless

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # lora, adapter, prefix, prompt, ia3, full, partial or features; settings below
    c.peft.init_from = ""  # start from this adapter (PEFT dir, jaxft adapter or workdir), not a fresh init; "": none

    # The other parts of a vision-language model (llava, idefics3), each frozen, lora (with the lora.* settings)
    # or full, beside peft.method for its language model (jaxft.peft.parts); a text-only model keeps the defaults.
    c.vision = ml_collections.ConfigDict()
    c.vision.method = "frozen"  # the vision tower: frozen, lora or full
    c.vision.targets = "default"  # vision.method=lora: regex over the tower's paths, 'default' (q/v) or 'all-linear'
    c.vision.cache_features = False  # vision.method=frozen: each image's tower output computed once, then reused
    c.projector = ml_collections.ConfigDict()
    c.projector.method = "full"  # the connector (LLaVA's MLP projector, Idefics3's linear map): frozen, lora or full

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # r
    c.lora.alpha = 32.0  # scaling alpha / r (rsLoRA: alpha / sqrt(r))
    c.lora.dropout = 0.05  # dropout on the LoRA input, in [0, 1)
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

    c.attention = ml_collections.ConfigDict()  # how every family computes attention (jaxft.models.attention)
    c.attention.impl = "auto"  # xla (plain softmax over a (T, S) mask), chunked (blockwise, any backend), splash
    # (Pallas, TPU), cudnn (GPU), or auto: splash on TPU, cudnn on GPU, on CPU chunked from 2048 keys, else xla
    c.attention.block_q = 512  # queries per block of chunked / splash (capped at the sequence; must divide it)
    c.attention.block_k = 512  # keys per block of chunked / splash (capped at the sequence; must divide it)
    c.attention.interpret = False  # splash in Pallas interpret mode, cudnn's call through XLA: tests on a CPU

    c.mesh = ml_collections.ConfigDict()  # the device mesh; data * fsdp * context * tensor * expert = devices
    c.mesh.data = -1  # replicas splitting the batch (params copied); -1: the devices the other axes leave
    c.mesh.fsdp = 1  # splits the batch and the params / optimizer state (fully sharded data parallel)
    c.mesh.context = 1  # splits the sequence (rules.seq): attention passes key/value blocks around a ring of this
    # many devices (jaxft.parallel.context); must divide train.seq_len
    c.mesh.tensor = 1  # splits heads, mlp and vocab within each layer (tensor parallel, one host)
    c.mesh.expert = 1  # splits a mixture of experts' experts (expert parallel; rules.experts)

    c.rules = ml_collections.ConfigDict()  # logical axis -> comma-separated mesh axes ('' = not split)
    c.rules.batch = "data,fsdp"  # B, rows of a batch
    c.rules.seq = "context"  # T, positions of a row
    c.rules.embed = "fsdp,context"  # D, the residual width (params; activations: where batch / seq did not take it)
    c.rules.heads = "tensor"  # N*H, query heads
    c.rules.kv_heads = "tensor"  # K*H, key/value heads
    c.rules.head_dim = ""  # H, within one head
    c.rules.mlp = "tensor"  # F, the MLP width
    c.rules.vocab = "tensor"  # V, embedding rows and output logits
    c.rules.layers = ""  # L, stacked layers (scanned over: keep unsplit)
    c.rules.lora_rank = ""  # R, the LoRA rank (small: keep unsplit)
    c.rules.experts = "expert"  # E, the experts of a mixture of experts
    return c
