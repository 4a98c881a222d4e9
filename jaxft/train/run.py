"""One way to build a run from a config, shared by `jaxft train`, `jaxft eval`, `jaxft aot` and the benchmarks:

  config -> validate -> layout (mesh) -> model (family from the checkpoint, quantized, in its shards)
         -> method (trainable tree + spec, the task's head) -> optimizer and state (created in their shards)
         -> data (train iterator, evaluation batches, info) -> jitted train step and evaluator

`abstract=True` reads nothing: the base is the family's `init` under `jax.eval_shape` (quantized as configured),
the trainable tree and state are ShapeDtypeStructs carrying their shardings, and the batch is one of the task's
keys (`abstract_batch`), so that `run.train_step.lower(run.state, run.base, run.batch).compile()` checks a
config against a topology's devices without them (`jaxft.train.aot`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxft import backend as backend_lib, checkpoint, config as config_lib, parallel, peft, quant, tasks
from jaxft.checkpoint import gguf, hf
from jaxft.models import family_of, llava
from jaxft.tasks import heads
from jaxft.train.build import (Evaluator, batch_shardings, dtype_of, load_model, put_batch,
                               stack_micro, task_model, trainable_builder)
from jaxft.train.optim import make_optimizer
from jaxft.train import vision_cache
from jaxft.train.step import init_state, make_train_step


@dataclasses.dataclass
class Run:
    """Everything a run is made of. Arrays live on `layout`'s mesh; in an abstract run they are
    ShapeDtypeStructs with shardings, and there is no data, tokenizer or evaluator."""
    config: Any
    task_name: str
    task: ModuleType  # jaxft.tasks.<name>
    layout: parallel.Layout
    family: ModuleType  # jaxft.models.<family>
    cfg: Any  # the family's Config
    model_path: str  # the checkpoint read (config.model in an abstract run)
    tokenizer: Any
    base: dict  # the frozen base
    trainable: dict | None  # the method's tree with the task's head under head/, fresh (or peft.init_from's);
    # None when not training (`init_trainable` makes it)
    spec: Any  # the method's MethodSpec
    model: tasks.Model  # the static half of the task's forward pass
    train_data: Any  # endless iterator of host batches with get_state / set_state; None without data
    eval_batches: list  # host batches the evaluator runs (train.eval_batches of them when training)
    info: dict  # the data's info (labels, counts); {} when abstract
    batch: dict  # one (A, B/A, ...) micro-batched training batch: host arrays, or ShapeDtypeStructs without data
    optimizer: optax.GradientTransformation | None = None
    lr_schedule: Callable | None = None
    state: dict | None = None  # {step, trainable, opt_state, rng}, in its shards
    train_step: Callable | None = None  # jitted (state, base, batch on the mesh) -> (state, metrics); state donated
    evaluate: Evaluator | None = None  # evaluate(trainable) -> the task's metrics over eval_batches (training)
    init_trainable: Callable | None = None  # () -> the fresh trainable tree, when not training (`jaxft eval`)
    feature_cache: Any = None  # llava.FeatureCache of vision.cache_features (its hits and misses), else None

    def put(self, batch: dict) -> dict:
        """A host batch of train.batch_size rows -> (A, B/A, ...) micro-batches on the mesh, as train_step takes."""
        return put_batch(stack_micro(batch, self.config.train.grad_accum), self.layout, micro=True)

    def evaluator(self, spec) -> Evaluator:
        """An evaluator of this run's evaluation batches for the method `spec` (`jaxft eval`: the run's own,
        or a saved adapter's)."""
        m = task_model(self.config, self.family, self.cfg, spec, self.tokenizer, self.layout)
        return Evaluator(self.task, m, self.config, self.info, self.base, self.eval_batches, self.layout,
                         self.tokenizer)


def build_run(config, *, abstract: bool = False, devices=None, model_config=None, training: bool = True,
              data: bool = True, cache_dir=None) -> Run:
    """The run `config` describes (see the module docstring).

    devices: the mesh's devices (default: JAX's), e.g. a TPU topology's compile-only devices for `abstract`.
    model_config: the family Config to use instead of config.model (`jaxft aot`: an HF config.json without
    weights); a concrete run then has random weights (`random_base`) and no data (benchmarks).
    training=False (`jaxft eval`): no optimizer, state or train step; `evaluator(spec)` runs every evaluation
    batch instead of train.eval_batches of them. data=False (benchmarks): the model is read but no data;
    `batch` is abstract as in an abstract run, to be filled with synthetic arrays of its shapes (`Run.put`),
    and there is no evaluator. cache_dir: where peft.method=features keeps the frozen model's pooled features
    (WORKDIR/features; None: computed, not kept).
    """
    n_devices = len(devices) if devices is not None else jax.device_count()
    data = data and model_config is None
    if abstract or not data:  # no data is read, so its files need not exist here (they may be a pod's)
        config = _without_data(config)
    config_lib.validate(config, n_devices, require_data=training and data and not abstract)
    task_name = tasks.name_of(config)
    task = tasks.get(task_name)
    layout = parallel.from_config(config, devices)
    key = jax.random.PRNGKey(config.seed)
    init_key, state_key = jax.random.split(key)
    features = config.peft.method == "features"  # the classification task's head on cached features
    if features and (abstract or not data):
        raise ValueError("peft.method=features: trains a head on features computed from data; there is no "
                         "abstract or data-free run of it (jaxft aot, benchmarks)")

    if abstract or model_config is not None:
        cfg = model_config if model_config is not None else _config_of(config.model)
        fam = family_of(cfg)
        tasks.check_kind(task_name, task, fam, str(config.model))
        base, tokenizer, model_path = random_base(config, cfg, layout, abstract), None, str(config.model)
        train_data, eval_batches, info, feature_cache = None, [], {}, None
        labels = _labels_of_config(config)
    else:
        model, fam = load_model(config, layout, None if features else task)  # (features: T5's encoder too)
        feature_cache = None
        cfg, base, tokenizer, model_path = model.cfg, model.params, model.tokenizer, str(model.path)
        if features:
            train_data, eval_batches, info = task.feature_batches(config, model, cache_dir)
        else:
            train_data, eval_batches, info = task.batches(config, tokenizer) if data else (None, [], {})
        if training:
            eval_batches = eval_batches[:config.train.eval_batches]
        if data:  # vision.cache_features: a frozen tower's features in place of the pixels
            train_data, eval_batches, feature_cache = vision_cache.cached(config, cfg, base, train_data,
                                                                          eval_batches, dtype_of(config, "dtype"))
        labels = info.get("labels", ()) if data else _labels_of_config(config)

    build = trainable_builder(config, cfg, tokenizer, task, labels, key)
    if abstract:
        trainable, spec = _abstract_trainable(build, init_key, base, layout, fam.PARAM_AXES)
    elif training:
        trainable, spec = parallel.create_trainable(build, init_key, base, layout, fam.PARAM_AXES)
        trainable = _unaliased(trainable, base)
    else:  # evaluation: only made if no saved adapter replaces it (`Run.init_trainable`)
        trainable, spec = None, _traced(build, init_key, base)[1]
    m = task_model(config, fam, cfg, spec, tokenizer, layout)
    if abstract or not data:
        batch = abstract_batch(config, task_name, fam.KIND, layout, cfg, base)
    elif training:
        batch = stack_micro(_peek(train_data), config.train.grad_accum)
    else:
        batch = {}
    run = Run(config=config, task_name=task_name, task=task, layout=layout, family=fam, cfg=cfg,
              model_path=model_path, tokenizer=tokenizer, base=base, trainable=trainable, spec=spec, model=m,
              train_data=train_data, eval_batches=eval_batches, info=info, batch=batch, feature_cache=feature_cache)
    if not training:
        run.init_trainable = lambda: build(init_key, base)[0]
    if training:
        _add_training(run, state_key, abstract)
        if data and not abstract:
            run.evaluate = Evaluator(task, m, config, info, base, eval_batches, layout, tokenizer,
                                     parallel.shardings_of(trainable))
    return run


def _add_training(run: Run, state_key, abstract: bool) -> None:
    """The optimizer, the state in its shards and the jitted train step of `run`."""
    config, layout, task, m = run.config, run.layout, run.task, run.model
    run.optimizer, run.lr_schedule = make_optimizer(config.train)
    make_state = lambda t, k: init_state(t, run.optimizer, k)
    state_sh = lambda a: parallel.state_shardings(a, run.trainable, layout)
    if abstract:
        run.state = _with_shardings(jax.eval_shape(make_state, run.trainable, state_key), state_sh)
    else:
        run.state = parallel.create_sharded(make_state, state_sh, run.trainable, state_key)

    def forward(base_, trainable_, mb, rng):
        return task.forward(m, base_, trainable_, mb, rng)

    penalty = peft.penalty(run.spec, config.train.l2sp)  # L2-SP towards the pretrained weights, or None
    if penalty is not None:  # over the backbone only: the head has no pretrained value to be pulled towards
        backbone_penalty = penalty
        penalty = lambda trainable, base: backbone_penalty(heads.backbone(trainable), base)
    sh = lambda tree_: jax.tree.map(lambda x: x.sharding, tree_)
    state_sh, base_sh = sh(run.state), sh(run.base)
    host_batch = not isinstance(next(iter(run.batch.values())), jax.ShapeDtypeStruct)  # else it has shardings
    batch_sh = batch_shardings(run.batch, layout, True) if host_batch else sh(run.batch)
    # keep_unused: base weights a task does not read (BERT's pooler under a token head) stay in the compiled
    # program's arguments, so that its memory plan (`jaxft aot`) counts every byte the devices hold.
    run.train_step = jax.jit(make_train_step(forward, run.optimizer, penalty, loss=task.loss,
                                             extra=getattr(task, "train_metrics", None)), donate_argnums=(0,),
                             in_shardings=(state_sh, base_sh, batch_sh), out_shardings=(state_sh, layout.replicated),
                             keep_unused=True,
                             compiler_options=backend_lib.compiler_options(layout.mesh.devices.flat[0].platform))


def random_base(config, cfg, layout, abstract: bool = False) -> dict:
    """A base of `cfg`'s family from its `init` (seeded with 0; no checkpoint), quantized as config.quant says,
    created in its shards; abstract: ShapeDtypeStructs with their shardings (nothing computed or allocated)."""
    fam = family_of(cfg)
    param_dtype = dtype_of(config, "param_dtype")
    q = config.quant

    def make():
        base = fam.init(jax.random.PRNGKey(0), cfg, param_dtype)
        if q.format != "none":
            base = quant.quantize_params(base, q.format, block_size=q.block_size, double_quant=q.double_quant,
                                         include=q.include, dense_dtype=param_dtype)
        return base

    shardings = lambda a: parallel.base_shardings(a, layout, fam.PARAM_AXES)
    return _with_shardings(jax.eval_shape(make), shardings) if abstract else parallel.create_sharded(make, shardings)


# Each task's training batch keys (its module docstring's "Batch keys"): key -> (per-row shape: "T" one value
# per position, "" one per row; dtype). tests/test_run.py checks them against each task's real batches.
_TEXT = {"tokens": ("T", jnp.int32), "segment_ids": ("T", jnp.int32), "positions": ("T", jnp.int32)}
_LM = {**_TEXT, "targets": ("T", jnp.int32), "loss_mask": ("T", jnp.float32)}
BATCH_KEYS = {
    "causal_lm": _LM,
    "seq2seq": _LM,  # decoders: prompt + response rows
    "seq2seq/encoder-decoder": {"tokens": ("T", jnp.int32), "segment_ids": ("T", jnp.int32),
                                "dec_tokens": ("T", jnp.int32), "dec_segment_ids": ("T", jnp.int32),
                                "targets": ("T", jnp.int32), "loss_mask": ("T", jnp.float32)},
    "classification": {**_TEXT, "labels": ("", jnp.int32)},
    "token_classification": {**_TEXT, "labels": ("T", jnp.int32)},
    "embedding": {**_TEXT, **{f"pair_{k}": v for k, v in _TEXT.items()}},
    "mlm": {"tokens": ("T", jnp.int32), "segment_ids": ("T", jnp.int32), "targets": ("T", jnp.int32),
            "loss_mask": ("T", jnp.int32)},
}


def abstract_batch(config, task_name: str, kind: str, layout, cfg=None, base=None) -> dict:
    """A training batch of `task_name`'s keys as ShapeDtypeStructs (A, B/A, T) or (A, B/A) with their shardings
    (A = train.grad_accum, B = train.batch_size over every process, T = train.seq_len). For a vision-language
    `cfg`, one image per row as well: pixel_values (A, B/A, C, H, W) (or, with vision.cache_features, the tower's
    image_features (A, B/A, P, D) of `base`) and image_mask (A, B/A)."""
    t = config.train
    keys = BATCH_KEYS.get(f"{task_name}/{kind}", BATCH_KEYS.get(task_name))
    if keys is None:
        raise tasks.TaskError(f"task: {task_name!r} has no abstract batch (jaxft.train.run.BATCH_KEYS)")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of train.grad_accum={t.grad_accum}")
    rows = (t.grad_accum, t.batch_size // t.grad_accum)
    out = {}
    for k, (per_row, dtype) in keys.items():
        shape = (*rows, t.seq_len) if per_row else rows
        names = parallel.MICRO_BATCH[:len(shape)]
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=layout.sharding(
            names, shape, f"batch[{k!r}] (train.batch_size / grad_accum rows)"))
    if hasattr(cfg, "image_token_id"):
        v = cfg.vision
        pixels = jax.ShapeDtypeStruct((*rows, v.channels, v.image_size, v.image_size), jnp.float32)
        images = {"image_mask": jax.ShapeDtypeStruct(rows, jnp.bool_)}
        if config.vision.cache_features:
            def features(b, px):
                f = llava.tower_features(cfg, b, px.reshape(-1, *px.shape[2:]))
                return f.reshape(*rows, *f.shape[1:])
            images["image_features"] = jax.eval_shape(features, base, pixels)
        else:
            images["pixel_values"] = pixels
        for k, x in images.items():
            names = (*parallel.MICRO_BATCH[:2], *(None,) * (x.ndim - 2))
            out[k] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout.sharding(
                names, x.shape, f"batch[{k!r}] (one image per row)"))
    return out


def _config_of(model: str):
    """The family Config of config.model for an abstract run: its config.json (a directory or the file), or a
    GGUF file's header (the file is memory-mapped; no tensor is read)."""
    path = checkpoint.resolve(model) if model in ("default", "minilm") else Path(model)
    if path.suffix == ".gguf":
        return gguf.read_config(gguf.open_reader(path), str(path))
    return hf.read_config(path if path.is_dir() else path.parent)


def _without_data(config):
    """A copy of `config` naming no data file."""
    config = config.copy_and_resolve_references()
    for key in ("train", "eval", "train_target", "eval_target"):
        config.data[key] = ""
    return config


def _labels_of_config(config) -> list[str]:
    """The head's classes in an abstract run: data.labels where set, else two (the head is a few bytes)."""
    names = [x.strip() for x in str(config.data.labels or "").split(",") if x.strip()]
    return names or ["0", "1"]


def _unaliased(trainable: dict, base: dict) -> dict:
    """`trainable` with a copy of each leaf that is a base array itself (full fine-tuning of a float32 base on
    one device): the train step donates the state, and a donated buffer cannot also be the base argument."""
    base_ids = {id(x) for x in jax.tree.leaves(base)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in base_ids else x, trainable)


def _traced(build, key, base) -> tuple[dict, Any]:
    """(the trainable tree as ShapeDtypeStructs, the spec) of build(key, base), computing nothing."""
    static = {}

    def arrays(k, b):
        trainable, static["spec"] = build(k, b)
        return trainable

    return jax.eval_shape(arrays, key, base), static["spec"]


def _abstract_trainable(build, key, base, layout, table) -> tuple[dict, Any]:
    abstract, spec = _traced(build, key, base)
    return _with_shardings(abstract, lambda a: parallel.trainable_shardings(a, base, layout, table)), spec


def _with_shardings(abstract, shardings_fn):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        shardings_fn(abstract))


def _peek(data_iter) -> dict:
    """The next batch of a resumable iterator, without consuming it."""
    position = data_iter.get_state()
    batch = next(data_iter)
    data_iter.set_state(position)
    return batch
