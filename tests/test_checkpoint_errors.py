"""Every checkpoint jaxft cannot load fails with a LoadError whose one-line message names the file and the
tensors or field at fault."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxft import checkpoint
from jaxft.checkpoint import LoadError

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A loadable tiny Llama directory, and its tensors as numpy arrays."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path, load_file(path / "model.safetensors")


def variant(good, tmp_path, tensors=None, config=None):
    """A copy of the good directory with other tensors and/or config fields."""
    path, good_tensors = good
    out = tmp_path / "model"
    shutil.copytree(path, out)
    if tensors is not None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        hf = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**hf, **config}))
    return out


def load_error(path) -> str:
    with pytest.raises(LoadError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_checkpoint_loads(good):
    assert checkpoint.load(good[0]).cfg.n_layers == 2


def test_path_does_not_exist(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "no such file or directory" in message


def test_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "not a model directory or a .gguf file" in load_error(tmp_path / "weights.bin")
    assert "config.json" in load_error(tmp_path)  # a directory without one


def test_unknown_model_type(good, tmp_path):
    message = load_error(variant(good, tmp_path, config={"model_type": "gpt2"}))
    assert "config.json" in message and "model_type 'gpt2'" in message


def test_missing_tensors_are_listed(good, tmp_path):
    tensors = dict(good[1])
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]:
        del tensors[name]
    message = load_error(variant(good, tmp_path, tensors=tensors))
    assert "model.safetensors" in message and "missing tensors" in message
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.layers.{0,1}.mlp.up_proj.weight",
                 "model.norm.weight"]:
        assert name in message
    assert "unexpected" not in message


def test_unexpected_tensors_are_listed(good, tmp_path):
    extra = {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32),  # no attention_bias in config
             "model.layers.1.self_attn.q_proj.bias": np.zeros(64, np.float32),
             "vision_tower.patch_embed.weight": np.zeros((4, 4), np.float32)}
    message = load_error(variant(good, tmp_path, tensors={**good[1], **extra}))
    assert "unexpected tensors" in message and "missing" not in message
    assert "model.layers.{0,1}.self_attn.q_proj.bias" in message and "vision_tower.patch_embed.weight" in message


def test_shape_that_does_not_match_the_config(good, tmp_path):
    message = load_error(variant(good, tmp_path, config={"intermediate_size": 80}))
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "(96, 64)" in message and "expected (80, 64)" in message


def test_missing_shard(good, tmp_path):
    path = variant(good, tmp_path)
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors" for name in good[1]}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = load_error(path)
    assert "model-00002-of-00002.safetensors" in message and "model.norm.weight" in message


def test_no_safetensors(good, tmp_path):
    path = variant(good, tmp_path)
    (path / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error(path)


def test_save_hf_refuses_mismatched_params(good, tmp_path):
    loaded = checkpoint.load(good[0])
    params = {**loaded.params, "extra": {"w": np.zeros(3)}}
    with pytest.raises(ValueError, match="extra/w"):
        checkpoint.save_hf(loaded.cfg, params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_malformed_config_field(good, tmp_path):
    message = load_error(variant(good, tmp_path, config={"rope_scaling": {"rope_type": "llama3"}}))
    assert "config.json" in message and "factor" in message
