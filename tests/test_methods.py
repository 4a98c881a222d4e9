"""Every fine-tuning method under one contract, on a tiny random transformers Llama: identity at init where the
method has one, only the trainable tree changes and the loss falls, adapters round-trip through the jaxft
format, equality with HF PEFT (prefix tuning, prompt tuning, IA3), generation through the KV cache, exact
merging where it exists, the feature-based classifier, and errors that name the bad setting.

Compilation dominates on CPU: each method gets one train-step and one forward compilation (tokens always
(2, 12)), reused by every check of that method."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import tiny
from jaxft import checkpoint, config as config_lib, tree
from jaxft import generate as gen
from jaxft import peft
from jaxft.models import llama
from jaxft.peft import features, full
from jaxft.peft import io as adapter_io
from jaxft.peft.method import as_method
from jaxft.train.loop import train
from jaxft.train.step import init_state, make_train_step

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
SMALL = ["train.seq_len=32", "adapter.size=8", "prefix.length=4", "prompt.length=3", "partial.select=top1",
         "lora.rank=4", "lora.dropout=0.0"]
LR = {"lora": 1e-2, "adapter": 1e-2, "prefix": 1e-1, "prompt": 1e-1, "ia3": 3e-1, "full": 1e-3, "partial": 1e-3}
# Loss after 20 steps, as a fraction of the first: a few soft tokens or scaling vectors on a 2-layer random model
# can only bias the output so far (prompt tuning plateaus near 0.78, IA3 reaches 0.61 here).
FALL = {"prompt": 0.8, "ia3": 0.8}
IDENTITY_AT_INIT = ("lora", "adapter", "ia3", "full", "partial")
ROWS = np.random.RandomState(0).randint(4, 200, (2, 12)).astype(np.int32)
# These tests check numbers, not speed: without LLVM's optimizations a train step compiles in about half the time.
QUICK = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(tiny model directory, Loaded, base with a 10x output head): a spread of logits that a task can move."""
    path = tiny.llama_dir(tmp_path_factory.mktemp("methods") / "model")
    loaded = checkpoint.load(path)
    base = dict(loaded.params, lm_head={"w": loaded.params["lm_head"]["w"] * 10})
    return path, loaded, base


def _config(method, *extra):
    return config_lib.load(CONFIG, [f"peft.method={method}", *SMALL, *extra])


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), compiler_options=QUICK)
def _forward(cfg, base, trainable, tokens, segment_ids, positions, *, spec):
    return llama.forward(cfg, base, tokens, trainable=trainable, segment_ids=segment_ids, positions=positions,
                         peft=spec)[0]


def _logits(cfg, base, trainable, spec, tokens=ROWS, segment_ids=None, positions=None):
    """Logits (2, 12, V) through the one compiled forward of each method (tokens are always (2, 12))."""
    segment_ids = np.ones_like(tokens) if segment_ids is None else segment_ids
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12)) if positions is None else positions
    return np.asarray(_forward(cfg, base, trainable, tokens, segment_ids, positions, spec=spec))


def _batch():
    tokens = ROWS[None]
    return {"tokens": tokens, "targets": np.full_like(tokens, 7), "loss_mask": np.ones(tokens.shape, np.float32),
            "segment_ids": np.ones_like(tokens), "positions": np.broadcast_to(np.arange(12), tokens.shape)}


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "ia3", "full", "partial"])
def test_method_contract(model, tmp_path, method):
    """At init the identity (where the method has one); 20 steps on 'always answer token 7': the loss falls, the
    base is bit-identical, every trainable leaf moved and nothing else exists; the saved adapter restores the
    same outputs. Partial trains with L2-SP, whose penalty starts at zero and then grows."""
    path, loaded, base = model
    cfg = loaded.cfg
    config = _config(method, "train.l2sp=0.1" if method == "partial" else "train.l2sp=0.0")
    trainable, spec = peft.build(jax.random.PRNGKey(1), base, config, cfg, loaded.tokenizer)
    before = _logits(cfg, base, trainable, spec)
    if method in IDENTITY_AT_INIT:
        np.testing.assert_allclose(before, _logits(cfg, base, None, None), atol=1e-5)

    base_copy = jax.tree.map(np.array, base)
    fwd = lambda b, t, mb, rng: llama.forward(cfg, b, mb["tokens"], trainable=t, positions=mb["positions"],
                                              segment_ids=mb["segment_ids"], peft=spec, rng=rng)[0]
    opt = optax.adam(LR[method])
    step = jax.jit(make_train_step(fwd, opt, peft.penalty(spec, config.train.l2sp)), compiler_options=QUICK)
    state = init_state(trainable, opt, jax.random.PRNGKey(0))
    losses, penalties = [], []
    for _ in range(20):
        state, m = step(state, base, _batch())
        losses.append(float(m["loss"]))
        penalties.append(float(m.get("penalty", 0.0)))
    assert losses[-1] < FALL.get(method, 0.5) * losses[0], (losses[0], losses[-1])
    if method == "partial":
        assert penalties[0] == 0.0 and penalties[-1] > 0.0
    for p, x in tree.items(base):
        np.testing.assert_array_equal(np.asarray(x), tree.flatten(base_copy)[p], err_msg=p)
    trained = state["trainable"]
    assert sorted(tree.flatten(trained)) == sorted(tree.flatten(trainable))
    unchanged = [p for p, x in tree.items(trained) if np.array_equal(x, tree.flatten(trainable)[p])]
    assert not unchanged, unchanged

    after = _logits(cfg, base, trained, spec)
    adapter_io.save(tmp_path / "adapter", peft.finalize(spec, trained), spec, config, path)
    restored, restored_spec, meta = adapter_io.load(tmp_path / "adapter")
    assert meta["method"] == method and as_method(restored_spec) == spec
    np.testing.assert_allclose(_logits(cfg, base, restored, restored_spec), after, atol=1e-6)


def test_partial_selection_splits_stacked_leaves(model):
    _, loaded, base = model
    top = full.select(base, "top1")
    assert ("layers/attn/q_proj/w", (1,)) in top and ("final_norm/scale", None) not in top
    assert {p for p, _ in full.select(base, "norms")} == {"final_norm/scale", "layers/attn_norm/scale",
                                                        "layers/mlp_norm/scale"}
    assert dict(full.select(base, r"layers/0/mlp/.*|lm_head/w")) == {
        "layers/mlp/down_proj/w": (0,), "layers/mlp/gate_proj/w": (0,), "layers/mlp/up_proj/w": (0,),
        "lm_head/w": None}
    trainable, spec = peft.build(jax.random.PRNGKey(0), base, _config("partial"), loaded.cfg)
    assert trainable["layers"]["mlp"]["up_proj"]["w"].shape == (1, 32, 48)  # the selected layer only
    # Only layer 1 of a split leaf can move: resolving writes it into a copy of the frozen leaf.
    moved = jax.tree.map(lambda x: x + 1.0, trainable)
    resolved, _ = peft.resolve(spec, base, moved)
    w, w0 = resolved["layers"]["mlp"]["up_proj"]["w"], base["layers"]["mlp"]["up_proj"]["w"]
    np.testing.assert_array_equal(w[0], w0[0])
    np.testing.assert_allclose(w[1], w0[1] + 1.0)
    # L2-SP: weight / 2 * ||theta - theta_0||^2 against the base's own values.
    penalty = full.l2sp(spec.layers, 0.5)
    assert float(penalty(trainable, base)) == 0.0
    n = tree.count(trainable)
    np.testing.assert_allclose(float(penalty(moved, base)), 0.25 * n, rtol=1e-5)


def _peft_model(tmp_path, config):
    import peft as hf_peft

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path)
    return checkpoint.load(tmp_path), hf_peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("variant", ["prefix", "prefix_projection", "prompt", "ia3"])
def test_equals_hf_peft(tmp_path, variant):
    """PEFT's values put into jaxft's trainable tree give PEFT's logits (max abs difference <= 1e-4)."""
    import peft as hf_peft

    tokens = ROWS % 96
    n = 5
    config = {"prefix": hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
              "prefix_projection": hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                              prefix_projection=True, encoder_hidden_size=24),
              "prompt": hf_peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
              "ia3": hf_peft.IA3Config(task_type="CAUSAL_LM")}[variant]
    loaded, pm = _peft_model(tmp_path, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:  # away from ones, so that the scaling shows
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
        ref = pm(torch.tensor(tokens)).logits.numpy()
        sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    if variant == "prefix":  # PEFT: (P, L * 2 * K*H), layer l's key at 2l, its value at 2l + 1
        e = sd["prompt_encoder.default.embedding.weight"].reshape(n, 2, 2, -1)
        trainable = {"layers": {"attn": {"prefix_k": e[:, :, 0].transpose(1, 0, 2),
                                         "prefix_v": e[:, :, 1].transpose(1, 0, 2)}}}
        spec = peft.MethodSpec("prefix", virtual_tokens=n)
    elif variant == "prefix_projection":
        mlp = "prompt_encoder.default.transform"
        trainable = {"prefix": {"embedding": sd["prompt_encoder.default.embedding.weight"], "mlp": {
            "in": {"w": sd[f"{mlp}.0.weight"].T, "b": sd[f"{mlp}.0.bias"]},
            "out": {"w": sd[f"{mlp}.2.weight"].T, "b": sd[f"{mlp}.2.bias"]}}}}
        spec = peft.MethodSpec("prefix", virtual_tokens=n)
    elif variant == "prompt":
        trainable = {"prompt": {"embeddings": sd["prompt_encoder.default.embedding.weight"]}}
        spec = peft.MethodSpec("prompt", virtual_tokens=n)
        ref = ref[:, n:]  # PEFT returns the virtual tokens' logits too
    else:
        layer = "base_model.model.model.layers.{}.{}.ia3_l.default"
        stack = lambda module: np.stack([sd[layer.format(i, module)].reshape(-1) for i in range(2)])
        trainable = tree.unflatten({"layers/attn/k_proj/ia3_out": stack("self_attn.k_proj"),
                                    "layers/attn/v_proj/ia3_out": stack("self_attn.v_proj"),
                                    "layers/mlp/down_proj/ia3_in": stack("mlp.down_proj")})
        spec = peft.MethodSpec("ia3")
    trainable = jax.tree.map(jnp.asarray, trainable)
    out = llama.forward(loaded.cfg, loaded.params, jnp.asarray(tokens), trainable=trainable, peft=spec)[0]
    assert np.abs(np.asarray(out) - ref).max() <= 1e-4


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_through_the_cache_equals_recomputation(model, method):
    """Left-padded batched generation (prompt in the cache, prefix beside it) gives the tokens of greedy decoding
    by recomputing every sequence from scratch, and packing examples after a soft prompt changes nothing."""
    _, loaded, base = model
    cfg = loaded.cfg
    trainable, spec = peft.build(jax.random.PRNGKey(3), base, _config(method, "prefix.init=random"), cfg)
    prompts = [[5, 9, 3, 17, 2], [40, 41]]
    out = gen.generate(cfg, base, prompts, max_new_tokens=5, trainable=trainable, peft=spec)
    for prompt, new in zip(prompts, out):
        seq = list(prompt)
        for _ in range(5):
            tokens, seg = np.zeros((2, 12), np.int32), np.zeros((2, 12), np.int32)
            tokens[0, :len(seq)], seg[0, :len(seq)] = seq, 1
            seq.append(int(np.argmax(_logits(cfg, base, trainable, spec, tokens, seg)[0, len(seq) - 1])))
        assert new == seq[len(prompt):]
    # Both prompts packed in one row (segments 1 and 2): each sees the virtual tokens and itself only.
    tokens, seg = np.zeros((2, 12), np.int32), np.zeros((2, 12), np.int32)
    tokens[0, :7], seg[0, :7] = prompts[0] + prompts[1], [1] * 5 + [2] * 2
    positions = np.zeros((2, 12), np.int32)
    positions[0, :7] = [0, 1, 2, 3, 4, 0, 1]
    packed = _logits(cfg, base, trainable, spec, tokens, seg, positions)
    for prompt, cols in ((prompts[0], slice(0, 5)), (prompts[1], slice(5, 7))):
        alone_tokens, alone_seg = np.zeros((2, 12), np.int32), np.zeros((2, 12), np.int32)
        alone_tokens[0, :len(prompt)], alone_seg[0, :len(prompt)] = prompt, 1
        alone = _logits(cfg, base, trainable, spec, alone_tokens, alone_seg)[0, :len(prompt)]
        np.testing.assert_allclose(packed[0, cols], alone, atol=1e-5)


def test_merge_where_exact_and_refused_elsewhere(model):
    _, loaded, base = model
    cfg = loaded.cfg
    noise = lambda t: jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(5), x.shape), t)
    for method in ("ia3", "partial"):
        trainable, spec = peft.build(jax.random.PRNGKey(0), base, _config(method), cfg)
        trainable = noise(trainable)
        adapted = _logits(cfg, base, trainable, spec)
        merged = peft.merge(base, trainable, spec)
        assert set(tree.flatten(merged)) == set(tree.flatten(base))
        assert np.abs(adapted - _logits(cfg, base, None, None)).max() > 1e-2
        np.testing.assert_allclose(_logits(cfg, merged, None, None), adapted, atol=1e-4)
    for method, why in (("adapter", "non-linear block"), ("prefix", "keys and values"), ("prompt", "embeddings")):
        trainable, spec = peft.build(jax.random.PRNGKey(0), base, _config(method, "prefix.init=random"), cfg)
        with pytest.raises(peft.PeftError, match=f"{method} cannot be merged: .*{why}"):
            peft.merge(base, trainable, spec)
    with pytest.raises(peft.PeftError, match="features cannot be merged"):
        peft.merge(base, {}, features.FeatureSpec(layer=0, pool="mean", classes=("a", "b"), seq_len=8))


@pytest.mark.parametrize("override, message", [
    ("peft.method=dora", r"peft.method: 'dora' is not one of lora, adapter, .*features"),
    ("adapter.size=0", r"adapter.size must be in \[1, 32\].*got 0"),
    ("adapter.size=-4", r"adapter.size must be in \[1, 32\].*got -4"),
    ("adapter.size=33", r"adapter.size must be in \[1, 32\].*got 33"),
    ("adapter.placement=middle", r"adapter.placement: 'middle'"),
    ("prefix.length=0", r"prefix.length must be positive, got 0"),
    ("prefix.length=-2", r"prefix.length must be positive, got -2"),
    ("prefix.length=300", r"prefix.length=300 virtual tokens \+ train.seq_len=32 exceed .*max_seq_len=256"),
    ("prompt.length=0", r"prompt.length must be positive, got 0"),
    ("prompt.length=-1", r"prompt.length must be positive, got -1"),
    ("prompt.length=250", r"prompt.length=250 virtual tokens \+ train.seq_len=32 exceed .*max_seq_len=256"),
    ("prompt.init=text", r"prompt.init='text' needs prompt.init_text"),
    ("partial.select=layers/7/.*", r"partial.select: 'layers/7/.\*' selects no parameter"),
    ("partial.select=biases", r"partial.select: 'biases' selects no parameter"),
    ("partial.select=top9", r"partial.select: 'top9' asks for 9 blocks; the model has 2"),
    ("ia3.targets=layers/attn/qproj/w", r"ia3.targets: .* matches no linear weight"),
])
def test_bad_settings_are_named(model, override, message):
    _, loaded, base = model
    method = override.split(".")[0] if not override.startswith("peft") else "lora"
    config = _config(method, override)
    with pytest.raises(peft.PeftError, match=message):
        peft.build(jax.random.PRNGKey(0), base, config, loaded.cfg, loaded.tokenizer)


def test_prompt_init_from_text_and_l2sp_only_where_it_means_something(model):
    _, loaded, base = model
    config = _config("prompt", "prompt.init=text", "prompt.init_text=the quick fox", "prompt.length=5")
    trainable, _ = peft.build(jax.random.PRNGKey(0), base, config, loaded.cfg, loaded.tokenizer)
    ids = loaded.tokenizer("the quick fox", add_special_tokens=False)["input_ids"]
    want = [(ids * 5)[i] for i in range(5)]
    np.testing.assert_array_equal(trainable["prompt"]["embeddings"], base["embed"]["w"][np.asarray(want)])
    with pytest.raises(peft.PeftError, match="train.l2sp: .*method 'lora' retrains none"):
        peft.penalty(peft.MethodSpec("lora", lora=peft.LoraSpec()), 0.1)


def test_features_classifier_end_to_end(model, tmp_path, monkeypatch):
    """Through `jaxft train` (peft.method=features): features cached once, a head that separates the classes,
    the saved head restoring the same predictions, and the cache reused by a resumed run."""
    path, loaded, _ = model
    rng = np.random.RandomState(0)
    animals, sky = ["fox", "dog", "lazy", "brown", "jumps"], ["owls", "stars", "night", "seven", "count"]
    lines = ["sentence\tlabel"] + [f"{' '.join(rng.choice(words, 4))}\t{label}"
                                   for _ in range(60) for label, words in ((0, animals), (1, sky))]
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(lines) + "\n")
    config = config_lib.load(CONFIG, [f"model={path}", f"data.train={data}", "peft.method=features",
                                      "dtype=float32", "param_dtype=float32", "train.seq_len=16",
                                      "train.batch_size=16", "train.steps=60", "train.learning_rate=3e-2",
                                      "train.warmup_steps=0", "data.eval_fraction=0.2", "features.layer=0"])
    summary = train(config, tmp_path / "run")
    assert summary["eval_metrics"]["accuracy"] >= 0.9
    assert summary["data"] == {"labels": ["0", "1"], "train_examples": 96, "eval_examples": 24}
    assert sorted(p.name for p in (tmp_path / "run" / "features").glob("*.npy")) == ["eval.npy", "train.npy"]
    head, spec, meta = adapter_io.load(tmp_path / "run" / "adapter")
    assert meta["method"] == "features" and spec == features.FeatureSpec(0, "mean", ("0", "1"), 16)
    texts = [" ".join(rng.choice(animals, 4)), " ".join(rng.choice(sky, 4))]
    assert features.classify(loaded.cfg, loaded.params, loaded.tokenizer, head, spec, texts) == ["0", "1"]

    def no_extraction(*_, **__):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(features, "extract", no_extraction)
    again = train(config, tmp_path / "run", resume=True)  # the finished run, its features read back
    assert [list(h) for h in again["eval_history"]] == [list(h) for h in summary["eval_history"]]
    # --overwrite moves the run aside but keeps its cached features, and trains the same head again on them
    fresh = train(config, tmp_path / "run", overwrite=True)
    assert fresh["eval_history"] == summary["eval_history"]
    assert sorted(p.name for p in (tmp_path / "run" / "features").glob("*.npy")) == ["eval.npy", "train.npy"]


def test_trainer_runs_prefix_with_projection_and_saves_the_prefixes(model, tmp_path):
    """The language-model trainer with a non-LoRA method: the adapter holds the computed prefixes (the MLP is
    dropped), loads back and generates what the trained tree generates."""
    path, loaded, _ = model
    data = tiny.alpaca_file(tmp_path / "train.jsonl", 40)
    config = config_lib.load(CONFIG, [f"model={path}", f"data.train={data}", "peft.method=prefix",
                                      "prefix.projection=16", "prefix.length=4", "dtype=float32",
                                      "param_dtype=float32", "train.batch_size=4", "train.seq_len=32",
                                      "train.steps=2", "train.eval_batches=1", "train.learning_rate=1e-2"])
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "completed"
    trainable, spec, meta = adapter_io.load(tmp_path / "run" / "adapter")
    assert meta["method"] == "prefix" and spec == peft.MethodSpec("prefix", virtual_tokens=4)
    assert {p: x.shape for p, x in tree.items(trainable)} == {"layers/attn/prefix_k": (2, 4, 16),
                                                             "layers/attn/prefix_v": (2, 4, 16)}
    out = gen.generate(loaded.cfg, loaded.params, [[5, 6, 7], [8]], max_new_tokens=3, trainable=trainable, peft=spec)
    assert [len(o) for o in out] == [3, 3]


def test_adapters_of_format_1_still_load(tmp_path):
    """LoRA adapters written before methods existed (no "spec" in adapter.json) load as they did."""
    from safetensors.numpy import save_file

    save_file({"layers/attn/q_proj/lora_a": np.zeros((2, 32, 4), np.float32)}, str(tmp_path / "adapter.safetensors"))
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False, "dora": False}
    (tmp_path / "adapter.json").write_text(json.dumps({"format": "jaxft-adapter/1", "method": "lora", "lora": lora,
                                                       "targets": "default", "model": "m"}))
    _, spec, _ = adapter_io.load(tmp_path)
    assert spec == peft.LoraSpec(**lora) and as_method(spec) == peft.MethodSpec("lora", lora=spec)
