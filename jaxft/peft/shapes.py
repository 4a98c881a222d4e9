"""Whether a trainable tree fits a base model: every adapter that jaxft reads (its own, or PEFT's) goes through
`check` before it is used, so that an adapter made for another architecture or size is refused with the first
leaf that does not fit, never run. (An adapter for a different model of the same shapes cannot be told apart.)
The leaves each method needs are its module's to say (`check` or `expected`, see `jaxft.peft.method`); a task
head under `head/` (`jaxft.tasks`) may sit beside any method but features (which is all head/):
head/classifier or head/score {w (D, C), b (C,)}, or a masked-LM head {transform/{w,b}, norm/{scale,bias},
bias (V,)}.
"""

from __future__ import annotations

from jaxft import tree
from jaxft.checkpoint.assemble import expected_shapes
from jaxft.peft import parts
from jaxft.peft.method import AdapterError, PeftError, as_method, implementation, method_of


def check(trainable: dict, spec, cfg, source: str) -> None:
    """Raises AdapterError naming `source` and the leaf, unless `trainable` is a tree of the method of `spec`
    (a LoraSpec, MethodSpec or FeatureSpec) whose every leaf has the shape it needs over a base of `cfg`."""
    flat = {p: tuple(x.shape) for p, x in tree.items(trainable)}
    about = (f"this base is a {cfg.model_type} model with {cfg.n_layers} layers, width {cfg.dim}, mlp width "
             f"{cfg.mlp_dim}, {cfg.n_heads} heads of {cfg.head_dim}, {cfg.n_kv_heads} kv heads")
    method = method_of(spec)
    if method != "features":  # (whose whole tree is its head/)
        _check_head({p: s for p, s in flat.items() if p.startswith("head/")}, cfg, source, about)
        flat = {p: s for p, s in flat.items() if not p.startswith("head/")}
        spec = as_method(spec)
    if isinstance(spec, parts.PartsSpec):  # the parts' leaves here, the language model's by its method below
        flat = parts.check(flat, spec, expected_shapes(cfg), source)
        cfg, spec = cfg.text, parts.text_spec(spec)
    if not flat:
        raise AdapterError(f"{source}: the adapter holds no tensors")
    base = expected_shapes(cfg)
    try:
        module = implementation(method)
    except PeftError:
        raise AdapterError(f"{source}: unknown method {method!r}") from None
    if hasattr(module, "check"):  # the method's own messages
        try:
            module.check(spec, flat, base, about)
        except PeftError as e:
            raise AdapterError(f"{source}: {e}") from None
        return
    want = module.expected(spec, flat, base, cfg)
    stray = sorted(set(flat) - set(want))
    if stray:
        raise AdapterError(f"{source}: {stray[0]} is not a leaf of a {method} adapter of this base ({about})")
    missing = sorted(set(want) - set(flat))
    if missing:
        raise AdapterError(f"{source}: {missing[0]} is missing (a {method} adapter of this base has "
                           f"{', '.join(sorted(want))})")
    for path, shape in sorted(want.items()):
        if flat[path] != shape:
            raise AdapterError(f"{source}: {path} has shape {flat[path]}, but this base needs {shape}: it was made "
                               f"for another model ({about})")


def _check_head(flat: dict, cfg, source: str, about: str) -> None:
    """A task head: a linear layer over the hidden states (D, C) + (C,), or a masked-LM head (D -> V)."""
    if not flat:
        return
    names = sorted({p.split("/")[1] for p in flat})
    if set(names) <= {"transform", "norm", "bias"}:
        d = cfg.dim
        want = {"head/transform/w": (d, d), "head/transform/b": (d,), "head/norm/scale": (d,),
                "head/norm/bias": (d,), "head/bias": (cfg.vocab_size,)}
    elif len(names) == 1 and f"head/{names[0]}/w" in flat:
        n_labels = flat[f"head/{names[0]}/w"][-1]
        want = {f"head/{names[0]}/w": (cfg.dim, n_labels)}
        if f"head/{names[0]}/b" in flat:
            want[f"head/{names[0]}/b"] = (n_labels,)
    else:
        raise AdapterError(f"{source}: {', '.join(sorted(flat))} is not a task head (head/<name>/w, optionally b)")
    for path in sorted(set(flat) | set(want)):
        if path not in flat or path not in want:
            raise AdapterError(f"{source}: {path} {'is missing from' if path in want else 'is not part of'} the "
                               f"task head")
        if flat[path] != want[path]:
            raise AdapterError(f"{source}: {path} has shape {flat[path]}, but this base needs {want[path]}: it was "
                               f"made for another model ({about})")
