"""Training checkpoints with orbax: the trainable tree, optimizer state, step, RNG and data-iterator position.

The frozen base is never written: a checkpoint is megabytes, not gigabytes. `meta` records what the run was
(model, method, shapes) so that `--resume` with a different model or rank is refused instead of loading
arrays of the wrong meaning.

A save is all or nothing: orbax writes `STEP.orbax-checkpoint-tmp-*` and renames it to `STEP` when complete,
so a crash (kill -9, a full disk) mid-save leaves at worst such a leftover, which the next run removes; the
checkpoints completed before stay, and `restore` takes the newest of them (or none: the run starts at step 0).
A save that cannot complete raises CheckpointError, one line naming the directory and the bytes it needs.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("jaxft.train")
TMP = "*.orbax-checkpoint-tmp*"  # what orbax names a save in progress
_MARGIN = 1 << 20  # bytes beyond the arrays: orbax's metadata files, the data-iterator state, meta


class ResumeError(ValueError):
    """A workdir whose checkpoints do not belong to this run; the message names the difference."""


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written; the last complete one is kept."""


class Checkpoints:
    def __init__(self, workdir: Path, keep: int):
        self.dir = Path(workdir).absolute() / "checkpoints"
        if jax.process_index() == 0:
            remove_incomplete(self.dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state, meta: dict) -> None:
        """Writes the checkpoint of `step`, or raises CheckpointError leaving the earlier ones as they were."""
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) + _MARGIN
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise CheckpointError(self._full(step, need, free))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        hook, threading.excepthook = threading.excepthook, _quiet  # orbax's writer threads print what is raised here
        try:
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # orbax wraps the OSError of a failed write in its own errors
            remove_incomplete(self.dir)
            if _errno(e) == errno.ENOSPC:
                raise CheckpointError(self._full(step, need, shutil.disk_usage(self.dir).free)) from None
            raise CheckpointError(f"{self.dir}: the checkpoint of step {step} could not be written "
                                  f"({type(e).__name__}: {_first_line(e)}); {self._kept()}") from None
        finally:
            threading.excepthook = hook

    def restore(self, state: dict, meta: dict) -> tuple[dict, object]:
        """The latest complete checkpoint as (state, data-iterator state), after checking it matches `meta`;
        (`state`, None) when there is none (a run killed before its first checkpoint starts again)."""
        step = self.manager.latest_step()
        if step is None:
            return state, None
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        for key in sorted(set(meta) | set(saved)):
            if json.dumps(meta.get(key), sort_keys=True) != json.dumps(saved.get(key), sort_keys=True):
                raise ResumeError(f"{self.dir / str(step)}: checkpoint has {key}={saved.get(key)!r} but this run "
                                  f"has {key}={meta.get(key)!r}; resume with the original config or use a new workdir")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def close(self) -> None:
        self.manager.close()

    def _kept(self) -> str:
        self.manager.reload()
        last = self.manager.latest_step()
        return (f"the last complete checkpoint (step {last}) is kept" if last is not None else
                "no checkpoint was completed yet")

    def _full(self, step: int, need: int, free: int) -> str:
        return (f"{self.dir}: no space left on device for the checkpoint of step {step}: it needs about "
                f"{need} bytes, {free} are free; {self._kept()}. Free some space, then pass --resume")


def remove_incomplete(directory: Path) -> list[str]:
    """Removes what interrupted saves left in `directory` (orbax's temporary directories); returns their names."""
    removed = []
    for leftover in sorted(Path(directory).glob(TMP)) if Path(directory).is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover.name)
    if removed:
        log.warning("removed %d incomplete checkpoint(s) left by an interrupted save: %s", len(removed),
                    ", ".join(removed))
    return removed


def _quiet(args) -> None:
    """threading.excepthook during a save: an exception in orbax's writer thread reaches `save` as well, which
    reports it in one line; printed from the thread too, it is a traceback per failed file."""
    log.debug("checkpoint writer thread %s: %s", args.thread, args.exc_value)


def _errno(e: BaseException) -> int | None:
    """The errno of the first OSError in the chain of `e` (causes and contexts), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if "No space left on device" in str(e):  # tensorstore reports it as text
            return errno.ENOSPC
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
