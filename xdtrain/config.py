"""Typed configs: dataclasses loaded from YAML, with `key.sub=value` overrides.

Every job takes `--config <yaml> [key=value ...]`. The YAML is checked against the
dataclass tree: an unknown key, a value of the wrong type, or a required value left
missing raises `ConfigError` naming the dotted key and the file it came from.

    @dataclass
    class TrainConfig:
        lr: float = 1e-3
        epochs: int = 10

    @dataclass
    class JobConfig:
        data: str = MISSING          # required
        train: TrainConfig = field(default_factory=TrainConfig)

    cfg = load_config(JobConfig, "configs/x.yaml", ["train.lr=0.01"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

MISSING: Any = "???"  # sentinel default for required values
T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config: the message names the key and the file (or override) it came from."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: key '{key}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a {tp.__name__} mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}' expects bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}' expects int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: key '{key}' expects float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: key '{key}' expects str, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], raw: dict, source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            close = [f for f in fields if f.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(repr(prefix + c) for c in close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{k}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key, source)
        elif dataclasses.is_dataclass(hints[name]) and f.default_factory is dataclasses.MISSING:
            kwargs[name] = _build(hints[name], {}, source, prefix=key + ".")
    obj = cls(**kwargs)
    for name in fields:
        if getattr(obj, name) is MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['a.b=1', 'c=[1,2]'] into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse value ({e})") from None
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file plus dotted overrides; errors name the key and the source."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        override_tree = parse_overrides(overrides)
        # Check overrides on their own first, so an error names the override, not the file.
        _check_keys(cls, override_tree, "command-line override")
        raw = _merge(raw, override_tree)
        source = f"{source} (+ overrides {' '.join(overrides)})"
    return _build(cls, raw, source)


def from_dict(cls: type[T], raw: dict, source: str = "<dict>", prefix: str = "") -> T:
    """Build `cls` from a plain dict (e.g. the `model:` section of a job config); errors name `prefix` keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    return _build(cls, raw, source, prefix)


def _check_keys(cls: type, tree: dict, source: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for k, v in tree.items():
        if k not in hints:
            raise ConfigError(f"{source}: unknown key '{prefix}{k}'")
        if isinstance(v, dict) and dataclasses.is_dataclass(hints[k]):
            _check_keys(hints[k], v, source, prefix=f"{prefix}{k}.")


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (for metrics JSON and run directories)."""
    return dataclasses.asdict(cfg)
