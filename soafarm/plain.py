"""Frozen dataclasses to and from plain data (the maps msgpack and JSON carry), checked.

One checker for every typed record that crosses a process boundary (Redis records, control
RPC arguments and replies): each field is checked against its annotation, so code past the
edge holds typed values, never a dict it has to re-check with its own literal defaults.

Supported annotations: bool, int, float (an int is widened), str, str enums, `X | None`,
`dict[str, X]`, `tuple[X, ...]`, nested frozen dataclasses, and Any (taken as is).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

from soafarm.errors import DecodeError

T = TypeVar("T")

#: Field metadata key (`field(metadata={FLAT: True})`): this nested record's fields sit beside
#: the outer record's on the wire (a session description is the session record's map plus a
#: few live fields).
FLAT = "soafarm.flat"

_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    # get_type_hints evaluates string annotations: cache it, records are decoded in loops
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def to_plain(value: Any) -> Any:
    """`value` as plain data: records as maps (flat fields merged), enums as their values,
    tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = to_plain(getattr(value, f.name))
            if f.metadata.get(FLAT):
                out.update(item)
            else:
                out[f.name] = item
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def wire_names(cls: type[Any]) -> set[str]:
    """The keys a record of `cls` has on the wire (flattened records' keys included)."""
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get(FLAT):
            names |= wire_names(_hints(cls)[f.name])
        else:
            names.add(f.name)
    return names


def from_plain(cls: type[T], data: Any, where: str, *, strict: bool = False) -> T:
    """Build a `cls` record from a map, checking every value against its annotation.

    Missing keys take the field's default (a missing key without one is an error). Unknown
    keys are ignored (a newer writer added them) unless `strict`, where they are an error
    naming the allowed keys. Every failure is a `DecodeError` naming `where` and the field.
    """
    if not isinstance(data, Mapping):
        raise DecodeError(f"{where}: expected a map, got {_type_name(data)}")
    if strict:
        allowed = wire_names(cls)
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise DecodeError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                f"{', '.join(sorted(allowed)) or 'none'}"
            )
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get(FLAT):
            values[f.name] = from_plain(hints[f.name], data, where)
        elif f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], f"{where}: {f.name}", strict)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DecodeError(f"{where}: missing {f.name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a record's own __post_init__ check
        raise DecodeError(f"{where}: {e}") from None


def _value(kind: Any, value: Any, where: str, strict: bool) -> Any:  # noqa: PLR0911, PLR0912
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        if len(options) != 1:
            raise DecodeError(f"{where}: unsupported annotation {kind!r}")
        return _value(options[0], value, where, strict)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif isinstance(kind, type) and issubclass(kind, Enum):
        allowed = [m.value for m in kind]
        if value in allowed:
            return kind(value)
        raise DecodeError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return from_plain(kind, value, where, strict=strict)
    elif origin is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            item = typing.get_args(kind)[1]
            return {k: _value(item, v, f"{where}[{k!r}]", strict) for k, v in value.items()}
    elif origin is tuple:
        if isinstance(value, list | tuple):
            item = typing.get_args(kind)[0]
            return tuple(_value(item, v, f"{where}[{i}]", strict) for i, v in enumerate(value))
    else:
        raise DecodeError(f"{where}: unsupported annotation {kind!r}")
    raise DecodeError(f"{where}: expected {_kind_name(kind)}, got {value!r}")


def _kind_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is dict:
        return "a map with string keys"
    if origin is tuple:
        return "a list"
    return getattr(kind, "__name__", str(kind))


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
