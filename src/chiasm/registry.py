"""Name -> implementation tables for each seam (encoders, bridges, ...).

Names are matched exactly: a registry never guesses from a substring or a path, so a
config always means one thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from chiasm.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named implementations of one seam, filled by the ``register`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Decorator that files a class under ``name``; a name can be taken only once."""

        def wrap(cls: type[T]) -> type[T]:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._table[name].__name__}")
            self._table[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> type[T]:
        """The class registered under exactly ``name``, or a KeyError listing the known names."""
        try:
            return self._table[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._table))}") from None

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table
