"""Interop of a vision-language model's parts on a tiny random LLaVA (the directory of test_vlm_generate): the
merged export (`jaxft export --merged`: the language model's LoRA and the tower's LoRA merged, the trained
projector written as it is) loads in transformers with the adapted model's logits; the PEFT export (the language
model's LoRA, the trained projector as `modules_to_save`) loads with `peft` onto transformers' LLaVA with them
too; what has no PEFT export yet is a one-line error."""

import os

import jax
import peft as hf_peft
import pytest
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from PIL import Image

from jaxft import checkpoint, cli, config as config_lib, export, peft
from jaxft.models import llava
from jaxft.peft import io as adapter_io
from test_vlm_generate import setup  # noqa: F401  (the tiny LLaVA directory, a module fixture)

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")


def _adapter(model_dir, out, *overrides):
    """A jaxft adapter of every part (random, nonzero: LoRA's B too) saved as training saves it."""
    loaded = checkpoint.load(model_dir)
    config = config_lib.load(CONFIG, [f"model={model_dir}", "data.train=x.json", "lora.rank=4", "lora.dropout=0.0",
                                      *overrides])
    trainable, spec = peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    trainable = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    adapter_io.save(out, trainable, spec, config, model_dir)
    return loaded, trainable, spec


def _inputs(processor, files):
    inputs = processor(text="the <image> quick fox", images=[Image.open(files[0]).convert("RGB")],
                       return_tensors="np")
    return inputs["input_ids"], inputs["pixel_values"]


def test_peft_export_loads_in_peft(setup, tmp_path, monkeypatch):  # noqa: F811
    root, _, processor, files = setup
    model_dir = root / "model"
    loaded, trainable, spec = _adapter(model_dir, tmp_path / "adapter")  # LoRA + projector full, tower frozen
    monkeypatch.setattr(cli, "_cache_compilations", lambda: None)
    assert cli.main(["export", "--adapter", str(tmp_path / "adapter"), "--peft", str(tmp_path / "peft")]) == 0
    base = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    tuned = hf_peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokens, pixels = _inputs(processor, files)
    with torch.no_grad():
        theirs = tuned(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels)).logits.numpy()
    ours = llava.forward(loaded.cfg, loaded.params, tokens, pixel_values=pixels, trainable=trainable, peft=spec)[0]
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    plain = llava.forward(loaded.cfg, loaded.params, tokens, pixel_values=pixels)[0]
    assert float(jnp.max(jnp.abs(ours - plain))) > 1e-2  # the adapter acts: the comparison is not blind to it
    _adapter(model_dir, tmp_path / "tower", "vision.method=lora")
    with pytest.raises(Exception, match=r"^vision.method='lora' has no PEFT export yet .*export it merged"):
        export.export_peft(tmp_path / "tower", tmp_path / "out")


def test_merged_export_loads_in_transformers(setup, tmp_path, monkeypatch):  # noqa: F811
    root, _, processor, files = setup
    model_dir = root / "model"
    loaded, trainable, spec = _adapter(model_dir, tmp_path / "adapter", "vision.method=lora")
    cfg = loaded.cfg
    monkeypatch.setattr(cli, "_cache_compilations", lambda: None)
    assert cli.main(["export", "--adapter", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged"),
                     "--dtype", "float32"]) == 0
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    tokens, pixels = _inputs(processor, files)
    ours = llava.forward(cfg, loaded.params, tokens, pixel_values=pixels, trainable=trainable, peft=spec)[0]
    with torch.no_grad():
        theirs = merged(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    plain = llava.forward(cfg, loaded.params, tokens, pixel_values=pixels)[0]
    assert float(jnp.max(jnp.abs(ours - plain))) > 1e-2  # the adapter acts: the comparison is not blind to it


def test_peft_adapter_imports(setup, tmp_path):  # noqa: F811
    """An adapter made by PEFT over transformers' LLaVA (LoRA on the language model, the projector in
    modules_to_save) loads in jaxft (`export.load_adapter`: generate --adapter, peft.init_from) with its logits,
and a run continues from it (peft.init_from)."""
    root, _, processor, files = setup
    torch.manual_seed(0)
    base = transformers.LlavaForConditionalGeneration.from_pretrained(root / "model")
    targets = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
    lora = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["multi_modal_projector"])
    tuned = hf_peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad:  # LoRA's B too, and the projector's copy
                p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "peft")
    tokens, pixels = _inputs(processor, files)
    with torch.no_grad():
        theirs = tuned.eval()(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels)).logits.numpy()
    loaded = checkpoint.load(root / "model")
    trainable, spec = export.load_adapter(tmp_path / "peft", loaded.cfg)
    assert spec.part_methods == (("vision", "frozen"), ("projector", "full")) and spec.lora.rank == 4
    ours = llava.forward(loaded.cfg, loaded.params, tokens, pixel_values=pixels, trainable=trainable, peft=spec)[0]
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    plain = llava.forward(loaded.cfg, loaded.params, tokens, pixel_values=pixels)[0]
    assert float(jnp.max(jnp.abs(ours - plain))) > 1e-2
    # and it continues training from there (peft.init_from): the run's tree is the adapter's
    config = config_lib.load(CONFIG, [f"model={root / 'model'}", "data.train=x.json", "lora.rank=4", "lora.alpha=8",
                                      "lora.dropout=0.0", "lora.targets=default",
                                      f"peft.init_from={tmp_path / 'peft'}"])
    again, _ = peft.build(jax.random.PRNGKey(0), loaded.params, config, loaded.cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), again, trainable))
