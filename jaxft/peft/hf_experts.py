"""LoRA on a mixture of experts' experts and router in HF PEFT's format (`target_parameters`), both ways, exactly.

transformers 5 keeps each sparse block of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE alike as `model.layers.{i}.mlp`
(Mixtral's `block_sparse_moe` on disk) with the experts fused in two 3-D parameters, `mlp.experts.gate_up_proj`
(E, 2F, D) (gate's F rows, then up's) and `mlp.experts.down_proj` (E, D, F), and the router's (E, D)
`mlp.gate.weight` on a module that is not a Linear.
PEFT adapts parameters named in `target_parameters` (its `ParamWrapper`), each expert with its own factors:

  3-D parameter (E, out, in)   lora_A.weight (R*E, in), row e*R + k = row k of expert e's A   } delta_e =
                               lora_B.weight (out, R*E), column k*E + e = column k of its B   }  s B_e A_e
  router (E, D)                lora_A.weight (R, D), lora_B.weight (E, R), as on a Linear

under `base_model.model.model.layers.{i}.mlp.`: `gate.`, and `experts.` for the outermost of the experts'
wrappers. PEFT wraps the targeted parameters of one module one inside the other in the module's order, so with
both targeted gate_up_proj's adapter is `experts.base_layer.` and down_proj's `experts.`; with one, `experts.`.

jaxft holds A (L, E, in, R), B (L, E, R, out) for gate_proj, up_proj and down_proj apart, and the router's
A (L, D, R), B (L, R, E) (`jaxft.peft.lora`). The mapping, exact both ways:
- down_proj and the router: the same factors, laid out as above.
- gate_proj, up_proj -> gate_up_proj: one rank-R adapter A, B = [B_gate | B_up] where gate's and up's A are
  equal in every layer (an adapter that came from PEFT) or only one of them is adapted (the other's B zero);
  otherwise rank 2R, A = [A_gate, A_up] stacked on the rank, B = [[B_gate, 0], [0, B_up]] block-diagonal, with
  `rank_pattern` {"gate_up_proj": 2R} and `alpha_pattern` {"gate_up_proj": 2 alpha, rsLoRA sqrt(2) alpha}, so
  that PEFT's scaling equals jaxft's.
- gate_up_proj -> gate_proj, up_proj: rank R' <= R gives gate (A, B[:, :F]) and up (A, B[:, F:]), padded
  with zero rank columns up to R; R' = 2R with a block-diagonal B splits into its two rank-R halves; any other
  rank is an error. A parameter whose rank_pattern / alpha_pattern scaling differs from the adapter's (r,
  lora_alpha) has the ratio folded into B.
Adapters made on transformers 4, where every expert was a Linear of its own (`block_sparse_moe.experts.{e}.w1`,
the others' `mlp.experts.{e}.gate_proj`; PEFT converts them on loading), are read too: their factors are
jaxft's, expert by expert. A Qwen3-MoE's dense layers (`mlp_only_layers`) have no experts or router in
transformers: their filler factors are not written, and read as zeros.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from jaxft.models import family_of
from jaxft.peft.method import AdapterError

__all__ = ["is_moe_leaf", "load", "save", "split"]

PREFIX = "base_model.model."
BLOCK = "layers.{i}.mlp"  # every MoE family's sparse block in transformers 5's in-memory model
# PEFT parameter name -> the jaxft modules it holds, in the experts module's parameter order (the nesting order).
EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
ROUTER = "gate.weight"
TARGETS = {"gate_up_proj": "mlp.experts.gate_up_proj", "down_proj": "mlp.experts.down_proj",
           ROUTER: "mlp.gate.weight"}  # what `save` writes in target_parameters
_JAXFT = re.compile(r"layers/mlp/(experts/\w+|router)/")


def is_moe_leaf(path: str) -> bool:
    """True for a trainable leaf on the experts or the router (`layers/mlp/experts/...`, `layers/mlp/router/...`)."""
    return _JAXFT.match(path) is not None


def split(flat: dict, cfg) -> tuple[dict, dict]:
    """(the experts' and router's leaves, the others) of a flat trainable tree of a model of `cfg`.

    Raises AdapterError for LoRA on the MLP of a Qwen3-MoE's dense layers, which has no PEFT form on
    transformers 5: PEFT rewrites a Qwen3-MoE's (and OLMoE's) target_modules gate_proj / up_proj / down_proj
    into the experts' target_parameters, whatever module they were meant for."""
    dense = sorted({p.rsplit("/", 1)[0] for p in flat if re.match(r"layers/mlp/(gate|up|down)_proj/", p)})
    if dense and getattr(cfg, "dense_layers", ()):
        raise AdapterError(f"{dense[0]}: LoRA on the MLP of the dense layers {list(cfg.dense_layers)} of this "
                           f"{cfg.model_type} has no PEFT form (PEFT on transformers 5 turns target_modules "
                           f"{dense[0].rsplit('/', 1)[1]} into the experts' target_parameters); leave "
                           f"layers/mlp/(gate|up|down)_proj out of lora.targets, or export --merged")
    moe = {p: x for p, x in flat.items() if is_moe_leaf(p)}
    return moe, {p: x for p, x in flat.items() if p not in moe}


def save(flat: dict, spec, cfg, prefix: str) -> tuple[dict, dict]:
    """(tensors, adapter_config.json fields) of the expert and router LoRA leaves `flat` (path -> float32 array,
    the layouts of the module docstring) of a model of `cfg`, for the class whose backbone prefix is `prefix`
    ("model."). Layers without experts (a Qwen3-MoE's dense ones) are left out: their factors are fillers."""
    if any(p.endswith("/magnitude") for p in flat):
        raise AdapterError("DoRA on the experts has no PEFT form (PEFT's target_parameters refuse use_dora)")
    get = lambda module, leaf: flat.get(f"layers/mlp/experts/{module}/{leaf}")
    adapters: dict[str, tuple] = {}  # PEFT parameter -> (A (L, E, in, R'), B (L, E, R', out), R' / R)
    if get("gate_proj", "lora_a") is not None or get("up_proj", "lora_a") is not None:
        adapters["gate_up_proj"] = _fuse([(get(m, "lora_a"), get(m, "lora_b")) for m in ("gate_proj", "up_proj")])
    if get("down_proj", "lora_a") is not None:
        adapters["down_proj"] = (get("down_proj", "lora_a"), get("down_proj", "lora_b"), 1)
    tensors, fields = {}, {"target_parameters": [], "rank_pattern": {}, "alpha_pattern": {}}
    names = _expert_names(list(adapters))
    for param, (a, b, factor) in adapters.items():
        for i in _sparse_layers(cfg):
            lora_a, lora_b = _to_peft(a[i], b[i])
            where = f"{PREFIX}{prefix}{BLOCK.format(i=i)}.{names[param]}"
            tensors[f"{where}.lora_A.weight"], tensors[f"{where}.lora_B.weight"] = lora_a, lora_b
        fields["target_parameters"].append(TARGETS[param])
        if factor != 1:  # rank R * factor at the adapter's scaling
            fields["rank_pattern"][param] = spec.rank * factor
            alpha = spec.alpha * (math.sqrt(factor) if spec.rslora else factor)
            fields["alpha_pattern"][param] = int(alpha) if float(alpha).is_integer() else alpha
    if "layers/mlp/router/lora_a" in flat:
        a, b = flat["layers/mlp/router/lora_a"], flat["layers/mlp/router/lora_b"]
        for i in _sparse_layers(cfg):
            where = f"{PREFIX}{prefix}{BLOCK.format(i=i)}.gate"
            tensors[f"{where}.lora_A.weight"], tensors[f"{where}.lora_B.weight"] = a[i].T, b[i].T
        fields["target_parameters"].append(TARGETS[ROUTER])
    return tensors, fields


def load(arrays: dict, conf: dict, spec, cfg, prefixes: list[str], modules: list[str], file,
         source: str) -> tuple[dict, dict]:
    """(flat jaxft tree of the experts' and router's factors, the other tensors) of a PEFT LoRA adapter (config
    `conf`) for a base of `cfg` with LoRA spec `spec` (its r, lora_alpha): the parameters `target_parameters`
    names, and transformers 4's one LoRA per expert module (`_per_expert`).

    prefixes: the backbone prefixes the adapter may be named under, the TABLE's first ("model.", ""); modules:
    the module paths (every layer) PEFT's target_modules may adapt, which rank_pattern / alpha_pattern must not
    reach (jaxft has one rank for them). Raises AdapterError naming the key or tensor, and what was expected.
    """
    targets = conf.get("target_parameters") or []
    ranks, alphas = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{source}: target_parameters={targets!r} is not a list of parameter names")
    for field, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if not isinstance(pattern, dict):
            raise AdapterError(f"{source}: {field}={pattern!r} is not an object")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise AdapterError(f"{source}: {field} key {key!r} is not a valid regex ({e})") from None
            hit = next((m for m in modules if _pattern_matches(key, m)), None)
            if hit is not None:
                raise AdapterError(f"{source}: {field}={json.dumps(pattern)} is not supported by jaxft: key {key!r} "
                                   f"reaches {hit}, and jaxft reads one rank and alpha (r, lora_alpha) for the "
                                   f"linear layers, per-parameter ones only on the experts and the router")
    if targets and not getattr(cfg, "n_experts", 0):
        raise AdapterError(f"{source}: target_parameters={targets} on a {cfg.model_type} model, which has no "
                           f"experts or router (jaxft reads target_parameters on a mixture of experts)")
    if targets and spec.dora:
        raise AdapterError(f"{source}: use_dora with target_parameters: DoRA on the experts is not supported")
    if not getattr(cfg, "n_experts", 0):
        return {}, arrays
    prefix = next((p for p in prefixes if any(n.startswith(f"{PREFIX}{p}layers.0.") for n in arrays)), prefixes[0])
    rest = dict(arrays)
    flat = _per_expert(rest, cfg, spec, ranks, alphas, prefix, prefix_of_table=prefixes[0], file=file,
                       source=source)
    wanted = _targeted(targets, _sparse_layers(cfg), prefix, source) if targets else []
    names = _expert_names([p for p in EXPERTS if p in wanted])
    for param in wanted:
        key = f"{prefix}{BLOCK}." + ("gate.weight" if param == ROUTER else f"experts.{param}")
        per_layer = {}
        for i in _sparse_layers(cfg):
            rank, factor = _scaling(ranks, alphas, key.format(i=i), spec, source)
            where = f"{PREFIX}{prefix}{BLOCK.format(i=i)}." + ("gate" if param == ROUTER else names[param])
            a, b = (_pop(rest, f"{where}.lora_{x}.weight", file) for x in "AB")
            per_layer[i] = _read(param, a, b, rank, factor, spec.rank, cfg, f"{file}: {where}")
        flat.update(_stacked(per_layer, cfg))
    return flat, rest


def _per_expert(rest: dict, cfg, spec, ranks: dict, alphas: dict, prefix: str, prefix_of_table: str, file,
                source: str) -> dict:
    """The experts' factors of an adapter made on transformers 4, where each expert was its own Linear
    (`<block>.experts.{e}.w1` for Mixtral, `.gate_proj` for Qwen2-MoE, as the family's MOE_PREFIX and
    EXPERT_NAMES name them; PEFT converts these itself on transformers 5), popped from `rest`: per expert
    lora_A (R, in), lora_B (out, R) -> jaxft's A (L, E, in, R), B (L, E, R, out)."""
    family = family_of(cfg)
    moe_prefix, per_expert = getattr(family, "MOE_PREFIX", None), getattr(family, "EXPERT_NAMES", None)
    if not moe_prefix or not per_expert:
        return {}
    block = prefix + moe_prefix.removeprefix(prefix_of_table)
    e, d, f = cfg.n_experts, cfg.dim, cfg.mlp_dim
    flat = {}
    for module, hf in per_expert.items():
        stem = lambda i, x: f"{block.format(i=i)}.experts.{x}.{hf}"
        if not any(f"{PREFIX}{stem(i, x)}.lora_A.weight" in rest for i in _sparse_layers(cfg) for x in range(e)):
            continue
        if spec.dora:
            raise AdapterError(f"{source}: use_dora on the experts ({stem(0, 0)}): DoRA on the experts is not "
                               f"supported")
        d_in, d_out = (f, d) if module == "down_proj" else (d, f)
        per_layer = {}
        for i in _sparse_layers(cfg):
            experts = []
            for x in range(e):
                where = f"{PREFIX}{stem(i, x)}"
                rank, factor = _scaling(ranks, alphas, stem(i, x), spec, source)
                a, b = (_pop(rest, f"{where}.lora_{y}.weight", file) for y in "AB")
                for y, got, want in (("A", a, (rank, d_in)), ("B", b, (d_out, rank))):
                    if got.shape != want:
                        raise AdapterError(f"{file}: {where}.lora_{y}.weight has shape {got.shape}, expected {want} "
                                           f"(rank {rank} from r / rank_pattern): it was made for another model")
                experts.append(_pad(a.T[None], b.T[None] * factor, spec.rank, f"{file}: {where}"))
            per_layer[i] = {f"layers/mlp/experts/{module}/{leaf}": np.concatenate([x[leaf] for x in experts])
                            for leaf in ("lora_a", "lora_b")}
        flat.update(_stacked(per_layer, cfg))
    return flat


def _sparse_layers(cfg) -> list[int]:
    """The layers with experts and a router: all but a Qwen3-MoE's dense ones (`dense_layers`)."""
    dense = getattr(cfg, "dense_layers", ())  # only Qwen3-MoE's config has the field
    return [i for i in range(cfg.n_layers) if i not in dense]


def _stacked(per_layer: dict, cfg) -> dict:
    """{leaf: (L, ...) float32} of {sparse layer: {leaf: array}}, zeros in the dense layers: the fillers that
    a fresh adapter has there too (they are never read)."""
    first = next(iter(per_layer.values()))
    return {leaf: np.stack([per_layer[i][leaf] if i in per_layer else np.zeros_like(x)
                            for i in range(cfg.n_layers)]).astype(np.float32) for leaf, x in first.items()}


def _scaling(ranks: dict, alphas: dict, key: str, spec, source: str) -> tuple[int, float]:
    """(rank, scaling / the adapter's scaling) of the module or parameter `key` under rank_pattern /
    alpha_pattern (PEFT's first matching key; else r, lora_alpha)."""
    rank, alpha = _pattern_value(ranks, key, spec.rank), _pattern_value(alphas, key, spec.alpha)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterError(f"{source}: rank_pattern gives {key} rank {rank!r}, expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{source}: alpha_pattern gives {key} alpha {alpha!r}, expected a number")
    return rank, alpha / (math.sqrt(rank) if spec.rslora else rank) / spec.scaling


def _targeted(targets: list[str], layers: list[int], prefix: str, source: str) -> list[str]:
    """The PEFT parameters (EXPERTS' names, ROUTER) `target_parameters` adapts, in nesting order; each entry
    must name one of them in every one of `layers` (those with experts), as PEFT matches (the key itself or a
    '.'-separated end of it)."""
    known = {param: [f"{prefix}{BLOCK.format(i=i)}." + ("gate.weight" if param == ROUTER else f"experts.{param}")
                     for i in layers] for param in (*EXPERTS, ROUTER)}
    found = set()
    for t in targets:
        hits = [param for param, keys in known.items() if all(k == t or k.endswith("." + t) for k in keys)
                and (param != ROUTER or t.endswith(ROUTER))]  # not 'weight', which reaches every weight
        if not hits:
            raise AdapterError(f"{source}: target_parameters entry {t!r} names no expert or router parameter jaxft "
                               f"knows in every layer (expected {', '.join(repr(v) for v in TARGETS.values())})")
        found.update(hits)
    return [p for p in (*EXPERTS, ROUTER) if p in found]


def _read(param: str, a, b, rank: int, factor: float, want: int, cfg, where: str) -> dict:
    """One layer's PEFT factors of `param` (rank `rank`, scaling `factor` x the adapter's) as jaxft leaves."""
    e, d, f = cfg.n_experts, cfg.dim, cfg.mlp_dim
    d_in, d_out, n = {"gate_up_proj": (d, 2 * f, e), "down_proj": (f, d, e), ROUTER: (d, e, 1)}[param]
    expect = {"A": (rank * n, d_in), "B": (d_out, rank * n)}
    for x, got in (("A", a), ("B", b)):
        if got.shape != expect[x]:
            raise AdapterError(f"{where}.lora_{x}.weight has shape {got.shape}, expected {expect[x]} (rank {rank} "
                               f"from r / rank_pattern, {n} expert(s), in {d_in}, out {d_out}): it was made for "
                               f"another model or rank")
    if param == ROUTER:
        a, b = a.T[None], b.T[None]
    else:
        a, b = _from_peft(a, b, e)
    b = b * factor
    if param == ROUTER:
        return {f"layers/mlp/router/{k}": v[0] for k, v in _pad(a, b, want, where).items()}
    if param == "down_proj":
        return {f"layers/mlp/experts/down_proj/{k}": v for k, v in _pad(a, b, want, where).items()}
    gate, up = (a, b[..., :f]), (a, b[..., f:])
    if rank == 2 * want and not (b[:, :want, f:].any() or b[:, want:, :f].any()):
        gate, up = (a[..., :want], b[:, :want, :f]), (a[..., want:], b[:, want:, f:])  # jaxft's own rank-2R export
    out = {}
    for module, (pa, pb) in (("gate_proj", gate), ("up_proj", up)):
        out.update({f"layers/mlp/experts/{module}/{k}": v for k, v in _pad(pa, pb, want, where).items()})
    return out


def _pad(a, b, want: int, where: str) -> dict:
    """{lora_a (E, in, want), lora_b (E, want, out)}: a rank below `want` padded with zero rank columns (which
    add nothing), one above it an error."""
    rank = a.shape[-1]
    if rank > want:
        raise AdapterError(f"{where}: rank {rank} (r / rank_pattern) is above the adapter's r={want}, which jaxft "
                           f"uses for every module (a fused gate_up_proj may have 2r with a block-diagonal lora_B)")
    pad = want - rank
    return {"lora_a": np.pad(a, ((0, 0), (0, 0), (0, pad))), "lora_b": np.pad(b, ((0, 0), (0, pad), (0, 0)))}


def _fuse(pairs: list) -> tuple:
    """(A, B, rank factor) of gate_up_proj from gate's and up's (A, B) (either may be (None, None))."""
    (ag, bg), (au, bu) = pairs
    if ag is None or au is None:
        a, present = (au, bu) if ag is None else (ag, bg)
        zeros = np.zeros_like(present)
        return a, np.concatenate([bg if bg is not None else zeros, bu if bu is not None else zeros], -1), 1
    if np.array_equal(ag, au):
        return ag, np.concatenate([bg, bu], -1), 1
    r, f = ag.shape[-1], bg.shape[-1]
    b = np.zeros((*bg.shape[:-2], 2 * r, 2 * f), np.float32)
    b[..., :r, :f], b[..., r:, f:] = bg, bu
    return np.concatenate([ag, au], -1), b, 2


def _to_peft(a, b):
    """One layer's a (E, in, R), b (E, R, out) -> PEFT's lora_A (R*E, in) expert-major, lora_B (out, R*E)
    expert-minor."""
    e, d_in, r = a.shape
    return (np.ascontiguousarray(a.transpose(0, 2, 1).reshape(e * r, d_in)),
            np.ascontiguousarray(b.transpose(2, 1, 0).reshape(b.shape[2], r * e)))


def _from_peft(lora_a, lora_b, e: int):
    """The inverse of `_to_peft`: (a (E, in, R), b (E, R, out))."""
    r = lora_a.shape[0] // e
    return (lora_a.reshape(e, r, -1).transpose(0, 2, 1),
            lora_b.reshape(lora_b.shape[0], r, e).transpose(2, 1, 0))


def _expert_names(params: list[str]) -> dict[str, str]:
    """PEFT parameter -> the module path of its wrapper under the block: the first of the targeted ones is the
    innermost (`experts.base_layer.` once per wrapper around it)."""
    ordered = [p for p in EXPERTS if p in params]
    return {p: "experts" + ".base_layer" * (len(ordered) - 1 - k) for k, p in enumerate(ordered)}


def _pattern_matches(key: str, name: str) -> bool:
    # PEFT's get_pattern_key: the key names a '.'-separated end of the module or parameter path.
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_value(pattern: dict, name: str, default):
    return next((v for k, v in pattern.items() if _pattern_matches(k, name)), default)


def _pop(arrays: dict, name: str, file) -> np.ndarray:
    if name not in arrays:
        raise AdapterError(f"{file}: missing tensor {name} (each layer and expert of an adapted parameter has one)")
    return arrays.pop(name)
