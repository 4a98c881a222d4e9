"""docs/config.md is generated from the base config: it must name every key with its default and comment."""

from pathlib import Path

from jaxft import config as config_lib
from jaxft.config import reference

ROOT = Path(__file__).resolve().parent.parent


def _keys(config, prefix=""):
    for name, value in config.items():
        if hasattr(value, "keys"):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_docs_config_is_current_and_complete():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == reference.markdown(), "docs/config.md is stale: python -m jaxft.config.reference > docs/config.md"
    rows = {key: (default, comment) for key, default, comment in reference.rows(reference.SOURCE.read_text())}
    base = config_lib.base.get_config()
    for key in _keys(base):
        assert f"| `{key}` |" in text, key
        assert rows[key][1], f"{key} has no comment"
    assert rows["train.steps"][0] == repr(base.train.steps)
    assert rows["task"][1].endswith("what is trained and measured (jaxft.tasks)")  # a comment over two lines
