"""Sharded training on a device mesh, one host or many.

A `Layout` (a mesh with axes data, fsdp, tensor, and the config's rules from logical axes to mesh axes) is
the one source of every PartitionSpec: the model names the axes of its parameters (a path table next to
the model) and activations, `partition` derives the shardings of the base, trainable tree, optimizer state
and batches from it, and arrays are created directly in their shards.
"""

from jaxft.parallel.mesh import from_config, initialize, make_mesh
from jaxft.parallel.partition import (BATCH, MICRO_BATCH, any_process, base_shardings, bytes_per_device,
                                      create_sharded, create_trainable, leaf_sharding, param_names, put_batch,
                                      shard_leaf_fn, shardings_of, state_shardings, to_host, trainable_shardings)
from jaxft.parallel.rules import LOGICAL_AXES, MESH_AXES, Layout, ShardingError, constrain, rules_from_config

__all__ = ["BATCH", "LOGICAL_AXES", "MESH_AXES", "MICRO_BATCH", "Layout", "ShardingError", "any_process",
           "base_shardings", "bytes_per_device", "constrain", "create_sharded", "create_trainable", "from_config",
           "initialize", "leaf_sharding", "make_mesh", "param_names", "put_batch", "rules_from_config",
           "shard_leaf_fn", "shardings_of", "state_shardings", "to_host", "trainable_shardings"]
