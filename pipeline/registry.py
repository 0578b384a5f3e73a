"""A name -> implementation map with loud errors.

Every swappable concern (initializers, activations, normalizations, models, datasets) is a
``Registry``. Keys are lower snake names that equal the YAML file names in ``conf/`` and the MLflow
param values. Looking up an unknown name raises ``ConfigError`` listing every valid name;
registering a name twice raises.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to entries of one kind, e.g. ``INITIALIZERS``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("xavier_uniform", "glorot_uniform")``."""

        def add(entry: T) -> T:
            self.add(name, entry, *aliases)
            return entry

        return add

    def add(self, name: str, entry: T, *aliases: str) -> None:
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
        self._entries[name] = entry
        self._aliases.update({alias: name for alias in aliases})

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (an alias resolves to its target)."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ConfigError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names(aliases=True))}")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self, aliases: bool = False) -> list[str]:
        keys = list(self._entries) + (list(self._aliases) if aliases else [])
        return sorted(keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
