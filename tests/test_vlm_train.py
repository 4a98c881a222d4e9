"""A method per part of a vision-language model, trained through the normal trainer: the trainable tree holds the
language model's LoRA, the projector (full) and the tower's part only where its method asks; the frozen tower is
never copied; the loss on the generated shapes-and-colours images falls; a part method on
a text-only model, or a tower LoRA that matches nothing, is a one-line error."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxft import checkpoint, config as config_lib, peft, tree, vlm_task
from jaxft.models import llava
from jaxft.peft import PeftError, parts
from jaxft.train.loop import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("vlm"))


def make_setup(root):
    """A tiny LLaVA directory (CLIP tower, tokenizer with `<image>`, CLIP image processor) and task files."""
    tok = tiny.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image = tok.convert_tokens_to_ids("<image>")
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TOWER).to_dict(),
                                   text_config=text.to_dict(), image_token_id=image)
    model = transformers.LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # a head that can tell tokens apart (std 0.02 caps every logit near 0: loss ~ ln V)
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "model")
    train_file, eval_file = vlm_task.generate(root / "data", 24, seed=0, n_eval=8)
    return root / "model", train_file, eval_file


def _config(setup, *extra):
    model, train_file, eval_file = setup
    return config_lib.load(CONFIG, [f"model={model}", f"data.train={train_file}", f"data.eval={eval_file}",
                                    "dtype=float32", "param_dtype=float32", "train.batch_size=4", "train.seq_len=128",
                                    "train.steps=12", "train.eval_every=12", "train.save_every=12",
                                    "train.eval_batches=2", "train.learning_rate=2e-2", "train.warmup_steps=0",
                                    "train.schedule=constant",
                                    "lora.rank=4", "lora.dropout=0.0", *extra])


def test_trainable_tree_per_part(setup):
    """Defaults: the language model's LoRA + a float32 copy of the projector, nothing of the tower. vision.method
    lora adds LoRA beside the tower's q/v; projector.method lora puts LoRA beside its two matrices; full copies."""
    loaded = checkpoint.load(setup[0])
    base = loaded.params
    key = jax.random.PRNGKey(0)

    def paths(*extra):
        trainable, spec = peft.build(key, base, _config(setup, *extra), loaded.cfg)
        return {p: tuple(x.shape) for p, x in tree.items(trainable)}, spec

    got, spec = paths()
    assert isinstance(spec, parts.PartsSpec) and spec.part_methods == (("vision", "frozen"), ("projector", "full"))
    assert not any(p.startswith("vision/") for p in got)
    assert {p for p in got if p.startswith("projector/")} == {"projector/in_proj/w", "projector/in_proj/b",
                                                              "projector/out_proj/w", "projector/out_proj/b"}
    text = {p for p in got if not p.startswith("projector/")}
    assert text and all(p.startswith("layers/") and p.endswith(("lora_a", "lora_b")) for p in text)

    got, spec = paths("vision.method=lora", "projector.method=lora", "peft.method=ia3")
    assert spec.method == "ia3" and spec.vision == spec.projector == peft.LoraSpec(rank=4, alpha=32.0)
    assert {p: s for p, s in got.items() if p.startswith(("vision/", "projector/"))} == {
        "vision/layers/attn/q_proj/lora_a": (2, 32, 4), "vision/layers/attn/q_proj/lora_b": (2, 4, 32),
        "vision/layers/attn/v_proj/lora_a": (2, 32, 4), "vision/layers/attn/v_proj/lora_b": (2, 4, 32),
        "projector/in_proj/lora_a": (32, 4), "projector/in_proj/lora_b": (4, 32),
        "projector/out_proj/lora_a": (32, 4), "projector/out_proj/lora_b": (4, 32)}
    assert {p for p in got if not p.startswith(("vision/", "projector/"))} == {
        "layers/attn/k_proj/ia3_out", "layers/attn/v_proj/ia3_out", "layers/mlp/down_proj/ia3_in"}

    got, _ = paths("vision.method=full", "projector.method=frozen")
    assert {p for p in got if p.startswith("vision/")} == {f"vision/{p}" for p in tree.flatten(base["vision"])}
    assert not any(p.startswith("projector/") for p in got)
    with pytest.raises(Exception, match="vision.targets: 'nothing' matches no linear weight"):
        paths("vision.method=lora", "vision.targets=nothing")


def test_part_lora_at_init_changes_nothing_and_trained_parts_are_used(setup):
    """With B = 0 the parts' LoRA leaves the logits as the base gives them; nonzero B changes them, through
    the tower and through the projector."""
    loaded = checkpoint.load(setup[0])
    cfg, base = loaded.cfg, loaded.params
    trainable, spec = peft.build(jax.random.PRNGKey(1), base, _config(setup, "vision.method=lora",
                                                                      "projector.method=lora"), cfg)
    tokens = np.array([[3, 4] + [cfg.image_token_id] * cfg.image_tokens + [5]])
    pixels = np.random.RandomState(0).randn(1, 3, 32, 32).astype(np.float32)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def logits(trainable):
        return llava.forward(cfg, base, tokens, pixel_values=pixels, trainable=trainable, peft=spec)[0]

    plain = llava.forward(cfg, base, tokens, pixel_values=pixels)[0]
    np.testing.assert_allclose(logits(trainable), plain, atol=1e-5, rtol=0)
    for part in ("vision", "projector"):
        bumped = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.5 if part in jax.tree_util.keystr(p) and "lora_b" in jax.tree_util.keystr(p) else x,
            trainable)
        assert float(jnp.max(jnp.abs(logits(bumped) - plain))) > 1e-3, part


def test_text_only_model_refuses_part_methods(tmp_path):
    model = tiny.llama_dir(tmp_path / "llama")
    loaded = checkpoint.load(model)
    config = config_lib.load(CONFIG, [f"model={model}", "data.train=x.json", "vision.method=lora"])
    with pytest.raises(PeftError, match=r"^vision.method='lora': model_type 'llama' is a text-only model, with no "
                                        r"vision \(leave vision.method at 'frozen'\)$"):
        peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)


def test_trainer_runs_llava_with_images(setup, tmp_path):
    """12 steps of LoRA + full projector + tower LoRA through `jaxft.train`: the eval loss falls, the saved
    adapter has the three parts and reloads with its parts' specs, and changes the model's logits."""
    summary = train(_config(setup, "vision.method=lora"), tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.5, evals
    from jaxft.peft import io as adapter_io
    trained, spec, _ = adapter_io.load(tmp_path / "run" / "adapter")
    assert spec.part_methods == (("vision", "lora"), ("projector", "full")) and spec.vision.rank == 4
    flat = tree.flatten(trained)
    assert any(p.startswith("vision/") for p in flat) and "projector/in_proj/w" in flat
    assert any(p.startswith("layers/") for p in flat)
    loaded = checkpoint.load(setup[0])
    cfg, base = loaded.cfg, loaded.params
    tokens = np.array([[3] + [cfg.image_token_id] * cfg.image_tokens + [4]])
    pixels = np.random.RandomState(1).randn(1, 3, 32, 32).astype(np.float32)
    plain = llava.forward(cfg, base, tokens, pixel_values=pixels)[0]
    tuned = llava.forward(cfg, base, tokens, pixel_values=pixels, trainable=trained, peft=spec)[0]
    assert float(jnp.max(jnp.abs(tuned - plain))) > 1e-2  # the saved adapter, with its parts' specs, acts


def test_merge_of_parts(setup):
    """Merged parts compute what base + trainable computes (LoRA text and projector, full tower); a language-model
    method that no weights express is refused by its own merge."""
    loaded = checkpoint.load(setup[0])
    cfg, base = loaded.cfg, loaded.params
    trainable, spec = peft.build(jax.random.PRNGKey(0), base, _config(setup, "vision.method=full",
                                                                      "projector.method=lora"), cfg)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    tokens = np.array([[3] + [cfg.image_token_id] * cfg.image_tokens + [4, 5]])
    pixels = np.random.RandomState(2).randn(1, 3, 32, 32).astype(np.float32)
    want = llava.forward(cfg, base, tokens, pixel_values=pixels, trainable=trainable, peft=spec)[0]
    got = llava.forward(cfg, peft.merge(base, trainable, spec), tokens, pixel_values=pixels)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert float(jnp.max(jnp.abs(want - llava.forward(cfg, base, tokens, pixel_values=pixels)[0]))) > 1e-2
    trainable, spec = peft.build(jax.random.PRNGKey(0), base, _config(setup, "peft.method=prefix"), cfg)
    with pytest.raises(PeftError, match="prefix cannot be merged"):
        peft.merge(base, trainable, spec)


def test_grad_accum_with_images_equals_one_batch(setup, tmp_path):
    """train.grad_accum=2 splits each batch's images with their rows: three steps give the losses and the
    trained adapter that one batch of the same rows gives (1e-5)."""
    extra = ("train.steps=3", "train.eval_every=3", "train.save_every=3", "data.pack=false")
    runs = {a: train(_config(setup, *extra, f"train.grad_accum={a}"), tmp_path / str(a)) for a in (1, 2)}
    losses = {a: [json.loads(line).get("loss") for line in (tmp_path / str(a) / "metrics.jsonl").read_text()
                  .splitlines()] for a in runs}
    assert len([x for x in losses[1] if x is not None]) == 3
    np.testing.assert_allclose(np.array(losses[2], float), np.array(losses[1], float), rtol=1e-5)
    from jaxft.peft import io as adapter_io
    one, two = (tree.flatten(adapter_io.load(tmp_path / str(a) / "adapter")[0]) for a in (1, 2))
    assert one.keys() == two.keys()
    for p in one:
        np.testing.assert_allclose(two[p], one[p], rtol=0, atol=1e-5, err_msg=p)  # after 3 Adam steps


@pytest.mark.parametrize("cache", [False, True])
def test_abstract_run_of_a_vlm_compiles(setup, cache):
    """`build_run(abstract=True)` (what `jaxft aot` compiles) of a LLaVA run with train.grad_accum=2: its batch
    has the images (pixels, or the tower's features with vision.cache_features) with the shapes, dtypes and
    shardings of the real run's batch (one image per row), and its train step compiles."""
    from jaxft.train.run import build_run

    config = _config(setup, "train.grad_accum=2", "data.pack=false", f"vision.cache_features={cache}")
    abstract, real = build_run(config, abstract=True), build_run(config)
    image_key = "image_features" if cache else "pixel_values"
    assert image_key in abstract.batch and "image_mask" in abstract.batch
    assert {k: (x.shape, x.dtype, x.sharding) for k, x in abstract.batch.items()} == {
        k: (x.shape, x.dtype, real.put({k: x.reshape(-1, *x.shape[2:])})[k].sharding)
        for k, x in real.batch.items()}
    mem = abstract.train_step.lower(abstract.state, abstract.base, abstract.batch).compile().memory_analysis()
    assert mem.argument_size_in_bytes > 0
    if not cache:  # the command: the memory plan of the same step
        import contextlib
        import io

        from jaxft import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["aot", "--topology", "cpu", "--config", CONFIG, "--model", str(setup[0]),
                             "--config.train.grad_accum=2", "--config.train.batch_size=4",
                             "--config.train.seq_len=128", "--config.lora.rank=4", "--config.dtype=float32",
                             "--config.param_dtype=float32", "--config.data.pack=false"])
        report = json.loads(out.getvalue().strip().splitlines()[-1])
        assert code == 0 and report["argument_bytes"] == mem.argument_size_in_bytes
