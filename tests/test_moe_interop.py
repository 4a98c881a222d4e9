"""LoRA on a mixture of experts in HF PEFT's format (`target_parameters`, `jaxft.peft.hf_experts`), both ways:
jaxft's export loads in `peft` over transformers' Mixtral / Qwen2-MoE with jaxft's logits; PEFT's own adapter
imports with PEFT's logits, exports back to the same tensors and is what peft.init_from resumes; the merged
export loads in transformers; bad adapters are refused by key. Tiny random models, float32, logits within 1e-4."""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxft import checkpoint, cli, config as config_lib, export, peft, tree
from jaxft.models import family_of
from jaxft.models.config import LlamaConfig
from jaxft.peft import hf_format, lora
from jaxft.peft import io as adapter_io
from jaxft.peft.method import AdapterError

R, ALPHA = 2, 6.0
TOKENS = np.random.RandomState(1).randint(0, 80, (2, 7))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SMALL = dict(vocab_size=80, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, initializer_range=0.2)
CLASSES = {"mixtral": transformers.MixtralForCausalLM, "qwen2_moe": transformers.Qwen2MoeForCausalLM,
           "qwen3_moe": transformers.Qwen3MoeForCausalLM, "olmoe": transformers.OlmoeForCausalLM,
           "qwen3_moe_mixed": transformers.Qwen3MoeForCausalLM}


@functools.cache
def _model(root, model_type):
    torch.manual_seed(0)
    if model_type == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **SMALL)
    elif model_type == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                          num_experts=4, norm_topk_prob=True, **SMALL)
    elif model_type.startswith("qwen3_moe"):  # head_dim 6 != 16 / 4; q/k norms per head; mixed: layer 1 dense
        mixed = dict(num_hidden_layers=3, mlp_only_layers=[1]) if model_type == "qwen3_moe_mixed" else {}
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=12, intermediate_size=20, num_experts=4,
                                          norm_topk_prob=True, head_dim=6, **{**SMALL, **mixed})
    else:  # olmoe: q/k norms over the whole projections, top-k weights not renormalized
        cfg = transformers.OlmoeConfig(intermediate_size=12, num_experts=4, norm_topk_prob=False, **SMALL)
    model = CLASSES[model_type](cfg)
    with torch.no_grad():  # norms away from one, so that a q/k norm the adapter skips would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(f"{root}/{model_type}")
    return f"{root}/{model_type}", checkpoint.load(f"{root}/{model_type}", dtype=jnp.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe_interop"))
    return lambda model_type: _model(root, model_type)


def _torch_logits(path, model_type, adapter=None):
    model = CLASSES[model_type].from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        model = hf_peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _jaxft_logits(loaded, trainable=None, spec=None):
    method = spec.as_method() if spec is not None else None
    return np.asarray(family_of(loaded.cfg).forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS),
                                                    trainable=trainable, peft=method)[0])


def _random_adapter(loaded, spec, targets, seed=0):
    """LoRA on `targets` with random non-zero A and B (gate's and up's A differ)."""
    trainable = lora.init(jax.random.PRNGKey(seed), loaded.params, spec,
                          lora.target_paths(loaded.params, targets, loaded.cfg.model_type))
    return jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size + seed), a.shape), trainable)


@pytest.mark.parametrize("model_type,rslora", [("mixtral", False), ("mixtral", True), ("qwen2_moe", False),
                                               ("qwen3_moe", False), ("olmoe", True)])
def test_export_loads_in_peft_with_jaxfts_logits(models, tmp_path, model_type, rslora):
    """LoRA on attention, every expert projection, the router (and Qwen2-MoE's shared expert: all-linear): gate's
    and up's factors differ, so gate_up_proj goes out at rank 2R, block-diagonal, with rank/alpha_pattern."""
    path, loaded = models(model_type)
    spec = lora.LoraSpec(rank=R, alpha=ALPHA, rslora=rslora)
    targets = r"layers/(attn/.*|mlp/.*)/w"  # with the router
    trainable = _random_adapter(loaded, spec, targets)
    adapter_io.save(tmp_path / "native", trainable, spec, _lora_config(targets), path)
    assert cli.main(["export", "--adapter", str(tmp_path / "native"), "--peft", str(tmp_path / "peft")]) == 0
    conf = json.loads((tmp_path / "peft" / hf_format.CONFIG).read_text())
    assert sorted(conf["target_parameters"]) == sorted(EXPERTS + ["mlp.gate.weight"])
    assert conf["rank_pattern"] == {"gate_up_proj": 2 * R}
    want = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(want - _jaxft_logits(loaded)).max() > 0.05
    got = _torch_logits(path, model_type, tmp_path / "peft")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # And back: the rank-2R block-diagonal adapter splits into jaxft's own factors.
    again, again_spec = export.load_adapter(tmp_path / "peft", loaded.cfg)
    assert again_spec == spec
    for p, x in tree.flatten(trainable).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(again)[p]), np.asarray(x), atol=1e-6, err_msg=p)


def _lora_config(targets):
    config = config_lib.base.get_config()
    config.lora.targets = targets
    return config


def _peft_adapter(path, model_type, out, **extra):
    """PEFT's own target_parameters adapter (random A and B) saved to `out`; returns its logits."""
    model = CLASSES[model_type].from_pretrained(path, dtype=torch.float32).eval()
    config = hf_peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                **{"target_parameters": EXPERTS, **extra})
    torch.manual_seed(1)
    peft_model = hf_peft.get_peft_model(copy.deepcopy(model), config).eval()
    peft_model.save_pretrained(out)
    with torch.no_grad():
        return peft_model(torch.tensor(TOKENS)).logits.numpy()


def test_peft_adapter_imports_exports_back_and_training_resumes(models, tmp_path):
    path, loaded = models("mixtral")
    want = _peft_adapter(path, "mixtral", tmp_path / "peft")
    trainable, spec = export.load_adapter(tmp_path / "peft", loaded.cfg)
    assert spec == lora.LoraSpec(rank=R, alpha=ALPHA)
    experts = trainable["layers"]["mlp"]["experts"]
    assert experts["gate_proj"]["lora_a"].shape == (2, 4, 16, R)
    got = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(got - _jaxft_logits(loaded)).max() > 0.05
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # gate and up share PEFT's A: the export is PEFT's own rank-R adapter, tensor for tensor.
    _exports_back_to_pefts_tensors(tmp_path, trainable, spec, loaded.cfg, path)
    assert json.loads((tmp_path / "back" / hf_format.CONFIG).read_text())["rank_pattern"] == {}
    # Training starts from it: peft.init_from accepts it for a config that trains the same modules at the same
    # rank and alpha, and returns it as it is (the step on such a tree: tests/test_moe_lora.py).
    config = _lora_config(r"layers/(attn/(q|v)_proj|mlp/experts/.*)/w")
    config.lora.rank, config.lora.alpha, config.peft.init_from = R, ALPHA, str(tmp_path / "peft")
    start, _ = peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)
    assert sorted(tree.flatten(start)) == sorted(tree.flatten(trainable))
    for p, x in tree.flatten(trainable).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(start)[p]), np.asarray(x), err_msg=p)
    config.lora.targets = "all-linear"  # trains k_proj and o_proj too: refused, naming the setting
    with pytest.raises(ValueError, match=r"lora.targets='all-linear' trains .*, but the adapter at .* has "):
        peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe"])
def test_peft_adapter_on_qwen3_moe_and_olmoe_imports_and_exports_back(models, tmp_path, model_type):
    """PEFT's own adapter on q/v, every expert and the router of Qwen3-MoE / OLMoE (transformers 5's fused
    experts, as on Mixtral) imports with PEFT's logits and exports back to PEFT's tensors."""
    path, loaded = models(model_type)
    want = _peft_adapter(path, model_type, tmp_path / "peft", target_parameters=EXPERTS + ["mlp.gate.weight"])
    trainable, spec = export.load_adapter(tmp_path / "peft", loaded.cfg)
    assert spec == lora.LoraSpec(rank=R, alpha=ALPHA)
    assert sorted(tree.flatten(trainable)) == sorted(
        f"layers/{m}/lora_{x}" for m in ("attn/q_proj", "attn/v_proj", "mlp/router", "mlp/experts/gate_proj",
                                         "mlp/experts/up_proj", "mlp/experts/down_proj") for x in "ab")
    got = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(got - _jaxft_logits(loaded)).max() > 0.05
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    _exports_back_to_pefts_tensors(tmp_path, trainable, spec, loaded.cfg, path)


def test_qwen3_moe_with_dense_layers_both_ways(models, tmp_path):
    """A Qwen3-MoE whose layer 1 is dense: the experts' and router's factors of the sparse layers go out (the dense
    layer's fillers do not) and come back with zeros there; LoRA on the dense MLP, which PEFT on transformers 5
    cannot target (it turns target_modules gate_proj into the experts' gate_up_proj), is refused in one line."""
    path, loaded = models("qwen3_moe_mixed")
    spec = lora.LoraSpec(rank=R, alpha=ALPHA)
    trainable = _random_adapter(loaded, spec, r"layers/(attn/(q|v)_proj|mlp/(experts/.*|router))/w")
    hf_format.save(tmp_path / "ours", trainable, spec, loaded.cfg, base_model=path)
    names = load_file(str(tmp_path / "ours" / hf_format.WEIGHTS))
    assert {n.split(".")[4] for n in names if ".mlp." in n} == {"0", "2"}
    want = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(want - _jaxft_logits(loaded)).max() > 0.05
    np.testing.assert_allclose(_torch_logits(path, "qwen3_moe_mixed", tmp_path / "ours"), want, atol=1e-4, rtol=1e-4)
    want = _peft_adapter(path, "qwen3_moe_mixed", tmp_path / "peft", target_parameters=EXPERTS + ["mlp.gate.weight"])
    theirs, spec = export.load_adapter(tmp_path / "peft", loaded.cfg)
    assert not np.asarray(theirs["layers"]["mlp"]["experts"]["down_proj"]["lora_b"][1]).any()
    np.testing.assert_allclose(_jaxft_logits(loaded, theirs, spec), want, atol=1e-4, rtol=1e-4)
    dense = _random_adapter(loaded, spec, r"layers/(attn/q_proj|mlp/.*)/w")
    with pytest.raises(AdapterError, match=r"^layers/mlp/down_proj: LoRA on the MLP of the dense layers \[1\] of "
                                           r"this qwen3_moe has no PEFT form \(PEFT on transformers 5 turns [^\n]*$"):
        hf_format.save(tmp_path / "dense", dense, spec, loaded.cfg, base_model=path)


def _v4_adapter(out, path, model_type, rng, dense_layers=()):
    """A LoRA adapter as PEFT saved it on transformers 4, where each expert was a Linear of its own (Mixtral's
    `block_sparse_moe.experts.N.w1`, the Qwen-style `mlp.experts.N.gate_proj`) and the router `gate` one too;
    `dense_layers` (a Qwen3-MoE's mlp_only_layers) get LoRA on attention only."""
    block, names = (("block_sparse_moe", ("w1", "w2", "w3")) if model_type == "mixtral" else
                    ("mlp", ("gate_proj", "down_proj", "up_proj")))
    f = {"mixtral": 24, "qwen2_moe": 12, "qwen3_moe": 12, "olmoe": 12}[model_type]
    q = 24 if model_type == "qwen3_moe" else 16  # (4 heads x head_dim 6)
    tensors = {}
    for i in range(2 + len(dense_layers)):
        pre = f"base_model.model.model.layers.{i}"
        shapes = {"self_attn.q_proj": (16, q)} | ({} if i in dense_layers else {f"{block}.gate": (16, 4)} | {
            f"{block}.experts.{e}.{w}": (f, 16) if w == names[1] else (16, f) for e in range(4) for w in names})
        for module, (d_in, d_out) in shapes.items():
            tensors[f"{pre}.{module}.lora_A.weight"] = rng.normal(0, 0.3, (R, d_in)).astype(np.float32)
            tensors[f"{pre}.{module}.lora_B.weight"] = rng.normal(0, 0.3, (d_out, R)).astype(np.float32)
    out.mkdir()
    save_file(tensors, str(out / hf_format.WEIGHTS))
    (out / hf_format.CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "base_model_name_or_path": path,
        "target_modules": ["q_proj", "gate", *names]}))
    return tensors


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe"])
def test_transformers_4_per_expert_adapter_imports_with_peft_logits(models, tmp_path, model_type):
    """An adapter from transformers 4, one LoRA per expert Linear (Mixtral's w1, w2, w3, the others' gate_proj,
    down_proj, up_proj) and on the router (`gate`): PEFT converts it to target_parameters on loading (gate and up
    to a rank-2R block-diagonal gate_up_proj); jaxft reads each expert's factors as they are."""
    path, loaded = models(model_type)
    out = tmp_path / "v4"
    tensors = _v4_adapter(out, path, model_type, np.random.RandomState(2))
    trainable, spec = export.load_adapter(out, loaded.cfg)
    assert sorted(tree.flatten(trainable)) == sorted(
        f"layers/{m}/lora_{x}" for m in ("attn/q_proj", "mlp/router", "mlp/experts/gate_proj",
                                         "mlp/experts/up_proj", "mlp/experts/down_proj") for x in "ab")
    up = "block_sparse_moe.experts.3.w3" if model_type == "mixtral" else "mlp.experts.3.up_proj"
    np.testing.assert_array_equal(trainable["layers"]["mlp"]["experts"]["up_proj"]["lora_b"][1, 3],
                                  tensors[f"base_model.model.model.layers.1.{up}.lora_B.weight"].T)
    got = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(got - _jaxft_logits(loaded)).max() > 0.05
    np.testing.assert_allclose(got, _torch_logits(path, model_type, out), atol=1e-4, rtol=1e-4)


def test_transformers_4_per_expert_adapter_on_qwen3_moe_with_dense_layers(models, tmp_path):
    """The same for a Qwen3-MoE whose layer 1 is dense: routers and experts adapted on layers 0 and 2 only; jaxft
    fills layer 1's expert and router factors with zeros and gives PEFT's logits."""
    path, loaded = models("qwen3_moe_mixed")
    out = tmp_path / "v4"
    tensors = _v4_adapter(out, path, "qwen3_moe", np.random.RandomState(3), dense_layers=(1,))
    trainable, spec = export.load_adapter(out, loaded.cfg)
    mlp = trainable["layers"]["mlp"]
    assert not np.asarray(mlp["router"]["lora_b"][1]).any()
    assert not np.asarray(mlp["experts"]["gate_proj"]["lora_a"][1]).any()
    np.testing.assert_array_equal(mlp["router"]["lora_a"][2],
                                  tensors["base_model.model.model.layers.2.mlp.gate.lora_A.weight"].T)
    got = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(got - _jaxft_logits(loaded)).max() > 0.05
    np.testing.assert_allclose(got, _torch_logits(path, "qwen3_moe_mixed", out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,length", [("prefix", 4), ("ia3", 0)])
def test_other_methods_export_to_peft_on_mixtral(models, tmp_path, method, length):
    """Prefix tuning (the keys and values of every layer) and IA3 (on keys and values) go to PEFT on an MoE
    family as on a dense one (prompt tuning, which touches no layer, too)."""
    path, loaded = models("mixtral")
    config = config_lib.base.get_config()
    config.peft.method, config.train.seq_len = method, 32
    if length:
        config[method].length = length
    trainable, spec = peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), trainable)
    trainable = peft.finalize(spec, trainable)
    hf_format.save(tmp_path / "peft", trainable, spec, loaded.cfg, base_model=path)
    want = np.asarray(family_of(loaded.cfg).forward(loaded.cfg, loaded.params, jnp.asarray(TOKENS),
                                                    trainable=trainable, peft=spec)[0])
    assert np.abs(want - _jaxft_logits(loaded)).max() > 0.05
    got = _torch_logits(path, "mixtral", tmp_path / "peft")[:, -TOKENS.shape[1]:]  # (PEFT's soft prompt first)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_merged_export_loads_in_transformers(models, tmp_path):
    path, loaded = models("qwen2_moe")
    spec = lora.LoraSpec(rank=R, alpha=ALPHA)
    trainable = _random_adapter(loaded, spec, "all-linear", seed=3)
    adapter_io.save(tmp_path / "native", trainable, spec, _lora_config("all-linear"), path)
    assert cli.main(["export", "--adapter", str(tmp_path / "native"), "--merged", str(tmp_path / "merged"),
                     "--dtype", "float32"]) == 0
    want = _jaxft_logits(loaded, trainable, spec)
    assert np.abs(want - _jaxft_logits(loaded)).max() > 0.05
    np.testing.assert_allclose(_torch_logits(str(tmp_path / "merged"), "qwen2_moe"), want, atol=1e-4, rtol=1e-4)


def _edited(src, dst, conf=None, tensors=None):
    """A copy of the PEFT adapter `src` with config fields and tensors replaced (None: dropped)."""
    dst.mkdir()
    config = {**json.loads((src / hf_format.CONFIG).read_text()), **(conf or {})}
    (dst / hf_format.CONFIG).write_text(json.dumps(config))
    arrays = {**load_file(str(src / hf_format.WEIGHTS)), **(tensors or {})}
    save_file({k: v for k, v in arrays.items() if v is not None}, str(dst / hf_format.WEIGHTS))
    return dst


def test_bad_expert_adapters_are_refused_by_key(models, tmp_path):
    path, loaded = models("mixtral")
    _peft_adapter(path, "mixtral", tmp_path / "peft")
    src = tmp_path / "peft"
    name = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"  # down_proj's (the outer wrapper)
    cases = [
        ({"target_parameters": ["mlp.experts.gate_proj"]}, None,
         r"target_parameters entry 'mlp.experts.gate_proj' names no expert or router parameter jaxft knows"),
        ({"target_parameters": ["weight"]}, None, r"target_parameters entry 'weight' names no"),
        ({"target_parameters": ["model.layers.0.mlp.experts.down_proj"]}, None, r"in every layer"),
        ({"rank_pattern": {"down_proj": 3}}, None,
         rf"{name.replace('.1.', '.0.')} has shape \(8, 24\), expected \(12, 24\) \(rank 3"),
        ({"rank_pattern": {"q_proj": 4}}, None,
         r"rank_pattern=\{\"q_proj\": 4\} is not supported by jaxft: key 'q_proj' reaches model.layers.0.self_attn"),
        (None, {name: np.zeros((8, 20), np.float32)}, rf"{name} has shape \(8, 20\), expected \(8, 24\)"),
        (None, {name: None}, rf"missing tensor {name}"),
        ({"r": 1, "lora_alpha": 3, "rank_pattern": {"gate_up_proj": 2, "down_proj": 2}}, None,
         r"rank 2 \(r / rank_pattern\) is above the adapter's r=1"),
    ]
    for k, (conf, tensors, message) in enumerate(cases):
        bad = _edited(src, tmp_path / f"bad{k}", conf, tensors)
        with pytest.raises(AdapterError, match=message) as e:
            export.load_adapter(bad, loaded.cfg)
        assert "\n" not in str(e.value)
    llama = LlamaConfig(vocab_size=80, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=24)
    with pytest.raises(AdapterError, match=r"target_parameters=\[.*\] on a llama model, which has no experts"):
        export.load_adapter(src, llama)


def _exports_back_to_pefts_tensors(tmp_path, trainable, spec, cfg, path):
    """jaxft's PEFT export of an adapter imported from tmp_path/peft is PEFT's file, tensor for tensor."""
    hf_format.save(tmp_path / "back", trainable, spec, cfg, base_model=path)
    ours, theirs = (load_file(str(tmp_path / d / hf_format.WEIGHTS)) for d in ("back", "peft"))
    assert sorted(ours) == sorted(theirs)
    for name, x in theirs.items():
        np.testing.assert_allclose(ours[name], x, atol=1e-7, err_msg=name)
