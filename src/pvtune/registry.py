"""A small, open registry: maps names (or config types) to implementations.

Every extension point of pvtune (estimators, weight representations, fine-tuning
strategies) is one of these, so user code can add entries without editing pvtune.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from pvtune.errors import UnknownNameError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(Generic[K, V]):
    """A named mapping with a decorator for registration and helpful lookup errors."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._entries: dict[K, V] = {}

    def register(self, key: K, value: V, *, overwrite: bool = False) -> V:
        """Add ``value`` under ``key``; refuses to replace an entry unless ``overwrite``."""
        if key in self._entries and not overwrite:
            raise ValueError(
                f"{self._what} {key!r} is already registered; pass overwrite=True to replace it"
            )
        self._entries[key] = value
        return value

    def unregister(self, key: K) -> V:
        """Remove and return the entry under ``key`` (a plugin unloading, a test tidying up)."""
        return self._entries.pop(key)

    def decorator(self, key: K, *, overwrite: bool = False) -> Callable[[V], V]:
        """``@registry.decorator(key)`` registers the decorated object."""

        def wrap(value: V) -> V:
            return self.register(key, value, overwrite=overwrite)

        return wrap

    def get(self, key: K) -> V:
        """Look up ``key``; the error lists what is available."""
        try:
            return self._entries[key]
        except (KeyError, TypeError):  # TypeError: an unhashable key read from a file
            known = ", ".join(sorted(map(_label, self._entries)))
            raise UnknownNameError(
                f"unknown {self._what} {_label(key)!r}; known: {known}"
            ) from None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def names(self) -> list[str]:
        """Sorted labels of every registered key."""
        return sorted(map(_label, self._entries))


def _label(key: object) -> str:
    return key.__name__ if isinstance(key, type) else str(key)
