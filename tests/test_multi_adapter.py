"""Several adapters over one base: a batch row with its own adapter equals that adapter alone (LoRA, rsLoRA,
DoRA, none; forward and generation), and the base is shared, never copied."""

import functools
import gc
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import multi, tree
from jaxft.generate import generate
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft import hf_format, lora
from jaxft.peft import io as adapter_io

TINY = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 96, (5, 10)))


def _adapter(base, spec, targets, seed):
    """A trained-looking adapter: random A, B and (DoRA) magnitudes near the base's column norms."""
    rng = np.random.RandomState(seed)
    flat, t = tree.flatten(base), {}
    for path in lora.target_paths(base, targets):
        (n_layers, d_in, d_out), module = flat[path].shape, path.rsplit("/", 1)[0]
        t[f"{module}/lora_a"] = 0.3 * rng.randn(n_layers, d_in, spec.rank)
        t[f"{module}/lora_b"] = 0.1 * rng.randn(n_layers, spec.rank, d_out)
        if spec.dora:
            t[f"{module}/magnitude"] = np.linalg.norm(flat[path], axis=-2) * (1 + 0.2 * rng.randn(n_layers, d_out))
    return tree.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in t.items()}), spec


_init = jax.jit(llama.init, static_argnums=1)


def _base():
    return _init(jax.random.PRNGKey(0), TINY)


@pytest.fixture(scope="module")
def setup():
    base = _base()
    # Different ranks (padding), scalings (folded into B), modules (zeros) and DoRA beside plain LoRA.
    adapters = {"lora": _adapter(base, lora.LoraSpec(rank=4, alpha=8), "all-linear", 1),
                "dora": _adapter(base, lora.LoraSpec(rank=2, alpha=4, rslora=True, dora=True),
                                 r"layers/(mlp/.*|attn/q_proj/w)", 3)}
    return base, adapters, multi.stack(base, adapters)


@functools.partial(jax.jit, static_argnums=3)
def _forward(base, tokens, trainable, spec):
    peft = spec if spec is not None else multi.PER_ROW
    return llama.forward(TINY, base, tokens, trainable=trainable, peft=peft)[0]


def _logits(base, tokens, trainable=None, spec=None):
    return np.asarray(_forward(base, tokens, trainable, spec))


def test_each_row_equals_its_adapter_alone(setup):
    base, adapters, stacked = setup
    choice = ["dora", "lora", None, "dora", "lora"]
    got = _logits(base, TOKENS, stacked.rows(choice))
    alone = {name: _logits(base, TOKENS, *adapters[name]) for name in adapters} | {None: _logits(base, TOKENS)}
    for row, name in enumerate(choice):
        np.testing.assert_allclose(got[row], alone[name][row], atol=1e-5, err_msg=f"row {row} ({name})")
    for name in adapters:
        assert np.abs(alone[name] - alone[None]).max() > 1e-2  # each adapter does something
        # One adapter for the whole call.
        np.testing.assert_allclose(_logits(base, TOKENS, stacked.rows([name] * 5)), alone[name], atol=1e-5)
    with pytest.raises(KeyError, match="no adapter named 'sql'"):
        stacked.rows(["lora", "sql"])


def test_generation_per_row_equals_each_adapter_alone(setup):
    base, adapters, stacked = setup
    prompts = [[5, 17, 3], [8, 1, 44, 2, 9], [60, 61], [7, 7, 7, 7]]
    choice = ["lora", "dora", None, "dora"]
    got = generate(TINY, base, prompts, max_new_tokens=6, trainable=stacked.rows(choice), peft=multi.PER_ROW)
    # Rows decode independently, so a row of a batch that is all one adapter is that adapter alone.
    trainable, spec = adapters["dora"]
    assert got[1] == generate(TINY, base, prompts, max_new_tokens=6, trainable=trainable, lora=spec)[1]
    for row, name in enumerate(choice):  # the same compiled program as `got`: only the row -> adapter ids differ
        same = generate(TINY, base, prompts, max_new_tokens=6, trainable=stacked.rows([name] * 4),
                        peft=multi.PER_ROW)
        assert got[row] == same[row], name


def test_memory_grows_by_the_adapters_only(setup):
    base = _base()
    # Host copies, so that only what `stack` allocates appears among the live device arrays.
    adapters = {name: (jax.tree.map(np.asarray, t), spec) for name, (t, spec) in {
        f"a{k}": _adapter(base, lora.LoraSpec(rank=4, alpha=8), "all-linear", k) for k in range(3)}.items()}

    def live_bytes():
        gc.collect()
        return sum(x.nbytes for x in jax.live_arrays())

    before = live_bytes()
    stacked = multi.stack(base, adapters)
    assert live_bytes() - before == tree.nbytes(stacked.stacked) == sum(tree.nbytes(t) for t, _ in adapters.values())

    # Running it: the rows' adapter ids are all that is added, and nothing stays behind but the logits.
    base, _, stacked = setup
    base_leaves = jax.tree.leaves(base)
    before = live_bytes()
    rows = stacked.rows(["dora", "lora", None, "dora", "lora"])
    ids = TINY.n_layers * 5 * 4  # (L, B) int32, one array shared by the modules
    assert live_bytes() - before == ids
    flat_rows = tree.flatten(rows)
    assert all(flat_rows[p] is x for p, x in tree.items(stacked.stacked))  # the stacked arrays, not copies
    params = tree.overlay(base, rows)
    assert params["layers"]["attn"]["q_proj"]["w"] is base["layers"]["attn"]["q_proj"]["w"]
    logits = _forward(base, TOKENS, rows, None)
    assert live_bytes() - before == ids + logits.nbytes
    assert all(a is b for a, b in zip(jax.tree.leaves(base), base_leaves))


def test_load_from_peft_and_jaxft_directories(setup, tmp_path):
    base, adapters, stacked = setup
    trainable, spec = adapters["dora"]
    hf_format.save(tmp_path / "peft", trainable, spec, TINY, base_model="tiny")
    trainable, spec = adapters["lora"]
    run = types.SimpleNamespace(peft=types.SimpleNamespace(method="lora"),
                                lora=types.SimpleNamespace(targets="all-linear"))
    adapter_io.save(tmp_path / "jaxft", trainable, spec, run, "tiny")
    loaded = multi.load(base, TINY, {"lora": tmp_path / "jaxft", "dora": tmp_path / "peft"})
    assert loaded.names == stacked.names
    flat = tree.flatten(loaded.stacked)
    assert sorted(flat) == sorted(tree.flatten(stacked.stacked))
    for path, x in tree.items(stacked.stacked):  # the files hold the adapters exactly
        np.testing.assert_array_equal(flat[path], x, err_msg=path)
