"""Per-device memory of one attention call (forward + backward) with the sequence split over a `context` axis.

Compiles, without running, the vjp of self-attention on C = 2, 4, 8 simulated CPU devices and reads XLA's
memory analysis per device (temporaries + outputs + arguments), for:
  ring           jaxft.parallel.context: k/v blocks passed around a ring, keys scored 512 at a time within a
                 device, custom VJP (what jaxft uses)
  ring-autodiff  the same ring differentiated by JAX (the scan keeps every step's scores for the backward)
  all-gather     each device gathers the whole K/V and attends its T/C queries to all T keys (einsum softmax)
  one device     jaxft's plain attention on one device (C = 1)
Shapes: one row, N=8 query heads, K=2 key/value heads, H=64, float32, a causal mask. Also counts, per device,
the block pairs a causal mask leaves it to compute, in sequence order and in the zig-zag layout. Prints tables and one
`RESULT` line, and writes bench/results/context_parallel.json.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python bench/context_parallel.py [--seq 2048 8192]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxft.models.attention import attention
from jaxft.parallel.context import _forward, context_attention, zigzag
from jaxft.parallel.rules import Layout

RESULTS = Path(__file__).parent / "results"
N, K, H = 8, 2, 64
RULES = (("batch", ("data",)), ("seq", ("context",)), ("embed", ()), ("heads", ()), ("kv_heads", ()),
         ("head_dim", ()), ("mlp", ()), ("vocab", ()), ("layers", ()), ("lora_rank", ()), ("experts", ()))


def layout(c: int) -> Layout:
    mesh = jax.make_mesh((1, c), ("data", "context"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:c])
    return Layout(mesh, RULES)


def ring_autodiff(q, k, v, seg, pos, lay):
    c, spec = lay.mesh.shape["context"], P("data", "context")

    def local(q, k, v, seg, pos):
        block, t = min(512, q.shape[1]), q.shape[1]
        slots = jax.lax.axis_index("context") * t + jnp.broadcast_to(jnp.arange(t), seg.shape)
        return _forward(("context",), c, True, 1 / math.sqrt(H), (block, block), q, k, v, (seg, pos, slots),
                        jnp.int32(0))[0]

    return jax.shard_map(local, mesh=lay.mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)(
        q, k, v, seg, pos)


def all_gather(q, k, v, seg, pos, lay):
    c = lay.mesh.shape["context"]

    def local(q, k, v, seg, pos):
        t = q.shape[1]
        me = jax.lax.axis_index("context")
        k, v, k_seg, k_pos = (jax.lax.all_gather(x, "context", axis=1, tiled=True) for x in (k, v, seg, pos))
        slots = jnp.broadcast_to(jnp.arange(t * c), k_seg.shape)
        return attention(q, k, v, q_segments=seg, k_segments=k_seg, q_positions=pos, k_positions=k_pos,
                         q_index=me * t + slots[:, :t], k_index=slots, impl="xla")

    spec = P("data", "context")
    return jax.shard_map(local, mesh=lay.mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)(
        q, k, v, seg, pos)


def one_device(q, k, v, seg, pos, lay):
    idx = jnp.broadcast_to(jnp.arange(q.shape[1]), seg.shape)
    return attention(q, k, v, q_segments=seg, k_segments=seg, q_positions=pos, k_positions=pos, q_index=idx,
                     k_index=idx, impl="xla")


VARIANTS = {"ring": lambda q, k, v, s, p, lay: context_attention(q, k, v, lay, s, p),
            "ring-autodiff": ring_autodiff, "all-gather": all_gather}


def memory_gib(attn, t: int, lay: Layout | None) -> float:
    """Per-device bytes (GiB) XLA's memory analysis gives the compiled forward + backward of `attn`."""
    q = jax.ShapeDtypeStruct((1, t, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, K, H), jnp.float32)
    rows = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def step(q, k, v, seg, pos):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg, pos, lay), q, k, v)
        return vjp(out)

    if lay is not None:  # the inputs arrive split over the context axis, as the model's activations would
        shard = lay.sharding(("batch", "seq", None, None))
        q, kv = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard) for x in (q, kv))
        rows = jax.ShapeDtypeStruct(rows.shape, rows.dtype, sharding=lay.sharding(("batch", "seq")))
    m = jax.jit(step).lower(q, kv, kv, rows, rows).compile().memory_analysis()
    return (m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes) / 2**30


def blocks_computed(t: int, c: int, order, block: int = 512) -> list[int]:
    """Per device, the (query block, key block) pairs a causal mask leaves it to compute (the others are
    skipped), slots laid out in `order`, blocks of min(block, T/C)."""
    block = min(block, t // c)
    mine = np.asarray(order).reshape(c, t // c // block, block)
    keys = mine.reshape(-1, block)  # every key block of the ring
    return [int(sum(k.min() <= q.max() for q in queries for k in keys)) for queries in mine]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--context", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    rows = []
    for t in args.seq:
        rows.append({"seq": t, "context": 1, "variant": "one device", "gib": memory_gib(one_device, t, None)})
        for c in args.context:
            for name, attn in VARIANTS.items():
                rows.append({"seq": t, "context": c, "variant": name, "gib": memory_gib(attn, t, layout(c))})
            print(f"T={t} C={c} " + " ".join(f"{r['variant']}={r['gib']:.3f}" for r in rows[-3:]), flush=True)
    print(f"\n{'T':>6} {'C':>2} " + " ".join(f"{v:>14}" for v in VARIANTS) + "   (GiB per device, fwd+bwd)")
    for t in args.seq:
        one = next(r["gib"] for r in rows if r["seq"] == t and r["context"] == 1)
        print(f"{t:>6} {1:>2} {'one device':>14} {one:.3f}")
        for c in args.context:
            got = {r["variant"]: r["gib"] for r in rows if r["seq"] == t and r["context"] == c}
            print(f"{t:>6} {c:>2} " + " ".join(f"{got[v]:>14.3f}" for v in VARIANTS))
    print("\ncausal work: (query block, key block) pairs computed per device (blocks of min(512, T/2C), as zig-zag "
          "needs), slowest / fastest device:")
    work = {}
    for t in args.seq:
        for c in args.context:
            for layout_name, order in (("in order", np.arange(t)), ("zig-zag", zigzag(t, c))):
                got = blocks_computed(t, c, order, min(512, t // (2 * c)))
                work[f"T{t}_C{c}_{layout_name.replace(' ', '_').replace('-', '')}"] = got
                print(f"  T={t} C={c} {layout_name:>8}: {max(got)} / {min(got)}")
    RESULTS.mkdir(exist_ok=True)
    record = {"shapes": {"B": 1, "N": N, "K": K, "H": H, "dtype": "float32"}, "rows": rows, "causal_blocks": work,
              "devices": str(jax.devices()[0].platform)}
    (RESULTS / "context_parallel.json").write_text(json.dumps(record, indent=2) + "\n")
    print("RESULT " + " ".join(f"{r['variant'].replace(' ', '_')}_T{r['seq']}_C{r['context']}_gib={r['gib']:.3f}"
                               for r in rows))


if __name__ == "__main__":
    main()
