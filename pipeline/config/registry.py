"""A name -> implementation map with loud errors.

Every swappable concern (initializers, activations, normalizations, models, datasets) is a
``Registry``. Keys are lower snake names that equal the YAML file names in ``conf/`` and the MLflow
param values. Looking up an unknown name raises ``ConfigError`` listing every valid name;
registering a name twice raises.

A registry can be *declared* (pipeline/config/catalog.py): its names and aliases are known before the
module that implements its entries is imported, so that a config is checked without importing
PyTorch (a study's driver never does). That module then registers exactly the declared names
(anything else raises), and ``get`` imports it on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, Optional, TypeVar

from pipeline.config.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to entries of one kind, e.g. ``INITIALIZERS``."""

    def __init__(self, kind: str, implemented_in: Optional[str] = None) -> None:
        self.kind = kind
        self.implemented_in = implemented_in  # the module that registers the declared entries
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._declared: dict[str, tuple[str, ...]] = {}  # name -> its aliases

    def declare(self, name: str, *aliases: str) -> None:
        """A name (and its aliases) whose entry ``implemented_in`` registers."""
        self._check_new(name, *aliases)
        self._declared[name] = aliases
        self._aliases.update(dict.fromkeys(aliases, name))

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("xavier_uniform", "glorot_uniform")``."""

        def add(entry: T) -> T:
            self.add(name, entry, *aliases)
            return entry

        return add

    def add(self, name: str, entry: T, *aliases: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        if self._declared:
            if self._declared.get(name) != aliases:
                raise ValueError(
                    f"{self.kind} '{name}' (aliases: {', '.join(aliases) or 'none'}) is not declared "
                    "as such in pipeline/config/catalog.py: declare it there too"
                )
        else:
            self._check_new(name, *aliases)
            self._aliases.update(dict.fromkeys(aliases, name))
        self._entries[name] = entry

    def _check_new(self, *keys: str) -> None:
        for key in keys:
            if key in self._entries or key in self._declared or key in self._aliases:
                raise ValueError(f"{self.kind} '{key}' is registered twice")

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (an alias resolves to its target)."""
        if name in self._entries or name in self._declared:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ConfigError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names(aliases=True))}")

    def get(self, name: str) -> T:
        key = self.canonical(name)
        if key not in self._entries and self.implemented_in:
            importlib.import_module(self.implemented_in)  # registers the declared entries
        if key not in self._entries:
            raise ValueError(f"{self.kind} '{key}' is declared but {self.implemented_in} does not register it")
        return self._entries[key]

    def names(self, aliases: bool = False) -> list[str]:
        keys = {*self._entries, *self._declared} | (set(self._aliases) if aliases else set())
        return sorted(keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._declared or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
