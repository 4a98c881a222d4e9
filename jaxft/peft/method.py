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

The spec holds what the arrays cannot say. It is hashable, so jitted functions take it as a static argument.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxft.peft.lora import LoraSpec

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


class PeftError(ValueError):
    """A fine-tuning setting or call jaxft cannot honour; the message names the setting."""


class AdapterError(ValueError):
    """An adapter jaxft cannot use as it stands; the one-line message names the file and the field or tensor."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """The static half of a fine-tuning method, passed to `llama.forward` and `generate` as `peft=`."""
    method: str  # one of jaxft.peft.METHODS
    lora: LoraSpec | None = None  # LoRA's rank, scaling, dropout and DoRA (method lora only)
    activation: str = "relu"  # the bottleneck adapters' non-linearity (method adapter)
    virtual_tokens: int = 0  # P of prompt / prefix tuning: the text's positions start at P, as in PEFT
    layers: tuple[tuple[str, tuple[int, ...]], ...] = ()  # partial: (path, layers) of leaves holding some layers

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MethodSpec":
        return cls(method=d["method"], lora=LoraSpec(**d["lora"]) if d.get("lora") else None,
                   activation=d.get("activation", "relu"), virtual_tokens=int(d.get("virtual_tokens", 0)),
                   layers=tuple((p, tuple(ls)) for p, ls in d.get("layers", ())))


def method_of(spec) -> str:
    """The method name of any adapter spec: a MethodSpec's, 'lora' for a bare LoraSpec, 'features' for a
    FeatureSpec."""
    return "lora" if isinstance(spec, LoraSpec) else spec.method


def as_method(spec) -> MethodSpec | None:
    """A MethodSpec from what a caller passed as `peft=` / `lora=`: a bare LoraSpec stands for LoRA."""
    if spec is None or isinstance(spec, MethodSpec):
        return spec
    if isinstance(spec, LoraSpec):
        return MethodSpec("lora", lora=spec)
    raise TypeError(f"peft= takes a jaxft.peft.MethodSpec (or a LoraSpec), got {type(spec).__name__}")


def resolve(spec: MethodSpec | None, base: dict, trainable: dict | None) -> tuple[dict | None, MethodSpec | None]:
    """(trainable, spec) in the form the model reads: prefixes computed from a reparameterization MLP, the
    layers of a partial fine-tuning put in place in their stacked base leaves. Differentiable; a no-op (same
    objects back) when there is nothing to resolve, so resolving twice is resolving once.

    The model calls this itself; `generate` calls it once before decoding so that no decode step repeats it.
    """
    if not trainable or spec is None:
        return trainable, spec
    if "prefix" in trainable:
        from jaxft.peft import prefix
        trainable = prefix.project(trainable)
    if spec.layers:
        from jaxft.peft import full
        trainable = full.scatter(base, trainable, spec.layers)
        spec = dataclasses.replace(spec, layers=())
    return trainable, spec


def finalize(spec: MethodSpec, trainable: dict) -> dict:
    """The trainable tree to save after training: what training needed but inference does not is dropped
    (prefix tuning's reparameterization MLP: the adapter holds the prefixes it computes)."""
    if "prefix" in trainable:
        from jaxft.peft import prefix
        return prefix.project(trainable)
    return trainable


def virtual_positions(spec: MethodSpec | None, positions):
    """Positions of the text after P virtual tokens (prompt / prefix tuning), as PEFT numbers them."""
    if spec is None or not spec.virtual_tokens:
        return positions
    return positions + jnp.int32(spec.virtual_tokens)
