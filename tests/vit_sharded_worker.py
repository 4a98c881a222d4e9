"""The 4-device worker of tests/test_vit.py::test_sharded_tower_equals_one_device (run with
--xla_force_host_platform_device_count=4; prints 'sharded==unsharded' when the features agree)."""

import jax
import numpy as np

from jaxft import parallel
from jaxft.models import connectors, vit


def main():
    assert jax.device_count() == 4
    rules = (("batch", ("data", "fsdp")), ("seq", ()), ("embed", ("fsdp",)), ("heads", ("tensor",)),
             ("kv_heads", ("tensor",)), ("head_dim", ()), ("mlp", ("tensor",)), ("vocab", ("tensor",)),
             ("layers", ()), ("lora_rank", ()), ("experts", ()))
    cfg = vit.Config(dim=32, n_layers=2, n_heads=4, mlp_dim=48, image_size=32, patch_size=8)
    proj_cfg = connectors.LlavaProjector(vision_dim=32, text_dim=24)
    tower = vit.init(jax.random.PRNGKey(0), cfg)
    tower = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), tower)
    proj = connectors.init(jax.random.PRNGKey(2), proj_cfg)
    pixels = jax.random.normal(jax.random.PRNGKey(3), (4, 3, 32, 32))

    def features(tower, proj, pixels, layout):
        hidden = connectors.llava_features(cfg, tower, pixels, layout=layout)
        return connectors.project(proj_cfg, proj, hidden)

    want = jax.jit(features, static_argnums=3)(tower, proj, pixels, None)
    layout = parallel.Layout(parallel.make_mesh((1, 2, 2)), rules)
    tower_s = jax.device_put(tower, parallel.base_shardings(tower, layout, vit.PARAM_AXES))
    proj_s = jax.device_put(proj, parallel.base_shardings(proj, layout, connectors.PARAM_AXES))
    spec = tower_s["layers"]["attn"]["q_proj"]["w"].sharding.spec
    assert [a[0] if isinstance(a, tuple) else a for a in spec] == [None, "fsdp", "tensor"], spec
    got = jax.jit(features, static_argnums=3)(tower_s, proj_s, pixels, layout)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    print("sharded==unsharded")


if __name__ == "__main__":
    main()
