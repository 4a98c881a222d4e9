"""What `jaxft train` and `jaxft eval` build from a config before they run: the model (its family from the
checkpoint, loaded into its shards, quantized), the trainable tree with the task's head, the static half of the
task's forward pass, batches on the mesh, and the evaluator that runs the task's metrics.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import backend as backend_lib
from jaxft import checkpoint, parallel, peft, quant, tasks
from jaxft.checkpoint import hf
from jaxft.config.checks import ConfigFileError, moe_settings
from jaxft.dtypes import DTYPES
from jaxft.models import family, family_of



TASK_FILE = "task.json"  # in WORKDIR/adapter beside adapter.json: the task, its class names and pooling


def load_model(config, layout, task=None) -> tuple[checkpoint.Loaded, object]:
    """(the checkpoint of config.model, loaded straight into its shards, quantized as config.quant says; its
    family module). The family is read from the checkpoint's config first: its table shards the leaves, and a
    model of a kind the task cannot run (`task.KINDS`) is refused before its weights are read."""
    param_dtype = dtype_of(config, "param_dtype")
    path = checkpoint.resolve(config.model)
    fam = _family_of_checkpoint(path)
    _check_expert_axis(path, layout)
    if task is not None:
        tasks.check_kind(tasks.name_of(config), task, fam, str(path))
    leaf_fn = None
    if config.quant.format != "none":  # QLoRA: the frozen base is quantized tensor by tensor as it is read
        leaf_fn = quant.leaf_fn(config.quant.format, block_size=config.quant.block_size,
                                double_quant=config.quant.double_quant, include=config.quant.include,
                                dense_dtype=param_dtype)
    # Each leaf is created directly in its shards on the mesh (after quantization, if any).
    leaf_fn = parallel.shard_leaf_fn(layout, fam.PARAM_AXES, param_dtype, inner=leaf_fn)
    model = checkpoint.load(path, dtype=param_dtype, leaf_fn=leaf_fn)
    if config.quant.format != "none" and not any(isinstance(x, quant.QuantizedWeight) for x in jax.tree.leaves(
            model.params, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))):
        raise ValueError(f"quant.include={config.quant.include!r} matches no weight of {path} (its linear "
                               f"weights are named like {_a_linear_weight(model.params)})")
    return model, family_of(model.cfg)


def _a_linear_weight(params) -> str:
    from jaxft.tree import flatten
    return next((p for p in flatten(params) if p.endswith("/w") and "layers/" in p), next(iter(flatten(params))))


def _check_expert_axis(path, layout) -> None:
    """`mesh.expert` must divide an HF directory's expert count: said by key before any weight is read (a GGUF
    file's count is known only as it loads; its sharding error names `rules.experts` and the mesh)."""
    split = 1 if layout is None else dict(layout.mesh.shape).get("expert", 1)
    if split == 1 or not Path(path).is_dir():
        return
    n = getattr(hf.read_config(Path(path)), "n_experts", None)
    if n is not None and n % split:
        raise ConfigFileError(f"mesh.expert={split}: does not divide the {n} experts of {path} "
                              f"(expected a divisor of {n})")


def _family_of_checkpoint(path):
    """The family module of a model directory (its config.json's model_type); GGUF files are LLaMA-family."""
    if str(path) == "default" or Path(path).suffix == ".gguf" or not Path(path).is_dir():
        return family("llama")  # (a missing path fails in checkpoint.load, with its message)
    return family_of(hf.read_config(Path(path)))


def trainable_builder(config, cfg, tokenizer, task, labels, key):
    """build(key, base) -> (trainable tree, MethodSpec): the PEFT method's tree (`jaxft.peft.build`) and the
    task's head under `head/` (keyed from `key`, so that the method's own initialization is unchanged), fresh
    unless peft.init_from's adapter holds one. labels: the class names of a head over classes. With
    peft.method=features the tree is the head alone, with its FeatureSpec (`task.features_trainable`)."""
    head_key = jax.random.fold_in(key, 1)
    n_labels = len(labels)
    if config.peft.method == "features":
        return lambda k, b: task.features_trainable(head_key, config, cfg, list(labels))

    def build(k, b):
        trainable, spec = peft.build(k, b, config, cfg, tokenizer)
        if "head" not in trainable:  # (an adapter of peft.init_from may bring its trained head)
            head = task.init_head(head_key, cfg, config, n_labels)
            if head is not None:
                trainable = {**trainable, "head": head}
        return trainable, spec

    return build


def task_model(config, fam, cfg, spec, tokenizer, layout) -> tasks.Model:
    """The static description of the forward pass the task runs (`jaxft.tasks.Model`)."""
    pool = config.head.pool
    pad = 0 if tokenizer is None else (tokenizer.pad_token_id or 0)
    dtype = dtype_of(config, "dtype")
    cfg = moe_settings(config, cfg, str(config.model))  # the router losses' weights (mixtures of experts)
    policy = policy_of(config, dtype, layout)
    return tasks.Model(family=fam, cfg=cfg, spec=spec, dtype=dtype, layout=layout, remat=policy.remat,
                       unroll=policy.unroll_layers, pad_id=pad, pool=pool, loss_chunk=config.train.loss_chunk)


def policy_of(config, dtype, layout) -> backend_lib.Policy:
    """The backend policy of a run (`jaxft.backend.resolve`) computing in `dtype` on `layout`'s devices (None:
    JAX's default backend, one device): train.layer_loop and train.remat, `auto` left to the policy."""
    platform = None if layout is None else layout.mesh.devices.flat[0].platform  # (the compile target's)
    return backend_lib.resolve(platform, dtype, config.quant.format != "none", config.train.layer_loop,
                               config.train.remat, tokens_per_device(config, layout))


def tokens_per_device(config, layout) -> int:
    """Tokens of one training micro-batch on each device: train.batch_size / train.grad_accum rows of
    train.seq_len, over the mesh axes that split rows and positions (`layout` None: one device)."""
    t = config.train
    split = 1
    if layout is not None:
        for part in layout.spec(("batch", "seq")):
            for axis in (part,) if isinstance(part, str) else part or ():
                split *= layout.mesh.shape[axis]
    return t.batch_size // t.grad_accum * t.seq_len // split


# batch keys whose axes after the rows are not positions: a vector per row (B, D), a batch's images (M, ...)
ROW_VECTORS = ("features", "pixel_values", "image_features")


def _names(ndim: int, micro: bool, key: str = "") -> tuple:
    """Logical axes of a batch array: rows over `batch`, positions over `seq` (a vector of ROW_VECTORS unsplit),
    anything after unsplit; a leading micro-batch axis (gradient accumulation) unsplit."""
    n = ndim - int(micro)
    names = (("batch", None if key in ROW_VECTORS else "seq") + (None,) * n)[:n]
    return (None, *names) if micro else names


def batch_shardings(batch: dict, layout, micro: bool) -> dict:
    """The sharding of each array of a batch ((A, B, ...) micro-batches or (B, ...)): rows over `batch`,
    positions over `seq`."""
    return {k: layout.sharding(_names(np.ndim(v), micro, k)) for k, v in batch.items()}


def put_batch(batch: dict, layout, micro: bool) -> dict:
    """This process's rows of a global batch -> global arrays on the mesh, each with its own logical axes."""
    return {k: parallel.put_batch({k: v}, layout, _names(np.ndim(v), micro, k))[k] for k, v in batch.items()}


class Evaluator:
    """evaluator(trainable) -> the task's metrics over the evaluation batches (`task.evaluate`), with one jitted
    step (loss and predictions) compiled for the run; the batches are put on the mesh once."""

    def __init__(self, task, model: tasks.Model, config, info: dict, base, batches: list, layout, tokenizer,
                 trainable_shardings=None):
        self.task, self.model, self.config, self.info, self.base = task, model, config, info, base
        self.batches, self.tokenizer = batches, tokenizer
        self.on_mesh = {id(b): put_batch(b, layout, micro=False) for b in batches}

        def step(trainable, base_, batch):
            out = task.forward(model, base_, trainable, batch, None)
            total, count = task.loss(out, batch)
            return total, count, task.predict(out, batch)

        shardings = None
        if batches and trainable_shardings is not None:
            shardings = (trainable_shardings, parallel.shardings_of(base), batch_shardings(batches[0], layout, False))
        self.step = jax.jit(step, in_shardings=shardings)

    def __call__(self, trainable) -> dict[str, float]:
        ev = tasks.Eval(batches=self.batches, step=lambda b: self.step(trainable, self.base, self.on_mesh[id(b)]),
                        info=self.info, config=self.config, model=self.model, base=self.base, trainable=trainable,
                        tokenizer=self.tokenizer)
        return {k: float(v) for k, v in self.task.evaluate(ev).items()}


def dtype_of(config, key):
    name = config[key]
    if name not in DTYPES:
        raise ValueError(f"{key}: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def stack_micro(batch: dict, accum: int) -> dict:
    """(B, ...) rows -> (A, B/A, ...) micro-batches for gradient accumulation; an array of another length
    (a batch's M images, `jaxft.data.vlm_batches`) is split into A equal parts alike."""
    b = len(next(iter(batch.values())))
    if b % accum:
        raise ValueError(f"train.batch_size={b} is not a multiple of train.grad_accum={accum}")
    return {k: np.asarray(v).reshape(accum, len(v) // accum, *v.shape[1:]) for k, v in batch.items()}
