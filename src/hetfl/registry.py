"""One small registry type: datasets, partitioners, models and algorithms each own an instance.

A new entry is one decorated function or class::

    @MODELS.register("mlp")
    def mlp(*, input_shape, num_classes, width=1.0, hidden=(200, 200)): ...

Lookups of unknown names raise :class:`~hetfl.errors.ConfigError` listing the known names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from hetfl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {obj!r}; pass one")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str, where: str | None = None) -> T:
        try:
            return self._entries[name]
        except KeyError:
            field = f"{where}: " if where else ""
            raise ConfigError(
                f"{field}unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def describe(obj: Any) -> str:
    """The first paragraph of an entry's docstring on one line, for `hetfl list` (a sentence, not its first line)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    first = doc.split("\n\n")[0] if doc else ""
    return " ".join(first.split()).replace("``", "")
