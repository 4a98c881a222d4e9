"""Configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`, applied on top of the
base config (`jaxft/config/base.py`, which declares every key with its default and comment).

Command-line overrides look like `--config.lora.rank=32`; the value is parsed as the type of the field it
replaces, and a key that does not exist is an error that names it. Keys the user leaves unset whose default
depends on the method (the learning rate) take the method's default (`jaxft.config.defaults`). `load` records
where each value comes from, and `describe` says it in the run's first log lines; `validate` checks every value
that can be checked without the model (`jaxft.config.checks`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

import ml_collections

from jaxft.config import base
from jaxft.config.checks import ConfigFileError, validate
from jaxft.config.defaults import METHOD_DEFAULTS

__all__ = ["ConfigFileError", "METHOD_DEFAULTS", "apply_override", "base", "describe", "load", "read", "sources",
           "validate"]

BASE_FILE = "jaxft/config/base.py"  # where every key is documented (named in messages and --help)
_SOURCES = "_jaxft_sources"  # attribute of a loaded config: {key: where its value comes from}


def read(path: str | Path) -> ml_collections.ConfigDict:
    """The base config with the `get_config()` of the file at `path` applied: what a config file that extends
    another starts from (unlocked; method defaults not yet filled in)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"jaxft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigFileError:
        raise
    except Exception as e:  # a user's file: report where, not our stack
        raise ConfigFileError(f"{path}: could not be executed: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"{path}: defines no get_config()")
    config = base.get_config()
    for key, value in _flatten(module.get_config()).items():
        _set(config, key, value, str(path))
    return config


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The locked config of the file at `path` with `key=value` overrides (keys without 'config.') and the
    method's defaults for what neither sets."""
    config = read(path)
    config.lock()
    defaults = _flatten(base.get_config())
    found = {k: f"config file {path}" for k, v in _flatten(config).items() if v != defaults[k]}
    for item in overrides:
        found[apply_override(config, item, source=str(path))] = "override"
    method = config.peft.method
    for key, value in METHOD_DEFAULTS.get(method, {}).items():
        if _get(config, key) is None:
            _set(config, key, value, "method defaults")
            found[key] = f"method default for {method}"
    object.__setattr__(config, _SOURCES, found)
    return config


def sources(config) -> dict[str, str]:
    """{key: 'override' | 'config file PATH' | 'method default for M'} of the keys `load` did not take from the
    base config (empty for a config built by other means)."""
    return dict(getattr(config, _SOURCES, {}))


def describe(config) -> list[str]:
    """The values in force that are not the base config's, one 'key=value (where from)' per line; the method
    and learning rate always."""
    found = sources(config)
    keys = ["peft.method", "train.learning_rate"] + sorted(k for k in found if k not in ("peft.method",
                                                                                          "train.learning_rate"))
    return [f"{k}={_get(config, k)!r} ({found.get(k, 'base default')})" for k in keys]


def apply_override(config: ml_collections.ConfigDict, item: str, source: str = "config") -> str:
    """Sets one `a.b.c=value` override, parsing the value as the type of the existing field; returns the key."""
    if "=" not in item:
        raise ConfigFileError(f"override {item!r}: expected key=value, e.g. lora.rank=32")
    key, text = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    node, last = _node(config, key, source)
    field_type = node.get_type(last)
    try:
        value = _parse(text, node[last], field_type)
    except ValueError as e:
        raise ConfigFileError(f"override {key}={text!r}: {e}") from None
    with config.unlocked():
        try:
            node[last] = value
        except TypeError:
            raise ConfigFileError(f"override {key}={text!r}: expected {field_type.__name__}") from None
    return key


def _node(config, key: str, source: str):
    """(the ConfigDict holding `key`, its last name); ConfigFileError naming an unknown key."""
    *parents, last = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ConfigFileError(_unknown(".".join(parents[: i + 1]), node, source))
        node = node[name]
    if last not in node or isinstance(node[last], ml_collections.ConfigDict):
        raise ConfigFileError(_unknown(key, node, source))
    return node, last


def _get(config, key: str):
    node = config
    for name in key.split("."):
        node = node[name]
    return node


def _set(config, key: str, value, source: str) -> None:
    node, last = _node(config, key, source)
    with config.unlocked():
        try:
            node[last] = value
        except TypeError:
            raise ConfigFileError(f"{source}: {key}={value!r}: expected {node.get_type(last).__name__} (as in "
                                  f"{BASE_FILE})") from None


def _flatten(config, prefix: str = "") -> dict:
    out = {}
    for name, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _parse(text: str, old, field_type=None):
    if field_type is bool or isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if field_type is int or isinstance(old, int):
        return int(text)
    if field_type is float or isinstance(old, float):
        return float(text)
    if isinstance(old, (tuple, list)):
        value = ast.literal_eval(text)
        return type(old)(value if isinstance(value, (tuple, list)) else (value,))
    if old is None and field_type in (None, object):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def _unknown(key: str, node, source: str) -> str:
    name = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(name, list(node.keys()), n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near[0]}?)" if near else ""
    return f"{source}: no config key {key!r}{hint}; every key is declared in {BASE_FILE}"
