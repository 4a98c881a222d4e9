"""Generation: the KV cache against full recomputation, padding, sampling, and token-for-token agreement with
transformers' `generate`, on a tiny random Llama and on the default model (SmolLM2-135M-Instruct)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxft import checkpoint, cli
from jaxft import generate as gen
from jaxft.models import llama
from jaxft.models.config import LlamaConfig

PROMPTS = [[5, 9, 3, 17, 2, 8, 11], [4], [30, 31, 32, 1, 7, 7, 7, 60, 12, 13, 14, 15, 16]]  # one bucket: 16
CHATS = ["What is the capital of France?", "Write a short poem about the sea.",
         "Explain in two sentences why the sky is blue."]


@pytest.fixture(scope="module")
def random_model():
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
    params = jax.jit(llama.init, static_argnums=1)(jax.random.key(0), cfg)
    # Larger output weights than init's 0.02 spread the logits, so that greedy choices are not near-ties.
    params["lm_head"]["w"] = params["lm_head"]["w"] * 20
    return cfg, params


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(jaxft Loaded, transformers model) of the same tiny random Llama directory."""
    path = tiny.llama_dir(tmp_path_factory.mktemp("tiny_llama"))
    return checkpoint.load(path), transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_cached_decoding_equals_full_recomputation(random_model):
    """Prefill of a left-padded batch, then one token at a time through the cache: the logits of every new
    position equal those of running the whole sequences without a cache (right padded, which changes nothing
    before the padding)."""
    cfg, params = random_model
    rows = [[5, 9, 3, 17, 2, 8, 11, 20, 21, 22, 23], [4, 6, 8, 10, 12, 14, 16], [30, 31, 32, 1, 7, 7, 7, 60, 1]]
    n_prompt = [6, 2, 4]  # tokens of each row that go into the prefill; the next 5 are decoded one by one
    forward = jax.jit(lambda *args, **kw: llama.forward(cfg, params, *args, **kw))
    tokens, segment_ids, positions = gen.pad_left([r[:n] for r, n in zip(rows, n_prompt)], 8)
    logits, cache = forward(tokens, positions=positions, segment_ids=segment_ids,
                            cache=llama.init_cache(cfg, len(rows), 16))
    cached = [logits[:, -1]]
    for s in range(5):
        new = np.array([[r[n + s]] for r, n in zip(rows, n_prompt)], np.int32)
        logits, cache = forward(new, positions=np.array([[n + s] for n in n_prompt], np.int32), cache=cache)
        cached.append(logits[:, 0])
    cached = np.stack(cached, axis=1)  # (B, 6, V)

    full_tokens = np.zeros((len(rows), 11), np.int32)
    for i, (row, n) in enumerate(zip(rows, n_prompt)):
        full_tokens[i, :n + 5] = row[:n + 5]
    full, _ = forward(full_tokens, segment_ids=(np.arange(11) < np.array(n_prompt)[:, None] + 5).astype(np.int32))
    for i, n in enumerate(n_prompt):
        np.testing.assert_allclose(cached[i], full[i, n - 1:n + 5], atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_each_prompt_alone(random_model):
    cfg, params = random_model
    together = gen.generate(cfg, params, PROMPTS, max_new_tokens=12)
    assert together == [gen.generate(cfg, params, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert [len(t) for t in together] == [12, 12, 12]


def test_one_compilation_per_bucket(random_model):
    cfg, params = random_model
    gen.generate(cfg, params, [[1, 2, 3]], max_new_tokens=5)
    before = gen._generate._cache_size()
    gen.generate(cfg, params, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=9)  # same buckets: 16 and 16
    gen.generate(cfg, params, [[1, 2, 3, 4]], max_new_tokens=16, temperature=0.7, top_k=5, top_p=0.9, seed=1)
    assert gen._generate._cache_size() == before


def test_greedy_equals_transformers(tiny_hf):
    model, hf = tiny_hf
    eos = hf.generation_config.eos_token_id
    ours = gen.generate(model.cfg, model.params, PROMPTS, max_new_tokens=20, eos_ids=[eos])
    for prompt, new in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=0)
        ref = out[0, len(prompt):].tolist()
        assert new == (ref[:ref.index(eos)] if eos in ref else ref)
    assert sum(map(len, ours)) > 20  # not trivially empty


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6), (1, 0.5)])
def test_sampling_restricted_to_one_token_is_greedy(random_model, top_k, top_p):
    cfg, params = random_model
    greedy = gen.generate(cfg, params, PROMPTS, max_new_tokens=10)
    assert gen.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=0.8, top_k=top_k, top_p=top_p,
                        seed=3) == greedy


def test_same_seed_same_samples(random_model):
    cfg, params = random_model
    draw = lambda seed, **kw: gen.generate(cfg, params, PROMPTS, max_new_tokens=16, temperature=1.0, seed=seed, **kw)
    assert draw(7) == draw(7)
    assert draw(7, top_k=20, top_p=0.9) == draw(7, top_k=20, top_p=0.9)
    assert draw(7) != draw(8)
    assert draw(7) != gen.generate(cfg, params, PROMPTS, max_new_tokens=16)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (10, 0.6), (100, 0.3)])
def test_top_k_top_p_equals_transformers_warpers(top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 2
    ours = np.asarray(gen.top_k_top_p(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
    ref = torch.tensor(logits)
    if top_k:
        ref = transformers.generation.logits_process.TopKLogitsWarper(top_k)(None, ref)
    ref = transformers.generation.logits_process.TopPLogitsWarper(top_p)(None, ref).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], ref[np.isfinite(ref)])


def test_samples_follow_the_filtered_distribution():
    """Frequencies of 4000 draws against the probabilities left by top-p: [0.4, 0.3] of [0.4, 0.3, 0.2, 0.1]."""
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    knobs = (jnp.float32(1), jnp.int32(0), jnp.float32(0.65))
    draw = jax.jit(jax.vmap(lambda key: gen.sample(logits, key, knobs)[0]))
    counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 4000))), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0, 4 / 7, 0, 3 / 7], atol=0.03)


def test_eos_stops_a_row(random_model):
    cfg, params = random_model
    free = gen.generate(cfg, params, PROMPTS, max_new_tokens=12)
    eos = free[0][3]
    stopped = gen.generate(cfg, params, PROMPTS, max_new_tokens=12, eos_ids=[eos])
    assert stopped[0] == free[0][:free[0].index(eos)]
    assert stopped == [row[:row.index(eos)] if eos in row else row for row in free]
    # Stopping every row at its first token ends generation with nothing to return.
    assert gen.generate(cfg, params, PROMPTS, max_new_tokens=12, eos_ids=[r[0] for r in free]) == [[], [], []]


def test_trainable_tree_reaches_the_model(random_model):
    """A replaced weight in the trainable tree generates as a base holding that weight does."""
    cfg, params = random_model
    w = params["layers"]["mlp"]["down_proj"]["w"]
    replaced = jax.random.normal(jax.random.key(1), w.shape) * 0.5
    trainable = {"layers": {"mlp": {"down_proj": {"w": replaced}}}}
    base = {**params, "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"], "down_proj": {"w": replaced}}}}
    ours = gen.generate(cfg, params, PROMPTS, max_new_tokens=10, trainable=trainable)
    assert ours == gen.generate(cfg, base, PROMPTS, max_new_tokens=10)
    assert ours != gen.generate(cfg, params, PROMPTS, max_new_tokens=10)


@pytest.fixture(scope="module")
def default_model(default_model_path):
    return checkpoint.load(default_model_path)


def test_default_model_greedy_equals_transformers(default_model, default_model_path):
    """32 new tokens for 3 chat prompts of different lengths: batched (left padded) on our side, one prompt at a
    time on transformers' side. EOS is ignored on both sides, so that all 32 tokens are compared."""
    tok = default_model.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for c in CHATS]
    ours = gen.generate(default_model.cfg, default_model.params, prompts, max_new_tokens=32)

    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name,
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # else transformers stops at <|im_end|>
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster than more threads on a busy machine, and as fast on an idle one
    try:
        with torch.no_grad():
            refs = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=32, pad_token_id=0)[0, len(p):]
                    for p in prompts]
    finally:
        torch.set_num_threads(threads)
    for new, ref in zip(ours, refs):
        assert len(ref) == 32
        assert new == ref.tolist(), (tok.decode(new), tok.decode(ref))
    assert "Paris" in tok.decode(ours[0])


@pytest.fixture
def no_compilation_cache(monkeypatch):
    """The command line turns on JAX's persistent compilation cache: not for the rest of this test process."""
    monkeypatch.setattr(cli, "_cache_compilations", lambda: None)


def test_cli_generate(default_model, no_compilation_cache, monkeypatch, capsys):
    """`jaxft generate` in-process; the model loaded by the fixture stands in for loading it a second time."""
    def load(model, *, dtype):
        assert (model, dtype) == ("default", jnp.float32)
        return default_model
    monkeypatch.setattr(checkpoint, "load", load)
    code = cli.main(["generate", "--model", "default", "--prompt", "What is the capital of France?", "--chat",
                     "--temperature", "0", "--max-new-tokens", "16"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "Paris" in out and "Paris" not in err
    assert "generated" in err and "generated" not in out


def test_cli_errors(no_compilation_cache, capsys):
    assert cli.main(["generate", "--model", "/no/such/model", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/no/such/model" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "hi", "--dtype", "float64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype" in err
