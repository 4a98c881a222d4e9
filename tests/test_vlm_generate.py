"""`jaxft generate --image` and `jaxft.data.vlm.image_prompt` + `jaxft.generate.generate(extras=...)` on a tiny
random LLaVA directory (CLIP tower, a tokenizer with `<image>`, the CLIP image processor): greedy tokens equal
transformers' `generate` on what LlavaProcessor makes of the same prompt and image files, with one and two
images; markers that disagree with the images, a missing or unreadable image, an image given to a text-only
model, an image past the pixel bound are one-line errors naming the file."""

import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny
from jaxft import checkpoint, cli
from jaxft.data import vlm
from jaxft.generate import generate

TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_generate")
    tok = tiny.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TOWER).to_dict(),
                                   text_config=text.to_dict(), image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = transformers.LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # logits spread apart: no greedy near-ties between the two frameworks
        model.lm_head.weight.mul_(30.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(30.0)  # images that weigh on the answer
    tiny.perturbed(model, 1)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(root / "model")
    rs = np.random.RandomState(0)
    files = []
    for k, (h, w) in enumerate([(40, 52), (61, 45)]):
        files.append(root / f"{k}.png")
        Image.fromarray((255 * rs.rand(h, w, 3)).astype(np.uint8)).save(files[-1])
    (root / "bad.png").write_bytes(b"not a png")
    processor = transformers.LlavaProcessor(image_processor=proc, tokenizer=tok, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return root, model.eval(), processor, files


def _theirs(model, processor, prompt, files):
    inputs = processor(text=prompt, images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("prompt,n", [("<image> the quick brown fox", 1), ("a lazy <image> dog and <image> owls", 2),
                                      ("seven wise owls", 2)])
def test_python_equals_transformers(setup, prompt, n):
    """image_prompt's ids equal LlavaProcessor's (no marker: the images first), greedy tokens equal."""
    root, model, processor, files = setup
    loaded = checkpoint.load(root / "model")
    ids, pixels = vlm.image_prompt(root / "model", loaded.cfg, loaded.tokenizer, prompt, files[:n])
    want_ids, want = _theirs(model, processor, prompt if "<image>" in prompt else "<image>" * n + "\n" + prompt,
                             files[:n])
    assert ids == want_ids and pixels.shape == (n, 3, 32, 32)
    got = generate(loaded.cfg, loaded.params, [ids], max_new_tokens=STEPS, extras={"pixel_values": pixels})[0]
    assert got == want
    # the images reach the answer: other pixels, other tokens (the comparison is not blind to them)
    assert generate(loaded.cfg, loaded.params, [ids], max_new_tokens=STEPS,
                    extras={"pixel_values": -3 * pixels})[0] != want


def test_cli_equals_transformers(setup, capsys, monkeypatch):
    root, model, processor, files = setup
    monkeypatch.setattr(cli, "_cache_compilations", lambda: None)
    prompt = "<image> the quick <image> fox"
    code = cli.main(["generate", "--model", str(root / "model"), "--image", str(files[0]), "--image", str(files[1]),
                     "--prompt", prompt, "--max-new-tokens", str(STEPS)])
    out, err = capsys.readouterr()
    assert code == 0, err
    tokens = _theirs(model, processor, prompt, files)[1]
    eos = processor.tokenizer.eos_token_id
    tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
    assert out == processor.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_bad_input(setup, capsys, monkeypatch, tmp_path):
    root, _, _, files = setup
    monkeypatch.setattr(cli, "_cache_compilations", lambda: None)
    model = str(root / "model")
    cases = [(["--image", str(files[0]), "--prompt", "<image> and <image>"],
              "the prompt holds 2 '<image>' marker(s) but 1 image(s) were given"),
             (["--image", str(files[0]), "--image", str(files[1]), "--prompt", "<image> fox"],
              "the prompt holds 1 '<image>' marker(s) but 2 image(s) were given"),
             (["--image", str(root / "nope.png"), "--prompt", "fox"], f"{root / 'nope.png'}: no such image file"),
             (["--image", str(root / "bad.png"), "--prompt", "fox"], f"{root / 'bad.png'}: cannot identify image")]
    for args, message in cases:
        assert cli.main(["generate", "--model", model, *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"jaxft generate: error: {message}"), err[-1]
    loaded = checkpoint.load(root / "model")  # an image past the pixel bound (a decompression-bomb guard)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(files[0]))}: image of 52x40 pixels is larger than the "
                                         rf"bound of 1000$"):
        vlm.image_prompt(root / "model", loaded.cfg, loaded.tokenizer, "fox", files[:1], max_pixels=1000)
    text_only = tiny.llama_dir(tmp_path / "llama")
    assert cli.main(["generate", "--model", str(text_only), "--image", str(files[0]), "--prompt", "fox"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"jaxft generate: error: {files[0]}: model_type 'llama' at {text_only} is a text-only model, "
                   f"with no vision")
