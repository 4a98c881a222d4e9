"""PEFT interop for every model family: tiny random BERT (BertForMaskedLM) and T5 (T5ForConditionalGeneration)
adapters exported by jaxft load in `peft` with equal logits, adapters `peft` saved import into jaxft with equal
logits (BertModel's and BertForMaskedLM's module names alike), merged exports load in transformers; task heads
go to PEFT as `modules_to_save` (BertForSequenceClassification, LlamaForSequenceClassification) and back."""

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import tiny
from jaxft import checkpoint, cli, tree
from jaxft.export import AdapterError, export_merged, export_peft, load_adapter
from jaxft.models import bert, family_of, llama, t5
from jaxft.peft import hf_format, lora
from jaxft.peft import io as adapter_io
from jaxft.peft.method import MethodSpec
from jaxft.tasks import Model, classification, token_classification

QUICK = {"xla_backend_optimization_level": 0}  # numbers, not speed: compiles in about half the time
V, T = 64, 10
rs = np.random.RandomState(0)
TOKENS = rs.randint(5, V, (2, T))
SEGMENTS = np.array([[1] * T, [1] * 7 + [0] * 3])  # the second row right-padded
ENC = rs.randint(2, V, (2, 9)) * np.array([[1] * 9, [1] * 6 + [0] * 3])
ENC_MASK = (ENC != 0).astype(np.int64)
DEC = np.concatenate([np.zeros((2, 1), np.int64), rs.randint(2, V, (2, 5))], 1)
SPECS = {"lora": lora.LoraSpec(rank=4, alpha=8), "rslora": lora.LoraSpec(rank=4, alpha=8, rslora=True),
         "dora": lora.LoraSpec(rank=4, alpha=8, dora=True)}


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=24, **kw)


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    """A tiny BertForMaskedLM checkpoint (names under `bert.`, masked-LM head, no pooler), loaded by jaxft."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "mlm"
    tiny.perturbed(transformers.BertForMaskedLM(_bert_config())).save_pretrained(path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    """A tiny T5ForConditionalGeneration (gated, untied head, 2 encoder and 1 decoder layers), loaded by jaxft."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("t5") / "t5"
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    tiny.perturbed(model).save_pretrained(path)
    return checkpoint.load(path)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "hidden"), compiler_options=QUICK)
def _bert(cfg, params, trainable=None, *, spec=None, hidden=False):
    return bert.forward(cfg, params, jnp.asarray(TOKENS), segment_ids=jnp.asarray(SEGMENTS), trainable=trainable,
                        peft=spec, return_hidden=hidden)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), compiler_options=QUICK)
def _t5(cfg, params, trainable=None, *, spec=None):
    return t5.forward(cfg, params, jnp.asarray(ENC), jnp.asarray(DEC), enc_segment_ids=jnp.asarray(ENC_MASK),
                      trainable=trainable, peft=spec)[0]


def _ours(base, trainable=None, spec=None, params=None):
    params = base.params if params is None else params
    f = _t5 if family_of(base.cfg) is t5 else _bert
    return np.asarray(f(base.cfg, params, trainable, spec=spec))


def _theirs(model, hidden=False):
    with torch.no_grad():
        if isinstance(model.get_base_model() if hasattr(model, "get_base_model") else model,
                      transformers.T5ForConditionalGeneration):
            return model(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK),
                         decoder_input_ids=torch.tensor(DEC)).logits.numpy()
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS))
        return (out.last_hidden_state if hidden else out.logits).numpy()


def _hf(base, cls=None):
    cls = cls or (transformers.T5ForConditionalGeneration if family_of(base.cfg) is t5 else
                  transformers.BertForMaskedLM)
    return cls.from_pretrained(str(base.path), dtype=torch.float32).eval()


def _close(ours, ref, atol=1e-4):
    assert np.abs(ref).max() > 0.1  # a meaningful comparison, not two near-zero arrays
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def _trained(base, spec, targets, seed=1):
    """A LoRA tree as after training: random A, B and (DoRA) magnitudes near the base's column norms."""
    rng = np.random.RandomState(seed)
    flat, t = tree.flatten(base.params), {}
    for path in lora.target_paths(base.params, targets, base.cfg.model_type):
        (n_layers, d_in, d_out), module = flat[path].shape, path.rsplit("/", 1)[0]
        t[f"{module}/lora_a"] = 0.3 * rng.randn(n_layers, d_in, spec.rank)
        t[f"{module}/lora_b"] = 0.1 * rng.randn(n_layers, spec.rank, d_out)
        if spec.dora:
            t[f"{module}/magnitude"] = np.linalg.norm(flat[path], axis=-2) * (1 + 0.2 * rng.randn(n_layers, d_out))
    return tree.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in t.items()})


def _workdir(path, base, trainable, spec, targets, task=None):
    """A finished run's workdir as `jaxft train` leaves it: config.json and adapter/ (with task.json)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": str(base.path), "lora": {"init": "kaiming"},
                                                  **({"task": task["task"]} if task else {})}))
    run = types.SimpleNamespace(lora=types.SimpleNamespace(targets=targets))
    adapter_io.save(path / "adapter", trainable, spec, run, base.path)
    if task:
        (path / "adapter" / "task.json").write_text(json.dumps(task))
    return path


def _lora_modules(model) -> set[str]:
    """The module paths PEFT put LoRA layers on (inside the wrapped transformers model)."""
    from peft.tuners.lora import LoraLayer
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _exported_modules(out) -> set[str]:
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            for k in load_file(str(out / hf_format.WEIGHTS)) if ".lora_" in k}


# (family fixture, variant, lora.targets, the target_modules PEFT must read from the export)
EXPORTS = [
    ("mlm", "lora", "all-linear", ["intermediate.dense", "key", "output.dense", "query", "value"]),
    ("mlm", "rslora", "default", ["query", "value"]),
    ("mlm", "dora", r"layers/(attn/q_proj|mlp/down_proj)/w", None),  # output.dense alone: attention.output.dense
    #                                                                  ends alike, so a regex names it
    ("seq2seq", "lora", "all-linear", ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]),
    ("seq2seq", "rslora", "default", ["q", "v"]),
    ("seq2seq", "dora", r"encoder/layers/self_attn/(q|v)_proj/w", None),  # the decoder's q/v end alike: a regex
]


@pytest.mark.parametrize("fixture, variant, targets, names", EXPORTS, ids=[f"{e[0]}-{e[1]}" for e in EXPORTS])
def test_export_loads_in_peft_with_equal_logits(request, tmp_path, capsys, fixture, variant, targets, names):
    base = request.getfixturevalue(fixture)
    spec = SPECS[variant]
    trainable = _trained(base, spec, targets)
    workdir = _workdir(tmp_path / "run", base, trainable, spec, targets)
    out = tmp_path / "peft"
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    conf = json.loads((out / hf_format.CONFIG).read_text())
    if names is None:
        assert isinstance(conf["target_modules"], str)  # a regex over full module paths
    else:
        assert conf["target_modules"] == names
    exported = _exported_modules(out)
    assert all(m.startswith("bert.encoder.layer.") for m in exported) if fixture == "mlm" else \
        any(".EncDecAttention." in m for m in exported) or targets.startswith("encoder")
    assert conf["task_type"] == (None if fixture == "mlm" else "SEQ_2_SEQ_LM")

    model = peft.PeftModel.from_pretrained(_hf(base), str(out)).eval()
    assert _lora_modules(model) == exported  # PEFT adapts exactly the exported modules, no others
    ours = _ours(base, trainable, spec)
    plain = _theirs(_hf(base))
    assert np.abs(ours - plain).max() > 0.01 * np.abs(plain).max()  # the adapter does something
    _close(_theirs(model), ours)


@pytest.mark.parametrize("fixture, variant, wrapped", [
    ("mlm", "lora", "BertForMaskedLM"), ("mlm", "dora", "BertModel"), ("seq2seq", "lora", None),
    ("seq2seq", "dora", None)])
def test_peft_saved_adapter_imports_with_equal_logits(request, tmp_path, fixture, variant, wrapped):
    """PEFT's default targets (query/value; q/v of both T5 stacks and the cross-attention), on BertForMaskedLM
    (names under `bert.`) and on BertModel (no prefix): both import."""
    base = request.getfixturevalue(fixture)
    spec = SPECS[variant]
    model = _hf(base, getattr(transformers, wrapped) if wrapped else None)
    torch.manual_seed(0)
    task_type = {"BertModel": "FEATURE_EXTRACTION", "BertForMaskedLM": None}.get(wrapped, "SEQ_2_SEQ_LM")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, use_dora=spec.dora,
                                                       task_type=task_type)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    prefixed = any(k.startswith("base_model.model.bert.") for k in load_file(str(tmp_path / "peft" /
                                                                                   hf_format.WEIGHTS)))
    assert prefixed == (wrapped == "BertForMaskedLM")

    trainable, loaded_spec = load_adapter(tmp_path / "peft", base.cfg)
    assert loaded_spec == lora.LoraSpec(rank=4, alpha=8.0, dora=spec.dora)
    want = lora.target_paths(base.params, "default", base.cfg.model_type)
    assert sorted({p.rsplit("/", 1)[0] for p in tree.flatten(trainable)}) == sorted(p[:-2] for p in want)
    if wrapped == "BertModel":  # hidden states: BertModel has no masked-LM head
        ours = np.asarray(_bert(base.cfg, base.params, trainable, spec=loaded_spec, hidden=True))
        _close(ours, _theirs(model, hidden=True))
    else:
        _close(_ours(base, trainable, loaded_spec), _theirs(model))


@pytest.mark.parametrize("fixture", ["mlm", "seq2seq"])
def test_merged_export_loads_in_transformers(request, tmp_path, fixture):
    base = request.getfixturevalue(fixture)
    spec = SPECS["dora"]
    trainable = _trained(base, spec, "all-linear", seed=2)
    out = export_merged(_workdir(tmp_path / "run", base, trainable, spec, "all-linear"), tmp_path / "merged",
                        dtype=jnp.float32)
    auto = transformers.T5ForConditionalGeneration if fixture == "seq2seq" else transformers.AutoModelForMaskedLM
    hf = auto.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf) is type(_hf(base))
    merged = checkpoint.load(out).params
    ours = _ours(base, params=merged)
    _close(_theirs(hf), ours)
    _close(ours, _ours(base, trainable, spec))


def test_ia3_round_trip_with_peft_defaults(mlm, seq2seq, tmp_path):
    """IA3 with PEFT's default targets (BERT: key, value, output.dense at the input; T5: k, v, wo at the input)
    saved by PEFT imports into jaxft with equal logits, and goes back out with the same names and config."""
    for base, name in ((mlm, "bert"), (seq2seq, "t5")):
        torch.manual_seed(0)
        model = peft.get_peft_model(_hf(base), peft.IA3Config(
            task_type=None if name == "bert" else "SEQ_2_SEQ_LM")).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        trainable, spec = load_adapter(tmp_path / name, base.cfg)
        assert spec == MethodSpec("ia3")
        ref = _theirs(model)
        _close(_ours(base, trainable, spec), ref)

        out = hf_format.save(tmp_path / f"{name}-back", trainable, spec, base.cfg, base_model=str(base.path))
        native = json.loads((tmp_path / name / hf_format.CONFIG).read_text())
        ours = json.loads((out / hf_format.CONFIG).read_text())
        for key in ("target_modules", "feedforward_modules", "task_type"):
            assert ours[key] == (sorted(native[key]) if isinstance(native[key], list) else native[key]), key
        assert load_file(str(out / hf_format.WEIGHTS)).keys() == load_file(
            str(tmp_path / name / hf_format.WEIGHTS)).keys()
        _close(_theirs(peft.PeftModel.from_pretrained(_hf(base), str(out)).eval()), ref)


def test_base_class_option_and_refusals(mlm, seq2seq, tmp_path, capsys):
    """--base-class BertModel writes BertModel's names (no `bert.`); unknown classes, prompt tuning for a class
    without a task_type (PEFT would ignore it), and a head without a class for it are one-line errors that write
    nothing."""
    spec = SPECS["lora"]
    trainable = _trained(mlm, spec, "default")
    workdir = _workdir(tmp_path / "run", mlm, trainable, spec, "default")
    out = tmp_path / "bertmodel"
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(out), "--base-class", "BertModel"]) == 0
    assert all(m.startswith("encoder.layer.") for m in _exported_modules(out))
    model = peft.PeftModel.from_pretrained(_hf(mlm, transformers.BertModel), str(out)).eval()
    ours = np.asarray(_bert(mlm.cfg, mlm.params, trainable, spec=spec, hidden=True))
    _close(_theirs(model, hidden=True), ours)
    back, _ = load_adapter(out, mlm.cfg)  # BertModel's names import as well
    for path, x in tree.flatten(trainable).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(back)[path]), np.asarray(x))

    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(tmp_path / "x"), "--base-class",
                     "T5Model"]) == 1
    err = capsys.readouterr().err
    assert "'T5Model' is not a bert class" in err and "BertForMaskedLM" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(AdapterError, match="BertForSequenceClassification has a task head"):
        hf_format.save(tmp_path / "y", trainable, spec, mlm.cfg, base_model="b", run={"task": "classification"})
    prompt = {"prompt": {"embeddings": jnp.zeros((3, 32))}}
    with pytest.raises(AdapterError, match=r"BertForMaskedLM \(task_type None\): PEFT applies prefix and prompt"):
        hf_format.save(tmp_path / "y", prompt, MethodSpec("prompt", virtual_tokens=3), mlm.cfg, base_model="b")
    fresh_mlm_head = {"transform": {"w": jnp.zeros((32, 32)), "b": jnp.zeros(32)}, "bias": jnp.zeros(V),
                      "norm": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}
    with pytest.raises(AdapterError, match=r"masked-LM head \(head/bias, .*\) has no form in PEFT's format .*--merged"):
        hf_format.save(tmp_path / "y", {**trainable, "head": fresh_mlm_head}, spec, mlm.cfg, base_model="b",
                       run={"task": "mlm"})
    with pytest.raises(AdapterError, match="BertModel has no task head for the adapter's head"):
        hf_format.save(tmp_path / "y", {**trainable, "head": _head(mlm, True)}, spec, mlm.cfg, base_model="b",
                       run={"task": "classification"}, base_class="BertModel")
    assert not (tmp_path / "y").exists()
    t5_adapter = hf_format.save(tmp_path / "t5", _trained(seq2seq, spec, "default"), spec, seq2seq.cfg,
                                base_model="t")
    with pytest.raises(AdapterError, match="task_type 'SEQ_2_SEQ_LM' is for encoder-decoder models, and this "
                                           "base is an encoder model"):
        load_adapter(t5_adapter, mlm.cfg)


# --- task heads as PEFT's modules_to_save ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    """A tiny BertForSequenceClassification checkpoint (pooler; the classifier is not read by jaxft)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bert") / "cls"
    tiny.perturbed(transformers.BertForSequenceClassification(_bert_config(num_labels=3))).save_pretrained(path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return checkpoint.load(tiny.llama_dir(tmp_path_factory.mktemp("tiny") / "llama"))


def _head(base, with_bias, n_labels=3, seed=3):
    rng = np.random.RandomState(seed)
    name = "classifier" if family_of(base.cfg).KIND == "encoder" else "score"
    head = {"w": jnp.asarray(0.5 * rng.randn(base.cfg.dim, n_labels), jnp.float32)}
    if with_bias:
        head["b"] = jnp.asarray(0.1 * rng.randn(n_labels), jnp.float32)
    return {name: head}


@functools.partial(jax.jit, static_argnames=("model", "task"), compiler_options=QUICK)
def _classify(model, params, trainable, tokens, segments, task="classification"):
    batch = {"tokens": tokens, "segment_ids": segments,
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}
    module = classification if task == "classification" else token_classification
    return module.forward(model, params, trainable, batch)


def _cls_logits(base, trainable, spec, segments, task="classification"):
    model = Model(family=family_of(base.cfg), cfg=base.cfg, spec=MethodSpec("lora", lora=spec))
    return np.asarray(_classify(model, base.params, trainable, jnp.asarray(TOKENS), jnp.asarray(segments), task))


def _cls_hf(base, cls, path=None):
    return cls.from_pretrained(str(path or base.path), num_labels=3, pad_token_id=0, dtype=torch.float32).eval()


HEADS = [("bert", "classification", transformers.BertForSequenceClassification, "SEQ_CLS"),
         ("bert", "token_classification", transformers.BertForTokenClassification, "TOKEN_CLS"),
         ("llama", "classification", transformers.LlamaForSequenceClassification, "SEQ_CLS")]


@pytest.mark.parametrize("family, task, cls, task_type", HEADS, ids=[f"{h[0]}-{h[1]}" for h in HEADS])
def test_task_head_exports_as_modules_to_save(request, tmp_path, family, task, cls, task_type):
    """A LoRA + head run of a classification task -> PEFT SEQ_CLS / TOKEN_CLS adapter (the head saved whole as
    base_model.model.classifier / score) -> PeftModel on the task's transformers class: equal logits; back into
    jaxft; and merged, the task's AutoModelFor... class with the run's labels."""
    base = request.getfixturevalue("bert_cls" if family == "bert" else "llama_base")
    spec = SPECS["lora"]
    with_bias = family == "bert"  # LlamaForSequenceClassification's score has none
    trainable = {**_trained(base, spec, "default"), "head": _head(base, with_bias)}
    info = {"task": task, "labels": ["neg", "neutral", "pos"], "pool": "default"}
    workdir = _workdir(tmp_path / "run", base, trainable, spec, "default", task=info)
    segments = SEGMENTS if family == "bert" else np.ones_like(SEGMENTS)  # (no padding: tokens hold no pad id)
    ours = _cls_logits(base, trainable, spec, segments, task)

    out = export_peft(workdir, tmp_path / "peft")
    conf = json.loads((out / hf_format.CONFIG).read_text())
    name = "classifier" if family == "bert" else "score"
    assert (conf["task_type"], conf["modules_to_save"]) == (task_type, [name])
    keys = load_file(str(out / hf_format.WEIGHTS)).keys()
    assert {k for k in keys if "lora_" not in k} == ({f"base_model.model.{name}.weight"} |
                                                     ({f"base_model.model.{name}.bias"} if with_bias else set()))
    model = peft.PeftModel.from_pretrained(_cls_hf(base, cls), str(out)).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(segments)).logits.numpy()
    keep = segments.astype(bool) if task == "token_classification" else slice(None)  # (padding: anything)
    _close(theirs[keep], ours[keep])

    back, _ = load_adapter(out, base.cfg)
    for path, x in tree.flatten(trainable).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(back)[path]), np.asarray(x))

    merged = export_merged(workdir, tmp_path / "merged", dtype=jnp.float32)
    auto = (transformers.AutoModelForSequenceClassification if task == "classification" else
            transformers.AutoModelForTokenClassification)
    hf = auto.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert type(hf) is cls and hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    with torch.no_grad():
        _close(hf(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(segments)).logits.numpy()[keep],
               ours[keep])


def test_merged_export_with_a_new_masked_lm_head(bert_cls, tmp_path):
    """An mlm run over a checkpoint without a masked-LM head trained one (head/transform, norm, bias): merged,
    it is BertForMaskedLM's head (PEFT's format has no place for it)."""
    spec = SPECS["lora"]
    rng = np.random.RandomState(4)
    mlm_head = {"transform": {"w": 0.3 * rng.randn(32, 32), "b": 0.1 * rng.randn(32)}, "bias": 0.1 * rng.randn(V),
                "norm": {"scale": 1 + 0.1 * rng.randn(32), "bias": 0.1 * rng.randn(32)}}
    mlm_head = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), mlm_head)
    trainable = {**_trained(bert_cls, spec, "default"), "head": mlm_head}
    info = {"task": "mlm", "labels": None, "pool": "default"}
    workdir = _workdir(tmp_path / "run", bert_cls, trainable, spec, "default", task=info)
    out = export_merged(workdir, tmp_path / "merged", dtype=jnp.float32)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf) is transformers.BertForMaskedLM
    with_head = dataclasses.replace(bert_cls.cfg, mlm_head=True)
    ours = np.asarray(_bert(with_head, {**bert_cls.params, "mlm": mlm_head}, _trained(bert_cls, spec, "default"),
                            spec=spec))
    _close(_theirs(hf), ours)


def test_peft_seq_cls_adapter_imports_with_its_head(bert_cls, tmp_path):
    """PEFT's own SEQ_CLS adapter (LoRA on query/value, the classifier in modules_to_save) -> jaxft: the head
    lands in head/classifier and the classification task computes PEFT's logits."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_cls_hf(bert_cls, transformers.BertForSequenceClassification),
                                peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    assert "base_model.model.classifier.weight" in load_file(str(tmp_path / "peft" / hf_format.WEIGHTS))
    trainable, spec = load_adapter(tmp_path / "peft", bert_cls.cfg)
    assert sorted(tree.flatten(trainable["head"])) == ["classifier/b", "classifier/w"]
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS)).logits.numpy()
    _close(_cls_logits(bert_cls, trainable, spec, SEGMENTS), theirs)
    merged = export_merged(tmp_path / "peft", tmp_path / "merged", model=bert_cls.path, dtype=jnp.float32)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():  # (SEQ_CLS: the merged model is a BertForSequenceClassification, its head PEFT's)
        _close(hf(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS)).logits.numpy(), theirs)

    with pytest.raises(AdapterError, match="head.pool='mean': BertForSequenceClassification reads the cls"):
        hf_format.save(tmp_path / "x", trainable, spec, bert_cls.cfg, base_model="b",
                       run={"task": "classification", "head": {"pool": "mean"}})
    conf = json.loads((tmp_path / "peft" / hf_format.CONFIG).read_text())
    (tmp_path / "peft" / hf_format.CONFIG).write_text(json.dumps({**conf, "modules_to_save": ["pooler"]}))
    with pytest.raises(AdapterError, match=r'modules_to_save=\["pooler"\] is not supported'):
        load_adapter(tmp_path / "peft", bert_cls.cfg)
