"""Field descriptions for typed configuration (settings, policies, filter configs)."""

from __future__ import annotations

import msgspec


def doc(text: str) -> msgspec.Meta:
    """A field's description: in the JSON Schema (policies/schema.json) and editor hovers."""
    return msgspec.Meta(description=text)
