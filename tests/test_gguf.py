"""GGUF files against transformers' GGUF loader: tiny files written here with gguf-py in every readable tensor
type, and the real default model (SmolLM2-135M-Instruct, Q4_1)."""

import itertools

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T

from jaxft import checkpoint
from jaxft.checkpoint import LoadError
from jaxft.checkpoint.gguf import READABLE
from jaxft.models import llama

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
MODELS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
# llama.cpp's names for the per-layer modules of the Hugging Face checkpoint
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
# Exactly representable types for layer 0's q and k, to check the row permutation bit for bit.
EXACT = {"blk.0.attn_q.weight": T.F32, "blk.0.attn_k.weight": T.F16}
CYCLE = (T.Q8_0, T.Q4_0, T.Q4_1, T.BF16, T.F16, T.F32)
TOKENS = np.random.RandomState(0).randint(0, 128, (2, 12))


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{BLOCK['.'.join(module)]}.{kind}"


def permute(x, n_heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of jaxft's `unpermute`)."""
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def write_gguf(path, arch, types=None, tokenizer=True, tie=False, n_layers=2, template=TEMPLATE):
    """Writes a tiny random model of `arch` as GGUF; returns (PyTorch model, {gguf name: type})."""
    torch.manual_seed(0)
    config_cls, model_cls = MODELS[arch]
    model = model_cls(config_cls(**{**TINY, "num_hidden_layers": n_layers}, tie_word_embeddings=tie)).eval()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(128)
    if tokenizer:  # a byte-level BPE vocabulary of 94 characters and 34 merges
        letters = "abcdefghijklmnopqrstuvwxyz" * 2
        merges = [f"{a} {b}" for a, b in zip(letters[:34], letters[1:35])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list([chr(c) for c in range(33, 127)] + [m.replace(" ", "") for m in merges])
        w.add_token_types([1] * 128)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_chat_template(template)
    cycle = itertools.cycle(CYCLE)
    written = {}
    for hf, x in model.state_dict().items():
        if tie and hf == "lm_head.weight":  # as llama.cpp writes a tied model: no output head
            continue
        name, x = gguf_name(hf), x.numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            x = permute(x, 4 if ".attn_q." in name else 2)
        chosen = {**EXACT, **(types or {})}  # (not `or`: F32 is 0)
        qtype = T.F32 if x.ndim == 1 else chosen[name] if name in chosen else next(cycle)
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        written[name] = qtype
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, written


def logits(loaded, tokens=TOKENS):
    return np.asarray(llama.forward(loaded.cfg, loaded.params, jnp.asarray(tokens))[0])


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", False), ("llama", True)])
def test_tiny_gguf_matches_transformers(tmp_path, arch, tie):
    model, written = write_gguf(tmp_path / "tiny.gguf", arch, tie=tie)
    assert set(written.values()) == set(READABLE)  # every readable type is exercised
    loaded = checkpoint.load(tmp_path / "tiny.gguf")
    assert loaded.source == "gguf" and loaded.cfg.model_type == arch and loaded.cfg.tie_embeddings == tie
    assert loaded.cfg.qkv_bias == (arch == "qwen2")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(logits(loaded), ref, atol=1e-4, rtol=0)

    # The permutation is undone exactly: layer 0's q (F32) and k (F16) equal the original weights.
    sd = model.state_dict()
    q = np.asarray(loaded.params["layers"]["attn"]["q_proj"]["w"][0])
    k = np.asarray(loaded.params["layers"]["attn"]["k_proj"]["w"][0])
    np.testing.assert_array_equal(q, sd["model.layers.0.self_attn.q_proj.weight"].numpy().T)
    np.testing.assert_array_equal(k, sd["model.layers.0.self_attn.k_proj.weight"].half().float().numpy().T)

    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False)
    assert text == "<user>abc"


def test_tokenizer_cache(tmp_path, monkeypatch):
    """The converted tokenizer is cached by the file's metadata: read back equal, converted afresh for another
    file, rebuilt when damaged, and skipped when the cache cannot be written."""
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "a.gguf", "llama")
    converted = checkpoint.load(tmp_path / "a.gguf").tokenizer
    entries = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()

    convert = transformers.AutoTokenizer.from_pretrained

    def no_conversion(*args, **kwargs):
        assert "gguf_file" not in kwargs, "converted again instead of reading the cache"
        return convert(*args, **kwargs)

    texts = ["abcdef xyz", "hello, world!", "{}[]~ 0123"]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "abc"}]
    with monkeypatch.context() as m:
        m.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
        cached = checkpoint.load(tmp_path / "a.gguf").tokenizer
    assert [cached(t)["input_ids"] for t in texts] == [converted(t)["input_ids"] for t in texts]
    assert len(set(map(len, [cached(t)["input_ids"] for t in texts]))) > 1  # real tokenization, not empty
    assert cached.apply_chat_template(chat, tokenize=False) == converted.apply_chat_template(chat, tokenize=False)
    assert (cached.bos_token_id, cached.eos_token_id) == (converted.bos_token_id, converted.eos_token_id) == (0, 1)

    # Another file (its chat template differs): another entry, its own template.
    write_gguf(tmp_path / "b.gguf", "llama", template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert checkpoint.load(tmp_path / "b.gguf").tokenizer.apply_chat_template(chat, tokenize=False) == "[s][abc]"
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2

    # A damaged entry is converted again and replaced.
    (entries[0] / "tokenizer.json").write_text("{not json")
    assert checkpoint.load(tmp_path / "a.gguf").tokenizer(texts[0])["input_ids"] == converted(texts[0])["input_ids"]
    assert (entries[0] / "tokenizer.json").read_text().startswith("{\n")
    # A cache that cannot be written (a file where the directory should be) only costs the conversion.
    (tmp_path / "blocked").write_text("")
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "blocked"))
    assert checkpoint.load(tmp_path / "a.gguf").tokenizer(texts[1])["input_ids"] == converted(texts[1])["input_ids"]


def test_file_without_tokenizer(tmp_path):
    write_gguf(tmp_path / "bare.gguf", "llama", tokenizer=False)
    assert checkpoint.load(tmp_path / "bare.gguf").tokenizer is None


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    # Q5_0 is a type gguf-py can write but jaxft does not read.
    write_gguf(tmp_path / "q5.gguf", "llama", types={"blk.1.ffn_up.weight": T.Q5_0}, tokenizer=False)
    with pytest.raises(LoadError, match=r"q5\.gguf: tensor type not supported: blk\.1\.ffn_up\.weight \(Q5_0\)"):
        checkpoint.load(tmp_path / "q5.gguf")


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match=r"gpt2\.gguf: general\.architecture 'gpt2' is not supported"):
        checkpoint.load(tmp_path / "gpt2.gguf")


def test_default_model_matches_transformers(default_model_path):
    """The real default model, through jaxft and through transformers' GGUF loader, on a chat prompt."""
    loaded = checkpoint.load("default")
    assert loaded.path == default_model_path and loaded.source == "gguf"
    assert (loaded.cfg.n_layers, loaded.cfg.dim, loaded.cfg.tie_embeddings) == (30, 576, True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    assert loaded.tokenizer.decode(ids).endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
    tokens = np.asarray([ids])
    ours = logits(loaded, tokens)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() <= 2e-3
    assert ours[0, -1].argmax() == ref[0, -1].argmax()


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(LoadError, match=r"junk\.gguf: not a GGUF file \(it does not start with the bytes GGUF\)"):
        checkpoint.load(tmp_path / "junk.gguf")
