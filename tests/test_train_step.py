"""The PEFT contract in the train step: gradients for the trainable tree only, base untouched, one trace,
exact gradient accumulation, and packing that keeps examples apart."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import tree
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.models.loss import token_loss
from jaxft.peft import lora
from jaxft.train import optim
from jaxft.train.step import init_state, make_train_step

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
SPEC = lora.LoraSpec(rank=4, alpha=8)


def _forward(base, trainable, mb, rng):
    return llama.forward(TINY, base, mb["tokens"], trainable=trainable, positions=mb["positions"],
                         segment_ids=mb["segment_ids"], lora=SPEC, rng=rng)[0]


def _batch(rng, a, b, t):
    tokens = rng.randint(1, 64, (a, b, t)).astype(np.int32)
    mask = (rng.rand(a, b, t) < 0.6).astype(np.float32)  # uneven target counts per micro-batch
    return {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": mask,
            "segment_ids": np.ones((a, b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (a, b, t)).copy()}


def _setup(lr=1e-2):
    base = llama.init(jax.random.PRNGKey(0), TINY)
    trainable = lora.init(jax.random.PRNGKey(1), base, SPEC, lora.target_paths(base, "all-linear"))
    opt = optax.adamw(lr)
    return base, trainable, opt


def test_contract_base_untouched_state_sizes_single_trace():
    base, trainable, opt = _setup()
    base_before = jax.tree.map(np.array, base)
    traces = []

    def counted(state, base_, batch):
        traces.append(1)
        return make_train_step(_forward, opt)(state, base_, batch)

    step = jax.jit(counted, donate_argnums=(0,))
    state = init_state(trainable, opt, jax.random.PRNGKey(2))
    rng = np.random.RandomState(0)
    first = None
    for i in range(6):
        state, m = step(state, base, _batch(rng, 1, 2, 12))
        first = first if first is not None else float(m["loss"])
    assert len(traces) == 1
    for p, x in tree.items(base):
        np.testing.assert_array_equal(np.asarray(x), tree.flatten(base_before)[p], err_msg=p)
    # AdamW keeps two moments per trainable value and nothing for the base.
    opt_bytes = tree.nbytes(state["opt_state"])
    assert 2 * tree.nbytes(trainable) <= opt_bytes <= 2 * tree.nbytes(trainable) + 64
    assert tree.nbytes(trainable) < 0.2 * tree.nbytes(base)
    changed = [p for p, x in tree.items(state["trainable"]) if not np.array_equal(x, tree.flatten(trainable)[p])]
    assert changed == sorted(tree.flatten(trainable))  # every LoRA leaf trained (B moves first, then A)


def test_grad_accumulation_equals_one_big_batch():
    base, trainable, opt = _setup()
    rng = np.random.RandomState(1)
    big = _batch(rng, 1, 4, 10)
    micro = {k: v.reshape(4, 1, 10) for k, v in big.items()}
    step = jax.jit(make_train_step(_forward, opt))
    s1, m1 = step(init_state(trainable, opt, jax.random.PRNGKey(0)), base, big)
    s4, m4 = step(init_state(trainable, opt, jax.random.PRNGKey(0)), base, micro)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    for p, x in tree.items(s1["trainable"]):
        np.testing.assert_allclose(np.asarray(x), tree.flatten(s4["trainable"])[p], atol=1e-5, err_msg=p)


def test_packed_batch_loss_equals_unpacked():
    base, trainable, _ = _setup()
    trainable = jax.tree.map(lambda x: x + 0.02, trainable)
    rng = np.random.RandomState(2)
    ex = [rng.randint(1, 64, n).astype(np.int32) for n in (7, 5, 9)]

    def loss(tokens, seg, pos, targets, mask):
        logits = _forward(base, trainable, {"tokens": tokens, "segment_ids": seg, "positions": pos}, None)
        return token_loss(logits, targets, mask)

    # Unpacked: one padded row per example.
    t = 9
    rows = [np.pad(e, (0, t - len(e))) for e in ex]
    seg = np.array([[1] * len(e) + [0] * (t - len(e)) for e in ex], np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (3, t))
    targets = np.array([np.roll(r, -1) for r in rows])
    mask = np.array([[1.0] * (len(e) - 1) + [0.0] * (t - len(e) + 1) for e in ex], np.float32)
    s_u, n_u = loss(jnp.asarray(np.stack(rows)), seg, pos, targets, mask)

    # Packed: all three in one row of 21 tokens (+3 padding), segments 1, 2, 3.
    packed = np.concatenate(ex + [np.zeros(3, np.int32)])[None]
    pseg = np.concatenate([np.full(len(e), i + 1) for i, e in enumerate(ex)] + [np.zeros(3)]).astype(np.int32)[None]
    ppos = np.concatenate([np.arange(len(e)) for e in ex] + [np.zeros(3)]).astype(np.int32)[None]
    ptargets = np.concatenate([np.roll(e, -1) for e in ex] + [np.zeros(3)]).astype(np.int32)[None]
    pmask = np.concatenate([np.r_[np.ones(len(e) - 1), 0.0] for e in ex] + [np.zeros(3)]).astype(np.float32)[None]
    s_p, n_p = loss(jnp.asarray(packed), pseg, ppos, ptargets, pmask)
    assert float(n_u) == float(n_p) == 18
    np.testing.assert_allclose(float(s_p) / float(n_p), float(s_u) / float(n_u), rtol=1e-5)


def test_loss_falls_when_overfitting_one_batch():
    base, trainable, opt = _setup(lr=1e-2)
    # A frozen head of std 0.02 caps the logits at about +-0.6; give it the range of a trained model.
    base["lm_head"]["w"] = base["lm_head"]["w"] * 50
    batch = _batch(np.random.RandomState(3), 1, 2, 12)
    batch["targets"] = (batch["tokens"] + 1) % 64  # a rule a rank-4 adapter can learn
    step = jax.jit(make_train_step(_forward, opt))
    state = init_state(trainable, opt, jax.random.PRNGKey(0))
    losses = []
    for _ in range(40):
        state, m = step(state, base, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_schedules():
    warm_cos = optim.schedule(1.0, 110, 10, "cosine")
    assert float(warm_cos(0)) == 0.0 and abs(float(warm_cos(10)) - 1.0) < 1e-6 and float(warm_cos(110)) < 1e-6
    assert abs(float(optim.schedule(1.0, 100, 0, "linear")(50)) - 0.5) < 1e-6
    assert float(optim.schedule(0.5, 100, 0, "constant")(99)) == 0.5
