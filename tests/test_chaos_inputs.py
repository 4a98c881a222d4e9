"""Chaos, bad inputs: every file jaxft cannot use ends `jaxft train` in one line on stderr that names the file
(and line or field), exit code 1, and no file of the user's changed."""

import errno
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

import tiny
from jaxft import cli
from jaxft.data import DataError, formats, read_records
from jaxft.data.sources import Record
from jaxft.export import _base_of
from jaxft.train import workdir as workdir_lib

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default_lora.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return tiny.llama_dir(root / "model"), tiny.alpaca_file(root / "train.jsonl", 40)


def fails(capsys, args, *user_files) -> str:
    """Runs the command line; asserts exit code 1, one line on stderr, and `user_files` unchanged."""
    before = tiny.hashes(*user_files)
    capsys.readouterr()
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"jaxft {args[0]}: error: "), err
    assert tiny.hashes(*user_files) == before
    return err


def train_args(workdir, model, data, *extra):
    return ["train", "--config", str(CONFIG), "--workdir", str(workdir), f"--config.model={model}",
            f"--config.data.train={data}", "--config.train.steps=2", "--config.train.seq_len=32",
            "--config.train.batch_size=4", "--config.dtype=float32", *extra]


def test_damaged_model_files(setup, tmp_path, capsys):
    model, data = setup
    cut = tmp_path / "cut"
    shutil.copytree(model, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    err = fails(capsys, train_args(tmp_path / "w", cut, data), cut, data)
    assert f"{cut / 'model.safetensors'}: truncated: its header describes {len(weights)} bytes" in err
    (cut / "model.safetensors").write_bytes(weights[:40])
    assert "truncated inside its header" in fails(capsys, train_args(tmp_path / "w", cut, data), cut, data)

    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_')
    assert f"{bad / 'config.json'}: not valid JSON" in fails(capsys, train_args(tmp_path / "w", bad, data), bad)
    (bad / "config.json").write_text("[]")
    assert "expected a JSON object, got list" in fails(capsys, train_args(tmp_path / "w", bad, data), bad)

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(whole[:60])  # inside the key-value header
    err = fails(capsys, train_args(tmp_path / "w", tmp_path / "m.gguf", data), tmp_path / "m.gguf")
    assert f"{tmp_path / 'm.gguf'}: a truncated or damaged GGUF file (60 bytes" in err
    assert not (tmp_path / "w").exists()  # nothing written for runs that could not start


def test_data_field_of_the_wrong_type(setup, tmp_path, capsys):
    model, _ = setup
    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "a", "output": 7}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = fails(capsys, train_args(tmp_path / "w", model, data), data)
    assert f"{data}:4: field 'output' is a number here but a string in earlier records" in err
    chats = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}] * 2
    chats.append({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": {"a": 1}}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in chats))
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'messages\[1\].content' is an object here but a "
                                        r"string in earlier records"):
        read_records(data)


def test_records_above_the_bound_are_skipped_before_tokenizing():
    tok = tiny.tokenizer()
    seen = []

    class Spy:  # the tokenizer, recording the longest string it is given
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, texts, **kwargs):
            seen.append(max(map(len, [texts] if isinstance(texts, str) else texts)))
            return tok(texts, **kwargs)

    big = {"instruction": "hi", "input": "", "output": "fox " * 600}  # 2400 bytes
    records = [Record(big, "f.jsonl:1"), Record({"instruction": "hi", "input": "", "output": "dog"}, "f.jsonl:2")]
    small = formats.tokenize_records(records, "alpaca", Spy(), 32, max_record_bytes=1000)
    assert small.skipped_oversized == 1 and len(small) == 1 and max(seen) < 1000
    whole = formats.tokenize_records(records[1:], "alpaca", tok, 32)
    np.testing.assert_array_equal(small.ids, whole.ids)
    # A text document above the bound is tokenized in pieces, to the same tokens.
    seen.clear()
    doc = [Record({"text": " ".join(tiny.WORDS[i % 20] for i in range(900))}, "t.txt:1")]
    pieces = formats.tokenize_records(doc, "text", Spy(), 32, max_record_bytes=1000)
    assert max(seen) <= 250 and pieces.skipped_oversized == 0
    np.testing.assert_array_equal(pieces.ids, formats.tokenize_records(doc, "text", tok, 32).ids)


def test_unusable_workdir(setup, tmp_path, capsys, monkeypatch):
    model, data = setup
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    err = fails(capsys, train_args(run, model, data, "--resume"), run)
    assert f"{run / 'config.json'}: not valid JSON" in err
    # Read-only (injected: the tests may run as root, which permissions do not stop).
    with monkeypatch.context() as m:
        m.setattr(workdir_lib.os, "access", lambda path, mode: False)
        err = fails(capsys, train_args(tmp_path / "ro" / "run", model, data), tmp_path)
    assert f"{tmp_path}: not writable" in err and not (tmp_path / "ro").exists()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "config.json"))
    monkeypatch.setattr(workdir_lib, "commit", full)
    err = fails(capsys, train_args(tmp_path / "full", model, data), data)
    assert f"{tmp_path / 'full' / 'config.json'}: No space left on device" in err


def test_export_takes_the_base_the_adapter_was_trained_on(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (tmp_path / "trained").mkdir()
    (run / "config.json").write_text(json.dumps({"model": str(tmp_path / "other")}))
    (run / "adapter" / "adapter.json").write_text(json.dumps({"model": str(tmp_path / "trained")}))
    assert _base_of(run, None)[0] == str(tmp_path / "trained")
    assert _base_of(run, "given")[0] == "given"
    (run / "config.json").write_text(json.dumps({"model": str(tmp_path / "trained")}))
    assert _base_of(run, None)[0] == str(tmp_path / "trained")
