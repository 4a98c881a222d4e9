"""LoRA on the experts of a mixture of experts, with a trainable router: the default model (SmolLM2-135M-Instruct)
upcycled to 8 experts, top-2, instruction-tuned on alpaca-style data. Make the model once, then train:

  jaxft upcycle --model default --experts 8 --top-k 2 --router-noise 0.02 --out models/smollm2-8x135m
  jaxft train --config configs/moe_lora.py --workdir runs/moe \
      --config.data.train=../shared/data/instruction/alpaca_small.json

LoRA r=16 on attention and on every expert's gate/up/down weights (per-expert factors inside the grouped
products), plus LoRA on the router so that routing can adapt; the load-balancing loss at the checkpoint's
weight (router_aux_loss_coef, 0.02 as `jaxft upcycle` writes it) keeps the experts in use. The upcycled model
starts with the dense model's logits; the router noise breaks the tie between the expert copies.
Everything not set here is as in default_lora.py (every key: jaxft/config/base.py).
"""

from pathlib import Path

import ml_collections

from jaxft import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.read(Path(__file__).with_name("default_lora.py"))
    c.model = "models/smollm2-8x135m"  # the directory `jaxft upcycle` writes (command in the docstring)
    c.lora.targets = r"layers/(attn/.*|mlp/experts/.*|mlp/router)/w"  # all-linear plus the router
    c.moe.router_z_loss_coef = 1e-3  # ST-MoE's weight: keeps the router's logits small
    return c
