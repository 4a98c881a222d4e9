"""HF PEFT interop beyond LoRA: prefix tuning (with and without PEFT's prefix_projection), prompt tuning and IA3
exported by jaxft load in `peft` with equal logits and the files PEFT itself writes, and PEFT's own adapters
import with equal logits; the methods PEFT lacks are refused by name; training continues from an exported
adapter (`peft.init_from`); `jaxft generate --adapter` runs every kind of adapter.

All on the 2-layer random Llama of `tiny` (hidden 32, 4 heads, 2 kv heads); tokens are always (2, 12)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import tiny
from jaxft import checkpoint, cli, config as config_lib, peft, tree
from jaxft.export import AdapterError, export_peft, load_adapter
from jaxft.generate import generate
from jaxft.models import llama
from jaxft.peft import features, hf_format
from jaxft.peft import io as adapter_io
from jaxft.train.loop import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
TOKENS = np.random.RandomState(0).randint(4, 290, (2, 12))
N = {"prefix": 4, "prefix_projection": 4, "prompt": 3, "ia3": 0}  # virtual tokens
METHOD = {"prefix": "prefix", "prefix_projection": "prefix", "prompt": "prompt", "ia3": "ia3"}
SETTINGS = {"prefix": ["prefix.length=4"], "prefix_projection": ["prefix.length=4", "prefix.projection=16"],
            "prompt": ["prompt.length=3"], "ia3": [], "lora": ["lora.rank=4", "lora.alpha=8"],
            "adapter": ["adapter.size=8"], "full": [], "partial": ["partial.select=top1"]}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_config(variant):
    """The PEFT config of the same adapter as jaxft's `variant` run (SETTINGS, the config's defaults)."""
    return {"prefix": hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            "prefix_projection": hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                            prefix_projection=True, encoder_hidden_size=16),
            "prompt": hf_peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                 prompt_tuning_init="SAMPLE_VOCAB"),
            "ia3": hf_peft.IA3Config(task_type="CAUSAL_LM"),
            "lora": hf_peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=ALL_LINEAR)}[variant]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return checkpoint.load(tiny.llama_dir(tmp_path_factory.mktemp("tiny") / "model"))


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _torch_logits(model, n_virtual=0):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()[:, n_virtual:]  # PEFT returns a soft prompt's too


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(cfg, params, trainable, spec):
    return llama.forward(cfg, params, jnp.asarray(TOKENS), trainable=trainable, peft=spec)[0]


def _logits(base, trainable=None, spec=None, params=None):
    return np.asarray(_forward(base.cfg, base.params if params is None else params, trainable, spec))


def _config(base, method, *extra):
    return config_lib.load(CONFIG, [f"model={base.path}", f"peft.method={method}", "train.seq_len=32",
                                    *SETTINGS.get(method, []), *extra])


def _trained(base, variant, seed=1):
    """(config, trainable, spec) of jaxft's `variant` as after training: its init moved by noise."""
    config = _config(base, METHOD.get(variant, variant), *SETTINGS[variant])
    trainable, spec = peft.build(jax.random.PRNGKey(0), base.params, config, base.cfg, base.tokenizer)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    scale = 0.5 if variant == "ia3" else 0.3
    moved = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return config, jax.tree.unflatten(treedef, moved), spec


def _workdir(path, base, config, trainable, spec):
    """A finished run's workdir as `jaxft train` leaves it: config.json and adapter/."""
    path.mkdir()
    (path / "config.json").write_text(config.to_json_best_effort(indent=1))
    adapter_io.save(path / "adapter", peft.finalize(spec, trainable), spec, config, base.path)
    return path


@pytest.mark.parametrize("variant", ["prefix", "prefix_projection", "prompt", "ia3"])
def test_jaxft_export_loads_in_peft_with_equal_logits(base, tmp_path, variant, capsys):
    config, trainable, spec = _trained(base, variant)
    workdir = _workdir(tmp_path / "run", base, config, trainable, spec)
    out = tmp_path / "peft"
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    model = hf_peft.PeftModel.from_pretrained(_hf(base.path), str(out)).eval()
    ours = _logits(base, peft.finalize(spec, trainable), spec)
    assert np.abs(ours - _logits(base)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(_torch_logits(model, N[variant] if variant == "prompt" else 0), ours, atol=1e-4)

    # The files PEFT writes for the same adapter: tensor names and shapes, every config field and its value.
    native = hf_peft.get_peft_model(_hf(base.path), _peft_config(variant))
    native.save_pretrained(tmp_path / "native")
    ref = {k: v.shape for k, v in load_file(str(tmp_path / "native" / hf_format.WEIGHTS)).items()}
    assert {k: v.shape for k, v in load_file(str(out / hf_format.WEIGHTS)).items()} == ref
    ours_cfg = json.loads((out / hf_format.CONFIG).read_text())
    ref_cfg = json.loads((tmp_path / "native" / hf_format.CONFIG).read_text())
    assert set(ref_cfg) - set(ours_cfg) <= {"peft_version"}
    for key, value in ours_cfg.items():
        if key != "base_model_name_or_path":
            same = sorted(value) == sorted(ref_cfg[key]) if isinstance(value, list) else value == ref_cfg[key]
            assert same, (key, value, ref_cfg[key])
    assert ours_cfg["base_model_name_or_path"] == str(base.path.resolve())
    assert transformers.AutoTokenizer.from_pretrained(str(out)).encode("seven owls") == \
        base.tokenizer.encode("seven owls")


@pytest.mark.parametrize("variant", ["prefix", "prefix_projection", "prompt", "ia3"])
def test_peft_saved_adapter_imports_with_equal_logits(base, tmp_path, variant):
    torch.manual_seed(0)
    model = hf_peft.get_peft_model(_hf(base.path), _peft_config(variant)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:  # away from ones, so that the scaling shows
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    ref = _torch_logits(model, N[variant] if variant == "prompt" else 0)

    trainable, spec = load_adapter(tmp_path / "peft", base.cfg)
    assert spec == peft.MethodSpec(METHOD[variant], virtual_tokens=N[variant])
    want = {"prefix": {"layers/attn/prefix_k": (2, 4, 16), "layers/attn/prefix_v": (2, 4, 16)},
            "prompt": {"prompt/embeddings": (3, 32)},
            "ia3": {"layers/attn/k_proj/ia3_out": (2, 16), "layers/attn/v_proj/ia3_out": (2, 16),
                    "layers/mlp/down_proj/ia3_in": (2, 48)}}[METHOD[variant]]
    assert {p: x.shape for p, x in tree.items(trainable)} == want
    np.testing.assert_allclose(_logits(base, trainable, spec), ref, atol=1e-4)
    assert np.abs(ref - _logits(base)).max() > 1e-2


@pytest.fixture(scope="module")
def native_dirs(base, tmp_path_factory):
    """PEFT-saved adapters of the tiny model, by variant (prefix, prompt, ia3, lora)."""
    root = tmp_path_factory.mktemp("native")
    for variant in ("prefix", "prompt", "ia3", "lora"):
        torch.manual_seed(0)
        hf_peft.get_peft_model(_hf(base.path), _peft_config(variant)).save_pretrained(root / variant)
    return root


def _edited(src, tmp_path, config=None, tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    conf = json.loads((src / hf_format.CONFIG).read_text())
    (out / hf_format.CONFIG).write_text(json.dumps({**conf, **(config or {})}))
    arrays = load_file(str(src / hf_format.WEIGHTS))
    save_file(tensors(arrays) if tensors else arrays, str(out / hf_format.WEIGHTS))
    return out


@pytest.mark.parametrize("variant, config, tensors, message", [
    ("prefix", {"num_layers": 3}, None, "adapter_config.json: num_layers=3, but this base has 2"),
    ("prefix", {"num_attention_heads": 4, "token_dim": 32}, None, "num_attention_heads=4, but this base has 2"),
    ("prefix", {"num_transformer_submodules": 2}, None, "num_transformer_submodules=2 is not supported"),
    ("prefix", {"num_virtual_tokens": 6}, None, "prompt_embeddings has shape (4, 64), but 6 virtual tokens"),
    ("prompt", {"token_dim": 64}, None, "token_dim=64, but this base has 32"),
    ("prompt", {"modules_to_save": ["lm_head"]}, None, 'modules_to_save=["lm_head"] is not supported'),
    ("prompt", None, lambda a: {**a, "extra": np.zeros(3, np.float32)},
     "holds extra, prompt_embeddings; a PROMPT_TUNING adapter holds prompt_embeddings alone"),
    ("ia3", {"modules_to_save": ["lm_head"]}, None, 'modules_to_save=["lm_head"] is not supported'),
    ("ia3", {"feedforward_modules": []}, None,
     "mlp.down_proj.ia3_l has shape (1, 48), but an IA3 vector of this base needs (32, 1)"),
    ("ia3", None, lambda a: {k: v for k, v in a.items() if "layers.1.self_attn.k_proj" not in k},
     "missing tensors base_model.model.model.layers.1.self_attn.k_proj.ia3_l"),
    ("ia3", {"peft_type": "LOHA"}, None, "peft_type 'LOHA' is not supported"),
])
def test_unusable_peft_adapters_are_refused(base, native_dirs, tmp_path, variant, config, tensors, message):
    with pytest.raises(AdapterError) as e:
        load_adapter(_edited(native_dirs / variant, tmp_path, config, tensors), base.cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["adapter", "full", "partial", "features"])
def test_methods_peft_lacks_are_refused_by_name(base, tmp_path, capsys, method):
    if method == "features":
        config = _config(base, "features")
        head = features.init_head(jax.random.PRNGKey(0), base.cfg.dim, 2)
        spec = features.FeatureSpec(layer=1, pool="mean", classes=("a", "b"), seq_len=16)
        workdir = _workdir(tmp_path / "run", base, config, head, spec)
    else:
        workdir = _workdir(tmp_path / "run", base, *_trained(base, method))
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"a {method} adapter has no HF PEFT equivalent" in err, err
    assert ("--merged" in err) == (method in ("full", "partial")), err
    assert not (tmp_path / "out").exists()
    if method in ("adapter", "features"):  # nor merged: one line saying why
        assert cli.main(["export", "--workdir", str(workdir), "--merged", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{method} cannot be merged" in err, err
        assert not (tmp_path / "out").exists()


def test_partial_and_ia3_export_merged(base, tmp_path):
    """Where --merged is the way out (partial) and for IA3: transformers computes what the adapter does."""
    for method in ("partial", "ia3"):
        config, trainable, spec = _trained(base, method)
        workdir = _workdir(tmp_path / method, base, config, trainable, spec)
        out = tmp_path / f"{method}-merged"
        assert cli.main(["export", "--workdir", str(workdir), "--merged", str(out), "--dtype", "float32"]) == 0
        ours = _logits(base, trainable, spec)
        assert np.abs(ours - _logits(base)).max() > 1e-2
        np.testing.assert_allclose(_torch_logits(_hf(out)), ours, atol=1e-4)


# --- peft.init_from: continuing training from an adapter ---------------------------------------------------------


def test_training_continues_from_an_exported_adapter(base, tmp_path):
    """2 steps, export to PEFT, a new run from that directory: its first evaluation is the first run's last."""
    data = tiny.alpaca_file(tmp_path / "train.jsonl", 40)
    common = [f"model={base.path}", f"data.train={data}", "dtype=float32", "param_dtype=float32",
              "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "train.learning_rate=1e-2",
              "train.warmup_steps=0", "train.schedule=constant", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.0"]
    first = train(config_lib.load(CONFIG, [*common, "train.steps=2"]), tmp_path / "a")
    assert first["eval_history"][-1][1] < first["eval_history"][0][1] - 1e-3  # training moved the adapter
    export_peft(tmp_path / "a", tmp_path / "peft")
    second = train(config_lib.load(CONFIG, [*common, "train.steps=0", f"peft.init_from={tmp_path / 'peft'}"]),
                   tmp_path / "b")
    assert abs(second["eval_history"][0][1] - first["eval_history"][-1][1]) <= 1e-5
    saved = tree.flatten(adapter_io.load(tmp_path / "b" / "adapter")[0])
    for path, x in tree.flatten(adapter_io.load(tmp_path / "a" / "adapter")[0]).items():
        np.testing.assert_array_equal(saved[path], x, err_msg=path)


def test_init_from_returns_the_adapter_the_config_describes(base, native_dirs):
    ref = load_file(str(native_dirs / "prompt" / hf_format.WEIGHTS))["prompt_embeddings"]
    config = _config(base, "prompt", f"peft.init_from={native_dirs / 'prompt'}")
    trainable, spec = peft.build(jax.random.PRNGKey(0), base.params, config, base.cfg, base.tokenizer)
    assert spec == peft.MethodSpec("prompt", virtual_tokens=3)
    np.testing.assert_array_equal(trainable["prompt"]["embeddings"], ref)
    # As the trainer builds it: under jit (the files are read while tracing).
    config = _config(base, "lora", f"peft.init_from={native_dirs / 'lora'}", "lora.targets=all-linear")
    trainable = jax.jit(lambda k, b: peft.build(k, b, config, base.cfg)[0])(jax.random.PRNGKey(0), base.params)
    _, spec = peft.build(jax.random.PRNGKey(0), base.params, config, base.cfg)
    assert spec.lora == peft.LoraSpec(rank=4, alpha=8.0, dropout=config.lora.dropout)
    ref = load_file(str(native_dirs / "lora" / hf_format.WEIGHTS))
    np.testing.assert_array_equal(trainable["layers"]["mlp"]["up_proj"]["lora_b"][1],
                                  ref["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].T)
    assert len(tree.flatten(trainable)) == 14


@pytest.mark.parametrize("variant, extra, message", [
    ("lora", ["peft.method=prompt", "prompt.length=3"], "peft.method='prompt', but the adapter at {} (peft.init_from) "
                                                        "is a 'lora' adapter"),
    ("lora", ["lora.rank=8"], "lora.rank=8, but the adapter at {} (peft.init_from) has 4"),
    ("lora", ["lora.alpha=16"], "lora.alpha=16.0, but the adapter at {} (peft.init_from) has 8.0"),
    ("lora", ["lora.dora=True"], "lora.dora=True, but the adapter at {} (peft.init_from) has False"),
    ("lora", ["lora.targets=default"], "lora.targets='default' trains layers/attn/q_proj, layers/attn/v_proj, "
                                       "but the adapter at {} (peft.init_from) has layers/attn/k_proj, "),
    ("prefix", ["peft.method=prefix", "prefix.length=8"], "prefix.length=8, but the adapter at {} (peft.init_from) "
                                                          "has 4"),
    ("prefix", ["peft.method=prefix", "prefix.length=4", "prefix.projection=16"],
     "prefix.projection=16, but the adapter at {} (peft.init_from) has 0; set prefix.projection=0"),
    ("ia3", ["peft.method=ia3", "ia3.feedforward="], "ia3.targets='default' with ia3.feedforward='' trains "
                                                     "layers/attn/k_proj/ia3_out, layers/attn/v_proj/ia3_out, "
                                                     "layers/mlp/down_proj/ia3_out, but"),
    ("missing", [], "peft.init_from: {}: no such directory"),
])
def test_init_from_mismatches_name_the_setting(base, native_dirs, variant, extra, message):
    source = native_dirs / variant
    config = _config(base, "lora", "lora.targets=all-linear", *SETTINGS["lora"], f"peft.init_from={source}", *extra)
    with pytest.raises(peft.PeftError) as e:
        peft.build(jax.random.PRNGKey(0), base.params, config, base.cfg, base.tokenizer)
    assert message.format(source) in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- jaxft generate --adapter ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """The tiny model with larger random weights (initializer_range 0.2): its greedy answers are not ties that
    any change of the logits would flip, nor ones that a small adapter leaves as they are."""
    path = tmp_path_factory.mktemp("peaked") / "model"
    tok = tiny.tokenizer()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)).save_pretrained(path)
    tok.save_pretrained(path)
    return checkpoint.load(path)


@pytest.mark.parametrize("kind", ["prompt-workdir", "ia3-peft", "prefix-native", "features"])
def test_generate_cli_applies_every_kind_of_adapter(peaked, native_dirs, tmp_path, capsys, kind):
    """`jaxft generate --adapter` prints what `generate` gives with the same trainable tree."""
    base = peaked
    prompt = "the quick brown fox"
    ids = base.tokenizer(prompt)["input_ids"]
    if kind == "prompt-workdir":
        adapter = _workdir(tmp_path / "run", base, *_trained(base, "prompt"))
    elif kind == "ia3-peft":
        config, trainable, spec = _trained(base, "ia3")
        adapter = hf_format.save(tmp_path / "peft", trainable, spec, base.cfg, base_model=str(base.path))
    elif kind == "prefix-native":
        adapter = native_dirs / "prefix"
    else:
        head = features.init_head(jax.random.PRNGKey(0), base.cfg.dim, 2)
        spec = features.FeatureSpec(layer=1, pool="mean", classes=("a", "b"), seq_len=16)
        adapter = _workdir(tmp_path / "run", base, _config(base, "features"), head, spec)
    args = ["generate", "--model", str(base.path), "--adapter", str(adapter), "--prompt", prompt,
            "--max-new-tokens", "6"]
    capsys.readouterr()
    if kind == "features":
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a features head classifies texts" in err
        return
    trainable, spec = load_adapter(adapter, base.cfg)
    run = functools.partial(generate, base.cfg, base.params, [ids], max_new_tokens=6,
                            eos_ids=[base.tokenizer.eos_token_id])
    want = run(trainable=trainable, peft=spec)[0]
    assert want != run()[0]  # the adapter changes the answer, so the check below means something
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip() == base.tokenizer.decode(want, skip_special_tokens=True).strip()
