"""Image + text records to token sequences with a loss mask, each image's marker expanded to its image tokens.

Two record formats, told apart per record (a JSON array in a .json file, or one object per line in .jsonl):

  LLaVA:    {"image": "rel/path.png" or ["a.png", ...] (or none), "conversations": [{"from": "human",
            "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
  messages: {"images": ["a.png", ...], "messages": [{"role": "user", "content": [{"type": "image"},
            {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}
            (or the path in each image part, {"type": "image", "image": "a.png"}, and no "images")

Image paths are relative to the data file. A message's parts are joined in order, each `{"type": "image"}` part
becoming the marker; the k-th marker is the k-th image. A conversation with images and no marker gets them at the
start of its first user message (transformers' convention); any other disagreement between markers and images
is an error naming the record. The conversation is then rendered and tokenized as `format="messages"` records
are (`jaxft.data.formats`: chat template, loss on the assistant's tokens only), and each marker token (one
token of the tokenizer) is repeated to the image's token count, as `LlavaProcessor` expands it, with no loss on
them. For Idefics3 / SmolVLM each marker becomes what `Idefics3Processor` makes of it for that image: the
image's tiles (`jaxft.data.images.tile_grid`) each as `<fake_token_around_image><row_i_col_j>` + its image
tokens, then the whole image's (`<global-img>`), the text built by transformers' own processor (`Idefics3Prompt`).
Records with an image that cannot be used are skipped, counted and named in one log line each; an example
longer than seq_len + 1 tokens is skipped and counted (cutting it could cut an image).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import transformers

from jaxft.data.formats import Examples, tokenize_records
from jaxft.data.images import (MAX_PIXELS, ImageError, image_processor, image_token_count, open_image,
                               pixel_values, tile_grid)
from jaxft.data.sources import DataError, Record

log = logging.getLogger(__name__)
MARKER = "<image>"
_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_UNBOUNDED = 1 << 30  # tokenize whole conversations; length is checked after the image tokens are in


@dataclasses.dataclass(frozen=True)
class VlmRecord:
    messages: list[dict]  # {"role": "system" | "user" | "assistant", "content": str with one MARKER per image}
    images: tuple[Path, ...]  # resolved paths, in the order of the markers
    where: str  # "train.json record 3" or "train.jsonl:4": for messages
    file: str  # the data file, as given to read_vlm


@dataclasses.dataclass(frozen=True)
class VlmExamples:
    """Tokenized examples (image tokens expanded) and the image files of each, in the order of their tokens."""

    examples: Examples
    images: list[tuple[Path, ...]]  # (E,) one tuple per example
    skipped_images: int  # records skipped for an image that could not be used
    skipped_too_long: int  # records longer than seq_len + 1 tokens once their images are expanded
    tiles: list[int] | None = None  # (E,) pixel arrays of each example (Idefics3's tiles); None: one per image

    def pixel_count(self, e: int) -> int:
        """How many (C, H, W) pixel arrays example e's images become."""
        return len(self.images[e]) if self.tiles is None else self.tiles[e]

    def __len__(self) -> int:
        return len(self.images)


def read_vlm(path: str | Path) -> list[VlmRecord]:
    """The records of a .json (array of objects) or .jsonl file, in order, validated (module docstring).
    Raises DataError naming the file and record for malformed JSON, a missing or mistyped field, or markers
    that disagree with the images."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        objects = [(f"{path.name}:{n}", _loads(path, line, f":{n}")) for n, line in lines]
    else:
        data = _loads(path, text, "")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        objects = [(f"{path.name} record {i}", obj) for i, obj in enumerate(data)]
    if not objects:
        raise DataError(f"{path}: the data set is empty")
    return [_record(obj, where, path) for where, obj in objects]


def tokenize_vlm(records: list[VlmRecord], tokenizer, seq_len: int, image_tokens: int | Callable, *,
                 system_prompt: str = "", chat_template: bool = True, max_pixels: int = MAX_PIXELS) -> VlmExamples:
    """Checks every image (`jaxft.data.images.open_image`; records with a bad one are skipped and logged), then
    tokenizes the rest with each marker expanded: to `image_tokens` image tokens (an int, `image_token_count`:
    LLaVA), or to `image_tokens(image)`'s ids (`Idefics3Prompt`: Idefics3). Examples longer than seq_len + 1
    tokens are skipped and counted (an image cannot be cut). Raises DataError when no record is left,
    ValueError when MARKER is not one token of `tokenizer`."""
    image_id = marker_id(tokenizer)
    expand = (lambda image: ([image_id] * image_tokens, 1)) if isinstance(image_tokens, int) else image_tokens
    good, bad, expansions = [], 0, []
    for r in records:
        try:
            expansions.append([expand(open_image(p, max_pixels)) for p in r.images])
            good.append(r)
        except ImageError as e:
            log.warning("skipped %s: %s", r.where, e)
            bad += 1
    if not good:
        files = ", ".join(dict.fromkeys(r.file for r in records)) or "the data"
        raise DataError(f"{files}: no record left: all {bad} record(s) have an image that cannot be used")
    pieces = _tokenized(good, tokenizer, system_prompt, chat_template)
    ids_out, loss_out, images, tiles, too_long = [], [], [], [], []
    for r, (ids, loss), expanded in zip(good, pieces, expansions):
        at = ids == image_id
        if int(at.sum()) != len(r.images):
            raise DataError(f"{r.where}: the rendered conversation holds {int(at.sum())} image token(s) for "
                            f"{len(r.images)} image(s) (does the system prompt or template hold {MARKER!r}?)")
        id_parts, loss_parts, start = [], [], 0  # each marker's expansion in place of it, with no loss on it
        for j, (expansion, _) in zip(np.flatnonzero(at), expanded):
            id_parts += [ids[start:j], np.asarray(expansion, ids.dtype)]
            loss_parts += [loss[start:j], np.zeros(len(expansion), bool)]
            start = j + 1
        ids = np.concatenate([*id_parts, ids[start:]])
        loss = np.concatenate([*loss_parts, loss[start:]]).astype(bool)
        if len(ids) > seq_len + 1:
            too_long.append(r.where)
            continue
        ids_out.append(ids.astype(np.int32))
        loss_out.append(loss)
        images.append(r.images)
        tiles.append(sum(n for _, n in expanded))
    if too_long:
        log.warning("skipped %d record(s) longer than seq_len=%d with their image tokens, e.g. %s", len(too_long),
                    seq_len, ", ".join(too_long[:5]))
    if not ids_out:
        files = ", ".join(dict.fromkeys(r.file for r in good))
        raise DataError(f"{files}: no record left: all are longer than seq_len={seq_len} with their image tokens")
    lengths = np.array([len(x) for x in ids_out], np.int64)
    examples = Examples(ids=np.concatenate(ids_out), loss=np.concatenate(loss_out),
                        starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        skipped_too_long=len(too_long), skipped_empty=0)
    return VlmExamples(examples, images, skipped_images=bad, skipped_too_long=len(too_long),
                       tiles=None if isinstance(image_tokens, int) else tiles)


class Idefics3Prompt:
    """`prompt(image)` -> (the token ids an image's marker becomes, its tile count), as `Idefics3Processor`
    expands it (its own `replace_image_token`, on a copy of the tokenizer), for `tokenize_vlm` and
    `image_prompt`. image_seq_len: the image tokens per tile (`llava.Config.image_tokens`)."""

    def __init__(self, processor, tokenizer, image_seq_len: int):
        for token in ("<fake_token_around_image>", "<global-img>"):
            marker_id(tokenizer, token)  # one token each, as in SmolVLM's tokenizer
        self.processor, self.tokenizer, self._ids = processor, tokenizer, {}
        self._text = transformers.Idefics3Processor(image_processor=processor, tokenizer=copy.deepcopy(tokenizer),
                                                    image_seq_len=image_seq_len)

    def __call__(self, image) -> tuple[list[int], int]:
        rows, cols = tile_grid(self.processor, image)
        if (rows, cols) not in self._ids:
            text = self._text.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
            self._ids[rows, cols] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[rows, cols], rows * cols + 1


def image_expansion(hf: dict, tokenizer, processor) -> int | Idefics3Prompt:
    """What each marker becomes for the model of config.json dict `hf` (`tokenize_vlm`'s `image_tokens`): LLaVA's
    image token count, or Idefics3's `Idefics3Prompt`."""
    if hf.get("model_type") == "idefics3":
        v = hf["vision_config"]
        per_tile = (v["image_size"] // v["patch_size"]) ** 2 // hf.get("scale_factor", 2) ** 2
        return Idefics3Prompt(processor, tokenizer, per_tile)
    return image_token_count(hf["vision_config"], hf.get("vision_feature_select_strategy", "default"))


def image_prompt(model_dir: str | Path, cfg, tokenizer, prompt: str, paths, *, chat: bool = False,
                 max_pixels: int = MAX_PIXELS) -> tuple[list[int], np.ndarray]:
    """A prompt with images for `jaxft.generate.generate(..., extras={"pixel_values": pixels})`: (token ids with
    each MARKER repeated to the model's image tokens, pixels (I, C, H, W) from the directory's own image processor
    (preprocessor_config.json)), as LlavaProcessor makes them. The k-th MARKER of `prompt` is the k-th of `paths`;
    a prompt with none gets them all at its start (MARKER * I + "\n"). `chat` wraps the prompt as a user message
    in the tokenizer's chat template. Raises ValueError (ImageError for an image) in one line naming the file."""
    paths = [Path(p) for p in paths]
    if not hasattr(cfg, "image_token_id"):
        raise ValueError(f"{paths[0] if paths else 'image'}: model_type {cfg.model_type!r} at {model_dir} is a "
                         f"text-only model, with no vision")
    markers = prompt.count(MARKER)
    if markers == 0 and paths:
        prompt = MARKER * len(paths) + "\n" + prompt
    elif markers != len(paths):
        raise ValueError(f"the prompt holds {markers} {MARKER!r} marker(s) but {len(paths)} image(s) were given")
    processor = _processor(model_dir)
    opened = [open_image(p, max_pixels) for p in paths]
    pixels = pixel_values(processor, opened)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    image_id = marker_id(tokenizer)
    if image_id != cfg.image_token_id:
        raise ValueError(f"{model_dir}: the tokenizer's {MARKER!r} is token {image_id}, the model's image token is "
                         f"{cfg.image_token_id}")
    if ids.count(image_id) != len(paths):
        raise ValueError(f"the rendered prompt holds {ids.count(image_id)} image token(s) for {len(paths)} image(s) "
                         f"(does the chat template hold {MARKER!r}?)")
    if cfg.model_type == "idefics3":
        expand = Idefics3Prompt(processor, tokenizer, cfg.image_tokens)
        expanded = iter([expand(image)[0] for image in opened])
        return [j for i in ids for j in (next(expanded) if i == image_id else [i])], pixels
    return [j for i in ids for j in ([i] * cfg.image_tokens if i == image_id else [i])], pixels


def _processor(model_dir: str | Path):
    settings = Path(model_dir) / "preprocessor_config.json"
    if not settings.is_file():
        raise ValueError(f"{settings}: not found (the model's image processor settings)")
    return image_processor(json.loads(settings.read_text()), str(settings))


def marker_id(tokenizer, marker: str = MARKER) -> int:
    """The token id of the image marker; ValueError unless the tokenizer keeps it as one token."""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits the image marker {marker!r} into {len(ids)} tokens; add it as one "
                         f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{marker!r}]}}))")
    return ids[0]


def _tokenized(records: list[VlmRecord], tokenizer, system_prompt: str, chat_template: bool):
    """(ids, loss) per record, through formats.tokenize_records (batched); record by record where it dropped one
    (a conversation with nothing to predict), so that the DataError names it."""
    kw = dict(system_prompt=system_prompt, chat_template=chat_template)
    as_records = [Record({"messages": r.messages}, r.where) for r in records]
    ex = tokenize_records(as_records, "messages", tokenizer, _UNBOUNDED, **kw)
    if len(ex) != len(records):
        for r in as_records:
            if len(tokenize_records([r], "messages", tokenizer, _UNBOUNDED, **kw)) == 0:
                raise DataError(f"{r.where}: the conversation has no assistant token to train on")
    return [(ex.ids[a:z], ex.loss[a:z]) for a, z in zip(ex.starts[:-1], ex.starts[1:])]


def _loads(path: Path, text: str, at: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f":{e.lineno}" if not at else at
        raise DataError(f"{path}{line}: malformed JSON ({e.msg} at column {e.colno})") from None


def _record(obj, where: str, file: Path) -> VlmRecord:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        images, messages = _paths(obj, "image", where), _llava_messages(obj["conversations"], where)
    elif "messages" in obj:
        inline: list[str] = []
        images, messages = _paths(obj, "images", where), _hf_messages(obj["messages"], where, inline)
        if inline and images:
            raise DataError(f"{where}: image paths both in field 'images' and in image parts; give one or the other")
        images = images or inline
    else:
        raise DataError(f"{where}: expected field 'conversations' (LLaVA) or 'messages', the record has: "
                        f"{', '.join(obj) or 'nothing'}")
    markers = sum(m["content"].count(MARKER) for m in messages)
    if markers == 0 and images:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{where}: {len(images)} image(s) but no user message to put them in")
        m = messages[first]
        messages[first] = dict(m, content=MARKER * len(images) + "\n" + m["content"])
    elif markers != len(images):
        raise DataError(f"{where}: {markers} {MARKER!r} marker(s) in the conversation but {len(images)} image(s)")
    return VlmRecord(messages, tuple(file.parent / p for p in images), where, str(file))


def _paths(obj: dict, field: str, where: str) -> list[str]:
    value = obj.get(field)
    value = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise DataError(f"{where}: field '{field}' must be an image path or a list of paths")
    return value


def _llava_messages(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in _FROM or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations[{k}] must be {{'from': human | gpt | system, 'value': text}}")
        out.append({"role": _FROM[t["from"]], "content": t["value"]})
    return out


def _hf_messages(messages, where: str, inline: list[str]) -> list[dict]:
    """Messages with string contents; the paths of image parts that name their file are appended to `inline`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of messages")
    out = []
    for k, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in _FROM or not isinstance(content, (str, list)):
            raise DataError(f"{where}: messages[{k}] must be {{'role': system | user | assistant, 'content': text "
                            "or a list of parts}")
        if isinstance(content, list):
            content = _parts(content, f"{where}: messages[{k}]", inline)
        out.append({"role": _FROM[m["role"]], "content": content})
    return out


def _parts(parts: list, where: str, inline: list[str]) -> str:
    text = ""
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text += MARKER
            path = part.get("image", part.get("path"))
            if path is not None:
                if not isinstance(path, str) or not path:
                    raise DataError(f"{where} content[{j}]: an image part's 'image' must be a file path")
                inline.append(path)
        elif kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        else:
            raise DataError(f"{where} content[{j}] must be {{'type': 'image'}} or {{'type': 'text', 'text': ...}}")
    return text
