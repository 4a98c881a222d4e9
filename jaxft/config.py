"""Configs are Python files whose `get_config()` returns a locked `ml_collections.ConfigDict`.

Command-line overrides look like `--config.lora.rank=32`; the value is parsed as the type of the field it
replaces, and a key that does not exist is an error that names it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

import ml_collections


class ConfigFileError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the file at `path` and applies `key=value` overrides (keys without 'config.')."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"jaxft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: report where, not our stack
        raise ConfigFileError(f"{path}: could not be executed: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"{path}: defines no get_config()")
    config = module.get_config()
    config.lock()
    for item in overrides:
        apply_override(config, item, source=str(path))
    return config


def apply_override(config: ml_collections.ConfigDict, item: str, source: str = "config") -> None:
    """Sets one `a.b.c=value` override, parsing the value as the type of the existing field."""
    if "=" not in item:
        raise ConfigFileError(f"override {item!r}: expected key=value, e.g. lora.rank=32")
    key, text = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    *parents, last = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ConfigFileError(_unknown(".".join(parents[: i + 1]), node, source))
        node = node[name]
    if last not in node:
        raise ConfigFileError(_unknown(key, node, source))
    old = node[last]
    try:
        value = _parse(text, old)
    except ValueError as e:
        raise ConfigFileError(f"override {key}={text!r}: {e}") from None
    with config.unlocked():
        node[last] = value


def _parse(text: str, old):
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, (tuple, list)):
        value = ast.literal_eval(text)
        return type(old)(value if isinstance(value, (tuple, list)) else (value,))
    if old is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def _unknown(key: str, node, source: str) -> str:
    name = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(name, list(node.keys()), n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near[0]}?)" if near else ""
    return f"{source}: no config key {key!r}{hint}"
