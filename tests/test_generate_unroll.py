"""Decoding over per-layer weights split once (`generate(..., unroll=True)`) equals the scanned decode."""

import jax
import numpy as np

from jaxft import generate as gen
from jaxft.models import llama
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora, method


def test_unrolled_forward_and_generation_equal_the_scan():
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
    base = llama.init(jax.random.key(0), cfg)
    base["lm_head"]["w"] = base["lm_head"]["w"] * 20  # spread the logits: no greedy near-ties
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    trainable = lora.init(jax.random.key(1), base, spec, lora.target_paths(base, "all-linear"))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B non-zero: the adapter changes the outputs

    tokens = np.array([[5, 9, 3, 17, 2, 8], [4, 6, 8, 10, 12, 14]], np.int32)
    scanned, _ = llama.forward(cfg, base, tokens, trainable=trainable, lora=spec)
    split, _ = llama.forward(cfg, llama.split_layers(base), tokens, trainable=llama.split_layers(trainable),
                             lora=spec)
    np.testing.assert_allclose(split, scanned, atol=1e-5)
    assert not np.allclose(scanned, llama.forward(cfg, base, tokens)[0], atol=1e-3)

    prompts = [[5, 9, 3, 17, 2, 8, 11], [4], [30, 31, 32, 1, 7, 7, 7, 60, 12, 13]]
    for peft in (None, method.MethodSpec("lora", lora=spec)):
        tree = None if peft is None else trainable
        a = gen.generate(cfg, base, prompts, max_new_tokens=12, trainable=tree, peft=peft)
        b = gen.generate(cfg, base, prompts, max_new_tokens=12, trainable=tree, peft=peft, unroll=True)
        assert a == b and all(len(r) == 12 for r in a)
