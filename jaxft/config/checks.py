"""`validate(config)`: every value that can be checked without the model or the data, checked in a few
milliseconds before anything loads, so that a wrong value is one line naming the key and the value.

The choices below repeat the names the modules that use them accept (tests/test_config.py keeps the two in
step); what needs the model (an adapter wider than the model, a regex matching no weight) is checked where the
model is known (`jaxft.peft.build`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path


class ConfigFileError(ValueError):
    """A config file, override or value that cannot be used; the message names the file or key."""


CHOICES = {
    "task": ("causal_lm", "seq2seq", "classification", "token_classification", "embedding", "mlm"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "data.format": ("alpaca", "messages", "text"),
    "data.tag_scheme": ("iob1", "iob2"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.layer_loop": ("auto", "scan", "unroll"),
    "train.remat": ("auto", "true", "false"),
    "head.pool": ("default", "cls", "mean", "last"),
    "quant.format": ("none", "nf4", "int4"),
    "peft.method": ("lora", "adapter", "prefix", "prompt", "ia3", "full", "partial", "features"),
    "vision.method": ("frozen", "lora", "full"),
    "projector.method": ("frozen", "lora", "full"),
    "lora.init": ("kaiming", "gaussian"),
    "adapter.placement": ("houlsby", "pfeiffer"),
    "adapter.activation": ("relu", "gelu", "silu", "tanh"),
    "prefix.init": ("vocab", "random"),
    "prompt.init": ("random", "text", "vocab"),
    "features.pool": ("mean", "last", "cls"),
    "features.head": ("linear", "mlp"),
    "attention.impl": ("auto", "xla", "chunked", "splash", "cudnn"),
}
METRICS = ("rouge", "bleu")  # eval.metrics of seq2seq
POSITIVE = ("train.batch_size", "train.grad_accum", "train.seq_len", "train.save_every", "train.log_every",
            "train.eval_batches", "guard.patience", "demo.train_examples", "demo.eval_examples", "quant.block_size",
            "lora.rank", "adapter.size", "prefix.length", "prompt.length", "features.hidden",
            "attention.block_q", "attention.block_k")
NON_NEGATIVE = ("train.steps", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "train.eval_every",
                "train.early_stopping_patience", "train.keep_checkpoints", "train.l2sp", "eval.batch_size",
                "eval.max_examples", "eval.generate_max_new_tokens", "eval.temperature", "eval.top_k",
                "prefix.projection")


def validate(config, devices: int | None = None, require_data: bool = True) -> None:
    """ConfigFileError (one line: key, value, what is expected) for the first unusable value of `config`.

    devices: the number of devices the mesh spans, when known (after `jax.distributed.initialize`): the mesh
    must cover them and the batch split over its data-parallel axes. require_data: data.train must be set
    (not for `jaxft demo`, which writes its own, nor `jaxft eval`, which may read data.eval alone)."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            _fail(key, value, f"is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(key, value, "must be a positive integer")
    for key in NON_NEGATIVE:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            _fail(key, value, "must be >= 0")
    _train(config.train)
    _moe(config.moe)
    _method(config)
    _task(config, require_data)
    _mesh(config, devices)
    _attention(config, _backend() if devices is not None else None)
    if not config.guard.loss_factor > 1:
        _fail("guard.loss_factor", config.guard.loss_factor, "must be > 1 (a multiple of the step-0 loss)")
    if not isinstance(config.model, str) or not config.model:
        _fail("model", config.model, "must name a model (a directory, a .gguf file, 'default' or 'minilm')")


def _train(t) -> None:
    lr = t.learning_rate
    if lr is None or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        _fail("train.learning_rate", lr, "must be a number > 0")
    for key in ("b1", "b2"):
        if not 0 <= t[key] < 1:
            _fail(f"train.{key}", t[key], "must be in [0, 1)")
    if isinstance(t.loss_chunk, bool) or not isinstance(t.loss_chunk, int) or t.loss_chunk < 0:
        _fail("train.loss_chunk", t.loss_chunk, "must be an integer >= 0 (0: the full logits)")
    if isinstance(t.mlp_chunk, bool) or not isinstance(t.mlp_chunk, int) or t.mlp_chunk < 0:
        _fail("train.mlp_chunk", t.mlp_chunk, "must be an integer >= 0 (0: the whole row at once)")
    if t.mlp_chunk and t.seq_len % t.mlp_chunk:
        _fail("train.mlp_chunk", t.mlp_chunk, f"does not divide train.seq_len={t.seq_len}")
    if t.batch_size % t.grad_accum:
        _fail("train.batch_size", t.batch_size, f"is not a multiple of train.grad_accum={t.grad_accum}")


def _method(config) -> None:
    if not 0 <= config.lora.dropout < 1:
        _fail("lora.dropout", config.lora.dropout, "must be in [0, 1)")
    if not config.lora.alpha > 0:
        _fail("lora.alpha", config.lora.alpha, "must be > 0")
    for key in ("lora.targets", "ia3.targets", "ia3.feedforward", "partial.select", "quant.include"):
        try:
            re.compile(_get(config, key))
        except re.error as e:
            _fail(key, _get(config, key), f"is not a valid regex ({e})")
    method = config.peft.method
    if method == "prompt" and config.prompt.init == "text" and not config.prompt.init_text:
        _fail("prompt.init", "text", "needs prompt.init_text (the text whose embeddings start the prompt)")
    if method == "features" and config.features.layer < -1:
        _fail("features.layer", config.features.layer, "must be a block index >= 0, or -1 for the last")
    if config.vision.cache_features not in (True, False):
        _fail("vision.cache_features", config.vision.cache_features, "must be true or false")
    if config.vision.cache_features and config.vision.method != "frozen":
        _fail("vision.cache_features", True, f"needs vision.method=frozen (a {config.vision.method!r} tower's "
                                             "features change as it trains)")
    if config.train.l2sp and method not in ("full", "partial"):
        _fail("train.l2sp", config.train.l2sp, f"needs peft.method full or partial (method {method!r} retrains "
                                               "no pretrained weight)")


def _moe(m) -> None:
    for key in ("aux_loss_coef", "router_z_loss_coef", "capacity_factor"):
        value = m[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isfinite(value) and value >= 0)):
            _fail(f"moe.{key}", value, "must be a number >= 0, or None for " + (
                "dropless routing" if key == "capacity_factor" else "the model's own"))


def moe_settings(config, cfg, model: str):
    """The model config `cfg` with config.moe's loss coefficients and capacity factor; ConfigFileError naming the
    key where one is set for a model (`model`, as config.model names it) that is not a mixture of experts."""
    given = {key: value for key, value in config.moe.items() if value is not None}
    if not given.get("capacity_factor"):  # 0 means dropless, as None does
        given.pop("capacity_factor", None)
    if not hasattr(cfg, "n_experts"):
        for key, value in given.items():
            _fail(f"moe.{key}", value, f"is for mixture-of-experts models, but {model} is a dense "
                                       f"{cfg.model_type} model (leave it None)")
        return cfg
    return dataclasses.replace(cfg, router_aux_loss_coef=float(given.get("aux_loss_coef", cfg.router_aux_loss_coef)),
                               router_z_loss_coef=float(given.get("router_z_loss_coef", cfg.router_z_loss_coef)),
                               capacity_factor=float(given["capacity_factor"]) if "capacity_factor" in given
                               else cfg.capacity_factor)


def _task(config, require_data: bool) -> None:
    d, task = config.data, config.task
    if not 0 <= d.eval_fraction < 1:
        _fail("data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    if require_data and not d.train:
        _fail("data.train", d.train, "is empty: name the training file (e.g. --config.data.train=data.jsonl)")
    for key in ("train", "eval", "train_target", "eval_target"):
        if d[key] and not Path(d[key]).exists() and not _cached_name(d[key]):
            _fail(f"data.{key}", d[key], "does not exist")
    needs = {"classification": ("text_field", "label_field"), "token_classification": ("text_field", "label_field"),
             "embedding": ("text_field", "pair_field"), "seq2seq": ("source_field", "target_field")}
    for key in needs.get(task, ()):
        if not d[key]:
            _fail(f"data.{key}", d[key], f"is empty: task {task!r} reads this field")
    if task == "seq2seq":
        if "{source}" not in d.prompt_template:
            _fail("data.prompt_template", d.prompt_template, "must contain {source} (where the source goes)")
        for name in (m.strip().lower() for m in config.eval.metrics.split(",") if m.strip()):
            if name not in METRICS:
                _fail("eval.metrics", config.eval.metrics, f"{name} not among {', '.join(METRICS)}")
    if not 0 < config.eval.top_p <= 1:
        _fail("eval.top_p", config.eval.top_p, "must be in (0, 1]")


def _mesh(config, devices: int | None) -> None:
    sizes = {axis: config.mesh[axis] for axis in ("data", "fsdp", "context", "tensor", "expert")}
    for axis, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n == 0 or n < -1:
            _fail(f"mesh.{axis}", n, "must be a positive integer, or -1 for the devices the other axes leave")
    if list(sizes.values()).count(-1) > 1:
        shown = tuple(n for axis, n in sizes.items() if axis != "expert" or n != 1)
        _fail("mesh", shown, "has more than one axis of size -1 (data, fsdp, context, tensor, expert)")
    if devices is not None:
        known = math.prod(n for n in sizes.values() if n != -1)
        free = next((axis for axis, n in sizes.items() if n == -1), None)
        if free is not None:
            if devices % known:
                _fail(f"mesh.{free}", -1, f"leaves no whole number of devices: the other axes take {known} of "
                                          f"{devices}")
            sizes[free] = devices // known
        if math.prod(sizes.values()) != devices:
            expert = f" * mesh.expert={sizes['expert']}" if sizes["expert"] != 1 else ""
            _fail("mesh.data", sizes["data"], f"* mesh.fsdp={sizes['fsdp']} * mesh.context={sizes['context']} * "
                                              f"mesh.tensor={sizes['tensor']}{expert} is not the {devices} devices "
                                              "(use -1 for one axis to take the rest)")
    context = sizes["context"]
    if context > 0 and config.train.seq_len % context:
        _fail("mesh.context", context, f"does not divide train.seq_len={config.train.seq_len} (the sequence is "
                                       "split over it)")
    # rows of each micro-batch are split over data * fsdp (an axis of size -1: not known before the devices are)
    parallel = max(sizes["data"], 1) * max(sizes["fsdp"], 1)
    if config.train.batch_size % (parallel * config.train.grad_accum):
        _fail("train.batch_size", config.train.batch_size,
              f"is not a multiple of train.grad_accum={config.train.grad_accum} * the mesh's data-parallel size "
              f"{parallel} (mesh.data * mesh.fsdp)")


def _attention(config, backend: str | None) -> None:
    """Blocks that divide the sequence; a kernel the backend has (known once the devices are)."""
    a, t = config.attention, config.train.seq_len
    if a.impl in ("chunked", "splash"):
        for key in ("block_q", "block_k"):
            if t % min(a[key], t):
                _fail(f"attention.{key}", a[key], f"does not divide train.seq_len={t}")
    if a.impl == "splash" and backend not in (None, "tpu") and not a.interpret:
        _fail("attention.impl", a.impl, f"needs a TPU (the backend is {backend}); use chunked, or "
                                        "attention.interpret=True for Pallas interpret mode (tests)")
    if a.impl == "cudnn" and backend not in (None, "gpu") and not a.interpret:
        _fail("attention.impl", a.impl, f"needs an NVIDIA GPU (the backend is {backend}); use auto or chunked")


def _backend() -> str:
    import jax  # the devices are known (initialized) when validate is given their number

    return jax.default_backend()


def _cached_name(source: str) -> bool:
    """Whether `source` reads as the name of a data set in the local Hugging Face cache ('user/name'), which
    `jaxft.data.sources` looks up when no such file exists."""
    return source.count("/") <= 1 and not source.startswith((".", "/")) and Path(source).suffix == ""


def _get(config, key: str):
    node = config
    for name in key.split("."):
        node = node[name]
    return node


def _fail(key: str, value, expected: str):
    raise ConfigFileError(f"{key}: {value!r} {expected}")
