"""Lazy plugin lookup by ``"module:attribute"`` name, built-ins plus an entry-point group.

A third-party package adds a filter or backend by declaring an entry point, e.g.::

    [project.entry-points."guardrail.filters"]
    my_filter = "my_package.filters:SPEC"

Nothing is imported until a policy or the settings ask for that name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from guardrail.errors import RegistryError

T = TypeVar("T")


def load_object(target: str) -> object:
    """Import ``"package.module:attr"`` and return the attribute."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise RegistryError(f"plugin target {target!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import plugin module {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise RegistryError(f"plugin module {module_name!r} has no attribute {attr!r}") from e


class PluginRegistry(Generic[T]):
    """Names to lazily imported objects of type ``kind``.

    ``builtins`` maps names to targets and always wins over entry points of the same
    name, so an installed package cannot silently replace a built-in.
    """

    def __init__(self, group: str, kind: type[T], builtins: Mapping[str, str]) -> None:
        self.group = group
        self._kind = kind
        self._targets: dict[str, str] = {}
        for ep in entry_points(group=group):
            self._targets[ep.name] = ep.value
        self._targets.update(builtins)
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return sorted(self._targets)

    def register(self, name: str, obj: T) -> None:
        """Add an already imported plugin (tests, embedding applications)."""
        self._loaded[name] = obj
        self._targets.setdefault(name, f"<registered {name}>")

    def get(self, name: str) -> T:
        if name in self._loaded:
            return self._loaded[name]
        target = self._targets.get(name)
        if target is None:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"unknown {self.group} plugin {name!r} (known: {known})")
        obj = load_object(target)
        if not isinstance(obj, self._kind):
            raise RegistryError(
                f"{self.group} plugin {name!r} ({target}) is a {type(obj).__name__}, "
                f"not a {self._kind.__name__}"
            )
        self._loaded[name] = obj
        return obj
