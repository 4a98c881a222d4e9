"""A model family and a fine-tuning method defined here, outside jaxft, through its public API alone
(`jaxft.models.register_family`, `jaxft.peft.register`): each trains with jaxft's train step (the loss falls,
the base stays bit-identical) and generates with `jaxft.generate`, token-equal to a plain greedy loop that
reruns the whole forward pass for every new token. Tiny random models."""

import dataclasses
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import config as config_lib, tree
from jaxft import peft
from jaxft.generate import generate
from jaxft.models import hooks_of, llama, register_family
from jaxft.models.config import LlamaConfig
from jaxft.models.attention import attention, prefix_of
from jaxft.models.layers import apply_rope, dense, einsum, rms_norm, rope_frequencies
from jaxft.models.table import Entry
from jaxft.peft import io as adapter_io
from jaxft.peft import sources
from jaxft.peft.method import AdapterError
from jaxft.train.step import init_state, make_train_step

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
SMALL = ["train.seq_len=8", "adapter.size=4", "prefix.length=2", "prompt.length=2", "prefix.init=random",
         "lora.rank=2", "lora.alpha=8"]


# ---- a family: a small pre-norm decoder with a GELU MLP (no gate), written against the family protocol ------

@dataclasses.dataclass(frozen=True)
class MiniConfig:
    vocab_size: int = 40
    dim: int = 16
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 4
    mlp_dim: int = 24
    max_seq_len: int = 32
    model_type: str = "mini_gpt"

    n_kv_heads = property(lambda self: self.n_heads)

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        return cls(vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                   head_dim=hf["n_embd"] // hf["n_head"], mlp_dim=hf["n_inner"])

    def to_hf(self):
        return {"model_type": self.model_type, "architectures": ["MiniGPTForCausalLM"], "vocab_size": self.vocab_size,
                "n_embd": self.dim, "n_layer": self.n_layers, "n_head": self.n_heads, "n_inner": self.mlp_dim}


def _mini_init(key, cfg, dtype=jnp.float32):
    d, f, L, nh = cfg.dim, cfg.mlp_dim, cfg.n_layers, cfg.n_heads * cfg.head_dim
    shapes = {"embed/w": (cfg.vocab_size, d), "lm_head/w": (d, cfg.vocab_size),
              **{f"layers/attn/{m}_proj/w": (L, d, nh) for m in "qkv"}, "layers/attn/o_proj/w": (L, nh, d),
              "layers/mlp/up_proj/w": (L, d, f), "layers/mlp/down_proj/w": (L, f, d)}
    keys = jax.random.split(key, len(shapes))
    flat = {p: (0.3 * jax.random.normal(k, s)).astype(dtype) for k, (p, s) in zip(keys, sorted(shapes.items()))}
    flat.update({"layers/attn_norm/scale": jnp.ones((L, d), dtype), "layers/mlp_norm/scale": jnp.ones((L, d), dtype),
                 "final_norm/scale": jnp.ones((d,), dtype)})
    return tree.unflatten(flat)


def _mini_cache(cfg, batch, length, dtype=jnp.float32):
    kv = (cfg.n_layers, batch, length, cfg.n_heads, cfg.head_dim)
    return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype), "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "positions": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def _mini_forward(cfg, base, tokens, *, trainable=None, positions=None, segment_ids=None, cache=None, peft=None,
                  rng=None, dtype=jnp.float32, return_hidden=False, **_):
    trainable, hooks = hooks_of(peft).resolve(base, trainable)
    params = tree.overlay(base, trainable)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
    segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    x = params["embed"]["w"].astype(dtype)[tokens]
    x, positions, segment_ids = hooks.input_embeddings(trainable, x, positions + hooks.virtual_tokens, segment_ids)
    n_soft, t = x.shape[1] - t, x.shape[1]
    index = jnp.int32(0) if cache is None else cache["index"]
    q_idx = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
        keys_meta = (segment_ids, positions, q_idx)
    else:
        k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
        k_pos = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
        s = k_seg.shape[1]
        keys_meta = (k_seg, k_pos, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    mask = dict(zip(("k_segments", "k_positions", "k_index"), keys_meta), q_segments=segment_ids, q_positions=positions,
                q_index=q_idx)
    inv_freq = rope_frequencies(cfg.head_dim, 10000.0, None)
    heads = lambda y: y.reshape(b, t, cfg.n_heads, cfg.head_dim)

    def layer(x, xs):
        p, rng_l, kv = xs
        rngs = [None] * 6 if rng_l is None else list(jax.random.split(rng_l, 6))
        attn, mlp = p["attn"], p["mlp"]
        h = rms_norm(x, p["attn_norm"]["scale"], 1e-6)
        q, k, v = (heads(dense(h, attn[f"{m}_proj"], hooks, r)) for m, r in zip("qkv", rngs))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k, (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v, (0, index, 0, 0))
            kv = (k, v)
        o = attention(q, k, v, prefix=prefix_of(hooks, attn, k, v, segment_ids), **mask)
        o = dense(o.reshape(b, t, -1), attn["o_proj"], hooks, rngs[3])
        x = x + hooks.block_output(attn, o)
        h = rms_norm(x, p["mlp_norm"]["scale"], 1e-6)
        up = jax.nn.gelu(dense(h, mlp["up_proj"], hooks, rngs[4]))
        return x + hooks.block_output(mlp, dense(up, mlp["down_proj"], hooks, rngs[5])), kv

    def step(x, xs):
        base_l, train_l, rng_l, kv = xs
        return layer(x, (tree.overlay(base_l, train_l), rng_l, kv))

    rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)
    kv = None if cache is None else (cache["k"], cache["v"])
    x, new_kv = jax.lax.scan(step, x, (base["layers"], (trainable or {}).get("layers", {}), rngs, kv))
    x = rms_norm(x[:, n_soft:], params["final_norm"]["scale"], 1e-6)
    new_cache = None if cache is None else {"k": new_kv[0], "v": new_kv[1], "segment_ids": k_seg,
                                            "positions": k_pos, "index": index + t}
    if return_hidden:
        return x, new_cache
    return einsum("btd,dv->btv", x, params["lm_head"]["w"].astype(dtype)), new_cache


def _mini_logits(cfg, base, trainable, hidden, dtype, policy=None):
    return einsum("bd,dv->bv", hidden, tree.overlay(base, trainable)["lm_head"]["w"].astype(dtype))


MINI = SimpleNamespace(
    Config=MiniConfig, KIND="decoder", init=_mini_init, forward=_mini_forward, init_cache=_mini_cache,
    decode_logits=_mini_logits, LORA_TARGETS=r"layers/attn/(q_proj|v_proj)/w",
    TABLE=(Entry("wte.weight", "embed/w", False), Entry("lm_head.weight", "lm_head/w", True),
           *(Entry(f"h.{{i}}.attn.{m}.weight", f"layers/attn/{m}_proj/w", True) for m in "qkvo"),
           Entry("h.{i}.ln_1.weight", "layers/attn_norm/scale", False),
           Entry("h.{i}.ln_2.weight", "layers/mlp_norm/scale", False),
           Entry("h.{i}.mlp.up.weight", "layers/mlp/up_proj/w", True),
           Entry("h.{i}.mlp.down.weight", "layers/mlp/down_proj/w", True),
           Entry("ln_f.weight", "final_norm/scale", False)),
    PARAM_AXES=((r"embed/w", ("vocab", "embed")), (r"lm_head/w", ("embed", "vocab")),
                (r"layers/attn/(q|k|v)_proj/w", ("layers", "embed", "heads")),
                (r"layers/attn/o_proj/w", ("layers", "heads", "embed")),
                (r"layers/mlp/up_proj/w", ("layers", "embed", "mlp")),
                (r"layers/mlp/down_proj/w", ("layers", "mlp", "embed")), (r".*norm/scale", (None,))),
)


# ---- a method: a learned shift added to every block's output (only the hook it needs) ------------------------

def _shift_build(key, base, config, cfg, tokenizer=None):
    n = cfg.n_layers
    return ({"layers": {"attn": {"shift": jnp.zeros((n, cfg.dim))}, "mlp": {"shift": jnp.zeros((n, cfg.dim))}}},
            peft.MethodSpec("shift"))


SHIFT = SimpleNamespace(
    build=_shift_build,
    expected=lambda spec, flat, base, cfg: {f"layers/{m}/shift": (cfg.n_layers, cfg.dim) for m in ("attn", "mlp")},
    block_output=lambda spec, p, h: h + p["shift"].astype(h.dtype) if "shift" in p else h,
    UNMERGEABLE="a shift after a block's non-linear output",
)


# ---- the checks ----------------------------------------------------------------------------------------------

def _batch(vocab, seq_len=8, rows=4, accumulate=1):
    rs = np.random.RandomState(0)
    tokens = rs.randint(2, vocab, (accumulate, rows, seq_len)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": np.ones_like(tokens),
            "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()}


def _train_and_generate(family, cfg, method, steps=6):
    """(losses, generated, greedy reference): `steps` Adam steps of `method` from a fresh tree, then greedy
    generation of two prompts with jaxft.generate and with a plain loop over the full forward."""
    base = jax.jit(family.init, static_argnums=1)(jax.random.key(0), cfg)
    config = config_lib.load(CONFIG, [f"peft.method={method}", *SMALL])
    trainable, spec = peft.build(jax.random.key(1), base, config, cfg)
    forward = lambda base, trainable, mb, rng: family.forward(cfg, base, mb["tokens"], trainable=trainable,
                                                              positions=mb["positions"], peft=spec, rng=rng,
                                                              segment_ids=mb["segment_ids"])[0]
    step = jax.jit(make_train_step(forward, optax.adam(3e-2)))
    state, batch, before = init_state(trainable, optax.adam(3e-2), jax.random.key(2)), _batch(cfg.vocab_size), base
    losses = []
    for _ in range(steps):
        state, metrics = step(state, base, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)))
    trained = peft.finalize(spec, state["trainable"])
    prompts = [[3, 9, 4], [7, 1, 8, 2, 5]]
    got = generate(cfg, base, prompts, max_new_tokens=4, trainable=trained, peft=spec, unroll=False)
    full = jax.jit(lambda toks: family.forward(cfg, base, toks, trainable=trained, peft=spec)[0])
    want = []
    for p in prompts:
        seq = list(p)
        for _ in range(4):
            seq.append(int(jnp.argmax(full(jnp.asarray([seq], jnp.int32))[0, -1])))
        want.append(seq[len(p):])
    return losses, got, want, trained, spec, config


@pytest.fixture(scope="module")
def mini():
    register_family(MINI)
    return MiniConfig()


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt", "adapter"])
def test_family_defined_here_trains_and_generates(mini, method):
    losses, got, want, *_ = _train_and_generate(MINI, mini, method)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert got == want


def test_method_defined_here_trains_generates_and_saves(tmp_path):
    peft.register("shift", SHIFT)
    cfg = LlamaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=24,
                      max_seq_len=32)
    losses, got, want, trained, spec, config = _train_and_generate(llama, cfg, "shift")
    assert losses[-1] < losses[0] - 1e-3, losses
    assert got == want
    adapter_io.save(tmp_path / "adapter", trained, spec, config, "tiny")
    loaded, loaded_spec = sources.load(tmp_path, cfg)  # checked against the base by SHIFT.expected
    assert loaded_spec == spec
    for path, x in tree.items(trained):
        np.testing.assert_array_equal(np.asarray(tree.flatten(loaded)[path]), np.asarray(x))
    with pytest.raises(AdapterError, match="layers/attn/shift has shape"):
        sources.load(tmp_path, dataclasses.replace(cfg, dim=32))
    with pytest.raises(peft.PeftError, match="shift cannot be merged: a shift after"):
        peft.merge({}, {}, peft.MethodSpec("shift"))
