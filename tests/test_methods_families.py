"""The PEFT methods on the encoder families: full and partial fine-tuning on T5 (both stacks) and BERT, bottleneck
adapters on T5 (only the trainable tree moves, the loss falls, merging gives the forward's logits), prompt and
prefix tuning on T5 equal to HF PEFT's SEQ_2_SEQ_LM, and prefix tuning's 'vocab' start on BERT equal to the keys
and values transformers computes.

Tiny random models; compilation dominates, so every train step compiles at QUICK and runs a few steps."""

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
from jaxft import peft
from jaxft import generate as gen
from jaxft.models import bert, t5
from jaxft.peft import full

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
SMALL = ["train.seq_len=16", "adapter.size=8", "prefix.length=3", "prompt.length=3", "partial.select=top1"]
QUICK = {"xla_backend_optimization_level": 0}
rs = np.random.RandomState(0)
ENC = rs.randint(2, 64, (2, 9)).astype(np.int32)
ENC_MASK = np.ones_like(ENC)
ENC_MASK[1, 6:] = 0
TARGETS = np.full((2, 5), 7, np.int32)
DEC = np.concatenate([np.zeros((2, 1), np.int32), rs.randint(2, 64, (2, 5)).astype(np.int32)], 1)
T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
               feed_forward_proj="gated-gelu")


def _config(method, *extra):
    return config_lib.load(CONFIG, [f"peft.method={method}", *SMALL, *extra])


def _t5_model(layers=2, decoder_layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**T5_TINY, num_layers=layers, num_decoder_layers=decoder_layers)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def t5_loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    _t5_model().save_pretrained(path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def bert_loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    model = tiny.bert(path, transformers.BertForMaskedLM)
    return model, checkpoint.load(path)


def _t5_logits(cfg, spec):
    return jax.jit(lambda base, trainable: t5.forward(cfg, base, ENC, DEC, enc_segment_ids=ENC_MASK,
                                                      trainable=trainable, peft=spec)[0], compiler_options=QUICK)


def _t5_loss(cfg, spec):
    def loss(trainable, base):
        total, count = t5.loss(cfg, base, ENC, TARGETS, np.ones_like(TARGETS), enc_segment_ids=ENC_MASK,
                               trainable=trainable, peft=spec)
        return total / count
    return loss


def _bert_logits(cfg, spec):
    return jax.jit(lambda base, trainable: bert.forward(cfg, base, ENC, segment_ids=ENC_MASK, trainable=trainable,
                                                        peft=spec)[0], compiler_options=QUICK)


def _bert_loss(cfg, spec):
    def loss(trainable, base):
        logits = bert.forward(cfg, base, ENC, segment_ids=ENC_MASK, trainable=trainable, peft=spec)[0]
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 7])
    return loss


def _train(loss, trainable, base, lr, steps=6):
    opt = optax.adam(lr)
    step = jax.jit(lambda t, s, b: _update(loss, opt, t, s, b), compiler_options=QUICK)
    state, losses = opt.init(trainable), []
    for _ in range(steps):
        trainable, state, value = step(trainable, state, base)
        losses.append(float(value))
    return trainable, losses


def _update(loss, opt, trainable, state, base):
    value, grads = jax.value_and_grad(loss)(trainable, base)
    updates, state = opt.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value


def test_partial_selects_per_stack(t5_loaded, bert_loaded):
    base = t5_loaded.params
    assert full.stacks(base) == {"decoder/layers/": 3, "encoder/layers/": 2}
    top = dict(full.select(base, "top1"))
    assert top["encoder/layers/mlp/down_proj/w"] == (1,) and top["decoder/layers/cross_attn/q_proj/w"] == (2,)
    assert "shared/w" not in top and "decoder/final_norm/scale" not in top
    assert dict(full.select(base, r"decoder/layers/0/cross_attn/.*|encoder/final_norm/scale")) == {
        **{f"decoder/layers/cross_attn/{m}_proj/w": (0,) for m in "qkvo"}, "encoder/final_norm/scale": None}
    assert dict(full.select(base, "encoder/layers/(0|1)/self_attn/q_proj/w")) == {
        "encoder/layers/self_attn/q_proj/w": None}
    with pytest.raises(peft.PeftError, match=r"'top3' asks for 3 blocks; the model has 2 in its shortest stack "
                                             r"\(decoder/layers/ 3, encoder/layers/ 2\)"):
        full.select(base, "top3")
    with pytest.raises(peft.PeftError, match=r"paths look like 'decoder/layers/2/cross_attn/k_proj/w'"):
        full.select(base, "layers/0/.*")
    bert_base = bert_loaded[1].params
    norms = {p for p, _ in full.select(bert_base, "norms")}
    assert {"embed/norm/bias", "layers/attn_norm/scale", "layers/mlp_norm/bias", "mlm/norm/scale"} <= norms
    assert {p for p, _ in full.select(bert_base, "biases")} >= {"layers/attn/q_proj/b", "embed/norm/bias", "mlm/bias"}


@pytest.mark.parametrize("family,method", [("t5", "full"), ("t5", "partial"), ("t5", "adapter"), ("bert", "partial")])
def test_method_trains_and_merges(t5_loaded, bert_loaded, family, method):
    """Identity at init; a few steps: the loss falls, the base is bit-identical, every trainable leaf moved;
    full / partial merge into a base whose logits equal the forward with the trainable overlay."""
    loaded = t5_loaded if family == "t5" else bert_loaded[1]
    cfg, base = loaded.cfg, loaded.params
    trainable, spec = peft.build(jax.random.PRNGKey(1), base, _config(method), cfg)
    paths = set(tree.flatten(trainable))
    if method == "adapter":
        assert paths == {f"{s}/layers/{w}/adapter/{d}/{x}" for s in ("encoder", "decoder")
                         for w in ("self_attn", "mlp") for d in ("down", "up") for x in ("w", "b")}
        assert trainable["decoder"]["layers"]["mlp"]["adapter"]["down"]["w"].shape == (3, 32, 8)
    elif method == "partial" and family == "t5":
        assert dict(spec.layers)["encoder/layers/self_attn/q_proj/w"] == (1,)
        assert dict(spec.layers)["decoder/layers/mlp/down_proj/w"] == (2,)
        assert trainable["decoder"]["layers"]["mlp"]["down_proj"]["w"].shape == (1, 48, 32)
    else:
        assert paths == set(tree.flatten(base)) or method == "partial"
    logits = (_t5_logits if family == "t5" else _bert_logits)(cfg, spec)
    np.testing.assert_allclose(logits(base, trainable), logits(base, None), atol=1e-5)

    copy = jax.tree.map(np.array, base)
    loss = (_t5_loss if family == "t5" else _bert_loss)(cfg, spec)
    trained, losses = _train(loss, trainable, base, 1e-3 if family == "t5" and method != "adapter" else 1e-2)
    assert losses[-1] < 0.95 * losses[0] and np.all(np.diff(losses) < 0), losses
    for p, x in tree.items(base):
        np.testing.assert_array_equal(np.asarray(x), tree.flatten(copy)[p], err_msg=p)
    unchanged = [p for p, x in tree.items(trained) if np.array_equal(x, tree.flatten(trainable)[p])]
    assert not unchanged, unchanged
    if method != "adapter":
        merged = peft.merge(base, trained, spec)
        np.testing.assert_allclose(logits(merged, None), logits(base, trained), atol=1e-5)


def _peft_t5(config, seed=0, layers=2):
    import peft as hf_peft
    model = hf_peft.get_peft_model(_t5_model(layers, layers, seed), config).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(0, 1)
    return model


def _torch_logits(model, enc=ENC, mask=ENC_MASK, dec=DEC):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def test_t5_prompt_tuning_equals_peft(tmp_path):
    """PEFT's SEQ_2_SEQ_LM prompt tuning: the first P of its 2P embeddings before the encoder input (the decoder
    gets none), their encoder outputs read by the cross-attention; generation reads them too."""
    import peft as hf_peft
    n = 3
    pm = _peft_t5(hf_peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n))
    pm.get_base_model().save_pretrained(tmp_path)
    loaded = checkpoint.load(tmp_path)
    table = pm.prompt_encoder.default.embedding.weight.detach().numpy()
    assert table.shape == (2 * n, 32)
    trainable, spec = {"prompt": {"embeddings": jnp.asarray(table[:n])}}, peft.MethodSpec("prompt", virtual_tokens=n)
    ours = _t5_logits(loaded.cfg, spec)(loaded.params, trainable)
    np.testing.assert_allclose(ours, _torch_logits(pm), atol=1e-4)
    built, built_spec = peft.build(jax.random.PRNGKey(0), loaded.params, _config("prompt"), loaded.cfg)
    assert built_spec == spec and built["prompt"]["embeddings"].shape == (n, 32)
    # Generation encodes the prompt too: its first greedy token is the forward's after the start token.
    out = gen.generate(loaded.cfg, loaded.params, [list(ENC[0]), list(ENC[1, :6])], max_new_tokens=1, eos_ids=[63],
                       trainable=trainable, peft=spec)
    assert [row[:1] for row in out] == [[int(t)] for t in np.argmax(np.asarray(ours)[:, 0], -1)]


def test_t5_prefix_tuning_equals_peft(tmp_path):
    """PEFT's SEQ_2_SEQ_LM prefix tuning: P past keys / values in every decoder self-attention, the decoder's
    positions from P on; the encoder and the cross-attention get none. PEFT (0.21, transformers 5) reads its
    (P, L*2*N*H) tensor as L*2 (key, value) entries, repeats them and gives decoder layer i entries 4i and 4i + 1
    of the repeated list (the rest, meant for the cross-attention cache, is dropped): pair (2i) mod L."""
    import peft as hf_peft
    n, layers = 3, 2
    pm = _peft_t5(hf_peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n), layers=layers)
    pm.get_base_model().save_pretrained(tmp_path)
    loaded = checkpoint.load(tmp_path)
    e = pm.prompt_encoder.default.embedding.weight.detach().numpy().reshape(n, layers, 2, -1)
    e = e[:, [(2 * i) % layers for i in range(layers)]]
    trainable = {"decoder": {"layers": {"self_attn": {"prefix_k": jnp.asarray(e[:, :, 0].transpose(1, 0, 2)),
                                                      "prefix_v": jnp.asarray(e[:, :, 1].transpose(1, 0, 2))}}}}
    spec = peft.MethodSpec("prefix", virtual_tokens=n)
    np.testing.assert_allclose(_t5_logits(loaded.cfg, spec)(loaded.params, trainable), _torch_logits(pm),
                               atol=1e-4)
    built, built_spec = peft.build(jax.random.PRNGKey(0), loaded.params, _config("prefix"), loaded.cfg)
    assert built_spec == spec
    assert set(tree.flatten(built)) == set(tree.flatten(trainable))
    # 'vocab' starts from the decoder's own keys: the first layer's are k_proj of the normed embeddings.
    x = np.asarray(loaded.params["shared"]["w"])
    scale = np.asarray(loaded.params["decoder"]["layers"]["self_attn_norm"]["scale"][0])
    k0 = np.asarray(built["decoder"]["layers"]["self_attn"]["prefix_k"][0])
    rows = [np.flatnonzero(np.all(np.isclose((x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * scale)
                                             @ np.asarray(loaded.params["decoder"]["layers"]["self_attn"]["k_proj"]
                                                          ["w"][0]), k, atol=1e-4), -1)) for k in k0]
    assert all(len(r) == 1 for r in rows), rows


def test_bert_prefix_vocab_init_equals_transformers(bert_loaded):
    """prefix.init='vocab' on BERT: each layer's prefix is the keys and values transformers computes in that layer
    for the sampled tokens."""
    model, loaded = bert_loaded
    trainable, spec = peft.build(jax.random.PRNGKey(4), loaded.params, _config("prefix", "prefix.init=vocab"),
                                 loaded.cfg)
    ids = np.asarray(jax.random.randint(jax.random.split(jax.random.PRNGKey(4), 4)[3], (1, 3), 0, 64))
    with torch.no_grad():
        hidden = model.bert(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
        for l, layer in enumerate(model.bert.encoder.layer):
            for name, ours in (("key", "prefix_k"), ("value", "prefix_v")):
                ref = getattr(layer.attention.self, name)(hidden[l])[0].numpy()
                np.testing.assert_allclose(trainable["layers"]["attn"][ours][l], ref, atol=1e-4)
    assert spec == peft.MethodSpec("prefix", virtual_tokens=3)
