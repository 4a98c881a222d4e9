"""The BERT family against transformers: tiny random checkpoints of every head class (with and without the
`bert.` prefix, pooler, masked-LM head) give the same hidden states, MLM logits and pooler output; the real
all-MiniLM-L6-v2 gives the same hidden states and the sentence vectors of sentence-transformers; LoRA equals HF
PEFT; masking follows the 80/10/10 rule; bad configs name the field."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxft import checkpoint, tree
from jaxft.checkpoint import LoadError
from jaxft.models import bert
from jaxft.models.config import ConfigError
from jaxft.peft import lora
from jaxft.tasks import mlm

V, T = 64, 10
QUICK = {"xla_backend_optimization_level": 0}  # numbers, not speed: compiles in about half the time
TOKENS = np.random.RandomState(0).randint(5, V, (3, T))
SEGMENTS = np.array([[1] * T, [1] * 7 + [0] * 3, [1] * 4 + [0] * 6])  # rows 2 and 3 padded
TYPES = np.array([[0] * 5 + [1] * 5, [0] * 3 + [1] * 4 + [0] * 3, [0] * T])


def _hf_config(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=24, **kw)


def _save(cls, path, seed=0, **kw):
    """A tiny random `cls` with non-trivial biases and norms, saved with save_pretrained; returns the model."""
    torch.manual_seed(seed)
    model = cls(_hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _hf(model, tokens=TOKENS, segments=SEGMENTS, types=TYPES):
    with torch.no_grad():
        return model(torch.tensor(tokens), attention_mask=torch.tensor(segments),
                     token_type_ids=torch.tensor(types), output_hidden_states=True)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "dtype"), compiler_options=QUICK)
def _forward(cfg, params, tokens, segments, types, trainable=None, *, spec=None, dtype=jnp.float32):
    """(last hidden states, MLM logits or None) in one compilation."""
    hidden, _ = bert.forward(cfg, params, tokens, segment_ids=segments, token_types=types, trainable=trainable,
                             peft=spec, dtype=dtype, return_hidden=True)
    return hidden, bert.mlm_logits(cfg, params, hidden) if cfg.mlm_head else None


def _ours(loaded, **kw):
    """(hidden, logits or None) as float32 numpy for TOKENS, SEGMENTS, TYPES."""
    out = _forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS), jnp.asarray(SEGMENTS), jnp.asarray(TYPES), **kw)
    return tuple(None if x is None else np.asarray(x, np.float32) for x in out)


# (class, has pooler, has MLM head, checkpoint names carry `bert.`)
HEADS = [(transformers.BertModel, True, False, False), (transformers.BertForMaskedLM, False, True, True),
         (transformers.BertForPreTraining, True, True, True),
         (transformers.BertForSequenceClassification, True, False, True)]


@pytest.mark.parametrize("cls,pooler,mlm_head,prefixed", HEADS, ids=lambda x: getattr(x, "__name__", None))
def test_equals_transformers(tmp_path, cls, pooler, mlm_head, prefixed):
    """Hidden states (padding included), MLM logits and pooler output of every head class's checkpoint."""
    model = _save(cls, tmp_path)
    names = load_file(str(tmp_path / "model.safetensors"))
    assert any(n.startswith("bert.") for n in names) == prefixed
    loaded = checkpoint.load(tmp_path)
    assert (loaded.cfg.pooler, loaded.cfg.mlm_head) == (pooler, mlm_head)
    out = _hf(model)
    hidden, logits = _ours(loaded)
    np.testing.assert_allclose(hidden, out.hidden_states[-1].numpy(), atol=1e-4)
    if mlm_head:
        ref = out.prediction_logits if cls is transformers.BertForPreTraining else out.logits
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
    else:
        with pytest.raises(ValueError, match="no masked-LM head"):
            bert.mlm_logits(loaded.cfg, loaded.params, jnp.asarray(hidden))
    if pooler:
        encoder = model if cls is transformers.BertModel else model.bert
        ref = _hf(encoder).pooler_output.numpy()
        np.testing.assert_allclose(np.asarray(bert.pool(loaded.cfg, loaded.params, jnp.asarray(hidden))), ref,
                                   atol=1e-4)


@pytest.fixture(scope="module")
def mlm_model(tmp_path_factory):
    """(directory, transformers BertForMaskedLM, Loaded) of a tiny masked-LM checkpoint."""
    path = tmp_path_factory.mktemp("bert") / "mlm"
    model = _save(transformers.BertForMaskedLM, path, seed=1)
    return path, model, checkpoint.load(path)


def test_older_checkpoint_names(tmp_path, mlm_model):
    """TensorFlow-era gamma/beta names, buffers, tied copies and the NSP head load (ignored where unused);
    a tensor nobody knows, or a missing one, is an error naming it."""
    path, model, loaded = mlm_model
    tensors = load_file(str(path / "model.safetensors"))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in tensors.items()}
    old.update({"bert.embeddings.position_ids": np.arange(24)[None], "cls.seq_relationship.weight": np.zeros((2, 32),
                np.float32), "cls.predictions.decoder.weight": tensors["bert.embeddings.word_embeddings.weight"],
                "cls.predictions.decoder.bias": tensors["cls.predictions.bias"]})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(old, str(tmp_path / "model.safetensors"))
    again = checkpoint.load(tmp_path)
    assert again.cfg == loaded.cfg
    for (p, x), (_, y) in zip(tree.items(again.params), tree.items(loaded.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)

    save_file({**tensors, "bert.encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match=r"unexpected tensors bert\.encoder\.layer\.0\.attention\.self\.rotary"):
        checkpoint.load(tmp_path)
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match=r"missing tensors encoder\.layer\.1\.output\.dense\.bias"):
        checkpoint.load(tmp_path)


def test_bf16_close(mlm_model):
    path, model, _ = mlm_model
    loaded = checkpoint.load(path, dtype=jnp.bfloat16)
    assert tree.flatten(loaded.params)["layers/attn/q_proj/w"].dtype == jnp.bfloat16
    ref = _hf(model)
    hidden, logits = _ours(loaded, dtype=jnp.bfloat16)
    assert np.abs(hidden - ref.hidden_states[-1].numpy()).max() < 0.1  # hidden states are O(1) (LayerNorm)
    scale = np.abs(ref.logits.numpy()).max()
    assert np.abs(logits - ref.logits.numpy()).max() < 0.05 * scale
    assert (logits.argmax(-1) == ref.logits.numpy().argmax(-1)).mean() > 0.9


def test_export_round_trip(tmp_path, mlm_model):
    """save_hf writes what transformers loads into BertForMaskedLM, with the same logits."""
    _, model, loaded = mlm_model
    checkpoint.save_hf(loaded.cfg, loaded.params, tmp_path / "out", dtype=jnp.float32)
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_hf(back).logits.numpy(), _hf(model).logits.numpy(), atol=1e-5)


def test_init_matches_checkpoint_layout(mlm_model):
    _, _, loaded = mlm_model
    ours = jax.eval_shape(lambda: bert.init(jax.random.PRNGKey(0), loaded.cfg))
    assert {p: x.shape for p, x in tree.items(ours)} == {p: x.shape for p, x in tree.items(loaded.params)}


def test_lora_targets_and_equals_hf_peft(mlm_model):
    """'default' / 'all-linear' pick PEFT's modules; LoRA on every block linear equals PEFT on BertForMaskedLM."""
    import peft

    path, _, loaded = mlm_model
    base = loaded.params
    assert lora.target_paths(base, "default", "bert") == ["layers/attn/q_proj/w", "layers/attn/v_proj/w"]
    assert lora.target_paths(base, "all-linear", "bert") == [
        f"layers/{m}/w" for m in ("attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj", "mlp/down_proj",
                                  "mlp/up_proj")]
    modules = {"attention.self.query": "attn/q_proj", "attention.self.key": "attn/k_proj",
               "attention.self.value": "attn/v_proj", "attention.output.dense": "attn/o_proj",
               "intermediate.dense": "mlp/up_proj", "output.dense": "mlp/down_proj"}
    regex = r".*encoder\.layer\.\d+\.(" + "|".join(m.replace(".", r"\.") for m in modules) + ")"
    hf_model = transformers.BertForMaskedLM.from_pretrained(path).eval()
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=regex, lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ref = _hf(pm).logits.numpy()
    sd = {k: v.numpy() for k, v in pm.state_dict().items()}
    flat = {}
    for hf_name, ours in modules.items():
        prefix = "base_model.model.bert.encoder.layer.{i}." + hf_name
        for ab in ("A", "B"):
            flat[f"layers/{ours}/lora_{ab.lower()}"] = jnp.asarray(
                np.stack([sd[f"{prefix.format(i=i)}.lora_{ab}.default.weight"].T for i in range(2)]))
    assert len(flat) == 12 and all(x.shape[0] == 2 for x in flat.values())
    spec = lora.LoraSpec(rank=4, alpha=8)
    out = _ours(loaded, trainable=tree.unflatten(flat), spec=spec)[1]
    assert np.abs(out - _ours(loaded)[1]).max() > 1e-2  # the adapter does change the output
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_qlora_on_quantized_base(mlm_model):
    """LoRA over an NF4 base computes what it computes over the dequantized weights, near the float32 model."""
    from jaxft.quant import as_dense, quantize_params

    _, _, loaded = mlm_model
    q = jax.jit(lambda p: quantize_params(p, "nf4", block_size=16), compiler_options=QUICK)(loaded.params)
    paths = lora.target_paths(q, "all-linear", "bert")
    assert [p for p, x in tree.items(q) if hasattr(x, "dequantize")] == paths
    rs, shapes = np.random.RandomState(0), {p: x.shape for p, x in tree.items(loaded.params)}
    trainable = tree.unflatten({f"{p[:-2]}/lora_{ab}": jnp.asarray(0.1 * rs.randn(*shape), jnp.float32)
                                for p in paths for ab, shape in (("a", shapes[p][:2] + (4,)),
                                                                 ("b", (shapes[p][0], 4, shapes[p][2])))})
    spec = lora.LoraSpec(rank=4, alpha=8)
    run = lambda params: np.asarray(_forward(loaded.cfg, params, jnp.asarray(TOKENS), jnp.asarray(SEGMENTS),  # noqa
                                             jnp.asarray(TYPES), trainable, spec=spec, dtype=jnp.bfloat16)[1])
    dequantize = jax.jit(lambda q: tree.map_with_path(lambda p, x: as_dense(x, jnp.bfloat16), q),
                         compiler_options=QUICK)
    adapted = run(q)
    np.testing.assert_array_equal(adapted, run(dequantize(q)))
    full = _ours(loaded, trainable=trainable, spec=spec)[1]
    assert np.abs(adapted - full).max() < 0.05 * np.abs(full).max()


def test_prompt_tuning_equals_hf_peft(tmp_path):
    """A soft prompt joins the word embeddings before positions and types (0) are added, as PEFT does."""
    import peft
    from jaxft.peft.method import MethodSpec

    model = _save(transformers.BertForTokenClassification, tmp_path)
    pm = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3))
    torch.manual_seed(0)
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.normal_(0, 1)
        ref = _hf(pm).hidden_states[-1].numpy()[:, 3:]
    prompt = {"prompt": {"embeddings": jnp.asarray(pm.prompt_encoder.default.embedding.weight.detach().numpy())}}
    hidden, _ = _ours(checkpoint.load(tmp_path), trainable=prompt, spec=MethodSpec("prompt", virtual_tokens=3))
    np.testing.assert_allclose(hidden, ref, atol=1e-4)


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------------------------

SENTENCES = ["A man is eating food.", "The cat sat on the mat while the dog, who had been barking at the "
             "postman since early this morning, finally fell asleep by the fire.", "Hi", "Encoders embed text."]


@pytest.fixture(scope="session")
def minilm():
    from jaxft.hub import minilm_path
    path = minilm_path()
    return path, checkpoint.load(path)


def test_minilm_hidden_states_and_sentence_vectors(minilm):
    from sentence_transformers import SentenceTransformer

    path, loaded = minilm
    assert (loaded.cfg.n_layers, loaded.cfg.dim, loaded.cfg.pooler, loaded.cfg.mlm_head) == (6, 384, True, False)
    enc = loaded.tokenizer(SENTENCES, padding=True, return_tensors="np")
    tokens, segments = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    hidden, _ = _forward(loaded.cfg, loaded.params, tokens, segments, jnp.asarray(enc["token_type_ids"]))
    np.testing.assert_allclose(np.asarray(hidden), ref, atol=1e-4)

    embed = jax.jit(bert.embed, static_argnums=0, compiler_options=QUICK)
    ours = np.asarray(embed(loaded.cfg, loaded.params, tokens, segments))
    st = SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    cosine = np.sum(ours * st, -1) / np.linalg.norm(st, axis=-1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


# --- masked-LM --------------------------------------------------------------------------------------------------

SPECIAL = (0, 1, 2, 3)  # pad, [CLS], [SEP], [MASK] of the synthetic batch below
MASK_ID = 3


def _synthetic(rows=128, length=256, vocab=1000, seed=0):
    """[CLS] words [SEP] then padding, of random lengths."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(4, vocab, (rows, length))
    segments = np.zeros((rows, length), np.int32)
    for r, n in enumerate(rs.randint(8, length + 1, rows)):
        segments[r, :n] = 1
        tokens[r, 0], tokens[r, n - 1], tokens[r, n:] = 1, 2, 0
    return tokens, segments


def test_mask_tokens_80_10_10():
    vocab = 1000
    tokens, segments = _synthetic(vocab=vocab)
    inputs, targets, chosen = mlm.mask_tokens(tokens, segments, 7, MASK_ID, vocab, SPECIAL)
    np.testing.assert_array_equal(targets, tokens)
    eligible = (segments != 0) & (tokens > 3)
    assert not np.any(chosen & ~eligible)  # special tokens and padding are never chosen
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # nor changed

    def within(k, n, p):  # k successes of n near the binomial mean: 5 standard deviations
        assert abs(k - n * p) <= 5 * np.sqrt(n * p * (1 - p)), (k, n, p)

    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    within(n_chosen, n_eligible, 0.15)
    masked = int(np.sum(chosen & (inputs == MASK_ID)))
    kept = int(np.sum(chosen & (inputs == tokens)))
    # a random replacement is [MASK] or the token itself with probability 1/vocab each
    within(masked, n_chosen, 0.8 + 0.1 / vocab)
    within(kept, n_chosen, 0.1 + 0.1 / vocab)
    within(n_chosen - masked - kept, n_chosen, 0.1 * (1 - 2 / vocab))
    replaced = inputs[chosen & (inputs != MASK_ID) & (inputs != tokens)]
    assert replaced.min() >= 0 and replaced.max() < vocab and len(np.unique(replaced)) > 0.5 * len(replaced)

    again = mlm.mask_tokens(tokens, segments, 7, MASK_ID, vocab, SPECIAL)
    other = mlm.mask_tokens(tokens, segments, 8, MASK_ID, vocab, SPECIAL)
    assert all(np.array_equal(a, b) for a, b in zip(again, (inputs, targets, chosen)))
    assert not np.array_equal(other[2], chosen)


def test_mlm_loss_equals_torch_and_transformers(mlm_model):
    """The loss over the chosen positions: a direct torch cross-entropy on random logits, and the loss that
    BertForMaskedLM computes itself with labels -100 elsewhere."""
    rs = np.random.RandomState(0)
    tokens, segments = _synthetic(rows=4, length=12, vocab=V, seed=1)
    batch = mlm.mask_batch({"tokens": tokens, "segment_ids": segments}, 3,
                           {"mask_id": MASK_ID, "vocab_size": V, "special_ids": SPECIAL}, rate=0.4)
    chosen = batch["loss_mask"].astype(bool)
    assert chosen.sum() > 3
    logits = rs.randn(4, 12, V).astype(np.float32)
    total, count = mlm.loss(jnp.asarray(logits), batch)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits[chosen]), torch.tensor(tokens[chosen]),
                                            reduction="sum")
    assert float(count) == chosen.sum()
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)

    _, model, loaded = mlm_model
    labels = np.where(chosen, tokens, -100)
    with torch.no_grad():
        hf_loss = model(torch.tensor(batch["tokens"]), attention_mask=torch.tensor(segments),
                        labels=torch.tensor(labels)).loss.item()
    out = _task_forward(loaded.cfg, loaded.params, None, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = mlm.loss(out, batch)
    np.testing.assert_allclose(float(total / count), hf_loss, rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0, compiler_options=QUICK)
def _task_forward(cfg, params, trainable, batch):
    from jaxft.tasks import Model
    return mlm.forward(Model(bert, cfg), params, trainable, batch)


def test_mlm_head_for_checkpoints_without_one(tmp_path):
    """BertModel checkpoints (all-MiniLM-L6-v2) have no masked-LM head: the task brings a fresh one, trained in
    trainable['head'], over the encoder's hidden states."""
    _save(transformers.BertModel, tmp_path)
    loaded = checkpoint.load(tmp_path)
    assert not loaded.cfg.mlm_head
    head = mlm.init_head(jax.random.PRNGKey(0), loaded.cfg, None, 0)
    assert head["bias"].shape == (V,) and head["transform"]["w"].shape == (32, 32)
    rs = np.random.RandomState(1)
    head = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rs.randn(*x.shape), jnp.float32), head)
    batch = {"tokens": jnp.asarray(TOKENS), "segment_ids": jnp.asarray(SEGMENTS), "token_types": jnp.asarray(TYPES)}
    out = _task_forward(loaded.cfg, loaded.params, {"head": head}, batch)
    hidden, _ = _ours(loaded)
    ref = bert.mlm_logits(loaded.cfg, {**loaded.params, "mlm": head}, jnp.asarray(hidden))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_training_stream_resumes():
    """Training batches are masked afresh at each step, and a resumed stream repeats the same masking."""
    from jaxft.data import rows
    tokens, segments = _synthetic(rows=16, length=32, vocab=V)
    ids = {"mask_id": MASK_ID, "vocab_size": V, "special_ids": SPECIAL}
    first = mlm._Masked(rows.stream({"tokens": tokens, "segment_ids": segments}, 4, 0), ids, 0)
    next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(5)]
    second = mlm._Masked(rows.stream({"tokens": tokens, "segment_ids": segments}, 4, 0), ids, 0)
    second.set_state(json.loads(json.dumps(state)))
    for a, b in zip(expected, [next(second) for _ in range(5)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(expected[0]["loss_mask"], expected[4]["loss_mask"])


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_config(tmp_path):
    good = _hf_config().to_dict()
    bad = {k: v for k, v in good.items() if k != "intermediate_size"}
    with pytest.raises(ConfigError, match="missing field 'intermediate_size'"):
        bert.Config.from_hf(bad)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(LoadError, match=r"config\.json: missing field 'intermediate_size'"):
        checkpoint.load(tmp_path)
    for change, message in [({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
                            ({"hidden_act": "mish"}, "hidden_act 'mish' is not supported"),
                            ({"is_decoder": True}, "is_decoder=true is not supported"),
                            ({"num_attention_heads": 5}, "hidden_size=32 is not a multiple"),
                            ({"tie_word_embeddings": False}, "tie_word_embeddings=false")]:
        with pytest.raises(ConfigError, match=message):
            bert.Config.from_hf({**good, **change}, source="x/config.json")
    cfg = bert.Config.from_hf(good)
    assert bert.Config.from_hf(cfg.to_hf()) == cfg
