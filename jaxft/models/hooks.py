"""The hook points where a fine-tuning method acts on a model, and the default that does nothing.

A model family knows no method. Its forward pass takes the trainable tree (overlaid on the base, layer by layer)
and `peft=`, an object with the methods of `Hooks`, and calls them at fixed points:

  resolve(base, trainable)                 once per forward: the tree in the form the hooks read
  virtual_tokens                           P positions before the text (prompt / prefix tuning): text from P on
  prefix_length                            keys `attention_kv` puts first, at positions 0..P-1 (T5's bias)
  input_embeddings(trainable, x, pos, seg) the input embeddings (B, T, D) -> (B, T', D), with their positions
                                           and segment ids; T' - T leading outputs are dropped at the end
  linear(x, p, rng)                        every linear projection: p is the module's subtree ({w, b} and any
                                           leaves the method put beside them)
  attention_kv(p, k, v, mask, q_seg)       the keys / values (B, S, K, H) and mask (B, T, S) an attention layer
                                           sees; p is the attention block's subtree
  block_output(p, h)                       the output (B, T, D) of a sublayer (attention or MLP) before it
                                           joins the residual stream; p is the sublayer's subtree
  grouped_linear(x, p, group_sizes, impl)  each projection of a mixture of experts: rows x (M, in) sorted by
                                           expert times their expert's p["w"] (E, in, out) (`jaxft.models.moe`)

A method implements them (`jaxft.peft`); the object is static and hashable (jitted functions take it as a
static argument). `None` means no method: `hooks_of(None)` is `NO_METHOD`.
"""

from __future__ import annotations

from jaxft.models.layers import linear
from jaxft.models.moe import grouped_linear


class Hooks:
    """Every hook point left as it is: the model computes what its base computes."""

    virtual_tokens: int = 0  # P positions before the text: its positions start at P (PEFT's numbering)
    prefix_length: int = 0  # keys and values `attention_kv` puts before the text's (relative positions read it)

    def resolve(self, base: dict, trainable: dict | None):
        return trainable, self

    def input_embeddings(self, trainable: dict | None, x, positions, segment_ids):
        return x, positions, segment_ids

    def linear(self, x, p: dict, rng=None):
        return linear(x, p)

    def attention_kv(self, p: dict, k, v, mask, q_segment_ids):
        return k, v, mask

    def block_output(self, p: dict, h):
        return h

    def grouped_linear(self, x, p: dict, group_sizes, impl: str):
        return grouped_linear(x, {"w": p["w"]}, group_sizes, 1.0, impl)

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(self) is type(other)


NO_METHOD = Hooks()


def hooks_of(peft) -> Hooks:
    """The hooks of what a caller passed as `peft=`: any object with the methods of `Hooks`, or None."""
    if peft is None:
        return NO_METHOD
    missing = [name for name in ("resolve", "input_embeddings", "linear", "attention_kv", "block_output")
               if not callable(getattr(peft, name, None))]
    if missing:
        raise TypeError(f"peft= takes a fine-tuning method's spec (jaxft.peft.MethodSpec, a LoraSpec or a "
                        f"jaxft.models.Hooks), got {type(peft).__name__} without {', '.join(missing)}")
    return peft
