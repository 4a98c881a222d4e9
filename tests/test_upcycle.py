"""`jaxft upcycle`: a dense model as a Mixtral directory whose logits, loaded by transformers' MixtralForCausalLM,
equal the dense LlamaForCausalLM's / MistralForCausalLM's (float32, tiny random models)."""

import copy
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import tiny
from jaxft import checkpoint, cli
from jaxft.checkpoint import hf as jaxft_hf
from jaxft.models import mixtral
from jaxft.upcycle import upcycle

TOKENS = torch.tensor([[5, 17, 40, 3, 99, 120, 7, 8, 250, 31, 64, 2], [9, 9, 200, 13, 1, 77, 150, 42, 6, 5, 4, 3]])


def dense_dir(path, *, tie: bool, model_type: str = "llama", window: int | None = None, seed: int = 0):
    """A 2-layer random dense model with the tiny tokenizer, weights large enough (initializer 0.2, random
    norms) that the MLP moves the logits by far more than the tolerance; returns (model in eval mode, path)."""
    tok = tiny.tokenizer()
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, tie_word_embeddings=tie)
    if model_type == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=window, **kw))
    elif model_type == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return model, path


def tensors_of(path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    return {name: x for f in files for name, x in load_file(str(f)).items()}


CASES = {  # name: (dense model, experts, top_k, router noise, max shard bytes)
    "tied-zero-router": (dict(tie=True), 4, 2, 0.0, 2**30),
    "untied-noise-top1-sharded": (dict(tie=False), 3, 1, 0.5, 30_000),
    "mistral-window-noise-all-experts": (dict(tie=False, model_type="mistral", window=4), 4, 4, 0.1, 2**30),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixtral_logits_equal_the_dense_models(tmp_path, case):
    dense_kw, experts, top_k, noise, shard = CASES[case]
    dense, path = dense_dir(tmp_path / "dense", **dense_kw)
    out = tmp_path / "moe"
    done = upcycle(path, out, experts=experts, top_k=top_k, dtype=jnp.float32, router_noise=noise, seed=3,
                   max_shard_bytes=shard)
    assert done["out"] == out and (out / jaxft_hf.INDEX).is_file() == (shard < 2**20)

    # The published per-expert layout: every dense MLP tensor E times under Mixtral's names, plus a router.
    dense_sd = {k: v.numpy() for k, v in dense.state_dict().items()}
    written = tensors_of(out)
    for i in range(2):
        moe = f"model.layers.{i}.block_sparse_moe"
        for dense_name, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            for e in range(experts):
                np.testing.assert_array_equal(written[f"{moe}.experts.{e}.{w}.weight"],
                                              dense_sd[f"model.layers.{i}.mlp.{dense_name}.weight"])
        assert written[f"{moe}.gate.weight"].shape == (experts, 32)
        assert (written[f"{moe}.gate.weight"] == 0).all() == (noise == 0)
    assert not [k for k in written if ".mlp." in k]
    assert ("lm_head.weight" in written) != dense_kw["tie"]
    hf = json.loads((out / "config.json").read_text())
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["architectures"]) == \
        (experts, top_k, ["MixtralForCausalLM"])
    assert hf["sliding_window"] == dense_kw.get("window")

    moe, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for i in range(2):  # what transformers computes with is what was written (it fuses the experts in memory)
        np.testing.assert_array_equal(moe.model.layers[i].mlp.gate.weight.detach().numpy(),
                                      written[f"model.layers.{i}.block_sparse_moe.gate.weight"])
    with torch.no_grad():
        want, got = dense(TOKENS).logits, moe.eval()(TOKENS).logits
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
        # The check can fail: without its MLPs the dense model's logits are far from these.
        no_mlp = copy.deepcopy(dense)
        for layer in no_mlp.model.layers:
            layer.mlp.down_proj.weight.zero_()
        assert (no_mlp(TOKENS).logits - want).abs().max() > 0.1
        if noise:  # the noise breaks the tie: tokens go to different experts from the start
            router_logits = moe(TOKENS, output_router_logits=True).router_logits[0]
            assert len(set(router_logits.argmax(-1).tolist())) > 1
    # jaxft reads the directory as its Mixtral family, with the dense model's logits too.
    loaded = checkpoint.load(out)
    assert (loaded.cfg.model_type, loaded.cfg.n_experts, loaded.cfg.top_k) == ("mixtral", experts, top_k)
    got_jax, _ = mixtral.forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS.numpy()))
    np.testing.assert_allclose(np.asarray(got_jax), want.numpy(), atol=1e-5, rtol=0)


def test_tokenizer_round_trip(tmp_path):
    _, path = dense_dir(tmp_path / "dense", tie=True)
    upcycle(path, tmp_path / "moe", experts=2, top_k=1, dtype=jnp.float32)
    text = "the quick brown fox jumps over a lazy dog"
    messages = [{"role": "user", "content": "write this date in words"}]
    want = transformers.AutoTokenizer.from_pretrained(path)
    for tok in (transformers.AutoTokenizer.from_pretrained(tmp_path / "moe"), jaxft_hf.tokenizer(tmp_path / "moe")):
        assert tok(text)["input_ids"] == want(text)["input_ids"]
        assert tok.apply_chat_template(messages, tokenize=False) == want.apply_chat_template(messages, tokenize=False)
        assert (tok.eos_token_id, tok.pad_token_id) == (want.eos_token_id, want.pad_token_id)


def header(file) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_cli_writes_bfloat16_and_replaces_only_with_overwrite(tmp_path, capsys):
    _, path = dense_dir(tmp_path / "dense", tie=True)
    out = tmp_path / "moe"
    args = ["upcycle", "--model", str(path), "--experts", "2", "--top-k", "1", "--out", str(out)]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    dtypes = {v["dtype"] for k, v in header(out / "model.safetensors").items() if k != "__metadata__"}
    assert dtypes == {"BF16"} and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli.main(args) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite", "--experts", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]  # no temporary directory left


@pytest.mark.parametrize("flags, message", [
    (["--experts", "1"], "--experts must be at least 2"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--experts", "2", "--top-k", "3"], "--top-k (3) must not exceed --experts (2)"),
    (["--router-noise", "-1"], "--router-noise must be a finite number >= 0"),
    (["--model", "qwen2"], "attention biases"),
    (["--model", "missing"], "no such file or directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    if "qwen2" in flags:
        dense_dir(tmp_path / "qwen2", tie=True, model_type="qwen2")
    model = [str(tmp_path / flags[1])] if flags[0] == "--model" else []
    flags = ["--model", *model] + flags[2:] if model else ["--model", str(tmp_path / "none")] + flags
    capsys.readouterr()
    assert cli.main(["upcycle", *flags, "--out", str(tmp_path / "out" / "moe")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("jaxft upcycle: error: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gguf_model_upcycles_with_its_tokenizer(tmp_path):
    # A tiny GGUF in every readable tensor type, quantized ones included: jaxft dequantizes it as transformers'
    # GGUF loader does, and the float32 upcycled model's logits equal the dense GGUF model's.
    from test_gguf import TOKENS as GGUF_TOKENS, write_gguf

    write_gguf(tmp_path / "tiny.gguf", "llama", tie=True)
    upcycle(tmp_path / "tiny.gguf", tmp_path / "moe", experts=4, top_k=2, dtype=jnp.float32, router_noise=0.1)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    assert type(moe).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        want, got = dense.eval()(torch.tensor(GGUF_TOKENS)).logits, moe.eval()(torch.tensor(GGUF_TOKENS)).logits
    assert want.abs().max() > 1.0
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "moe")
    assert tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False) == "<user>abc"
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["eos_token_id"] == 1  # the GGUF's
