"""Named registries with loud look-ups and lazy entries (stdlib only: importing it costs nothing).

A registry maps a name (what configs say) to an object (what code calls). An entry may be given
lazily as a ``"package.module:attr"`` string: it is imported on its first ``get``, so the names can
be listed and checked (config validation) without importing the module behind them (torch).

    SCHEDULES = Registry("schedule", {"uniform": _uniform, "cosine": "my.module:cosine"})
    SCHEDULES.names()        # ['cosine', 'uniform'], imports nothing
    SCHEDULES.get("cosine")  # imports my.module, returns my.module.cosine
    SCHEDULES.get("cosin")   # KeyError: unknown schedule 'cosin'; known: cosine, uniform
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_MISSING: Any = object()


def resolve_lazy(path: str) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return the attribute."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"lazy registry entry {path!r} is not of the form 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Name → object, in registration order; unknown names raise a ``KeyError`` listing the known ones.

    It is a read-only ``Mapping`` (``in``, ``len``, iteration over names, ``reg[name]``), so code
    written against the plain dicts it replaces keeps working; ``register`` adds entries.

    Args:
        kind: What an entry is, for messages (``"schedule"``, ``"mask method (pruner.mask)"``).
        entries: Initial entries; a string value is a lazy ``"module:attr"`` reference.
        lazy: ``False``: string values are the entries themselves (e.g. descriptions).
    """

    def __init__(
        self, kind: str, entries: Mapping[str, T | str] | None = None, *, lazy: bool | None = None
    ) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._lazy: set[str] = set()
        for name, entry in (entries or {}).items():
            self.register(name, entry, lazy=lazy)

    def register(self, name: str, entry: T | str, *, lazy: bool | None = None) -> None:
        """Add ``name``; a string ``entry`` is a lazy ``"module:attr"`` reference unless ``lazy=False``.

        Raises:
            KeyError: When ``name`` is already registered.
        """
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        if lazy if lazy is not None else isinstance(entry, str):
            self._lazy.add(name)

    def names(self) -> list[str]:
        """Every registered name, sorted (no lazy entry is imported)."""
        return sorted(self._entries)

    def get(self, name: str, default: Any = _MISSING) -> T:
        """The entry for ``name``, importing it first if it is lazy.

        Args:
            name: A registered name.
            default: Returned for an unknown name; without it an unknown name raises.

        Raises:
            KeyError: For an unknown name (and no ``default``); the message lists the known names.
        """
        if name not in self._entries:
            if default is not _MISSING:
                return default
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")
        if name in self._lazy:
            self._entries[name] = resolve_lazy(self._entries[name])
            self._lazy.discard(name)
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
