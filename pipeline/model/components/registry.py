"""Name -> class registries: the user-facing vocabulary of each component family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of component classes. `get` fails with the list of valid names.

    A registered class carries its config dataclass as `Config`, whose default `name` is the
    registry name and whose `family` is this registry's: the config alone then finds its class.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._items:
                raise KeyError(f"{self.family} '{name}' is registered twice")
            config = getattr(cls, "Config", None)
            if config is None or config.family != self.family or config().name != name:
                raise TypeError(f"{cls.__name__}.Config must be a {self.family} config whose default name is '{name}'")
            self._items[name] = cls
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests that register a component of their own)."""
        self.get(name)
        del self._items[name]

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} '{name}'; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items  # a dict or list from a bad override is not a name
