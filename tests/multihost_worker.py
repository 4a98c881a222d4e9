"""One process of a multi-process training run on CPU devices, for tests/test_multihost.py.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR WORKDIR fresh|resume CACHE_DIR KEY=VALUE...

Joins the run through `jaxft.parallel.initialize` (gloo collectives over localhost), with 4 CPU devices per
process, then trains the default config with the overrides given.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

from jaxft import config as config_lib, parallel  # noqa: E402
from jaxft.train.loop import train  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default_lora.py")


def main(process_id, num_processes, coordinator, workdir, resume, cache_dir, *overrides):
    # The resumed run compiles what the first one did: a persistent cache makes that a lookup.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    parallel.initialize(coordinator, int(num_processes), int(process_id))
    assert jax.process_count() == int(num_processes) and jax.local_device_count() == 4
    summary = train(config_lib.load(CONFIG, list(overrides)), workdir, resume=resume == "resume")
    print(f"process {process_id}: {summary['status']} at step {summary['step']}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
