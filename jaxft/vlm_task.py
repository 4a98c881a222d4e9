"""A generated image task for vision-language fine-tuning: PNG images of one coloured shape on a light background,
a question about it and the exact answer, in LLaVA JSON files, and an exact-match metric.

Every image is drawn with PIL from a seeded generator: a circle, square or triangle of one of five colours, of a
random size and place, on a random light-grey background. The answer names what was drawn ("a red circle");
`box` in each record is the shape's bounding box (x0, y0, x1, y1), so that a check can find the shape. Train and
eval images are distinct files drawn independently (held-out images; the 15 answers occur in both parts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
