"""Image + text data against transformers: records (LLaVA JSON and HF messages with image parts) give the tokens and
pixel values of `LlavaProcessor` (CLIP and SigLIP image processors), the loss on the assistant's tokens only;
markers that disagree with the images and unusable images are named; a packed batch's loss through jaxft's tower,
projector, merge and decoder equals the unpacked one's and the per-example loss of LlavaForConditionalGeneration."""

import functools
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny
from jaxft.data import DataError, images, vlm, vlm_batches
from jaxft.models import connectors, llama

QUICK = {"xla_backend_optimization_level": 0}
CLIP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}}
SIGLIP = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}}
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)


@pytest.fixture(scope="module")
def tok():
    t = tiny.tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return t


def _write_images(root):
    """RGB, RGBA (transparent corner) and L images of other sizes than the tower's, as PNG files."""
    rs = np.random.RandomState(0)
    rgb = Image.fromarray((255 * rs.rand(40, 52, 3)).astype(np.uint8))
    rgba = Image.fromarray((255 * rs.rand(45, 33, 4)).astype(np.uint8), "RGBA")
    grey = Image.fromarray((255 * rs.rand(36, 36)).astype(np.uint8), "L")
    (root / "img").mkdir()
    for name, im in (("rgb", rgb), ("rgba", rgba), ("grey", grey)):
        im.save(root / "img" / f"{name}.png")
    return {"rgb": rgb, "rgba": rgba, "grey": grey}


def _llava(human: str, answer: str, image=None):
    rec = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    return rec if image is None else {"image": image, **rec}


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_tokens_and_pixels_equal_llava_processor(tmp_path, tok):
    """Each record's tokens are the processor's on the chat-rendered text (then EOS), with every `<image>`
    expanded to N tokens (16 patches + CLIP's class token - 1 for "default"; 16 for SigLIP "full"); the pixel
    values are the processor's; the loss counts the answer and its end-of-turn tokens only. The HF messages record
    and the marker-less record (images first) give the same tokens as the equivalent LLaVA record."""
    pics = _write_images(tmp_path)
    records = [_llava("<image>\nWhat is it?", "a red circle", "img/rgb.png"),
               _llava("Left <image> right <image>\nSame?", "no", ["img/rgba.png", "img/grey.png"]),
               {"images": ["img/rgba.png", "img/grey.png"], "messages": [
                   {"role": "user", "content": [{"type": "text", "text": "Left "}, {"type": "image"},
                                                {"type": "text", "text": " right "}, {"type": "image"},
                                                {"type": "text", "text": "\nSame?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "no"}]}]},
               _llava("What is it?", "a red circle", "img/rgb.png"),
               {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/rgb.png"},
                                                          {"type": "text", "text": "\nWhat is it?"}]},
                             {"role": "assistant", "content": "a red circle"}]}]
    recs = vlm.read_vlm(_write(tmp_path / "train.json", records))
    assert [len(r.images) for r in recs] == [1, 2, 2, 1, 1] and recs[4].images == recs[0].images
    assert recs[2].messages[0]["content"] == "Left <image> right <image>\nSame?"  # the parts joined in order
    assert recs[3].messages[0]["content"] == "<image>\nWhat is it?"
    for config, strategy, extra, n in ((CLIP, "default", 1, 16), (SIGLIP, "full", 0, 16)):
        kind = "clip_vision_model" if config is CLIP else "siglip_vision_model"
        assert images.image_token_count(dict(TOWER, model_type=kind), strategy) == n
        proc = images.image_processor(config)
        ref = transformers.LlavaProcessor(image_processor=proc, tokenizer=tok, patch_size=8,
                                          vision_feature_select_strategy=strategy, num_additional_image_tokens=extra)
        vex = vlm.tokenize_vlm(recs, tok, 256, n)
        ex = vex.examples
        for e, r in enumerate(recs[:2]):
            text = tok.apply_chat_template(r.messages, tokenize=False)
            want = ref(text=text, images=[pics[p.stem] for p in r.images], return_tensors="np")
            ids = ex.ids[ex.starts[e]:ex.starts[e + 1]]
            np.testing.assert_array_equal(ids[:-1], want["input_ids"][0])
            assert ids[-1] == tok.eos_token_id and (ids == vlm.marker_id(tok)).sum() == n * len(r.images)
            got = images.pixel_values(proc, [images.open_image(p) for p in r.images])
            np.testing.assert_array_equal(got, want["pixel_values"])
            counted = tok.decode(ids[ex.loss[ex.starts[e]:ex.starts[e + 1]]])
            assert counted == r.messages[1]["content"] + "<|im_end|>\n<|endoftext|>"
        piece = lambda e: ex.ids[ex.starts[e]:ex.starts[e + 1]].tolist()  # noqa: E731
        assert piece(2) == piece(1) and piece(3) == piece(0) == piece(4)


def test_markers_that_disagree_with_images_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    bad = [[_llava("<image> <image> two?", "x", "a.png")], [_llava("<image>", "x", ["a.png", "a.png"])],
           [{"messages": [{"role": "user", "content": [{"type": "image"}]}]}],
           [{"image": 3, "conversations": []}], [{"text": "x"}],
           [{"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]}]]
    messages = [r"train.json record 0: 2 '<image>' marker\(s\) in the conversation but 1 image\(s\)",
                r"train.json record 0: 1 '<image>' marker\(s\) in the conversation but 2 image\(s\)",
                r"train.json record 0: 1 '<image>' marker\(s\) in the conversation but 0 image\(s\)",
                r"train.json record 0: field 'image' must be an image path or a list of paths",
                r"train.json record 0: expected field 'conversations' \(LLaVA\) or 'messages', the record has: text",
                r"train.json record 0: image paths both in field 'images' and in image parts"]
    for records, message in zip(bad, messages):
        with pytest.raises(DataError, match=message):
            vlm.read_vlm(_write(tmp_path / "train.json", records))
    (tmp_path / "train.jsonl").write_text(json.dumps(_llava("hi", "x")) + "\n{oops\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        vlm.read_vlm(tmp_path / "train.jsonl")


def test_conversation_without_a_target_is_named(tmp_path, tok):
    """An empty answer followed by a user turn leaves nothing to predict under the plain template."""
    quiet = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""},
                               {"from": "human", "value": "bye"}]}
    recs = vlm.read_vlm(_write(tmp_path / "t.json", [_llava("hi", "x"), quiet]))
    with pytest.raises(DataError, match=r"t\.json record 1: the conversation has no assistant token to train on"):
        vlm.tokenize_vlm(recs, tok, 256, 16, chat_template=False)
    assert len(vlm.tokenize_vlm(recs[:1], tok, 256, 16, chat_template=False)) == 1


def test_bad_images_are_counted_skipped_and_named(tmp_path, tok, caplog):
    """Missing, not an image, truncated and too large: skipped, one log line each naming the file; RGBA and L are
    converted as the processor converts them; nothing left is an error."""
    pics = _write_images(tmp_path)
    (tmp_path / "img" / "text.png").write_text("not an image")
    data = (tmp_path / "img" / "rgb.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(data[:len(data) // 2])
    Image.new("RGB", (300, 300)).save(tmp_path / "img" / "big.png")
    names = ["rgb", "missing", "text", "cut", "big", "rgba", "grey"]
    recs = vlm.read_vlm(_write(tmp_path / "d.json", [_llava("<image>\nq", "a", f"img/{n}.png") for n in names]))
    with caplog.at_level(logging.WARNING, logger="jaxft.data.vlm"):
        vex = vlm.tokenize_vlm(recs, tok, 256, 16, max_pixels=200 * 200)
    assert (len(vex), vex.skipped_images) == (3, 4)
    assert [p[0].stem for p in vex.images] == ["rgb", "rgba", "grey"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    for line, name, why in zip(lines, names[1:5], ("no such image file", "cannot identify image file",
                                                    "unreadable image", "300x300 pixels is larger than")):
        assert line.startswith(f"skipped d.json record {names.index(name)}: ") and f"{name}.png" in line, line
        assert why in line, line
    proc = images.image_processor(CLIP)
    for name in ("rgba", "grey"):
        want = proc(images=[pics[name]], return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(images.pixel_values(proc, [images.open_image(tmp_path / "img" / f"{name}.png")]),
                                      want)
    with pytest.raises(DataError, match=r"d\.json: no record left: all 2 record\(s\) have an image that cannot"):
        vlm.tokenize_vlm(recs[1:3], tok, 256, 16)
    with pytest.raises(DataError, match=r"d\.json: no record left: all are longer than seq_len=20 with their image"):
        vlm.tokenize_vlm(recs[:1], tok, 20, 16)
    with pytest.raises(ValueError, match="the tokenizer splits the image marker '<image>' into"):
        vlm.tokenize_vlm(recs, tiny.tokenizer(), 256, 16)


def _tiny_llava(tok):
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TOWER).to_dict(),
                                   text_config=text.to_dict(), image_token_id=vlm.marker_id(tok))
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_packed_loss_equals_unpacked_and_transformers(tmp_path, tok):
    """Five examples (0, 1 or 2 images) packed into fewer rows, images padded to a static M: the masked token
    cross-entropy through jaxft's tower + projector + merge_images + llama.forward equals the unpacked batch's
    (1e-5), and both equal the loss from LlavaForConditionalGeneration's logits on each example alone."""
    _write_images(tmp_path)
    records = [_llava("<image>\nWhat is it?", "a red circle", "img/rgb.png"),
               _llava("Left <image> right <image>\nSame?", "no they differ", ["img/rgba.png", "img/grey.png"]),
               _llava("count the stars", "seven wise owls"),
               _llava("<image>\nAnd this?", "the quick brown fox", "img/grey.png"),
               _llava("<image>\nOnce more", "a lazy dog", "img/rgba.png")]
    proc = images.image_processor(CLIP)
    vex = vlm.tokenize_vlm(vlm.read_vlm(_write(tmp_path / "d.json", records)), tok, 160, 16)
    packed_rows = vlm_batches.layout(vex, 160)
    assert len(packed_rows) < len(vex) and max(len(r) for r in packed_rows) >= 2
    packed = vlm_batches.eval_batches(vex, proc, 160, len(packed_rows) + 1, n_images=7)[0]  # + an empty row
    np.testing.assert_array_equal(packed["image_mask"], [1, 1, 1, 1, 1, 0, 0])  # two padding images
    plain = vlm_batches.eval_batches(vex, proc, 160, len(vex), pack=False)[0]

    model = _tiny_llava(tok)
    hf, state = model.config.to_dict(), {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tower_cfg, tower, proj_cfg, proj, lm_cfg, lm = tiny.llava_parts(hf, state)

    @functools.partial(jax.jit, compiler_options=QUICK)
    def loss(batch):
        features = connectors.llava_features(tower_cfg, tower, batch["pixel_values"], layer=hf["vision_feature_layer"])
        embeds = lm["embed"]["w"][batch["tokens"]]
        merged = connectors.merge_images(embeds, batch["tokens"], connectors.project(proj_cfg, proj, features),
                                         hf["image_token_index"])
        logits = llama.forward(lm_cfg, lm, batch["tokens"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"], embeddings=merged)[0]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    got_packed, got_plain = float(loss(packed)), float(loss(plain))
    total, count = 0.0, 0
    ex = vex.examples
    for e in range(len(vex)):
        ids = ex.ids[ex.starts[e]:ex.starts[e + 1]]
        mask = ex.loss[ex.starts[e] + 1:ex.starts[e + 1]]
        pixels = images.pixel_values(proc, [images.open_image(p) for p in vex.images[e]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids[None, :-1]),
                           pixel_values=torch.tensor(pixels) if len(pixels) else None).logits[0]
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], dtype=torch.long), reduction="none")
        total, count = total + float(ce[torch.tensor(mask)].sum()), count + int(mask.sum())
    assert count == int(plain["loss_mask"].sum()) == int(packed["loss_mask"].sum())
    assert abs(got_packed - got_plain) <= 1e-5, (got_packed, got_plain)
    assert abs(got_plain - total / count) <= 1e-5, (got_plain, total / count)


def test_train_stream_covers_each_example_once_per_epoch(tmp_path, tok):
    """One epoch of the shuffled stream: every example's targets once, each batch's valid images as many as its
    image tokens / N and equal to the processor's pixels of the images in token order; the same seed, the same
    batches."""
    _write_images(tmp_path)
    names = ["rgb", "rgba", "grey"]
    records = [_llava("<image>\nq" if i % 3 else "q <image> <image>", f"answer {i}",
                      f"img/{names[i % 3]}.png" if i % 3 else ["img/grey.png", "img/rgb.png"]) for i in range(8)]
    proc = images.image_processor(CLIP)
    vex = vlm.tokenize_vlm(vlm.read_vlm(_write(tmp_path / "d.json", records)), tok, 100, 16)
    rows = vlm_batches.layout(vex, 100, order=np.random.default_rng(1).permutation(len(vex)))
    stream, m = vlm_batches.train_stream(vex, proc, 100, 2, seed=1, num_epochs=1)
    batches = list(stream)
    assert len(batches) == len(rows) // 2 and m == vlm_batches.max_images(vex, rows, 2)
    targets = sum(int(b["loss_mask"].sum()) for b in batches)
    dropped = len(rows) % 2  # a last partial batch is dropped
    assert targets == vex.examples.target_tokens() if not dropped else targets < vex.examples.target_tokens()
    by_pixels = {n: images.pixel_values(proc, [images.open_image(tmp_path / "img" / f"{n}.png")])[0] for n in names}
    for b in batches:
        want = []  # the images of each row's examples in order, the example known by its "answer i"
        for r in range(2):
            for seg in range(1, int(b["segment_ids"][r].max()) + 1):
                i = int(re.search(r"answer (\d)", tok.decode(b["tokens"][r][b["segment_ids"][r] == seg]))[1])
                want += [by_pixels[names[i % 3]]] if i % 3 else [by_pixels["grey"], by_pixels["rgb"]]
        assert b["pixel_values"].shape == (m, 3, 32, 32) and int(b["image_mask"].sum()) == len(want)
        assert (b["tokens"] == vlm.marker_id(tok)).sum() == 16 * len(want)
        np.testing.assert_array_equal(b["pixel_values"][:len(want)], np.stack(want))
        assert not b["pixel_values"][len(want):].any()
    again = list(vlm_batches.train_stream(vex, proc, 100, 2, seed=1, num_epochs=1)[0])
    for x, y in zip(batches, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
