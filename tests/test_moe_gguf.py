"""Mixtral-style GGUF files (llama.cpp's `llama` architecture with expert metadata and stacked experts,
`blk.N.ffn_{gate,up,down}_exps.weight`): a tiny random Mixtral written here with gguf-py loads with the logits
of the same weights loaded from its Hugging Face directory. Float32."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T

from jaxft import checkpoint
from jaxft.checkpoint import LoadError
from jaxft.models import family_of, mixtral

E, K, F = 4, 2, 24
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_local_experts=E, num_experts_per_tok=K,
            rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False)
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 9))
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate": "ffn_gate_inp"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}


def permute(x, n_heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of jaxft's `unpermute`)."""
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def gguf_tensors(model):
    """{llama.cpp name: array} of a transformers 5 Mixtral, as convert_hf_to_gguf writes it: experts stacked
    (E, out, in) per projection, q/k rows permuted."""
    out = {}
    for hf, x in model.state_dict().items():
        x = x.numpy()
        if hf in TOP:
            out[TOP[hf]] = x
            continue
        _, _, i, *module, kind = hf.split(".")
        module = ".".join(module)
        if module == "mlp.experts" and kind == "gate_up_proj":  # (E, 2F, D): gate rows, then up rows
            out[f"blk.{i}.ffn_gate_exps.weight"], out[f"blk.{i}.ffn_up_exps.weight"] = x[:, :F], x[:, F:]
        elif module == "mlp.experts":  # down_proj (E, D, F)
            out[f"blk.{i}.ffn_down_exps.weight"] = x
        else:
            name = f"blk.{i}.{BLOCK[module]}.{kind}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                x = permute(x, 4 if "q_proj" in module else 2)
            out[name] = x
    return out


def write(path, tensors, rope_theta, types=None, experts=E, used=K):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(rope_theta)  # Mixtral's 1e6, not llama's default
    w.add_vocab_size(96)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    for name, x in tensors.items():
        qtype = (types or {}).get(name, T.F32)
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).eval()
    root = tmp_path_factory.mktemp("moe_gguf")
    model.save_pretrained(root / "hf")
    return model, root


def _theta(model) -> float:
    return float(model.config.rope_parameters["rope_theta"])


def logits(loaded):
    return np.asarray(mixtral.forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS))[0])


@pytest.mark.parametrize("quantized", [False, True])
def test_stacked_experts_load_as_the_hf_directory(tiny, quantized):
    model, root = tiny
    tensors = gguf_tensors(model)
    # Q8_0 gate/up experts (blocks of 32 along D; F = 24 is no multiple of 32, so down stays float32),
    # dequantized on reading: compare with the HF weights rounded the same way.
    types = {n: T.Q8_0 for n in tensors if "gate_exps" in n or "up_exps" in n} if quantized else None
    path = write(root / f"tiny{int(quantized)}.gguf", tensors, _theta(model), types)
    got = checkpoint.load(path, dtype=jnp.float32)
    want = checkpoint.load(root / "hf", dtype=jnp.float32)
    assert isinstance(got.cfg, mixtral.Config) and (got.cfg.n_experts, got.cfg.top_k) == (E, K)
    if quantized:
        for name in ("gate_proj", "up_proj"):
            w = np.asarray(want.params["layers"]["mlp"]["experts"][name]["w"])  # (L, E, in, out)
            rounded = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(np.swapaxes(w, -1, -2)),
                                                                  T.Q8_0), T.Q8_0)
            np.testing.assert_array_equal(np.asarray(got.params["layers"]["mlp"]["experts"][name]["w"]),
                                          np.swapaxes(rounded, -1, -2))
        assert np.abs(logits(got) - logits(want)).max() > 0  # the rounding is there, and checked above
        return
    np.testing.assert_allclose(logits(got), logits(want), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(logits(got), model(torch.tensor(TOKENS)).logits.numpy(), atol=1e-4, rtol=1e-4)


def test_expert_count_disagreeing_with_the_tensors_is_a_one_line_error(tiny):
    model, root = tiny
    path = write(root / "bad.gguf", gguf_tensors(model), _theta(model), experts=E + 1)
    with pytest.raises(LoadError, match=r"bad\.gguf: tensor blk\.0\.ffn_gate_inp\.weight has shape \(4, 32\), "
                                        r"expected \(5, 32\) from the config$"):
        checkpoint.load(path)


QWEN_OLMOE = {  # llama.cpp arch: (transformers config and model classes, overrides)
    "qwen3moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,  # head_dim 12 != 32 / 4
                 dict(num_experts=E, moe_intermediate_size=F, intermediate_size=40, norm_topk_prob=True,
                      head_dim=12)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,  # top-k weights not renormalized
              dict(num_experts=E, intermediate_size=F, norm_topk_prob=False)),
}


def write_moe(path, model, arch):
    """`model` (transformers 5's Qwen3-MoE or OLMoE) as llama.cpp's convert_hf_to_gguf writes it: experts stacked
    (E, out, in), the MoE width in expert_feed_forward_length, q/k rows as they are (NeoX-style rotary)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # (OLMoE has no field)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE if arch == "qwen3moe" else gguf.MODEL_ARCH.OLMOE, 2)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_expert_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(96)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    for hf, x in model.state_dict().items():
        x = x.numpy()
        if hf.endswith("experts.gate_up_proj"):  # (E, 2F, D): gate rows, then up rows
            i = hf.split(".")[2]
            tensors = {f"blk.{i}.ffn_gate_exps.weight": x[:, :F], f"blk.{i}.ffn_up_exps.weight": x[:, F:]}
        elif hf.endswith("experts.down_proj"):
            tensors = {f"blk.{hf.split('.')[2]}.ffn_down_exps.weight": x}
        else:
            tensors = {names.get_name(hf, try_suffixes=(".weight",)): x}
        for name, t in tensors.items():
            w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", list(QWEN_OLMOE))
def test_qwen3moe_and_olmoe_files_load_with_transformers_logits(tmp_path, arch):
    config_cls, model_cls, overrides = QWEN_OLMOE[arch]
    torch.manual_seed(0)
    common = {k: v for k, v in TINY.items() if k not in ("num_local_experts", "intermediate_size")}
    model = model_cls(config_cls(**common, **overrides)).eval()
    with torch.no_grad():  # norms away from one, so that a swapped or skipped q/k norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    got = checkpoint.load(write_moe(tmp_path / f"{arch}.gguf", model, arch), dtype=jnp.float32)
    assert (got.cfg.model_type, got.cfg.n_experts, got.cfg.top_k, got.cfg.mlp_dim, got.cfg.normalize) == (
        model.config.model_type, E, K, F, model.config.norm_topk_prob)
    ours = np.asarray(family_of(got.cfg).forward(got.cfg, got.params, jnp.asarray(TOKENS))[0])
    with torch.no_grad():
        np.testing.assert_allclose(ours, model(torch.tensor(TOKENS)).logits.numpy(), atol=1e-4, rtol=1e-4)
