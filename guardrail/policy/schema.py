"""One JSON Schema for policy files, for editors (completion, hover text, squiggles).

The loader validates in two steps: the document against the schema of
:class:`~guardrail.policy.model.PolicyDocument`, then each ``filters[].config``
against the schema of its type's config struct. An editor needs that in one file,
so here each registered filter type adds an ``if type == T then config: <T's
schema>`` branch to the filter entry, and its ``$defs`` are merged into one table.
Two config structs may share a ``$defs`` name with different content (every plugin
may call its struct ``Config``); the later one is renamed ``<type>.<Name>`` and its
references rewritten, so no schema silently takes another's definition.

``policies/schema.json`` is this schema for the built-in filters; a test keeps it in
sync. Regenerate it with ``python -m guardrail.policy.schema``. Point an editor at it
with a first line ``# yaml-language-server: $schema=./schema.json``.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

from guardrail.guard.filter import FilterSpec
from guardrail.plugins import PluginRegistry
from guardrail.policy.model import PolicyDocument

__all__ = ["SCHEMA_ID", "policy_json_schema", "schema_text", "write_schema"]

SCHEMA_ID = "https://guardrail.dev/policy.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
_REF = "#/$defs/"


def policy_json_schema(registry: PluginRegistry[FilterSpec]) -> dict[str, Any]:
    """The policy schema with every type in ``registry`` constraining ``filters[].config``.

    Loads every registered filter type; a plugin that cannot be imported raises
    :class:`~guardrail.errors.RegistryError`.
    """
    document = msgspec.json.schema(PolicyDocument)
    defs: dict[str, Any] = copy.deepcopy(document["$defs"])
    root_name = document["$ref"].removeprefix(_REF)
    # Inline the document at the root: some editors ignore keywords beside a root "$ref".
    root = defs.pop(root_name)

    names = registry.names()
    branches: list[dict[str, Any]] = []
    for name in names:
        spec = registry.get(name)
        config_schema = _merge(defs, msgspec.json.schema(spec.config_type), owner=name)
        branches.append(
            {
                "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                "then": {"properties": {"config": config_schema}},
            }
        )
    entry = defs["FilterEntry"]
    entry["properties"]["type"]["enum"] = names
    if branches:
        entry["allOf"] = branches

    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        **root,
        "title": "Guardrail policy",
        "$defs": defs,
    }


def schema_text(registry: PluginRegistry[FilterSpec]) -> str:
    """The schema as written to disk: 2-space indent, sorted keys, trailing newline."""
    schema = policy_json_schema(registry)
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema(path: str | Path, registry: PluginRegistry[FilterSpec]) -> None:
    """Write :func:`schema_text` to ``path`` (UTF-8)."""
    Path(path).write_text(schema_text(registry), encoding="utf-8")


def _merge(defs: dict[str, Any], schema: dict[str, Any], owner: str) -> dict[str, Any]:
    """Add ``schema``'s ``$defs`` to ``defs``; return its root with references rewritten.

    A definition equal to the one already there is shared. One that differs is renamed,
    and so is any definition that refers to a renamed one (it would otherwise change
    meaning once its references point into the shared table), until nothing changes.
    """
    incoming: dict[str, Any] = schema.get("$defs", {})
    root = {k: v for k, v in schema.items() if k != "$defs"}
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", owner)
    renames: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, definition in incoming.items():
            if name in renames or name not in defs:
                continue
            if defs[name] != _rewrite(definition, renames):
                renames[name] = _free_name(f"{prefix}.{name}", defs, renames)
                changed = True
    for name, definition in incoming.items():
        defs[renames.get(name, name)] = _rewrite(definition, renames)
    result: dict[str, Any] = _rewrite(root, renames)
    return result


def _free_name(wanted: str, defs: dict[str, Any], renames: dict[str, str]) -> str:
    taken = set(defs) | set(renames.values())
    name, n = wanted, 2
    while name in taken:
        name, n = f"{wanted}{n}", n + 1
    return name


def _rewrite(node: Any, renames: dict[str, str]) -> Any:
    """A copy of ``node`` with ``$ref``s to renamed definitions pointing at the new names."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_REF):
                target = value.removeprefix(_REF)
                out[key] = _REF + renames.get(target, target)
            else:
                out[key] = _rewrite(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite(item, renames) for item in node]
    return node


def main(argv: list[str] | None = None) -> int:
    """``python -m guardrail.policy.schema [PATH]``; PATH defaults to policies/schema.json."""
    from guardrail.guard.registry import filter_registry

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path("policies/schema.json")
    write_schema(path, filter_registry())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
