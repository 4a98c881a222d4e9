"""Image files to pixel values, with the model's own transformers image processor, and the checks that let a
data set skip the images it cannot use.

The processor is built from a `preprocessor_config.json` dict (no hub): CLIP's (resize the short side, centre
crop), SigLIP's (resize to a square), both normalizing with the config's mean and std, or Idefics3's (each image
tiled into squares of the tower's size, plus the whole image resized); what jaxft feeds the tower is then
exactly what transformers feeds it. `open_image` refuses (ImageError, a one-line reason) a file
that is missing, cannot be decoded, has a mode that does not convert to RGB, or holds more pixels than a bound;
images of any other mode PIL converts (L, LA, P, RGBA, CMYK, I;16, ...) become RGB as the processors'
`do_convert_rgb` makes them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import transformers
from PIL import Image, UnidentifiedImageError

# The PIL backends: what `CLIPImageProcessor(...)` falls back to without torchvision, chosen here explicitly
# (same numbers, no warning, no torch).
PROCESSORS = {"CLIPImageProcessor": transformers.CLIPImageProcessorPil,
              "SiglipImageProcessor": transformers.SiglipImageProcessorPil,
              "Idefics3ImageProcessor": transformers.Idefics3ImageProcessorPil}
MAX_PIXELS = 4096 * 4096  # default bound on an image's width x height (a decompression-bomb guard)


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and why."""


def image_processor(settings: dict, source: str = "preprocessor_config.json"):
    """A transformers image processor from a preprocessor_config.json dict; `image_processor_type` picks the
    class (one of PROCESSORS; a "...Fast" suffix is accepted). Raises ValueError naming `source` otherwise."""
    kind = str(settings.get("image_processor_type", "")).removesuffix("Fast")
    if kind not in PROCESSORS:
        raise ValueError(f"{source}: image_processor_type {settings.get('image_processor_type')!r} is not supported "
                         f"(expected one of {', '.join(PROCESSORS)})")
    kwargs = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
    return PROCESSORS[kind](**kwargs)


def image_token_count(vision_config: dict, strategy: str = "default") -> int:
    """How many `<image>` tokens one image becomes in a LLaVA prompt, counted as `LlavaProcessor` counts them:
    (image_size / patch_size)^2, plus CLIP's class token, minus one where `strategy`
    (`vision_feature_select_strategy`) is "default" (the model then drops the first feature).
    `vision_config` is a LLaVA config's `vision_config` dict."""
    try:
        size, patch, kind = vision_config["image_size"], vision_config["patch_size"], vision_config["model_type"]
    except KeyError as e:
        raise ValueError(f"vision_config: missing field {e.args[0]!r}") from None
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (expected 'default' or 'full')")
    return (size // patch) ** 2 + (kind == "clip_vision_model") - (strategy == "default")


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path`, decoded and in RGB. Raises ImageError ("<path>: <why>") for a missing or
    unreadable file (not an image, truncated, corrupt), a mode PIL cannot convert to RGB, or more than
    `max_pixels` pixels (checked from the header, before decoding)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                w, h = image.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: image of {w}x{h} pixels is larger than the bound of {max_pixels}")
                image.load()
                try:
                    return _rgb(image)
                except (ValueError, OSError) as e:
                    raise ImageError(f"{path}: image mode {image.mode!r} cannot be converted to RGB "
                                     f"({_first_line(e)})") from None
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: {_first_line(e)}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data surfaces as any of these
        raise ImageError(f"{path}: unreadable image ({_first_line(e)})") from None


def pixel_values(processor, images: list[Image.Image]) -> np.ndarray:
    """RGB images (any sizes) -> (n, C, H, W) float32, as `processor(images=...)` gives them; for Idefics3, the
    tiles of each image in order (its own count per image: n is their total)."""
    tiled = isinstance(processor, transformers.Idefics3ImageProcessorPil)
    if not images:
        size = (processor.max_image_size["longest_edge"],) * 2 if tiled else (
            processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size)
        size = size if tiled else (size["height"], size["width"])
        return np.zeros((0, 3, *size), np.float32)
    if tiled:  # one image at a time, so that no padding tiles come in (a batch pads to its most tiles)
        return np.concatenate([np.asarray(processor(images=[[im]], return_tensors="np")["pixel_values"][0],
                                          np.float32) for im in images])
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)


def tile_grid(processor, image: Image.Image) -> tuple[int, int]:
    """(rows, cols) of the tiles an Idefics3 image processor cuts `image` into ((0, 0): not cut, the whole
    image alone), as `processor(..., return_row_col_info=True)` reports them; the image becomes rows * cols + 1
    tiles (the last the whole image, resized)."""
    info = processor(images=[[image]], return_row_col_info=True)
    return int(info["rows"][0][0]), int(info["cols"][0][0])


def pixel_shape(processor) -> tuple[int, int, int]:
    """(C, H, W) of the pixel values `processor` makes."""
    return pixel_values(processor, []).shape[1:]


def _rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it (every mode through RGBA, composited over white), so that
    the processor's own conversion is a no-op on what this returns."""
    if image.mode == "RGB":
        return image
    white = Image.new("RGBA", image.size, (255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
