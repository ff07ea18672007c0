"""Checks every typed config shares, in one wording (standard library only: no torch import).

    check_keys("data", given, DataConfig, DataConfigError)   # unknown keys, with a did-you-mean
    check_choices("model.attention", cfg, ConfigError)        # fields typed Literal[...]

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
