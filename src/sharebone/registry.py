"""Name -> factory registries: one decorator to add a part, one ``create_*`` to build it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sharebone.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories, e.g. every backbone sharebone can build.

    Example:
        >>> blocks = Registry("block")
        >>> @blocks.register("identity")
        ... def identity(): return "id"
        >>> blocks.create("identity"), blocks.names()
        ('id', ['identity'])
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        #: Appended to the unknown-name error (other ways to name a part, e.g. ``timm:<model>``).
        self.hint = hint
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                warnings.warn(f"{self.kind} '{name}' is registered twice; the later one wins.",
                              stacklevel=2)
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; a KeyError lists the known names."""
        if name not in self._factories:
            raise UnknownNameError(
                f"Unknown {self.kind} '{name}'. Known: {', '.join(self.names())}. "
                f"Register a new one with @register_{self.kind}('{name}')."
                + (f" {self.hint}" if self.hint else "")
            )
        return self._factories[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories
