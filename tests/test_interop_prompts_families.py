"""PEFT interop of prefix and prompt tuning on the encoder families: jaxft's adapters of T5 (SEQ_2_SEQ_LM) and
BERT (SEQ_CLS with its classifier, TOKEN_CLS, FEATURE_EXTRACTION), exported, load in `peft` with jaxft's
outputs and read back unchanged; adapters `peft` saves import with PEFT's outputs; what PEFT would compute
otherwise (BERT's SEQ_CLS prompt tuning, a class without a task_type, T5 prefixes PEFT cannot run) is a
one-line error that writes nothing.

Tiny random models: T5 with 3 encoder and 2 decoder layers (PEFT's own T5 prefix reads pair 2j mod 3 in decoder
layer j), BERT with a pooler."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import tiny
from jaxft import checkpoint, cli, tree
from jaxft.export import AdapterError, export_peft, load_adapter
from jaxft.models import bert, t5
from jaxft.peft import hf_format, prefix
from jaxft.peft import io as adapter_io
from jaxft.peft.method import MethodSpec
from jaxft.tasks import Model, classification, token_classification

QUICK = {"xla_backend_optimization_level": 0}
V, P = 64, 3  # vocabulary, virtual tokens
rs = np.random.RandomState(0)
TOKENS = rs.randint(5, V, (2, 10))
SEGMENTS = np.array([[1] * 10, [1] * 7 + [0] * 3])  # the second row right-padded
ENC = rs.randint(2, V, (2, 9)) * np.array([[1] * 9, [1] * 6 + [0] * 3])
ENC_MASK = (ENC != 0).astype(np.int64)
DEC = np.concatenate([np.zeros((2, 1), np.int64), rs.randint(2, V, (2, 5))], 1)
# (family, method, jaxft task, the transformers class PEFT wraps, its task_type)
CASES = [("t5", "prompt", "seq2seq", transformers.T5ForConditionalGeneration, "SEQ_2_SEQ_LM"),
         ("t5", "prefix", "seq2seq", transformers.T5ForConditionalGeneration, "SEQ_2_SEQ_LM"),
         ("bert", "prefix", "classification", transformers.BertForSequenceClassification, "SEQ_CLS"),
         ("bert", "prefix", "token_classification", transformers.BertForTokenClassification, "TOKEN_CLS"),
         ("bert", "prompt", "token_classification", transformers.BertForTokenClassification, "TOKEN_CLS"),
         ("bert", "prompt", "embedding", transformers.BertModel, "FEATURE_EXTRACTION")]
IDS = [f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    tiny.perturbed(transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))).save_pretrained(root / "t5")
    tiny.perturbed(transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=24, num_labels=3))).save_pretrained(root / "bert")
    return {name: checkpoint.load(root / name) for name in ("t5", "bert")}


def _adapter(base, method, task, seed=1):
    """(trainable, spec) as after training: random prefixes or prompt, and a head where the task has one."""
    rng = np.random.RandomState(seed)
    cfg = base.cfg
    if method == "prompt":
        flat = {"prompt/embeddings": rng.randn(P, cfg.dim)}
    else:
        path, n_layers = prefix.where(cfg)
        flat = {f"{path}/prefix_{kv}": rng.randn(n_layers, P, cfg.n_kv_heads * cfg.head_dim) for kv in "kv"}
    if task in ("classification", "token_classification"):
        flat.update({"head/classifier/w": 0.5 * rng.randn(cfg.dim, 3), "head/classifier/b": 0.1 * rng.randn(3)})
    return tree.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in flat.items()}), MethodSpec(method,
                                                                                                 virtual_tokens=P)


@functools.partial(jax.jit, static_argnames=("model", "task"), compiler_options=QUICK)
def _run(model, params, trainable, task):
    if task == "seq2seq":
        return t5.forward(model.cfg, params, jnp.asarray(ENC), jnp.asarray(DEC),
                          enc_segment_ids=jnp.asarray(ENC_MASK), trainable=trainable, peft=model.spec)[0]
    batch = {"tokens": jnp.asarray(TOKENS), "segment_ids": jnp.asarray(SEGMENTS),
             "positions": jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)}
    if task == "embedding":
        return bert.forward(model.cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                            trainable=trainable, peft=model.spec, return_hidden=True)[0]
    return {"classification": classification, "token_classification": token_classification}[task].forward(
        model, params, trainable, batch)


def _ours(base, trainable, spec, task):
    model = Model(family=t5 if task == "seq2seq" else bert, cfg=base.cfg, spec=spec)
    return np.asarray(_run(model, base.params, trainable, task))


def _hf(base, cls):
    extra = {"num_labels": 3} if cls in (transformers.BertForSequenceClassification,
                                         transformers.BertForTokenClassification) else {}
    return cls.from_pretrained(str(base.path), dtype=torch.float32, **extra).eval()


def _theirs(model, method, task):
    """PEFT's outputs, at the text's positions (PEFT returns the soft prompt's too)."""
    with torch.no_grad():
        if task == "seq2seq":
            return model(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK),
                         decoder_input_ids=torch.tensor(DEC)).logits.numpy()
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS))
    out = (out.last_hidden_state if task == "embedding" else out.logits).numpy()
    return out[:, P:] if method == "prompt" else out


def _close(ours, theirs, task):
    keep = SEGMENTS.astype(bool) if task in ("token_classification", "embedding") else slice(None)  # (padding)
    assert np.abs(theirs[keep]).max() > 0.1  # a meaningful comparison, not two near-zero arrays
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-4, rtol=0)


def _workdir(path, base, trainable, spec, task):
    """A finished run's workdir as `jaxft train` leaves it: config.json and adapter/."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": str(base.path), "task": task}))
    adapter_io.save(path / "adapter", trainable, spec, None, base.path)
    return path


@pytest.mark.parametrize("family, method, task, cls, task_type", CASES, ids=IDS)
def test_export_loads_in_peft_with_equal_outputs(bases, tmp_path, family, method, task, cls, task_type):
    base = bases[family]
    trainable, spec = _adapter(base, method, task)
    ours = _ours(base, trainable, spec, task)
    assert np.abs(ours - _ours(base, {k: v for k, v in trainable.items() if k == "head"} or None,
                               None, task)).max() > 1e-2  # the adapter does something
    out = export_peft(_workdir(tmp_path / "run", base, trainable, spec, task), tmp_path / "peft")

    conf = json.loads((out / hf_format.CONFIG).read_text())
    assert (conf["peft_type"], conf["task_type"]) == (f"{method.upper()}_TUNING", task_type)
    assert conf["modules_to_save"] == (["classifier"] if "classification" in task else None)
    if family == "t5":  # PEFT's layout for encoder-decoders (see jaxft.peft.hf_prompts)
        rows, width = load_file(str(out / hf_format.WEIGHTS))["prompt_embeddings"].shape
        assert conf["num_transformer_submodules"] == 2
        assert (rows, width, conf["num_layers"]) == ((P, 4 * 2 * 32, 4) if method == "prefix" else (2 * P, 32, 3))
    model = peft.PeftModel.from_pretrained(_hf(base, cls), str(out)).eval()
    _close(ours, _theirs(model, method, task), task)

    back, back_spec = load_adapter(out, base.cfg)
    assert back_spec == spec
    assert sorted(tree.flatten(back)) == sorted(tree.flatten(trainable))
    for path, x in tree.flatten(trainable).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(back)[path]), np.asarray(x), err_msg=path)


def _peft_config(method, task_type):
    config = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
    return config(task_type=task_type, num_virtual_tokens=P)


def _peft_saved(base, method, cls, task_type, path):
    """An adapter PEFT made and saved: its prompt encoder and any head moved from their initialization."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf(base, cls), _peft_config(method, task_type)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(0, 1)
            elif "modules_to_save" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family, method, task, cls, task_type", CASES, ids=IDS)
def test_peft_saved_adapter_imports_with_equal_outputs(bases, tmp_path, family, method, task, cls, task_type):
    base = bases[family]
    model = _peft_saved(base, method, cls, task_type, tmp_path / "peft")
    trainable, spec = load_adapter(tmp_path / "peft", base.cfg)
    assert spec == MethodSpec(method, virtual_tokens=P)
    if family == "t5" and method == "prefix":  # PEFT's own file: 3 pairs, decoder layer j reads pair 2j mod 3
        saved = load_file(str(tmp_path / "peft" / hf_format.WEIGHTS))["prompt_embeddings"].reshape(P, 3, 2, 32)
        np.testing.assert_array_equal(trainable["decoder"]["layers"]["self_attn"]["prefix_v"][1], saved[:, 2, 1])
    _close(_ours(base, trainable, spec, task), _theirs(model, method, task), task)


def test_unequal_pairs_are_refused(bases, tmp_path, capsys):
    """BERT's SEQ_CLS prompt tuning (PEFT pools the first virtual token) both ways, a class without a
    task_type (PEFT ignores the adapter), and T5 prefixes PEFT cannot run: one line, nothing written."""
    b, t = bases["bert"], bases["t5"]
    trainable, spec = _adapter(b, "prompt", "classification")
    workdir = _workdir(tmp_path / "run", b, trainable, spec, "classification")
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BertForSequenceClassification pools the first virtual token" in err, err
    assert not (tmp_path / "out").exists()
    _peft_saved(b, "prompt", transformers.BertForSequenceClassification, "SEQ_CLS", tmp_path / "seq_cls")
    with pytest.raises(AdapterError, match="PROMPT_TUNING with task_type 'SEQ_CLS' on bert: PEFT puts the soft "
                                           "prompt before"):
        load_adapter(tmp_path / "seq_cls", b.cfg)

    trainable, spec = _adapter(b, "prefix", "mlm")
    with pytest.raises(AdapterError, match=r"prefix tuning for BertForMaskedLM \(task_type None\): PEFT applies .* "
                                           r"ignore it; export for a class with a task_type \(base_class / "
                                           r"--base-class: BertModel, "):
        hf_format.save(tmp_path / "out", trainable, spec, b.cfg, base_model="b", run={"task": "mlm"})
    assert not (tmp_path / "out").exists()

    native = tmp_path / "t5"
    _peft_saved(t, "prefix", transformers.T5ForConditionalGeneration, "SEQ_2_SEQ_LM", native)
    conf = json.loads((native / hf_format.CONFIG).read_text())
    x = load_file(str(native / hf_format.WEIGHTS))["prompt_embeddings"]
    for edit, tensor, message in [({"task_type": None}, x, "PEFT applies prefix and prompt tuning only through"),
                                  ({"num_transformer_submodules": 1}, x, "num_transformer_submodules=1 is not "
                                                                          "supported (PEFT runs PREFIX_TUNING of t5 "
                                                                          "with 2)"),
                                  ({"num_layers": 1}, x[:, :2 * 32], "num_layers=1, but PEFT gives each of this "
                                                                     "base's 2 decoder layers a pair")]:
        (native / hf_format.CONFIG).write_text(json.dumps({**conf, **edit}))
        save_file({"prompt_embeddings": np.ascontiguousarray(tensor)}, str(native / hf_format.WEIGHTS))
        with pytest.raises(AdapterError) as e:
            load_adapter(native, t.cfg)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bert_prefix_export_refused_where_peft_cannot_load_it(bases, tmp_path, capsys, monkeypatch):
    """PEFT gives a BERT prefix to BertModel as past_key_values; transformers 5.24 dropped that parameter, and
    PEFT then rejects the adapter. The test extra pins transformers<5.24 so that the export test above can load
    the file in PEFT; under a newer transformers the export is one line naming the versions that can, and writes
    nothing."""
    from jaxft.peft import hf_prompts
    monkeypatch.setattr(hf_prompts, "transformers_version", lambda: "5.25.0")
    b = bases["bert"]
    trainable, spec = _adapter(b, "prefix", "classification")
    workdir = _workdir(tmp_path / "run", b, trainable, spec, "classification")
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "past_key_values, which transformers 5.25.0 no longer takes" in err and "<=5.23" in err, err
    assert not (tmp_path / "out").exists()
