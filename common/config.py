"""TOML -> frozen dataclasses: types checked, unknown keys refused, all problems reported at once."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


def _convert(tp: Any, value: Any, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, errors)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {type(value).__name__}")
            return None
        return _build(tp, value, where, errors)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {type(value).__name__}")
            return {}
        return dict(value)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return ()
        return tuple(_convert(item, v, f"{where}[{i}]", errors) for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a path string")
            return Path()
        return Path(value).expanduser()
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
            return False
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
            return ""
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], where: str, errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            errors.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})".lstrip("."))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}".lstrip("."), errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}.{name}: required".lstrip("."))
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        errors.append(f"{where}: {exc}")
        return None  # type: ignore[return-value]
    check = getattr(obj, "problems", None)
    if callable(check):
        errors.extend(f"{where}.{p}".lstrip(".") if where else p for p in check())
    return obj


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    errors: list[str] = []
    obj = _build(cls, data, "", errors)
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    return obj


def load_toml(cls: type[T], path: Path) -> T:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:   # e.g. installed without the service user's group
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; it must be readable by the user "
                          "the service runs as (e.g. chgrp fedserver FILE && chmod 0640 FILE)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = from_dict(cls, data, str(path))
    # Relative paths in a config file are relative to the file, not to the working directory.
    return _rebase(cfg, Path(path).resolve().parent)


def _rebase(obj: T, base: Path) -> T:
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Path) and str(v) and not v.is_absolute():
            changes[f.name] = base / v
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _rebase(v, base)
        elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
            changes[f.name] = tuple(_rebase(x, base) for x in v)
    return dataclasses.replace(obj, **changes) if changes else obj
