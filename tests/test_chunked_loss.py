"""`jaxft.models.loss`: the token loss equals torch's cross-entropy; `chunked_cross_entropy` equals the token
loss of the full logits, value and gradients, and its compiled step holds no (B, T, V) logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.models.layers import einsum
from jaxft.models import loss as loss_module
from jaxft.models.loss import LossError, chunked_cross_entropy, token_loss

B, T, D, V = 2, 24, 16, 50


def _inputs(tied: bool, dtype=jnp.float32, share: float = 0.4):
    kh, kw, kt, km = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(kh, (B, T, D)).astype(dtype)
    head = (0.3 * jax.random.normal(kw, (V, D) if tied else (D, V))).astype(dtype)
    targets = jax.random.randint(kt, (B, T), 0, V)
    mask = (jax.random.uniform(km, (B, T)) < share).astype(jnp.int32)  # 0.4: 21 of 48 tokens carry a target
    return hidden, head, targets, mask


def test_token_loss_equals_torch_and_ignores_what_is_off_the_mask():
    """Sum, count and gradient against torch's cross_entropy with ignore_index=-100; positions off the mask count
    nothing in the sum, even with non-finite logits (an all-padding row) or a -100 target."""
    logits = np.random.RandomState(0).randn(B, T, V).astype(np.float32) * 3
    targets = np.random.RandomState(1).randint(0, V, (B, T))
    mask = np.random.RandomState(2).rand(B, T) < 0.5
    torch_targets = torch.tensor(np.where(mask, targets, -100))
    reference = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(reference.reshape(-1, V), torch_targets.reshape(-1), ignore_index=-100,
                                             reduction="sum")
    want.backward()
    targets = np.where(mask, targets, -100)
    (total, count), grad = jax.value_and_grad(lambda x: token_loss(x, targets, mask), has_aux=True)(logits)
    np.testing.assert_allclose(total, want.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, reference.grad.numpy(), atol=1e-6)
    assert count == mask.sum()
    logits[~mask] = np.nan  # what an all-padding row's logits may hold
    np.testing.assert_allclose(token_loss(logits, targets, mask)[0], want.item(), rtol=1e-5)


def _full(hidden, head, targets, mask, tied):
    logits = einsum("btd,vd->btv", hidden, head) if tied else einsum("btd,dv->btv", hidden, head)
    return token_loss(logits, targets, mask)


def _value_and_grads(fn, hidden, head):
    return jax.jit(jax.value_and_grad(lambda h, w: fn(h, w)[0], (0, 1)))(hidden, head)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("share", [0.4, 1.0, 0.0])  # of the tokens that carry a target
def test_equals_the_full_loss_and_its_gradients(tied, share):
    hidden, head, targets, mask = _inputs(tied, share=share)
    want, want_grads = _value_and_grads(lambda h, w: _full(h, w, targets, mask, tied), hidden, head)
    # chunk 10 does not divide the 48 rows: the last chunk is padded
    ours = lambda h, w: chunked_cross_entropy(h, w, targets, mask, tied=tied, chunk=10)
    got, got_grads = _value_and_grads(ours, hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(ours(hidden, head)[1], mask.sum())
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bfloat16_equals_the_full_loss():
    hidden, head, targets, mask = _inputs(False, jnp.bfloat16)
    want, want_grads = _value_and_grads(lambda h, w: _full(h, w, targets, mask, False), hidden, head)
    got, got_grads = _value_and_grads(
        lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk=16), hidden, head)
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=2e-2, rtol=2e-2)


def test_only_the_rows_with_a_target_pay_for_the_head(monkeypatch):
    """21 of 48 rows carry a target: with chunks of 4 rows, 6 chunks compute logits (counted by a callback in
    the loss of a chunk), not 12."""
    computed = []

    def counted(*args):
        jax.debug.callback(lambda: computed.append(1))
        return token_loss(*args)

    monkeypatch.setattr(loss_module, "token_loss", counted)
    hidden, head, targets, mask = _inputs(False)
    assert int(mask.sum()) == 21
    total, _ = jax.jit(lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk=4))(hidden, head)
    jax.effects_barrier()
    assert len(computed) == 6
    np.testing.assert_allclose(total, _full(hidden, head, targets, mask, False)[0], rtol=1e-5)


def test_compiled_gradient_holds_no_full_logits():
    """XLA's memory analysis at B=2, T=2048, V=32000: the full loss's temporaries hold the (B, T, V) float32
    logits (524 MB, and their gradient); the chunked loss's hold a (256, V) chunk's logits and their gradient
    (2 x 33 MB)."""
    b, t, d, v = 2, 2048, 64, 32000
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32))

    def temp_bytes(loss):
        grad = jax.grad(lambda h, w, tg, m: loss(h, w, tg, m)[0], (0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits, chunk = b * t * v * 4, 256 * v * 4
    assert temp_bytes(lambda h, w, tg, m: _full(h, w, tg, m, False)) >= logits
    assert temp_bytes(lambda h, w, tg, m: chunked_cross_entropy(h, w, tg, m, chunk=256)) < 3 * chunk


def test_bad_settings_are_one_line_errors():
    hidden, head, targets, mask = _inputs(False)
    with pytest.raises(LossError, match=r"^train.loss_chunk must be a positive integer, got 0$"):
        chunked_cross_entropy(hidden, head, targets, mask, chunk=0)
    with pytest.raises(LossError, match=r"^loss head: expected \(V, D\) with D=16, got \(16, 50\)$"):
        chunked_cross_entropy(hidden, head, targets, mask, tied=True)
