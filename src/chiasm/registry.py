"""Name -> implementation tables for each seam (encoders, bridges, layouts, objectives, scorers).

Names are matched exactly: a registry never guesses from a substring or a path, so a
config always means one thing.

An implementation is filed by the ``register`` decorator when its module is imported. A
registry may also be given a *plugin table*, ``name -> "package.module"``: the module
whose import registers that name. ``get`` imports it on first use, and ``names`` and
``in`` know the name before that. This is how a saved model whose config names an
implementation that lives outside the general path (the synthetic world's ``quadrants``
layout, say) is rebuilt by code that never imports that package itself.

Why a table and not ``importlib.metadata`` entry points: entry points exist only once
the distribution's metadata is installed, so they break in a source checkout used through
``PYTHONPATH``, in a stale editable install, or when a module is renamed without
reinstalling; the table is plain source, read where the registry is, and always matches
the code next to it. Code outside chiasm adds its own names with :meth:`Registry.declare`
(or by importing its module, whose decorators register them) before a config names them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from chiasm.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named implementations of one seam, filled by the ``register`` decorator."""

    def __init__(self, kind: str, plugins: Mapping[str, str] | None = None):
        self.kind = kind
        self._table: dict[str, type[T]] = {}
        self._plugins: dict[str, str] = dict(plugins or {})

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Decorator that files a class under ``name``; a name can be taken only once."""

        def wrap(cls: type[T]) -> type[T]:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._table[name].__name__}")
            self._table[name] = cls
            return cls

        return wrap

    def declare(self, name: str, module: str) -> None:
        """Say that importing ``module`` registers ``name``, without importing it now."""
        if name in self._table or self._plugins.get(name, module) != module:
            where = self._table[name].__name__ if name in self._table else self._plugins[name]
            raise ValueError(f"{self.kind} {name!r} is already provided by {where}")
        self._plugins[name] = module

    def get(self, name: str) -> type[T]:
        """The class registered under exactly ``name`` (importing its plugin module if need be),
        or a KeyError listing the known names."""
        if name not in self._table and name in self._plugins:
            self._load(name)
        try:
            return self._table[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def _load(self, name: str) -> None:
        module = self._plugins[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"{self.kind} {name!r} is provided by {module}, which failed to import: {exc}") from exc
        if name not in self._table:
            raise ImportError(f"{self.kind} {name!r} should be registered by {module}, but importing it did not")

    def names(self) -> list[str]:
        """Every known name: registered ones and those of the plugin table."""
        return sorted(set(self._table) | set(self._plugins))

    def __contains__(self, name: object) -> bool:
        return name in self._table or name in self._plugins
