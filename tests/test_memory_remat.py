"""What a rematerialized layer scan keeps of its blockwise attention (bench/README.md, the long-context trace):
under `jax.checkpoint` in a `lax.scan` (the layer loop with remat), JAX linearized the forward loops inside the
attention's custom VJP and kept every (query block, key block) pair's scores for the backward pass: the
(T, S) matrix the blockwise algorithm exists to avoid (115 GiB a chip for the 8B QLoRA step at 32k tokens with
mesh.context=2). Checked on the jaxpr of the gradient for `chunked` attention and for ring attention over two
simulated devices (a subprocess: `python tests/test_memory_remat.py OUT.json`), gradients equal to the plain
scan's."""

import json
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

B, T, N, K, H = 1, 128, 4, 2, 16
PAIRS = B * N * T * T  # what the stacked (query block, key block) scores held


def _check(fn) -> dict:
    """The largest value in the remat'd scan's gradient jaxpr, and |remat - plain| of the gradients."""
    from jaxprs import equations

    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H)]
    q, k, v = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes))

    def loss(q, k, v, remat):
        body = lambda x, _: (x + fn(x, k, v), None)  # noqa: E731
        body = jax.checkpoint(body, prevent_cse=False) if remat else body
        return jnp.sum(jax.lax.scan(body, q, None, length=2)[0] ** 2)

    remat, plain = (jax.grad(partial(loss, remat=r), (0, 1, 2)) for r in (True, False))
    sizes = [int(np.prod(v.aval.shape)) for e in equations(jax.make_jaxpr(remat)(q, k, v).jaxpr)
             for v in e.outvars if hasattr(v.aval, "shape")]
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(remat(q, k, v), plain(q, k, v)))
    return {"largest": max(sizes), "diff": diff}


def test_chunked_attention_in_a_rematerialized_scan_keeps_no_block_scores():
    from jaxft.models.attention import attention

    got = _check(lambda q, k, v: attention(q, k, v, impl="chunked", block_q=8, block_k=4))
    assert got["largest"] < PAIRS // 2 and got["diff"] < 1e-5, got  # largest: the 2 layers' inputs (16,384)


def test_ring_attention_in_a_rematerialized_scan_keeps_no_block_scores(tmp_path):
    import tiny

    got = tiny.on_simulated_devices(__file__, tmp_path / "results.json", devices=2)
    # each device's program stacked its half of the pairs (PAIRS // 2 = 32,768); largest now: the layer inputs
    assert got["largest"] < PAIRS // 2 and got["diff"] < 1e-5, got


def _ring(out_path):
    from jaxft import backend, config as config_lib, parallel
    from jaxft.parallel.context import context_attention

    config = config_lib.load(Path(__file__).parent.parent / "configs" / "default_lora.py", [])
    mesh = parallel.make_mesh((1, 1, 2, 1, 1), jax.devices()[:2])
    layout = parallel.Layout(mesh, parallel.rules_from_config(config.rules), backend.Attention("xla"))
    with open(out_path, "w") as f:
        json.dump(_check(lambda q, k, v: context_attention(q, k, v, layout, block_q=8, block_k=4)), f)


if __name__ == "__main__":
    _ring(sys.argv[1])
