"""The contract every fine-tuning method keeps: a trainable tree over the frozen base, and a small static
`MethodSpec` that the model receives as `peft=` beside it.

The trainable tree says where a method acts, by its paths (float32 leaves; D width, S adapter size, P virtual
tokens, K*H key/value width, F mlp width):

  lora      layers/<module>/lora_a (L, in, R), lora_b (L, R, out), magnitude (L, out)   beside its w
  adapter   layers/attn/adapter/{down,up}/{w,b}, layers/mlp/adapter/...:               after o_proj / down_proj
            down/w (L, D, S), down/b (L, S), up/w (L, S, D), up/b (L, D)
  prefix    layers/attn/prefix_k, prefix_v (L, P, K*H); while training with a reparameterization MLP,
            prefix/embedding (P, K*H) and prefix/mlp/... instead, from which `resolve` computes them
  prompt    prompt/embeddings (P, D)
  ia3       layers/attn/{k,v}_proj/ia3_out (L, K*H), layers/mlp/down_proj/ia3_in (L, F)   beside its w
  full      every base leaf, replacing it
  partial   the selected base leaves, replacing them; a stacked leaf selected in some layers only holds those
            layers, (k, ...), and the spec says which (see `jaxft.peft.full`)
  features  not run by the language model: a head over pooled hidden states (`jaxft.peft.features`)
  head      a task's head (`jaxft.tasks`: head/classifier or head/score), beside any of the above, always trained

The paths are the LLaMA family's; the other families use their own (`jaxft.models.bert`: the same `layers/...`
names; `jaxft.models.t5`: two stacks, `encoder/layers/...` and `decoder/layers/...`, where prefix tuning acts on
the decoder's self-attention and the soft prompt goes before the encoder input).

The spec holds what the arrays cannot say. It is hashable, so jitted functions take it as a static argument,
and it is what the model receives as `peft=`: it fills the model's hook points (`jaxft.models.hooks`) with the
functions of its method's module, found in `REGISTRY` by name (`register`). A method module may define

  build(key, base, config, cfg, tokenizer) -> (trainable, spec)   a fresh tree from config.<name>
  expected(spec, flat, base, cfg) -> {path: shape}                 the leaves an adapter of this base must have
  settings(config, spec, flat) -> [(field, config value, adapter value[, hint])]   what `peft.init_from` compares
  selection(config) -> (the setting choosing the leaves, listed by leaf?)    named when `init_from`'s leaves differ
  merge(base, trainable, spec, dtype) -> base                      where a plain base computes the same
  SHAPING (config fields fixing the tree's shapes), UNMERGEABLE (why no merge exists)
  the hooks: resolve, finalize, input_embeddings, linear, attention_kv, block_output, grouped_linear (spec first), and
  prefix_length(spec) (keys `attention_kv` puts first, for relative-position models)

and leaves out what it does not need (the hook then does nothing).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from jaxft.models.hooks import Hooks

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
REGISTRY: dict[str, ModuleType] = {}  # method name -> the module implementing it (see `register`)


def register(name: str, module) -> None:
    """Makes `MethodSpec(name, ...)` run the hooks `module` defines (a module or any object with those
    functions as attributes). A name registered again is replaced."""
    REGISTRY[name] = module


class PeftError(ValueError):
    """A fine-tuning setting or call jaxft cannot honour; the message names the setting."""


class AdapterError(ValueError):
    """An adapter jaxft cannot use as it stands; the one-line message names the file and the field or tensor."""


@dataclasses.dataclass(frozen=True)
class MethodSpec(Hooks):
    """The static half of a fine-tuning method, passed to a model's `forward` and `generate` as `peft=`."""
    method: str  # a name in REGISTRY (jaxft.peft.METHODS and any registered later)
    lora: Any = None  # the LoraSpec: LoRA's rank, scaling, dropout and DoRA (method lora only)
    activation: str = "relu"  # the bottleneck adapters' non-linearity (method adapter)
    virtual_tokens: int = 0  # P of prompt / prefix tuning: the text's positions start at P, as in PEFT
    layers: tuple[tuple[str, tuple[int, ...]], ...] = ()  # partial: (path, layers) of leaves holding some layers
    options: tuple[tuple[str, object], ...] = ()  # settings of a method registered outside jaxft, hashable

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MethodSpec":
        lora = REGISTRY["lora"].LoraSpec(**d["lora"]) if d.get("lora") else None  # (jaxft.peft.lora imports this)
        return cls(method=d["method"], lora=lora,
                   activation=d.get("activation", "relu"), virtual_tokens=int(d.get("virtual_tokens", 0)),
                   layers=tuple((p, tuple(ls)) for p, ls in d.get("layers", ())),
                   options=tuple((k, v) for k, v in d.get("options", ())))

    def _hook(self, name: str):
        return getattr(implementation(self.method), name, None)

    @property
    def prefix_length(self) -> int:
        fn = self._hook("prefix_length")
        return 0 if fn is None else fn(self)

    def resolve(self, base, trainable):
        fn = self._hook("resolve")
        return (trainable, self) if fn is None or not trainable else fn(self, base, trainable)

    def input_embeddings(self, trainable, x, positions, segment_ids):
        fn = self._hook("input_embeddings")
        return (x, positions, segment_ids) if fn is None else fn(self, trainable, x, positions, segment_ids)

    def linear(self, x, p, rng=None):
        fn = self._hook("linear")
        return super().linear(x, p, rng) if fn is None else fn(self, x, p, rng)

    def attention_kv(self, p, k, v, mask, q_segment_ids):
        fn = self._hook("attention_kv")
        return (k, v, mask) if fn is None else fn(self, p, k, v, mask, q_segment_ids)

    def block_output(self, p, h):
        fn = self._hook("block_output")
        return h if fn is None else fn(self, p, h)

    def grouped_linear(self, x, p, group_sizes, impl):
        fn = self._hook("grouped_linear")
        return super().grouped_linear(x, p, group_sizes, impl) if fn is None else fn(self, x, p, group_sizes, impl)


def method_of(spec) -> str:
    """The method name of any adapter spec: a MethodSpec's, 'lora' for a bare LoraSpec, 'features' for a
    FeatureSpec."""
    return spec.method


def as_method(spec) -> MethodSpec | None:
    """A MethodSpec from what a caller passed as `peft=` / `lora=`: a bare LoraSpec stands for LoRA."""
    if spec is None or isinstance(spec, MethodSpec):
        return spec
    if hasattr(spec, "as_method"):  # a LoraSpec
        return spec.as_method()
    raise TypeError(f"peft= takes a jaxft.peft.MethodSpec (or a LoraSpec), got {type(spec).__name__}")


def implementation(method: str):
    """The module registered for `method`; PeftError naming peft.method if there is none."""
    if method not in REGISTRY:
        raise PeftError(f"peft.method: {method!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[method]


def virtual_tokens(name: str, n: int, seq_len: int, max_seq_len: int) -> int:
    """Checks a prefix / prompt length `n` (config field `name`) against the model's context, with the training
    rows after it."""
    if n <= 0:
        raise PeftError(f"{name} must be positive, got {n}")
    if n + seq_len > max_seq_len:
        raise PeftError(f"{name}={n} virtual tokens + train.seq_len={seq_len} exceed the model's context "
                        f"(max_seq_len={max_seq_len})")
    return n


def resolve(spec: MethodSpec | None, base: dict, trainable: dict | None) -> tuple[dict | None, MethodSpec | None]:
    """(trainable, spec) in the form the model reads (e.g. prefixes computed from a reparameterization MLP, the
    layers of a partial fine-tuning put in place in their stacked base leaves). Differentiable; a no-op (same
    objects back) when there is nothing to resolve, so resolving twice is resolving once.

    The model calls this itself (`spec.resolve`); `generate` calls it once before decoding so that no decode step
    repeats it.
    """
    if not trainable or spec is None:
        return trainable, spec
    return spec.resolve(base, trainable)


def finalize(spec: MethodSpec, trainable: dict) -> dict:
    """The trainable tree to save after training: what training needed but inference does not is dropped
    (prefix tuning's reparameterization MLP: the adapter holds the prefixes it computes)."""
    fn = getattr(implementation(method_of(spec)), "finalize", None)  # (any spec: a FeatureSpec's head too)
    return trainable if fn is None else fn(spec, trainable)
