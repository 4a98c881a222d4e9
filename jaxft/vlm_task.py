"""A generated image task for vision-language fine-tuning: PNG images of one coloured shape on a light background,
a question about it and the exact answer, in LLaVA JSON files, and an exact-match metric.

Every image is drawn with PIL from a seeded generator: a circle, square or triangle of one of five colours, of a
random size and place, on a random light-grey background. The answer names what was drawn ("a red circle");
`box` in each record is the shape's bounding box (x0, y0, x1, y1), so that a check can find the shape. Train and
eval images are distinct files drawn independently (held-out images; the 15 answers occur in both parts).

`build_model` makes the vision-language model the end-to-end run trains (configs/vlm_lora.py): no pretrained one
can be had without a model hub, so it joins a pretrained language model (default: SmolLM2-135M-Instruct) with a
small CLIP-shaped tower and projector initialized at random, which the run trains from scratch. `predict`
answers the questions greedily (KV cache, the images prefilled once) and `run` is the whole experiment.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from PIL import Image, ImageDraw

from jaxft import checkpoint
from jaxft.data import images as image_files
from jaxft.data.vlm import MARKER
from jaxft.models import connectors, llava, vit

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20),
           "purple": (140, 40, 170)}
QUESTION = "What shape and colour is shown?"
SIZE = 64  # image side in pixels; the model's image processor resizes it


def generate(out_dir: str | Path, n: int, seed: int = 0, *, n_eval: int | None = None) -> tuple[Path, Path]:
    """Writes n training and n_eval (default max(1, n // 4)) evaluation images under out_dir/images/ and their
    records to out_dir/train.json and out_dir/eval.json (LLaVA format, image paths relative to the files);
    returns the two JSON paths. The same (n, seed, n_eval) writes the same bytes."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_eval = max(1, n // 4) if n_eval is None else n_eval
    rng = np.random.default_rng(seed)
    paths = []
    for split, count in (("train", n), ("eval", n_eval)):
        records = []
        for i in range(count):
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
            image, box = draw(shape, colour, rng)
            name = f"images/{split}_{i:05d}.png"
            image.save(out / name, optimize=False)
            records.append({"id": f"{split}_{i:05d}", "image": name, "box": box, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": answer(shape, colour)}]})
        paths.append(out / f"{split}.json")
        paths[-1].write_text(json.dumps(records, indent=1) + "\n")
    return paths[0], paths[1]


def answer(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def draw(shape: str, colour: str, rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """A SIZE x SIZE RGB image of `shape` filled with COLOURS[colour] on a light background, and its box."""
    grey = int(rng.integers(200, 256))
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    side = int(rng.integers(SIZE // 3, SIZE - 8))
    x0, y0 = (int(v) for v in rng.integers(2, SIZE - side - 2, size=2, endpoint=True))
    box = [x0, y0, x0 + side, y0 + side]
    pen, fill = ImageDraw.Draw(image), COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:  # apex at the top centre, base along the bottom
        pen.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side / 2, y0)], fill=fill)
    return image, box


def normalize(text: str) -> str:
    """Lower case, single spaces, without surrounding spaces and a final full stop: how answers are compared."""
    return re.sub(r"\s+", " ", text.strip().lower()).removesuffix(".").strip()


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """The fraction of predictions equal to their answer after `normalize` (0.0 for no predictions)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(normalize(p) == normalize(a) for p, a in zip(predictions, answers)) / len(answers)


def build_model(out_dir: str | Path, lm: str | Path = "default", *, image_size: int = 32, patch_size: int = 8,
                width: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Writes a LLaVA directory: the language model `lm` (a jaxft `checkpoint.load` source) with `<image>` added
    to its tokenizer (one embedding row more, the mean of the others), a random CLIP-shaped tower (`layers`
    blocks of `width`, `image_size` pixels in `patch_size` patches) and a random 2-layer projector; with a CLIP
    image processor (resize + centre crop to image_size, CLIP's mean and std). Returns the directory."""
    loaded = checkpoint.load(lm, dtype=jnp.float32)
    tok = loaded.tokenizer
    tok.add_special_tokens({"additional_special_tokens": [MARKER]})
    image_id = tok.convert_tokens_to_ids(MARKER)
    text = loaded.cfg
    vocab = max(text.vocab_size, image_id + 1)
    params = dict(loaded.params)
    grow = vocab - text.vocab_size
    embed = params["embed"]["w"]
    params["embed"] = {"w": jnp.concatenate([embed, jnp.tile(embed.mean(0, keepdims=True), (grow, 1))])}
    if "lm_head" in params:
        head = params["lm_head"]["w"]
        params["lm_head"] = {"w": jnp.concatenate([head, jnp.tile(head.mean(1, keepdims=True), (1, grow))], 1)}
    tower = vit.Config(dim=width, n_layers=layers, n_heads=max(1, width // 32), mlp_dim=4 * width,
                       image_size=image_size, patch_size=patch_size)
    hf = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
          "text_config": dataclasses.replace(text, vocab_size=vocab).to_hf(), "vision_config": tower.to_hf(),
          "image_token_index": image_id, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
          "projector_hidden_act": "gelu", "tie_word_embeddings": text.tie_embeddings}
    cfg = llava.Config.from_hf(hf)
    k_vision, k_proj = jax.random.split(jax.random.PRNGKey(seed))
    params["vision"] = vit.init(k_vision, tower)
    params["projector"] = connectors.init(k_proj, cfg.projector)
    out = checkpoint.save_hf(cfg, params, out_dir, dtype=jnp.bfloat16, tokenizer=tok, overwrite=True)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                   crop_size={"height": image_size, "width": image_size})
    settings = dict(processor.to_dict(), image_processor_type="CLIPImageProcessor")
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(settings, indent=1) + "\n")
    return Path(out)


def predict(cfg, base: dict, tokenizer, processor, records: list[dict], root: Path, *, trainable=None, peft=None,
            max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """The model's greedy answers to LLaVA records (their first human turn, images relative to `root`): each
    prompt rendered with the chat template, its marker expanded to the image tokens, prefilled with its image,
    then decoded over the KV cache until an end-of-turn token."""
    stop = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if i is not None}
    prompts = []
    for r in records:
        question = r["conversations"][0]["value"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [j for i in ids for j in ([i] * cfg.image_tokens if i == cfg.image_token_id else [i])]
        prompts.append((ids, root / r["image"]))
    # (the weights are arguments, not constants folded into the compiled code)
    prefill = jax.jit(lambda b, t, x, px, c: llava.forward(cfg, b, x, pixel_values=px, cache=c, trainable=t,
                                                           peft=peft))
    step = jax.jit(lambda b, t, x, pos, c: llava.forward(cfg, b, x, positions=pos, cache=c, trainable=t, peft=peft))
    answers = []
    for k in range(0, len(prompts), batch_size):
        chunk = prompts[k:k + batch_size]
        length = len(chunk[0][0])
        if any(len(ids) != length for ids, _ in chunk):
            raise ValueError("predict: the prompts of a batch must have one length (the task's question is one)")
        tokens = np.array([ids for ids, _ in chunk], np.int32)
        pixels = image_files.pixel_values(processor, [image_files.open_image(p) for _, p in chunk])
        cache = llava.init_cache(cfg, len(chunk), length + max_new_tokens)
        logits, cache = prefill(base, trainable, tokens, pixels, cache)
        out = [np.asarray(jnp.argmax(logits[:, -1], -1))]
        for i in range(max_new_tokens - 1):
            pos = np.full((len(chunk), 1), length + i, np.int32)
            logits, cache = step(base, trainable, out[-1][:, None], pos, cache)
            out.append(np.asarray(jnp.argmax(logits[:, -1], -1)))
        for row in np.stack(out, 1):
            cut = next((i for i, t in enumerate(row) if int(t) in stop), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


def run(out_dir: str | Path, config_path: str | Path, overrides: tuple[str, ...] = (), *, n_train: int = 600,
        n_eval: int = 60, lm: str = "default") -> dict:
    """The end-to-end experiment: writes the task's images and records and the model (`build_model`) under
    out_dir, measures exact match on the held-out images, trains with `config_path` (+ `overrides`) into
    out_dir/run, measures again; returns and writes out_dir/result.json."""
    from jaxft import config as config_lib  # (the trainer: only this experiment needs it)
    from jaxft.peft import io as adapter_io
    from jaxft.train.loop import train

    out = Path(out_dir)
    train_file, eval_file = generate(out / "data", n_train, seed=0, n_eval=n_eval)
    model = build_model(out / "model", lm)
    config = config_lib.load(config_path, [f"model={model}", f"data.train={train_file}", f"data.eval={eval_file}",
                                           *overrides])
    loaded = checkpoint.load(model, dtype=jnp.float32)
    processor = image_files.image_processor(json.loads((model / "preprocessor_config.json").read_text()))
    records = json.loads(eval_file.read_text())
    truth = [r["conversations"][1]["value"] for r in records]
    before = predict(loaded.cfg, loaded.params, loaded.tokenizer, processor, records, eval_file.parent)
    summary = train(config, out / "run", overwrite=True)
    trainable, spec, _ = adapter_io.load(out / "run" / "adapter")
    after = predict(loaded.cfg, loaded.params, loaded.tokenizer, processor, records, eval_file.parent,
                    trainable=trainable, peft=spec)
    result = {"exact_match_before": exact_match(before, truth), "exact_match_after": exact_match(after, truth),
              "colour_right_after": sum(a.split()[1:2] == t.split()[1:2] for a, t in zip(after, truth)) / len(truth),
              "shape_right_after": sum(a.split()[2:3] == t.split()[2:3] for a, t in zip(after, truth)) / len(truth),
              "examples": [{"answer": t, "before": b, "after": a} for t, b, a in zip(truth[:8], before, after)],
              "train": {k: summary.get(k) for k in ("step", "status", "eval_loss")}}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The vision-language end-to-end run (README, configs/vlm_lora.py)")
    parser.add_argument("out", help="directory for the data, the model, the run and result.json")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "vlm_lora.py"))
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-eval", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.config, tuple(args.overrides), n_train=args.n_train, n_eval=args.n_eval),
                     indent=1))
