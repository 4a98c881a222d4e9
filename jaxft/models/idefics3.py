"""Idefics3 / SmolVLM (Idefics3ForConditionalGeneration): the family of `jaxft.models.llava` with Idefics3's
checkpoint names (the tower at `model.vision_model.`, the decoder at `model.text_model.`, the connector at
`model.connector.`). Its Config reads either model_type; the forward pass takes Idefics3's post-normed last
tower layer through the pixel shuffle (`jaxft.models.connectors`). Images are the tiles the Idefics3 image
processor makes, each full-size (jaxft has no patch attention mask for padded tiles).
"""

from jaxft.models.llava import (KIND, LORA_TARGETS, PARAM_AXES, PARTS, Config, decode_logits, forward,
                                checkpoint_names, hf_shapes, image_embeddings, init, init_cache, split_cache,
                                output_head, split_layers, table)

__all__ = ["KIND", "LORA_TARGETS", "PARAM_AXES", "PARTS", "TABLE", "Config", "checkpoint_names", "decode_logits",
           "forward", "hf_shapes", "image_embeddings", "init", "init_cache", "output_head", "split_cache",
           "split_layers"]

TABLE = table("idefics3")
