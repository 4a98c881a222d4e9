"""Bad input for mixture-of-experts models through `jaxft train`: a checkpoint whose expert count or top-k
disagrees with its config, mesh.expert not dividing the experts, a LoRA target regex matching nothing, moe.*
keys on a dense model. Each ends in one line on stderr naming the file or key, exit code 1, nothing written.
Tiny random Mixtral / Llama models saved by transformers."""

import functools
import json
import sys
from pathlib import Path

import gguf
import pytest
import torch
import transformers

import tiny
from jaxft import cli
from jaxft.checkpoint import LoadError, load
from test_moe_gguf import gguf_tensors, write

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default_lora.py"


@functools.cache
def _mixtral(experts: int) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=len(tiny.tokenizer()), hidden_size=32, intermediate_size=24,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, num_local_experts=experts, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


def mixtral_dir(path: Path, experts: int = 4, layout: str = "per_expert", **config) -> Path:
    """A tiny Mixtral saved in `layout` (per_expert: save_pretrained; fused: transformers 5's in-memory
    `experts.gate_up_proj` stacks), its config.json then overwritten with `config`."""
    model = _mixtral(experts)
    if layout == "per_expert":
        model.save_pretrained(path)
    else:
        path.mkdir(parents=True)
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    tiny.tokenizer().save_pretrained(path)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, **config}))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_errors")
    return mixtral_dir(root / "moe"), tiny.llama_dir(root / "dense"), tiny.alpaca_file(root / "train.jsonl", 40)


def train_args(workdir, model, data, *extra):
    return ["train", "--config", str(CONFIG), "--workdir", str(workdir), f"--config.model={model}",
            f"--config.data.train={data}", "--config.train.steps=1", "--config.train.seq_len=32",
            "--config.train.batch_size=4", "--config.dtype=float32", *extra]


def fails(capsys, workdir, model, data, *extra) -> str:
    """`jaxft train` ends with exit code 1 and one line on stderr; nothing written, the inputs unchanged."""
    before = tiny.hashes(model, data)
    capsys.readouterr()
    assert cli.main(train_args(workdir, model, data, *extra)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxft train: error: "), err
    assert not Path(workdir).exists() and tiny.hashes(model, data) == before
    return err


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_count_disagreeing_with_config_json(tmp_path, setup, capsys, layout):
    data = setup[2]
    for config_says, on_disk in ((4, 8), (8, 4)):
        model = mixtral_dir(tmp_path / f"m{on_disk}", on_disk, layout, num_local_experts=config_says)
        err = fails(capsys, tmp_path / "w", model, data)
        shown = (f"experts.0 to model.layers.0.block_sparse_moe.experts.{on_disk - 1})" if layout == "per_expert"
                 else f"experts.down_proj of shape ({on_disk}, 32, 24))")
        assert err.startswith(f"jaxft train: error: {model / 'config.json'}: num_local_experts={config_says}, but "
                              f"{model / 'model.safetensors'} holds {on_disk} experts per layer (model.layers.0."), err
        assert shown in err


@pytest.mark.parametrize("top_k", [5, 0])
def test_top_k_outside_the_experts(tmp_path, setup, capsys, top_k):
    model = mixtral_dir(tmp_path / "m", num_experts_per_tok=top_k)
    err = fails(capsys, tmp_path / "w", model, setup[2])
    assert f"{model / 'config.json'}: num_experts_per_tok={top_k}, expected 1 <= num_experts_per_tok <= " \
           f"num_local_experts=4 (the experts each token is routed to)\n" in err


def test_top_k_outside_the_experts_of_a_gguf_file(tmp_path):
    path = write(tmp_path / "k.gguf", gguf_tensors(_mixtral(4)), 1e6, experts=4, used=6)
    with pytest.raises(LoadError, match=r"k\.gguf: llama\.expert_used_count=6, expected 1 <= "
                                        r"llama\.expert_used_count <= llama\.expert_count=4"):
        load(path)


def test_qwen2_moe_expert_count_is_num_experts(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path / "q")
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**hf, "num_experts": 6}))
    with pytest.raises(LoadError, match=r"q/config\.json: num_experts=6, but .*model\.safetensors holds 4 experts "
                                        r"per layer \(model\.layers\.0\.mlp\.experts\.0 to "):
        load(tmp_path / "q")


def test_lora_targets_matching_no_weight(tmp_path, setup, capsys):
    moe, dense, data = setup
    err = fails(capsys, tmp_path / "w", dense, data, "--config.lora.targets=.*experts.*")
    assert "lora.targets: '.*experts.*' matches no linear weight of the model (paths look like " in err
    err = fails(capsys, tmp_path / "w", moe, data, "--config.lora.targets=.*mlp/expert/.*")
    assert "lora.targets: '.*mlp/expert/.*' matches no linear weight of the model" in err
    # A regex naming the experts that also matches attention: refused on a dense model, not applied to the rest.
    err = fails(capsys, tmp_path / "w", dense, data, "--config.lora.targets=.*(q_proj|experts/gate_proj)/w")
    assert err == ("jaxft train: error: lora.targets: '.*(q_proj|experts/gate_proj)/w' names experts, but this llama "
                   "model has no experts/ weights (expected a mixture of experts, e.g. mixtral)\n")


@pytest.mark.parametrize("key,value", [("aux_loss_coef", 0.01), ("router_z_loss_coef", 0.001),
                                       ("capacity_factor", 1.5)])
def test_moe_keys_on_a_dense_model(tmp_path, setup, capsys, key, value):
    dense, data = setup[1:]
    err = fails(capsys, tmp_path / "w", dense, data, f"--config.moe.{key}={value}")
    assert err == (f"jaxft train: error: moe.{key}: {value} is for mixture-of-experts models, but {dense} is a dense "
                   "llama model (leave it None)\n")


def test_mesh_expert_not_dividing_the_experts(tmp_path, setup):
    """On 8 simulated devices: mesh.expert=8 for 4 experts fails before a weight is read or a file is written,
    naming the key, its value and the expert count."""
    moe, _, data = setup
    (tmp_path / "in.json").write_text(json.dumps([str(moe), str(data)]))
    got = tiny.on_simulated_devices(__file__, tmp_path / "out.json", devices=8)
    rc, made, line = got["expert=8"]
    assert (rc, made) == (1, False), got
    assert line == f"jaxft train: error: mesh.expert=8: does not divide the 4 experts of {moe} (expected a divisor of 4)\n"


def _main(out: str):
    """The __main__ of test_mesh_expert_not_dividing_the_experts: [exit code, workdir made, stderr] per case."""
    import contextlib
    import io

    cli._cache_compilations = lambda: None
    root = Path(out).parent
    model, data = json.loads((root / "in.json").read_text())
    results = {}
    for name, extra in {"expert=8": ["--config.mesh.expert=8", "--config.mesh.data=1"]}.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(train_args(root / name, model, data, *extra))
        results[name] = [rc, (root / name).exists(), err.getvalue().splitlines()[-1] + "\n"]
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1])
