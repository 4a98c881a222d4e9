"""The trainer: the jitted step, the loop, checkpoints and evaluation of a run."""
