"""The backend registry: built-in backends plus the ``guardrail.backends`` entry points."""

from __future__ import annotations

from guardrail.backends.base import BackendSpec
from guardrail.plugins import PluginRegistry

BACKEND_GROUP = "guardrail.backends"

BUILTIN_BACKENDS: dict[str, str] = {
    "local": "guardrail.backends.local:SPEC",
    "remote": "guardrail.backends.remote:SPEC",
}


def backend_registry() -> PluginRegistry[BackendSpec]:
    """A registry of every backend type available in this environment."""
    return PluginRegistry(BACKEND_GROUP, BackendSpec, BUILTIN_BACKENDS)
