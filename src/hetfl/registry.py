"""One small registry type: datasets, partitioners, models and algorithms each own an instance.

A new entry is one decorated function or class::

    @MODELS.register("mlp")
    def mlp(*, input_shape, num_classes, width=1.0, hidden=(200, 200)): ...

Lookups of unknown names raise :class:`~hetfl.errors.ConfigError` listing the known names.  A registry of
parameterised parts (index policies, width schedules) builds an entry from one config string with
:func:`build_entry`: ``"rolling"`` or ``"rolling(stride=2)"``; a new entry with parameters is then one
registered dataclass, with no config field to add anywhere.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from hetfl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


def split_entry(text: str, where: str) -> tuple[str, dict[str, str]]:
    """``"name(key=value; key=value)"`` -> ``("name", {"key": "value", ...})`` (values as written)."""
    body = text.strip()
    hint = f"write e.g. 'name' or 'name(key=value; key=value)', got {text!r}"
    params: dict[str, str] = {}
    if "(" in body:
        if not body.endswith(")") or body.count("(") != 1 or body.count(")") != 1:
            raise ConfigError(f"{where}: cannot read {text!r}; {hint}")
        body, inner = body[:-1].split("(", 1)
        for item in filter(None, (i.strip() for i in inner.split(";"))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{where}: expected key=value, got {item!r}; {hint}")
            params[key.strip()] = value.strip()
    name = body.strip()
    if not name:
        raise ConfigError(f"{where}: empty name; {hint}")
    return name, params


def _typed(text: str, tp: Any, where: str) -> Any:
    if tp is str:
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float, bool) and type(value) is not tp:
        raise ConfigError(f"{where} must be {tp.__name__}, got {text!r}")
    return value


def build_entry(registry: Registry, text: str, where: str) -> Any:
    """Build the registered dataclass named in ``text`` (``"name"`` or ``"name(key=value; ...)"``).

    Its fields are its parameters (int, float, bool or str); unknown names and parameters, mistyped values
    and the entry's own range checks (ConfigError in ``__post_init__``) raise ConfigError naming ``where``.
    """
    name, raw = split_entry(text, where)
    if name not in registry:
        raise ConfigError(f"unknown {registry.kind} {name!r}: {where} must be one of {', '.join(registry.names())}")
    cls = registry.get(name)
    declared = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in declared:
            known = ", ".join(declared) or "none"
            raise ConfigError(f"{where}: {registry.kind} {name!r} has no parameter {key!r}; its parameters: {known}")
        kwargs[key] = _typed(value, hints.get(key, str), f"{where}: {name} parameter {key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where} = {text!r}: {exc}") from None

