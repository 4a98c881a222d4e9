"""Training checkpoints with orbax: the trainable tree, optimizer state, step, RNG and data-iterator position.

The frozen base is never written: a checkpoint is megabytes, not gigabytes. `meta` records what the run was
(model, method, shapes) so that `--resume` with a different model or rank is refused instead of loading
arrays of the wrong meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """A workdir whose checkpoints do not belong to this run; the message names the difference."""


class Checkpoints:
    def __init__(self, workdir: Path, keep: int):
        self.dir = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: dict, meta: dict) -> tuple[dict, object]:
        """The latest checkpoint as (state, data-iterator state), after checking it matches `meta`."""
        step = self.manager.latest_step()
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        for key in sorted(set(meta) | set(saved)):
            if json.dumps(meta.get(key), sort_keys=True) != json.dumps(saved.get(key), sort_keys=True):
                raise ResumeError(f"{self.dir / str(step)}: checkpoint has {key}={saved.get(key)!r} but this run "
                                  f"has {key}={meta.get(key)!r}; resume with the original config or use a new workdir")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def close(self) -> None:
        self.manager.close()
