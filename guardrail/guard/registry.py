"""The filter registry: built-in filter types plus the ``guardrail.filters`` entry points."""

from __future__ import annotations

from guardrail.guard.filter import FilterSpec
from guardrail.plugins import PluginRegistry

FILTER_GROUP = "guardrail.filters"

BUILTIN_FILTERS: dict[str, str] = {
    "rules": "guardrail.filters.rules:SPEC",
    "pii": "guardrail.filters.pii:SPEC",
    "toxicity": "guardrail.filters.toxicity:SPEC",
    "hallucination": "guardrail.filters.hallucination:SPEC",
}


def filter_registry() -> PluginRegistry[FilterSpec]:
    """A registry of every filter type available in this environment."""
    return PluginRegistry(FILTER_GROUP, FilterSpec, BUILTIN_FILTERS)
