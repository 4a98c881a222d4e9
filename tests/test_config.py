"""Configs: one base declares every key; config files and overrides change only declared keys; method-aware
defaults yield to what the user sets; `validate` names a wrong key and value in one line, fast, also through
the command line."""

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxft import backend, config as config_lib, peft, tasks
from jaxft.config import checks
from jaxft.peft import adapters, features, method as peft_method, prefix, prompt
from jaxft.quant import weight
from jaxft.tasks import heads, seq2seq, token_classification
from jaxft.train import build, optim

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
DEFAULT = ROOT / "configs" / "default_lora.py"


def _flat(config, prefix=""):
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
    return out


def test_the_base_declares_every_key_with_a_comment():
    keys = set(_flat(config_lib.base.get_config()))
    assert len(keys) == 120 and {"attention.impl", "guard.enabled", "guard.patience", "guard.loss_factor",
                                 "eval.metrics", "data.pair_field", "head.pool", "demo.train_examples"} <= keys
    source = (ROOT / "jaxft" / "config" / "base.py").read_text()
    assigned = re.findall(r"^    c\.(\w+(?:\.\w+)?) = (?!ml_collections\.ConfigDict)(.*)$", source, re.M)
    assert {k for k, _ in assigned} == keys
    assert [k for k, rest in assigned if "#" not in rest] == []  # every key says what it is


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_has_exactly_the_base_keys_and_validates(path):
    config = config_lib.load(path)
    assert set(_flat(config)) == set(_flat(config_lib.base.get_config()))
    with config.unlocked():  # (the ../shared data files are not part of the unit tests)
        for key in ("train", "eval", "train_target", "eval_target"):
            config.data[key] = ""
    config_lib.validate(config, require_data=False)


def test_config_files_may_only_set_declared_keys_of_their_type(tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text("from jaxft.config import base\ndef get_config():\n    c = base.get_config()\n"
                    "    c.train.stepz = 3\n    return c\n")
    with pytest.raises(config_lib.ConfigFileError, match=r"typo.py: no config key 'train.stepz' \(did you mean "
                                                         r"train.steps\?\); every key is declared in jaxft/config"):
        config_lib.load(typo)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict("
                     "{'train': {'steps': 'many'}})\n")
    with pytest.raises(config_lib.ConfigFileError, match=r"wrong.py: train.steps='many': expected int"):
        config_lib.load(wrong)
    # a file written from scratch sets only what it changes: the rest is the base's
    small = tmp_path / "small.py"
    small.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict("
                     "{'lora': {'rank': 4}})\n")
    config = config_lib.load(small)
    assert config.lora.rank == 4 and config.train.steps == 200 and config.guard.patience == 10


def test_method_defaults_yield_to_the_config_file_and_overrides(tmp_path):
    for method, defaults in config_lib.METHOD_DEFAULTS.items():
        config = config_lib.load(DEFAULT, [f"peft.method={method}"])
        assert config.train.learning_rate == defaults["train.learning_rate"]
        assert config_lib.sources(config)["train.learning_rate"] == f"method default for {method}"
    lrs = {m: d["train.learning_rate"] for m, d in config_lib.METHOD_DEFAULTS.items()}
    assert lrs["lora"] == 2e-4 and 1e-2 <= lrs["prompt"] <= 3e-2 and lrs["ia3"] == 3e-3 and lrs["prefix"] == 1e-2
    assert 1e-5 <= lrs["full"] <= 5e-5 and 1e-4 <= lrs["adapter"] <= 1e-3
    override = config_lib.load(DEFAULT, ["peft.method=prompt", "train.learning_rate=1e-3"])
    assert override.train.learning_rate == 1e-3
    assert config_lib.sources(override)["train.learning_rate"] == "override"
    demo = ROOT / "configs" / "demo_dates.py"  # sets 1e-3 for LoRA: the file wins over any method default
    filed = config_lib.load(demo, ["peft.method=prompt"])
    assert filed.train.learning_rate == 1e-3
    assert config_lib.describe(filed)[:2] == [
        "peft.method='prompt' (override)", f"train.learning_rate=0.001 (config file {demo})"]
    assert "train.steps=30 (config file" in "\n".join(config_lib.describe(filed))
    # a config file that extends another reads it without the method defaults, so they still apply to it
    child = tmp_path / "child.py"
    child.write_text(f"from jaxft import config as config_lib\ndef get_config():\n"
                     f"    c = config_lib.read({str(DEFAULT)!r})\n    c.peft.method = 'ia3'\n    return c\n")
    assert config_lib.load(child).train.learning_rate == 3e-3


def test_the_choices_validate_checks_are_those_the_code_accepts():
    c = checks.CHOICES
    assert c["task"] == tuple(tasks.TASKS)
    assert c["peft.method"] == peft.METHODS
    assert c["train.schedule"] == optim.SCHEDULES and c["train.layer_loop"] == backend.LAYER_LOOPS
    assert c["attention.impl"] == backend.ATTENTION_IMPLS and c["train.remat"] == backend.REMAT
    assert c["dtype"] == c["param_dtype"] == tuple(build.DTYPES)
    assert c["quant.format"] == ("none", *weight.FORMATS)
    assert c["adapter.placement"] == tuple(adapters.PLACEMENTS) and c["adapter.activation"] == peft_method.ACTIVATIONS
    assert set(c["prefix.init"]) == set(prefix.INITS) and set(c["prompt.init"]) == set(prompt.INITS)
    assert c["features.pool"] == features.POOLS and c["features.head"] == features.HEADS
    assert c["head.pool"] == heads.POOLS and c["data.tag_scheme"] == token_classification.SCHEMES
    assert checks.METRICS == seq2seq.METRICS


def test_no_config_lookup_with_a_fallback_default_in_jaxft():
    pattern = re.compile(r"config(\.\w+)*\.get\(|\"\w+\" (not )?in config\b|getattr\(config")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "jaxft").rglob("*.py") if p.parent.name != "config"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    return path


BAD = [
    ("train.schedule=cos", "train.schedule: 'cos' is not one of cosine, linear, constant"),
    ("dtype=float16", "dtype: 'float16' is not one of float32, bfloat16"),
    ("peft.method=dora", "peft.method: 'dora' is not one of lora, adapter, prefix, prompt, ia3, full, partial, "
                         "features"),
    ("task=summarize", "task: 'summarize' is not one of causal_lm, seq2seq"),
    ("task=embedding", "data.pair_field: '' is empty: task 'embedding' reads this field"),
    ("train.steps=-3", "train.steps: -3 must be >= 0"),
    ("train.batch_size=0", "train.batch_size: 0 must be a positive integer"),
    ("train.save_every=0", "train.save_every: 0 must be a positive integer"),
    ("train.eval_every=-1", "train.eval_every: -1 must be >= 0"),
    ("train.log_every=0", "train.log_every: 0 must be a positive integer"),
    ("train.learning_rate=-0.001", "train.learning_rate: -0.001 must be a number > 0"),
    ("train.learning_rate=0", "train.learning_rate: 0.0 must be a number > 0"),
    ("train.grad_accum=3", "train.batch_size: 8 is not a multiple of train.grad_accum=3"),
    ("mesh.fsdp=3", "train.batch_size: 8 is not a multiple of train.grad_accum=1 * the mesh's data-parallel size 3"),
    ("train.layer_loop=rolled", "train.layer_loop: 'rolled' is not one of auto, scan, unroll"),
    ("guard.patience=0", "guard.patience: 0 must be a positive integer"),
    ("guard.loss_factor=0.5", "guard.loss_factor: 0.5 must be > 1"),
    ("lora.dropout=1.0", "lora.dropout: 1.0 must be in [0, 1)"),
    ("lora.rank=0", "lora.rank: 0 must be a positive integer"),
    ("lora.targets=layers/(attn", "lora.targets: 'layers/(attn' is not a valid regex"),
    ("adapter.placement=middle", "adapter.placement: 'middle' is not one of houlsby, pfeiffer"),
    ("prompt.init=text", "prompt.init: 'text' needs prompt.init_text"),
    ("train.l2sp=0.1", "train.l2sp: 0.1 needs peft.method full or partial"),
    ("data.eval=missing.jsonl", "data.eval: 'missing.jsonl' does not exist"),
    ("data.train=", "data.train: '' is empty: name the training file"),
    ("quant.format=int8", "quant.format: 'int8' is not one of none, nf4, int4"),
    ("attention.impl=flash", "attention.impl: 'flash' is not one of auto, xla, chunked, splash, cudnn"),
    ("attention.block_q=96", "attention.block_q: 96 does not divide train.seq_len=256"),
    ("train.remat=yes", "train.remat: 'yes' is not one of auto, true, false"),
    ("mesh.context=3", "mesh.context: 3 does not divide train.seq_len=256"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_validate_names_the_key_and_the_value_in_one_line_fast(data, override, message):
    extra = ["peft.method=prompt"] if override.startswith("prompt.") else []
    extra += ["attention.impl=chunked"] if override.startswith("attention.block") else []  # auto fits its blocks
    config = config_lib.load(DEFAULT, [f"data.train={data}", *extra, override])
    start = time.perf_counter()
    with pytest.raises(config_lib.ConfigFileError) as e:
        config_lib.validate(config)
    assert time.perf_counter() - start < 0.5
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_validate_checks_the_mesh_against_the_devices(data):
    config = config_lib.load(DEFAULT, [f"data.train={data}", "mesh.data=2", "mesh.fsdp=2"])
    config_lib.validate(config)  # 2 * 2 divides the batch of 8; the devices are not known yet
    with pytest.raises(config_lib.ConfigFileError, match=r"^mesh.data: 2 \* mesh.fsdp=2 \* mesh.context=1 \* "
                                                         r"mesh.tensor=1 is not the 8 devices"):
        config_lib.validate(config, devices=8)
    spread = config_lib.load(DEFAULT, [f"data.train={data}", "mesh.tensor=2", "train.batch_size=6"])
    config_lib.validate(spread, devices=2)  # data = 2 / 2 = 1
    with pytest.raises(config_lib.ConfigFileError, match=r"^train.batch_size: 6 is not a multiple .* size 4"):
        config_lib.validate(spread, devices=8)  # data = 8 / 2 = 4
    fsdp = config_lib.load(DEFAULT, [f"data.train={data}", "mesh.data=1", "mesh.fsdp=-1"])
    config_lib.validate(fsdp, devices=8)  # any one axis may take the rest
    with pytest.raises(config_lib.ConfigFileError, match=r"^mesh: \(-1, -1, 1, 1\) has more than one axis of size -1"):
        config_lib.validate(config_lib.load(DEFAULT, [f"data.train={data}", "mesh.fsdp=-1"]))
    with pytest.raises(config_lib.ConfigFileError, match=r"^mesh.tensor: 0 must be a positive integer, or -1"):
        config_lib.validate(config_lib.load(DEFAULT, [f"data.train={data}", "mesh.tensor=0"]))


def test_validate_checks_the_attention_kernel_against_the_backend(data):
    """Known once the devices are (here the CPU): splash needs a TPU or interpret mode, cudnn a GPU."""
    splash = config_lib.load(DEFAULT, [f"data.train={data}", "attention.impl=splash"])
    config_lib.validate(splash)  # the backend is not known yet
    with pytest.raises(config_lib.ConfigFileError, match=r"^attention.impl: 'splash' needs a TPU \(the backend is "
                                                         r"cpu\); use chunked, or attention.interpret=True"):
        config_lib.validate(splash, devices=1)
    config_lib.validate(config_lib.load(DEFAULT, [f"data.train={data}", "attention.impl=splash",
                                                  "attention.interpret=True"]), devices=1)
    with pytest.raises(config_lib.ConfigFileError, match=r"^attention.impl: 'cudnn' needs an NVIDIA GPU \(the "
                                                         r"backend is cpu\)"):
        config_lib.validate(config_lib.load(DEFAULT, [f"data.train={data}", "attention.impl=cudnn"]), devices=1)


def test_train_validates_and_logs_the_settings_in_force_before_anything_loads(data, tmp_path, caplog):
    from jaxft.train.loop import train

    config = config_lib.load(DEFAULT, [f"data.train={data}", "peft.method=ia3", f"model={tmp_path / 'none'}"])
    with caplog.at_level(logging.INFO, logger="jaxft"):
        with pytest.raises(Exception):  # the model does not exist: the settings were logged before that
            train(config, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config: ")]
    assert lines[:2] == ["config: peft.method='ia3' (override)",
                         "config: train.learning_rate=0.003 (method default for ia3)"]
    bad = config_lib.load(DEFAULT, [f"data.train={data}", "train.schedule=cos"])
    with pytest.raises(config_lib.ConfigFileError, match="^train.schedule: 'cos'"):
        train(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.parametrize("override, message", [BAD[0], BAD[5], BAD[13]], ids=["schedule", "steps", "mesh"])
def test_the_command_line_refuses_a_bad_value_in_one_line_before_loading(data, tmp_path, override, message):
    start = time.perf_counter()
    out = _cli("train", "--config", str(DEFAULT), "--workdir", str(tmp_path / "run"), f"--config.data.train={data}",
               f"--config.{override}")
    seconds = time.perf_counter() - start
    assert out.returncode == 1 and out.stderr.startswith(f"jaxft train: error: {message}")
    assert out.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
    assert seconds < 10, seconds  # before JAX is imported: no model or data is loaded


def test_version_and_train_help():
    from importlib.metadata import version

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"jaxft {version('jaxft')}"
    text = _cli("train", "--help").stdout
    assert "jaxft/config/base.py" in text and "jaxft/config/defaults.py" in text
    for group in ("data", "train", "guard", "eval", "lora", "prompt", "mesh"):
        assert re.search(rf"^  {group} +\w", text, re.M), group


def test_demo_and_eval_validate_too(tmp_path):
    demo = _cli("demo", "--workdir", str(tmp_path / "demo"), "--config.train.warmup_steps=-1")
    assert demo.returncode == 1 and demo.stderr == "jaxft demo: error: train.warmup_steps: -1 must be >= 0\n"
    assert not (tmp_path / "demo").exists()
    ev = _cli("eval", "--config", str(DEFAULT), "--workdir", str(tmp_path / "run"), "--config.head.pool=max")
    assert ev.returncode == 1 and ev.stderr == ("jaxft eval: error: head.pool: 'max' is not one of default, cls, "
                                                "mean, last\n")
