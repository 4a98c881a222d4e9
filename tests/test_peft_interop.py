"""Adapters between jaxft and HF PEFT / transformers: PEFT export and import with equal logits (LoRA, rsLoRA,
DoRA), merged export loaded by transformers, an adapter trained on the default model kept bit for bit, and
the inputs that must be refused without writing anything."""

import dataclasses
import functools
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import tiny
from jaxft import checkpoint, cli, tree
from jaxft.export import AdapterError, export_merged, export_peft, load_adapter
from jaxft.models import llama
from jaxft.peft import hf_format, lora
from jaxft.peft import io as adapter_io

TOKENS = np.random.RandomState(0).randint(0, 300, (2, 12))
SPECS = {"lora": lora.LoraSpec(rank=4, alpha=8), "rslora": lora.LoraSpec(rank=4, alpha=8, rslora=True),
         "dora": lora.LoraSpec(rank=4, alpha=8, dora=True)}
HF_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return checkpoint.load(tiny.llama_dir(tmp_path_factory.mktemp("tiny") / "model"))


def _trained(base, spec, targets="all-linear", seed=1):
    """A LoRA tree as after training: random A, B and (DoRA) magnitudes near the base's column norms."""
    rng = np.random.RandomState(seed)
    flat, t = tree.flatten(base.params), {}
    for path in lora.target_paths(base.params, targets):
        (n_layers, d_in, d_out), module = flat[path].shape, path.rsplit("/", 1)[0]
        t[f"{module}/lora_a"] = 0.3 * rng.randn(n_layers, d_in, spec.rank)
        t[f"{module}/lora_b"] = 0.1 * rng.randn(n_layers, spec.rank, d_out)
        if spec.dora:
            t[f"{module}/magnitude"] = np.linalg.norm(flat[path], axis=-2) * (1 + 0.2 * rng.randn(n_layers, d_out))
    return tree.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in t.items()})


def _workdir(path, base, trainable, spec, init="kaiming"):
    """A finished run's workdir as `jaxft train` leaves it: config.json and adapter/."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": str(base.path), "lora": {"init": init}}))
    run = types.SimpleNamespace(peft=types.SimpleNamespace(method="lora"),
                                lora=types.SimpleNamespace(targets="all-linear"))
    adapter_io.save(path / "adapter", trainable, spec, run, base.path)
    return path


def _jaxft_logits(base, params=None, trainable=None, spec=None):
    return np.asarray(_forward(base.cfg, base.params if params is None else params, trainable, spec))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(cfg, params, trainable, spec):
    return llama.forward(cfg, params, jnp.asarray(TOKENS), trainable=trainable, lora=spec)[0]


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_export_loads_in_peft_with_equal_logits(base, tmp_path, variant, capsys):
    spec = SPECS[variant]
    trainable = _trained(base, spec)
    init = "gaussian" if variant == "rslora" else "kaiming"  # lora.init of the run, which PEFT records
    workdir = _workdir(tmp_path / "run", base, trainable, spec, init)
    out = tmp_path / "peft"
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    model = peft.PeftModel.from_pretrained(_hf(base.path), str(out)).eval()
    ours = _jaxft_logits(base, trainable=trainable, spec=spec)
    assert np.abs(ours - _jaxft_logits(base)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(_torch_logits(model), ours, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).encode("the quick fox") == \
        base.tokenizer.encode("the quick fox")

    # The same files PEFT writes for the same adapter: tensor names and shapes, config values.
    native = peft.get_peft_model(_hf(base.path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=HF_MODULES, use_rslora=spec.rslora, use_dora=spec.dora,
        init_lora_weights="gaussian" if init == "gaussian" else True, task_type="CAUSAL_LM"))
    native.save_pretrained(tmp_path / "native")
    ref = {k: v.shape for k, v in load_file(str(tmp_path / "native" / hf_format.WEIGHTS)).items()}
    assert {k: v.shape for k, v in load_file(str(out / hf_format.WEIGHTS)).items()} == ref
    ours_cfg = json.loads((out / hf_format.CONFIG).read_text())
    ref_cfg = json.loads((tmp_path / "native" / hf_format.CONFIG).read_text())
    for key, value in ours_cfg.items():
        expected = sorted(ref_cfg[key]) if key == "target_modules" else ref_cfg[key]
        if key != "base_model_name_or_path":
            assert value == expected, key
    assert ours_cfg["base_model_name_or_path"] == str(base.path.resolve())


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_saved_adapter_imports_with_equal_logits(base, tmp_path, variant):
    torch.manual_seed(0)
    spec = SPECS[variant]
    model = peft.get_peft_model(_hf(base.path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=spec.rslora,
        use_dora=spec.dora, lora_dropout=0.1, task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")

    trainable, loaded_spec = load_adapter(tmp_path / "peft", base.cfg)
    assert loaded_spec == lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1, rslora=spec.rslora, dora=spec.dora)
    assert sorted(tree.flatten(trainable)) == sorted(
        f"layers/{m}/{leaf}" for m in ("attn/q_proj", "attn/v_proj", "mlp/down_proj")
        for leaf in ("lora_a", "lora_b") + (("magnitude",) if spec.dora else ()))
    ref = _torch_logits(model)
    np.testing.assert_allclose(_jaxft_logits(base, trainable=trainable, spec=loaded_spec), ref, atol=1e-4)
    if variant == "dora":  # and merged by jaxft onto the base PEFT recorded: what transformers computes, alone
        assert cli.main(["export", "--adapter", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged"),
                         "--dtype", "float32"]) == 0
        np.testing.assert_allclose(_torch_logits(_hf(tmp_path / "merged")), ref, atol=1e-4)


def test_merged_export_loads_in_transformers(base, tmp_path, capsys):
    spec = SPECS["dora"]
    trainable = _trained(base, spec)
    workdir = _workdir(tmp_path / "run", base, trainable, spec)
    out = tmp_path / "merged"
    assert cli.main(["export", "--workdir", str(workdir), "--merged", str(out), "--dtype", "float32",
                     "--max-shard-gb", str(20_000 / 2**30)]) == 0
    assert (out / "model.safetensors.index.json").is_file()  # sharded: the tensors pass 20 kB
    merged = checkpoint.load(out).params
    hf = _hf(out)
    np.testing.assert_allclose(_torch_logits(hf), _jaxft_logits(base, merged), atol=1e-4)
    np.testing.assert_allclose(_jaxft_logits(base, merged), _jaxft_logits(base, trainable=trainable, spec=spec),
                               atol=1e-4)

    from jaxft.generate import generate

    prompts = [list(TOKENS[0, :5]), list(TOKENS[1, :7])]
    ours = generate(base.cfg, merged, prompts, max_new_tokens=8)
    for prompt, new in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist()
    assert transformers.AutoTokenizer.from_pretrained(str(out)).encode("seven owls") == \
        base.tokenizer.encode("seven owls")


def test_merged_export_from_quantized_base(base, tmp_path):
    """QLoRA: the adapter was trained over the NF4 weights; the merge is onto their dequantized values."""
    from jaxft import quant

    leaf_fn = quant.leaf_fn("nf4", block_size=16, dense_dtype=None)
    qbase = checkpoint.load(base.path, leaf_fn=leaf_fn)
    spec = SPECS["lora"]
    trainable = _trained(base, spec)
    out = export_merged(_workdir(tmp_path / "run", base, trainable, spec), tmp_path / "merged",
                        dtype=jnp.float32, leaf_fn=leaf_fn)
    adapted = _jaxft_logits(base, qbase.params, trainable, spec)
    np.testing.assert_allclose(_torch_logits(_hf(out)), adapted, atol=1e-4)
    assert np.abs(adapted - _jaxft_logits(base, trainable=trainable, spec=spec)).max() > 1e-3  # NF4 mattered


def test_default_model_adapter_round_trip_bit_for_bit(default_model_path, tmp_path, monkeypatch):
    """Two train steps on the default model, then jaxft -> PEFT -> jaxft: the very same bits."""
    from jaxft.checkpoint import gguf
    from jaxft.train.step import init_state, make_train_step

    # The GGUF tokenizer takes transformers seconds to convert and plays no part here (the tiny models' tests
    # cover the tokenizer saved beside an adapter).
    monkeypatch.setattr(gguf, "tokenizer", lambda *_: None)
    model = checkpoint.load(default_model_path)
    spec = lora.LoraSpec(rank=4, alpha=8, rslora=True)
    trainable = lora.init(jax.random.PRNGKey(0), model.params, spec, lora.target_paths(model.params, "default"))
    optimizer = optax.adam(1e-2)

    def forward(base_, trainable_, mb, rng):
        return llama.forward(model.cfg, base_, mb["tokens"], trainable=trainable_, lora=spec, rng=rng)[0]

    step = jax.jit(make_train_step(forward, optimizer))
    tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (1, 2, 33))
    batch = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": np.ones((1, 2, 32)),
             "segment_ids": np.ones((1, 2, 32), np.int32), "positions": np.broadcast_to(np.arange(32), (1, 2, 32))}
    state = init_state(trainable, optimizer, jax.random.PRNGKey(1))
    for _ in range(2):
        state, _ = step(state, model.params, batch)
    trained = tree.flatten(state["trainable"])
    assert all(np.abs(np.asarray(x)).max() > 0 for p, x in trained.items() if p.endswith("lora_b"))

    out = hf_format.save(tmp_path / "peft", state["trainable"], spec, model.cfg, base_model="default")
    back, back_spec = load_adapter(out, model.cfg)
    assert back_spec == spec
    back = tree.flatten(back)
    assert sorted(back) == sorted(trained)
    for path, x in trained.items():
        assert back[path].dtype == np.float32 and np.array_equal(np.asarray(back[path]), np.asarray(x)), path
    assert peft.PeftConfig.from_pretrained(str(out)).r == 4


# --- what must be refused -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    """A PEFT-saved LoRA adapter (q_proj, v_proj) of the tiny model."""
    path = tmp_path_factory.mktemp("adapter") / "peft"
    model = peft.get_peft_model(_hf(base.path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    model.save_pretrained(path)
    return path


def _edited_copy(peft_dir, tmp_path, config=None, tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    conf = json.loads((peft_dir / hf_format.CONFIG).read_text())
    (out / hf_format.CONFIG).write_text(json.dumps({**conf, **(config or {})}))
    arrays = load_file(str(peft_dir / hf_format.WEIGHTS))
    save_file(tensors(arrays) if tensors else arrays, str(out / hf_format.WEIGHTS))
    return out


@pytest.mark.parametrize("edit, message", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
    ({"bias": "all"}, "bias='all'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=true is not supported"),
    ({"layers_to_transform": [0]}, "layers_to_transform=[0] is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern="),
    ({"alpha_pattern": {"v_proj": 32}}, "alpha_pattern="),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save="),
    ({"lora_bias": True}, "lora_bias=true"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"task_type": "SEQ_CLS"}, "task_type 'SEQ_CLS'"),
    ({"some_future_option": {"on": 1}}, "some_future_option="),
    ({"use_dora": True}, "missing tensors base_model.model.model.layers.{0,1}.self_attn.q_proj.lora_magnitude_vector"),
    ({"r": 8}, "has shape (2, 32, 4), but a rank-8 adapter of this base needs (2, 32, 8)"),
])
def test_unsupported_peft_config_is_refused(base, peft_dir, tmp_path, edit, message):
    with pytest.raises(AdapterError, match=r"adapter_(config\.json|model\.safetensors): .*" + re.escape(message)):
        load_adapter(_edited_copy(peft_dir, tmp_path, config=edit), base.cfg)


@pytest.mark.parametrize("tensors, message", [
    (lambda a: {k: v for k, v in a.items() if ".layers.1.self_attn.v_proj.lora_A" not in k},
     "missing tensors base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"),
    (lambda a: {**a, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)},
     "unexpected tensors base_model.model.lm_head.lora_A.weight"),
    (lambda a: {**a, "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": np.zeros(32, np.float32)},
     "unexpected tensors base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"),
])
def test_unexpected_or_missing_peft_tensors_are_refused(base, peft_dir, tmp_path, tensors, message):
    with pytest.raises(AdapterError, match=re.escape(message)):
        load_adapter(_edited_copy(peft_dir, tmp_path, tensors=tensors), base.cfg)


def test_adapter_for_another_base_is_refused(base, peft_dir, tmp_path, capsys):
    wider = dataclasses.replace(base.cfg, dim=64, n_heads=8, n_kv_heads=4)
    with pytest.raises(AdapterError, match=r"layers/attn/q_proj/lora_a has shape \(2, 32, 4\), but a rank-4 "
                                           r"adapter of this base needs \(2, 64, 4\): it was made for another model"):
        load_adapter(peft_dir, wider)
    deeper = dataclasses.replace(base.cfg, n_layers=3, layer_windows=())
    with pytest.raises(AdapterError, match=r"missing tensors .*layers.2.self_attn.q_proj.lora_A.weight"):
        load_adapter(peft_dir, deeper)
    # A jaxft workdir made on the tiny model, exported against another base given with --model.
    spec = SPECS["lora"]
    workdir = _workdir(tmp_path / "run", base, _trained(base, spec), spec)
    other_dir = tmp_path / "other"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(other_dir)
    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(workdir), "--model", str(other_dir), "--peft",
                     str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxft export: error: ") and "made for another model" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_and_failed_writes_leave_nothing_behind(base, tmp_path, capsys):
    spec = SPECS["lora"]
    trainable = _trained(base, spec)
    workdir = _workdir(tmp_path / "run", base, trainable, spec)
    out = tmp_path / "exports" / "peft"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    for flag in ("--peft", "--merged"):
        assert cli.main(["export", "--workdir", str(workdir), flag, str(out)]) == 1
        err = capsys.readouterr().err
        assert "exists and is not empty" in err and "--overwrite" in err
        assert sorted(p.name for p in out.parent.iterdir()) == ["peft"] and (out / "keep.txt").is_file()
    with pytest.raises(FileExistsError):
        export_peft(workdir, out)
    # --merged checked before --peft is written: nothing at all is written.
    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(tmp_path / "new"), "--merged",
                     str(out)]) == 1
    assert not (tmp_path / "new").exists()

    assert cli.main(["export", "--workdir", str(workdir), "--peft", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / hf_format.CONFIG).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["peft"]

    class Failing:  # the last step of a write fails: no directory, no temporary left
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hf_format.save(tmp_path / "exports" / "broken", trainable, spec, base.cfg, base_model="x",
                       tokenizer=Failing())
    assert sorted(p.name for p in out.parent.iterdir()) == ["peft"]


def test_bad_sources_are_one_line_errors(base, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "unfinished"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": str(base.path)}))
    cases = [(["--adapter", str(tmp_path / "missing"), "--model", str(base.path)], "no such directory"),
             (["--adapter", str(tmp_path / "empty"), "--model", str(base.path)], "not an adapter"),
             (["--workdir", str(run)], "has not finished"),
             (["--adapter", str(tmp_path / "empty")], "not a training workdir")]
    for args, message in cases:
        assert cli.main(["export", *args, "--peft", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert cli.main(["export", "--adapter", str(tmp_path / "empty")]) == 1
    assert "nothing to do" in capsys.readouterr().err


def test_generate_cli_applies_a_peft_adapter(tmp_path, capsys):
    """`jaxft generate --adapter PEFT_DIR` prints what the API generates with the same adapter."""
    import tiny
    from jaxft import checkpoint, cli
    from jaxft.generate import generate
    from jaxft.peft import hf_format, lora as lora_lib

    model_dir = tiny.llama_dir(tmp_path / "model")
    loaded = checkpoint.load(model_dir)
    spec = lora_lib.LoraSpec(rank=4, alpha=8)
    trainable = lora_lib.init(jax.random.PRNGKey(0), loaded.params, spec,
                              lora_lib.target_paths(loaded.params, "all-linear"))
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), trainable)
    hf_format.save(tmp_path / "peft", trainable, spec, loaded.cfg, base_model=str(model_dir))
    ids = loaded.tokenizer("the quick brown fox")["input_ids"]
    want = generate(loaded.cfg, loaded.params, [ids], max_new_tokens=6, trainable=trainable, lora=spec)[0]
    plain = generate(loaded.cfg, loaded.params, [ids], max_new_tokens=6)[0]
    assert want != plain  # the adapter changes the answer, so the CLI check below means something
    assert cli.main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "peft"),
                     "--prompt", "the quick brown fox", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == loaded.tokenizer.decode(want, skip_special_tokens=True).strip()
