"""`train.loss_chunk`: a training step whose loss runs the output head over chunks of tokens equals the step over
the full logits (loss and gradients), for LLaMA with LoRA and a tied head (causal LM) and for T5's
decoder (seq2seq); a bad value is a one-line error naming the key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import config as config_lib
from jaxft.models import llama, t5
from jaxft.models.config import LlamaConfig
from jaxft.peft import lora
from jaxft.tasks import Model, TaskError, causal_lm, seq2seq
from jaxft.train.step import init_state, make_train_step

CONFIG = "configs/default_lora.py"


def _sft_batch(vocab: int, rows: int = 3, seq_len: int = 12):
    """One micro-batch (leading axis 1) whose loss mask covers the second half of each row (the answer)."""
    rs = np.random.RandomState(0)
    tokens = rs.randint(1, vocab, (1, rows, seq_len)).astype(np.int32)
    mask = np.zeros_like(tokens, np.float32)
    mask[..., seq_len // 2:] = 1
    mask[0, 0, -1] = 0  # a row's last token predicts nothing
    return {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": mask,
            "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()}


def _compare(task, model: Model, base, trainable, batch, chunk: int):
    """One training step with loss_chunk=chunk against loss_chunk=0: plain SGD at learning rate 1, so that the
    updated tree is the tree minus the gradients."""
    runs = {}
    for n in (0, chunk):
        m = dataclasses.replace(model, loss_chunk=n)
        forward = lambda b, t, mb, rng, m=m: task.forward(m, b, t, mb, rng)
        step = jax.jit(make_train_step(forward, optax.sgd(1.0), loss=task.loss))
        runs[n] = step(init_state(trainable, optax.sgd(1.0), jax.random.key(3)), base, batch)
    (full, full_metrics), (chunked, metrics) = runs[0], runs[chunk]
    assert metrics["target_tokens"] == full_metrics["target_tokens"] == batch["loss_mask"].sum()
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    assert full_metrics["grad_norm"] > 1e-3  # the comparison is not between zeros
    grads = lambda state: [a - b for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(state["trainable"]))]
    for a, b in zip(grads(chunked), grads(full)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_llama_lora_tied_head_equals_the_full_logits():
    cfg = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                      tie_embeddings=True)
    base = llama.init(jax.random.key(0), cfg)
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    trainable = lora.init(jax.random.key(1), base, spec, lora.target_paths(base, "all-linear"))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B non-zero: the adapter changes the outputs
    model = Model(family=llama, cfg=cfg, spec=spec.as_method())
    _compare(causal_lm, model, base, trainable, _sft_batch(cfg.vocab_size), chunk=5)  # 5 does not divide 36


def test_t5_decoder_equals_the_full_logits():
    cfg = t5.Config(vocab_size=80, dim=16, n_layers=1, n_decoder_layers=2, n_heads=2, head_dim=8, mlp_dim=24,
                    gated=True, act="gelu_new", tie_embeddings=False, scale_decoder_outputs=True)
    base = t5.init(jax.random.key(0), cfg)
    down = base["decoder"]["layers"]["mlp"]["down_proj"]
    # As full / partial fine-tuning: the decoder's down projections and the head are trained
    trainable = {"decoder": {"layers": {"mlp": {"down_proj": down}}}, "lm_head": base["lm_head"]}
    batch = _sft_batch(cfg.vocab_size, seq_len=8)
    batch = {"tokens": batch["tokens"], "segment_ids": batch["segment_ids"], "targets": batch["targets"],
             "loss_mask": batch["loss_mask"], "dec_tokens": np.roll(batch["targets"], 1, -1),
             "dec_segment_ids": batch["segment_ids"]}
    _compare(seq2seq, Model(family=t5, cfg=cfg), base, trainable, batch, chunk=4)


def test_a_family_without_output_head_and_bad_values():
    batch = jax.tree.map(lambda x: x[0], _sft_batch(16))
    family = type("Family", (), {"forward": staticmethod(lambda *a, **k: (jnp.zeros((3, 12, 8)), None))})
    cfg = LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, mlp_dim=8,
                      model_type="mini")
    with pytest.raises(TaskError, match=r"^train.loss_chunk=4: the mini family has no output_head"):
        causal_lm.forward(Model(family=family, cfg=cfg, loss_chunk=4), {}, None, batch)
    for value in (-1, -1024):
        config = config_lib.load(CONFIG, [f"train.loss_chunk={value}"])
        with pytest.raises(config_lib.ConfigFileError) as e:
            config_lib.validate(config, require_data=False)
        assert str(e.value) == f"train.loss_chunk: {value!r} must be an integer >= 0 (0: the full logits)"
