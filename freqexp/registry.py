"""A name -> factory table. Components register themselves with a decorator, so adding a
model, loss term, filter, augment or dataset is one module plus one yaml file."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from freqexp.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str):
        self.kind = kind  # e.g. "model"
        self.key = key  # the config key that selects an entry, e.g. "model.name"
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(self.key, f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
