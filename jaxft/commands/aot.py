"""`jaxft aot`: compile a config's train step for a device topology (a TPU pod) without its devices."""

from __future__ import annotations

import argparse

from jaxft.commands import CommandError

HELP = """Build the run of --config abstractly (shapes, dtypes and shardings: no weight or data is read), lower
and compile its train step for --topology, and print XLA's per-device memory plan as one JSON line; a step that
does not fit ends in one line on stderr (exit code 1). Any family, method and task `jaxft train` runs.

--topology cpu compiles for this machine's devices; TPU topologies (v5e:4x4, v4:2x2x2, v5p:2x2x4, v6e:8x8)
need libtpu (`pip install 'jax[tpu]'`), not a TPU. --model names an HF model directory or its config.json
(only its shapes are read; default: config.model). Override config fields with --config.KEY=VALUE, e.g.
--config.mesh.data=1 --config.mesh.fsdp=-1."""


def register(subparsers) -> None:
    p = subparsers.add_parser("aot", help="compile a config's train step for a topology (fits? memory per device)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="'cpu', or a TPU topology like v5e:4x4, v4:2x2x2, v6e:8x8")
    p.add_argument("--config", required=True, metavar="FILE", help="a jaxft training config file")
    p.add_argument("--model", metavar="DIR_OR_JSON",
                   help="an HF model directory or its config.json, for the shapes (default: config.model)")
    p.add_argument("--memory-gib", type=float, metavar="GIB",
                   help="memory per device the plan must fit (default: the TPU chip's; none for cpu)")
    p.set_defaults(run=run, overrides_allowed=True)


def run(args) -> int:
    from jaxft import config as config_lib
    from jaxft.checkpoint import LoadError
    from jaxft.parallel import ShardingError
    from jaxft.train.aot import check

    try:
        config = config_lib.load(args.config, args.overrides)
        return check(config, args.topology, args.model, args.memory_gib)
    except (config_lib.ConfigFileError, LoadError, ShardingError, ValueError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
