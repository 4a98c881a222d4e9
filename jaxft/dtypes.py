"""The one table of dtypes a config (`dtype`, `param_dtype`) or a command (`--dtype`) may name: name -> the dtype
JAX computes or stores in. Free of JAX, so that the command line offers the names without importing it."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
