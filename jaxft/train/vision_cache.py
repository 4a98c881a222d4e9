"""`vision.cache_features`: a frozen vision tower's output for each training image computed once
(`jaxft.models.llava.FeatureCache`) and put into the batches in place of the pixels, so that the train step
skips the tower from the second time an image comes around (a second epoch). The numbers are those the pixels
give: the tower is frozen, and the features are computed in the run's compute dtype."""

from __future__ import annotations

from jaxft.models import llava


class CachedBatches:
    """An iterator of image batches (with get_state / set_state, as the trainer resumes it) whose
    `pixel_values` become `image_features` through `cache`. The cache lives in host memory only: a resumed run
    computes each image once more."""

    def __init__(self, batches, cache: llava.FeatureCache):
        self.batches, self.cache = batches, cache

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.cache.batch(next(self.batches))

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)


def cached(config, cfg, base, train_data, eval_batches: list, dtype) -> tuple:
    """(train_data, eval_batches, cache) with the tower's features in place of the pixels where
    vision.cache_features is set (else as given, and cache None). Raises ValueError for a text-only model."""
    if not config.vision.cache_features:
        return train_data, eval_batches, None
    if not hasattr(cfg, "image_token_id"):
        raise ValueError(f"vision.cache_features=True: model_type {cfg.model_type!r} is a text-only model, with no "
                         f"vision tower (leave vision.cache_features at False)")
    cache = llava.FeatureCache(cfg, base, dtype)
    return CachedBatches(train_data, cache), [cache.batch(b) for b in eval_batches], cache
