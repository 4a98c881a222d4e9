"""The generated image task: what each answer says is what its PNG shows (colour at the shape's centre, shape from
its box's corners), train and eval images are distinct, the files are the same for the same seed, and the
records read as LLaVA data; exact match compares normalized answers."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from jaxft import vlm_task
from jaxft.data import vlm


def _shape_from_pixels(pixels: np.ndarray, box, colour) -> str:
    """Which shape fills the box: a square fills its top-left corner, a triangle (apex up) only its bottom-left,
    a circle neither (k = side / 10 in from the corners: outside the circle, inside the triangle's base)."""
    x0, y0, x1, y1 = box
    k = max(2, (x1 - x0) // 10)
    inside = lambda x, y: tuple(pixels[y, x]) == colour  # noqa: E731
    top_left, bottom_left = inside(x0 + k, y0 + k), inside(x0 + k, y1 - k)
    return "square" if top_left else "triangle" if bottom_left else "circle"


def test_answers_match_the_drawn_images(tmp_path):
    train, eval_ = vlm_task.generate(tmp_path / "a", 40, seed=3)
    seen, hashes = set(), {}
    for path in (train, eval_):
        records = json.loads(path.read_text())
        assert len(records) == (40 if path == train else 10)
        for r in records:
            pixels = np.asarray(Image.open(path.parent / r["image"]).convert("RGB"))
            assert pixels.shape == (vlm_task.SIZE, vlm_task.SIZE, 3)
            x0, y0, x1, y1 = r["box"]
            answer = r["conversations"][1]["value"]
            _, colour, shape = answer.split()
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == vlm_task.COLOURS[colour], r["id"]
            assert _shape_from_pixels(pixels, r["box"], vlm_task.COLOURS[colour]) == shape, r["id"]
            assert r["conversations"][0]["value"] == "<image>\n" + vlm_task.QUESTION
            seen.add(answer)
            hashes.setdefault(path.stem, set()).add(hashlib.sha256(pixels.tobytes()).hexdigest())
    assert len(seen) >= 10  # most of the 15 shape-colour pairs occur
    assert not hashes["train"] & hashes["eval"] and len(hashes["eval"]) == 10  # held-out, distinct images
    train_files = {r["image"] for r in json.loads(train.read_text())}
    assert not train_files & {r["image"] for r in json.loads(eval_.read_text())}
    assert [len(r.images) for r in vlm.read_vlm(train)] == [1] * 40  # reads as LLaVA data, paths resolved
    assert all(p.is_file() for r in vlm.read_vlm(eval_) for p in r.images)


def test_deterministic_from_the_seed(tmp_path):
    one = vlm_task.generate(tmp_path / "one", 6, seed=7, n_eval=2)
    two = vlm_task.generate(tmp_path / "two", 6, seed=7, n_eval=2)
    other = vlm_task.generate(tmp_path / "other", 6, seed=8, n_eval=2)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # noqa
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert files(tmp_path / "one") != files(tmp_path / "other")
    assert one[0].name == two[0].name == other[0].name == "train.json" and one[1].name == "eval.json"


def test_exact_match():
    assert vlm_task.exact_match(["A red circle.", " a  blue square", "a red square"],
                                ["a red circle", "a blue square", "a red circle"]) == pytest.approx(2 / 3)
    assert vlm_task.exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        vlm_task.exact_match(["a", "b"], ["a"])


def test_built_model_loads_in_transformers_and_predict_equals_generate(tmp_path):
    """build_model joins a language model with a random tower and projector: transformers loads the directory
    (LlavaForConditionalGeneration), the language model's text-only logits are unchanged by the added `<image>`
    row, and `predict`'s greedy answers are transformers' greedy tokens for the same prompts and images."""
    import jax.numpy as jnp
    import torch
    import transformers

    import tiny
    from jaxft import checkpoint
    from jaxft.models import llama

    lm = tiny.llama_dir(tmp_path / "lm")
    out = vlm_task.build_model(tmp_path / "vlm", lm, image_size=32, patch_size=8, width=32, layers=2)
    _, eval_file = vlm_task.generate(tmp_path / "data", 2, seed=1, n_eval=3)
    loaded = checkpoint.load(out)
    cfg = loaded.cfg
    assert (cfg.model_type, cfg.image_tokens, cfg.vocab_size) == ("llava", 16, len(loaded.tokenizer))
    text = checkpoint.load(lm)
    tokens = np.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(np.asarray(vlm_task.llava.forward(cfg, loaded.params, tokens)[0])[..., :-1],
                               np.asarray(llama.forward(text.cfg, text.params, tokens)[0]), atol=2e-2)  # bf16 file
    records = json.loads(eval_file.read_text())
    processor = vlm_task.image_files.image_processor(json.loads((out / "preprocessor_config.json").read_text()))
    ours = vlm_task.predict(cfg, loaded.params, loaded.tokenizer, processor, records, eval_file.parent,
                            max_new_tokens=5)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    tok = loaded.tokenizer
    for r, answer in zip(records, ours):
        text_prompt = tok.apply_chat_template([{"role": "user", "content": r["conversations"][0]["value"]}],
                                              add_generation_prompt=True, tokenize=False)
        ids = [j for i in tok(text_prompt, add_special_tokens=False)["input_ids"]
               for j in ([i] * 16 if i == cfg.image_token_id else [i])]
        pixels = processor(images=[Image.open(eval_file.parent / r["image"]).convert("RGB")],
                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=5,
                                  do_sample=False)[0, len(ids):]
        want = [int(t) for t in want]
        stop = next((i for i, t in enumerate(want) if t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))),
                    len(want))
        assert answer == tok.decode(want[:stop], skip_special_tokens=True)
    assert any(ours) and jnp.asarray(loaded.params["vision"]["embed"]["patch"]["w"]).shape == (3 * 64, 32)
