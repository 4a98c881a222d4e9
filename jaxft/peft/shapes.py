"""Whether a trainable tree fits a base model: the shapes each method's leaves have over a base of `cfg`.

Every adapter that jaxft reads (its own, or PEFT's) goes through `check` before it is used, so that an adapter
made for another architecture or size is refused with the first leaf that does not fit, never run. (An adapter
for a different model of the same shapes cannot be told apart.) The layouts are those of `jaxft.peft.method`,
plus a task head under `head/` (`jaxft.tasks`) beside any method but features (which is all head/):
head/classifier or head/score {w (D, C), b (C,)}, or a masked-LM head {transform/{w,b}, norm/{scale,bias},
bias (V,)}.
"""

from __future__ import annotations

from jaxft import tree
from jaxft.checkpoint.assemble import expected_shapes
from jaxft.peft.lora import LoraSpec
from jaxft.peft.method import AdapterError, as_method, method_of


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
    if not flat:
        raise AdapterError(f"{source}: the adapter holds no tensors")
    base = expected_shapes(cfg)
    if method == "lora":
        _check_lora(flat, spec if isinstance(spec, LoraSpec) else as_method(spec).lora, base, source, about)
        return
    want = _expected(method, spec, flat, base, cfg, source)
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


def _expected(method: str, spec, flat: dict, base: dict, cfg, source: str) -> dict[str, tuple[int, ...]]:
    """path -> shape of every leaf a `method` adapter with the leaves of `flat` must have."""
    n_layers, dim, kv = cfg.n_layers, cfg.dim, cfg.n_kv_heads * cfg.head_dim
    if method == "ia3":
        want = {}
        for path in flat:
            module, leaf = path.rsplit("/", 1)
            w = base.get(f"{module}/w")
            if w is None or len(w) != 3 or leaf not in ("ia3_out", "ia3_in"):
                continue  # reported as a stray leaf
            want[path] = (w[0], w[2] if leaf == "ia3_out" else w[1])
        return want
    if method == "adapter":
        size = next((s[-1] for p, s in flat.items() if p.endswith("adapter/down/w")), 0)
        wheres = sorted({p.split("/")[1] for p in flat if p.startswith("layers/")} & {"attn", "mlp"}) or ["mlp"]
        want = {}
        for where in wheres:
            at = f"layers/{where}/adapter"
            want.update({f"{at}/down/w": (n_layers, dim, size), f"{at}/down/b": (n_layers, size),
                         f"{at}/up/w": (n_layers, size, dim), f"{at}/up/b": (n_layers, dim)})
        return want
    if method == "prefix":
        from jaxft.peft.prefix import where
        n = as_method(spec).virtual_tokens
        path, n_layers = where(cfg)  # T5: the decoder's self-attention
        if "prefix/embedding" in flat:  # not finalized: the reparameterization MLP is still there
            hidden = flat.get("prefix/mlp/in/w", (0, 0))[-1]
            return {"prefix/embedding": (n, kv), "prefix/mlp/in/w": (kv, hidden), "prefix/mlp/in/b": (hidden,),
                    "prefix/mlp/out/w": (hidden, n_layers * 2 * kv), "prefix/mlp/out/b": (n_layers * 2 * kv,)}
        return {f"{path}/prefix_k": (n_layers, n, kv), f"{path}/prefix_v": (n_layers, n, kv)}
    if method == "prompt":
        return {"prompt/embeddings": (as_method(spec).virtual_tokens, dim)}
    if method == "full":
        return dict(base)
    if method == "partial":
        split = dict(as_method(spec).layers)
        want = {}
        for path in flat:
            if path in base:
                want[path] = base[path] if path not in split else (len(split[path]),) + base[path][1:]
        return want
    if method == "features":
        first = "head/hidden/w" if "head/hidden/w" in flat else "head/out/w"
        return {**flat, first: (dim, flat.get(first, (0, 0))[-1])}
    raise AdapterError(f"{source}: unknown method {method!r}")


def _check_lora(flat: dict, spec: LoraSpec, base: dict, source: str, about: str) -> None:
    for module in sorted({p.rsplit("/", 1)[0] for p in flat}):
        w = base.get(f"{module}/w")
        if w is None or len(w) != 3:
            raise AdapterError(f"{source}: {module} is not a linear layer of the base model ({about})")
        n_layers, d_in, d_out = w
        want = {"lora_a": (n_layers, d_in, spec.rank), "lora_b": (n_layers, spec.rank, d_out)}
        if spec.dora:
            want["magnitude"] = (n_layers, d_out)
        leaves = {p.rsplit("/", 1)[1] for p in flat if p.rsplit("/", 1)[0] == module}
        if leaves != set(want):
            raise AdapterError(f"{source}: {module} holds {sorted(leaves)}, expected {sorted(want)} for a "
                               f"{'DoRA' if spec.dora else 'LoRA'} adapter")
        for leaf, shape in want.items():
            got = flat[f"{module}/{leaf}"]
            if got != shape:
                raise AdapterError(f"{source}: {module}/{leaf} has shape {got}, but a rank-{spec.rank} adapter of "
                                   f"this base needs {shape}: it was made for another model ({about})")


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
