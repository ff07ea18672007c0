"""Checks every typed config shares, in one wording (standard library only: no torch import).

    check_keys("data", given, DataConfig, DataConfigError)   # unknown keys, with a did-you-mean
    check_choices("model.attention", cfg, ConfigError)        # fields typed Literal[...]
    check_types("eval", given, EvalConfig, RunConfigError)    # values of the fields' types

Each config (model, its components, data, eval, optimizer) calls these instead of writing its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal


def check_keys(
    node: str, given: Iterable[str], cls: type, error: type[Exception] = ValueError, owner: str | None = None
) -> None:
    """Raise `error` for the first key of `given` that is not a field of the dataclass `cls`.

    The message names the key, what it was given to (`owner`, default `node`), the valid keys
    and the closest valid key: `model.n_head is not a setting of model; valid: ...; did you mean n_heads?`
    """
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise error(f"{node}.{key} is not a setting of {owner or node}; valid: {', '.join(valid)}{hint}")


def check_choices(node: str, obj: Any, error: type[Exception] = ValueError) -> None:
    """Raise `error` if a field of the dataclass `obj` typed `Literal[...]` holds another value."""
    for name, allowed in literal_fields(type(obj)).items():
        value = getattr(obj, name)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise error(f"{node}.{name}={value!r} is not valid; valid: {shown}")


@functools.cache
def literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field: allowed values} for the fields of `cls` typed `Literal[...]` (or `Literal[...] | None`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        allowed = _literal_values(hints[f.name])
        if allowed:
            out[f.name] = allowed
    return out


def _literal_values(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals:
            values = tuple(v for lit in literals for v in typing.get_args(lit))
            return values + ((None,) if type(None) in args else ())
    return ()


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a dataclass field's annotation (int for float is fine, a bool
    is not a number); unknown annotations accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_matches, value, args))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True


def check_types(node: str, values: dict[str, Any], cls: type, error: type[Exception] = ValueError) -> None:
    """Every given value of `node` has its field's type (nested dataclass nodes too), so a wrong
    type is one clear line here, not a TypeError from a comparison later."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            continue  # unknown keys: the config's own from_dict names them
        if not _matches(value, hint):
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise error(f"{node}.{key}={value!r} has the wrong type; use {shown}")
        if dataclasses.is_dataclass(hint):
            check_types(f"{node}.{key}", value, hint, error)
