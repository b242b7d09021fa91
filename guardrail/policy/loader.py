"""Load a policy file into a :class:`~guardrail.policy.model.Policy`, or say exactly what is wrong.

A bad policy must stop startup (or a reload) with errors a policy author can act on
without reading Python: every problem in the file at once, each as
``file:line:column: key: message``. That drives the design:

1. The YAML is *composed*, not loaded, so every key and value keeps its line and
   column. We build plain data ourselves from the node graph and record, for each
   JSON path (``("filters", 0, "config", "rules", 1, "regex", 0)``), where its key and
   its value start. Duplicate keys, which PyYAML silently overwrites, are errors here.
2. The data is checked against the JSON Schema that msgspec generates from
   :class:`~guardrail.policy.model.PolicyDocument` (the same schema editors get), and
   each filter's ``config`` against the schema of its type's config struct. jsonschema
   reports every failure with its path; we reword the common ones ("expected a list,
   got a string", "unknown key ... (expected one of: ...)") and place each one with the
   source map: unknown keys at the key itself, missing keys at the parent mapping.
3. What a schema cannot say (a regex that does not compile, duplicate ids, a stage the
   filter type cannot run at) is checked afterwards, and reported the same way.

Only when nothing is wrong is the data converted into typed structs and resolved
(defaults filled in, disabled filters dropped).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator

from guardrail.errors import PolicyError, Problem, RegistryError
from guardrail.guard.filter import ConfigIssue, FilterSpec
from guardrail.guard.types import Action, Stage
from guardrail.plugins import PluginRegistry
from guardrail.policy.model import (
    HEADER_VALUE_PATTERN,
    VISIBLE_PATTERN,
    FilterConfig,
    Id,
    Policy,
    PolicyDocument,
    ScopedTenant,
)
from guardrail.policy.openai_categories import DEFAULT_OPENAI_MAPPING

__all__ = ["load_policy", "load_policy_text"]

JsonPath = tuple[str | int, ...]
"""Where a value sits in the document: mapping keys and list indices from the root."""

Position = tuple[int, int]
"""A 1-based ``(line, column)`` in the policy file."""

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(
    f"{_YAML}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")
)
_MERGE_TAG = f"{_YAML}merge"
# Aliases let a small file expand to a huge one ("billion laughs"); no real policy
# comes near this many values.
_MAX_VALUES = 1_000_000
_SURROGATE = re.compile("[\ud800-\udfff]")

_ID_PATTERN: str = msgspec.json.schema(Id)["pattern"]
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_STAGES = frozenset(s.value for s in Stage)


# --- public API ------------------------------------------------------------------------


def load_policy(path: str | Path, registry: PluginRegistry[FilterSpec]) -> Policy:
    """Read, validate and resolve the policy file at ``path``.

    Raises :class:`~guardrail.errors.PolicyError` listing every problem found; a file
    that cannot be read is one problem at ``1:1``. ``Policy.digest`` is the sha256 of
    the file's bytes and ``Policy.source`` is ``Path(path)``.
    """
    source = Path(path)
    name = str(path)
    try:
        raw = source.read_bytes()
    except OSError as e:
        reason = e.strerror or str(e)
        raise PolicyError(
            [Problem(name, 1, 1, "", f"cannot read the policy file: {reason}")]
        ) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[: e.start].decode("utf-8", errors="replace")
        line, column = _line_column(before, len(before))
        message = f"the file is not UTF-8 text (byte 0x{raw[e.start]:02x} cannot be decoded)"
        raise PolicyError([Problem(name, line, column, "", message)]) from e
    return _load(text, hashlib.sha256(raw).hexdigest(), name, source, registry)


def load_policy_text(
    text: str,
    source: str,
    registry: PluginRegistry[FilterSpec],
    base_dir: Path | None = None,
) -> Policy:
    """Validate and resolve policy ``text``; ``source`` names it in problems.

    ``base_dir`` is the folder the text belongs to, when it is a file's contents: the
    policy's ``source`` is then ``base_dir / source``. Without it (text from an API
    call, a test) the policy has no source file. ``digest`` is the sha256 of the text
    encoded as UTF-8, which equals the file digest of the same text saved as UTF-8.
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    source_path = base_dir / source if base_dir is not None else None
    return _load(text, digest, source, source_path, registry)


# --- the pipeline ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Issue:
    """A problem located by JSON path; turned into a :class:`Problem` with the source map.

    ``at_key`` places it at the key that holds the value (an unknown key, a missing
    key's parent) rather than at the value itself. ``prunable`` is False for a value
    that may not be left out to check the rest of a config (see :func:`_check_config`).
    """

    path: JsonPath
    message: str
    at_key: bool = False
    prunable: bool = True
    warning: bool = False


def _load(
    text: str,
    digest: str,
    name: str,
    source_path: Path | None,
    registry: PluginRegistry[FilterSpec],
) -> Policy:
    parsed = _parse_yaml(text, name)
    data, where = parsed.data, parsed.where
    if parsed.problems and not isinstance(data, dict):
        raise PolicyError(_sorted(parsed.problems))
    if data is None:
        raise PolicyError([Problem(name, 1, 1, "", "the policy file is empty")])
    if not isinstance(data, dict):
        line, column = where.value_at(())
        message = f"a policy must be a mapping of keys to values, got {_describe(data)}"
        raise PolicyError([Problem(name, line, column, "", message)])

    # YAML-level problems (duplicate keys, unsupported tags) do not stop the checks;
    # a value the YAML step already rejected is not reported a second time.
    issues = list(_schema_issues(_document_validator(), data, ()))
    filters, filter_issues = _check_filters(data, where, registry)
    # An empty 'stages' is explained with the stages the filter type would run at: the
    # schema's "must not be an empty list" there would say it a second time, less well.
    explained = {i.path for i in filter_issues if i.path[-1:] == ("stages",)}
    issues = [i for i in issues if i.path not in explained] + filter_issues
    issues = [i for i in dict.fromkeys(issues) if i.path not in parsed.rejected]
    warnings = tuple(_sorted([where.problem(name, i) for i in issues if i.warning]))
    issues = [i for i in issues if not i.warning]
    if issues or parsed.problems:
        problems = parsed.problems + [where.problem(name, i) for i in issues]
        raise PolicyError(_sorted(problems))

    try:
        doc = _convert(data, PolicyDocument)
    except msgspec.ValidationError as e:
        # The schema is generated from these structs, so this is a safety net only.
        issue = _msgspec_issue(e, (), data, PolicyDocument)
        raise PolicyError([where.problem(name, issue)]) from e

    resolved: list[FilterConfig] = []
    positions: list[tuple[int, int, int]] = []
    scoped: list[ScopedTenant] = []
    for i, (entry, (spec, config)) in enumerate(zip(doc.filters, filters, strict=True)):
        if not entry.enabled:
            continue
        positions.append((i, *where.value_at(("filters", i))))
        scoped += _scoped_tenants(entry.id, config, where, ("filters", i, "config"))
        resolved.append(
            FilterConfig(
                id=entry.id,
                type=entry.type,
                stages=frozenset(entry.stages) if entry.stages else spec.stages,
                timeout_s=(entry.timeout_ms or doc.timeout_ms) / 1000,
                on_error=Action(entry.on_error or doc.on_error),
                config=config,
            )
        )
    return Policy(
        name=doc.name,
        version=doc.version,
        description=doc.description,
        digest=digest,
        source=source_path,
        on_error=Action(doc.on_error),
        messages=doc.messages,
        stream=doc.stream,
        filters=tuple(resolved),
        tests=tuple(doc.tests),
        test_positions=tuple(where.value_at(("tests", i)) for i in range(len(doc.tests))),
        filter_positions=tuple(positions),
        scoped_tenants=tuple(scoped),
        warnings=warnings,
        openai_categories={
            **DEFAULT_OPENAI_MAPPING,
            **{c: tuple(keys) for c, keys in doc.openai_categories.items()},
        },
    )


def _sorted(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line, p.column))


# --- YAML with positions ---------------------------------------------------------------


@dataclass(slots=True)
class _SourceMap:
    """Where each JSON path's key and value start in the file (1-based)."""

    keys: dict[JsonPath, Position] = field(default_factory=dict)
    values: dict[JsonPath, Position] = field(default_factory=dict)

    def value_at(self, path: JsonPath) -> Position:
        """The value's position, else the nearest enclosing value's (a missing key)."""
        for n in range(len(path), -1, -1):
            found = self.values.get(path[:n])
            if found is not None:
                return found
        return (1, 1)

    def key_at(self, path: JsonPath) -> Position:
        return self.keys.get(path) or self.value_at(path)

    def problem(self, file: str, issue: _Issue) -> Problem:
        line, column = self.key_at(issue.path) if issue.at_key else self.value_at(issue.path)
        return Problem(file, line, column, _dotted(issue.path), issue.message)


@dataclass(slots=True)
class _Parsed:
    data: Any
    where: _SourceMap
    problems: list[Problem]
    rejected: frozenset[JsonPath] = frozenset()
    """Paths whose values the YAML step replaced with None, having reported why."""


class _TooLarge(Exception):
    pass


# PyYAML composes nested collections by recursion: some hundreds of levels ("[[[[...")
# exhaust Python's stack. No policy nests deeper than a dozen.
_TOO_DEEP = "the file nests lists or mappings too deeply to be read"


# Line breaks to PyYAML (YAML 1.1) that editors, and YAML 1.2, show inside one line.
_HIDDEN_BREAKS = {
    "\x85": "NEL, next line",
    "\u2028": "line separator",
    "\u2029": "paragraph separator",
}
_HIDDEN_BREAK = re.compile(f"[{''.join(_HIDDEN_BREAKS)}]")


def _hidden_breaks(text: str, name: str) -> list[Problem]:
    """Each character that YAML 1.1 reads as a line break and an editor does not.

    Refused rather than read: it would not only shift every later line number; a
    comment would end at it (the rest of the line read as policy) and a plain value
    would be folded there. Inside a double-quoted string the escape still writes it.
    """
    problems = []
    for found in _HIDDEN_BREAK.finditer(text):
        line, column = _line_column(text, found.start())
        char = found.group()
        message = (
            f"the character U+{ord(char):04X} ({_HIDDEN_BREAKS[char]}) is a line break to "
            "YAML but not to editors, so the file would not read as it shows; remove it, or "
            f'write it as "\\u{ord(char):04x}" inside a double-quoted string'
        )
        problems.append(Problem(name, line, column, "", message))
    return problems


def _parse_yaml(text: str, name: str) -> _Parsed:
    """Compose ``text`` and build plain data plus its source map; syntax errors are problems."""
    if problems := _hidden_breaks(text, name):
        return _Parsed(None, _SourceMap(), problems)
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:
        line, column = _line_column(text, e.position)
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        message = f"the character {char} is not allowed in a YAML file"
        return _Parsed(None, _SourceMap(), [Problem(name, line, column, "", message)])
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            return _Parsed(None, _SourceMap(), [_yaml_problem(name, e)])
        except yaml.YAMLError as e:
            return _Parsed(None, _SourceMap(), [Problem(name, 1, 1, "", f"invalid YAML: {e}")])
        except RecursionError:
            line, column = _pos(loader.get_mark())
            return _Parsed(None, _SourceMap(), [Problem(name, line, column, "", _TOO_DEEP)])
        if root is None:
            return _Parsed(None, _SourceMap(), [])
        builder = _Builder(loader, name)
        try:
            data = builder.build(root, ())
        except _TooLarge:
            line, column = _pos(root.start_mark)
            message = f"the file expands to more than {_MAX_VALUES:,} values (through aliases)"
            return _Parsed(None, builder.where, [Problem(name, line, column, "", message)])
        except RecursionError:
            line, column = _pos(root.start_mark)
            return _Parsed(None, builder.where, [Problem(name, line, column, "", _TOO_DEEP)])
        return _Parsed(data, builder.where, builder.problems, frozenset(builder.rejected))
    finally:
        loader.dispose()


# The line breaks of YAML (and of editors): a check made before the YAML is read counts
# lines as the reader's marks do, or a file saved with CR endings was all on line 1.
_LINE_BREAK = re.compile(r"\r\n?|\n")


def _line_column(text: str, at: int) -> Position:
    """Where ``text[at]`` is, as YAML counts lines: after ``\\r\\n``, ``\\r`` or ``\\n``."""
    line_start = max(text.rfind("\n", 0, at), text.rfind("\r", 0, at)) + 1
    return len(_LINE_BREAK.findall(text, 0, at)) + 1, at - line_start + 1


def _yaml_problem(name: str, e: yaml.MarkedYAMLError) -> Problem:
    mark = e.problem_mark or e.context_mark
    line, column = _pos(mark) if mark is not None else (1, 1)
    message = f"invalid YAML: {e.problem or e.context or 'cannot be parsed'}"
    if e.problem and e.context and e.context_mark is not None:
        message += f" ({e.context} started on line {e.context_mark.line + 1})"
    return Problem(name, line, column, "", message)


def _pos(mark: yaml.Mark) -> Position:
    return (mark.line + 1, mark.column + 1)


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag


class _Builder:
    """Turns a composed YAML node graph into plain data, recording positions and problems.

    Keys are taken as written (``on:`` is the key ``"on"``, not ``True``), since JSON,
    and so every schema, has text keys only. Merge keys (``<<: *defaults``) are
    supported; explicit keys win over merged ones, as YAML specifies.
    """

    def __init__(self, loader: yaml.SafeLoader, name: str) -> None:
        self._loader = loader
        self._name = name
        self._active: set[int] = set()
        self._count = 0
        self.where = _SourceMap()
        self.problems: list[Problem] = []
        self.rejected: set[JsonPath] = set()

    def _problem(self, position: Position, path: JsonPath, message: str) -> None:
        self.problems.append(Problem(self._name, *position, _dotted(path), message))

    def _reject(self, position: Position, path: JsonPath, message: str) -> None:
        """Report a value that cannot be used; it becomes None."""
        self._problem(position, path, message)
        self.rejected.add(path)

    def build(self, node: yaml.Node, path: JsonPath) -> Any:
        self._count += 1
        if self._count > _MAX_VALUES:
            raise _TooLarge
        position = _pos(node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            value = self._scalar(node, path)
        elif id(node) in self._active:
            self._reject(position, path, "an alias refers to a mapping or list that contains it")
            value = None
        else:
            self._active.add(id(node))
            try:
                value = self._collection(node, path)
            finally:
                self._active.discard(id(node))
        # Set last: merged mappings are built at the same path and must not win.
        self.where.values[path] = position
        return value

    def _scalar(self, node: yaml.ScalarNode, path: JsonPath) -> Any:
        if node.tag not in _SCALAR_TAGS:
            message = f"the YAML tag '{_tag_name(node.tag)}' is not supported in a policy"
            self._reject(_pos(node.start_mark), path, message)
            return None
        try:
            value = self._loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as e:
            message = f"{node.value!r} is not a valid {_tag_name(node.tag)} value ({e})"
            self._reject(_pos(node.start_mark), path, message)
            return None
        if isinstance(value, float) and math.isnan(value):
            # JSON has no NaN, so the schema's bounds pass it (no comparison holds) and
            # every threshold compared with it would be false.
            message = f"{node.value!r} is not a number (NaN); write a number"
            self._reject(_pos(node.start_mark), path, message)
            return None
        if isinstance(value, str) and (bad := _SURROGATE.search(value)):
            # A YAML escape ("\ud800") makes one; no UTF-8 text holds it, so every
            # answer that quotes the string (a block's message) failed to encode.
            message = f"the string holds a lone surrogate (U+{ord(bad.group()):04X}), not text"
            self._reject(_pos(node.start_mark), path, message)
            return None
        return value

    def _collection(self, node: yaml.Node, path: JsonPath) -> Any:
        if isinstance(node, yaml.SequenceNode) and node.tag == f"{_YAML}seq":
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode) and node.tag == f"{_YAML}map":
            return self._mapping(node, path)
        message = f"the YAML tag '{_tag_name(node.tag)}' is not supported in a policy"
        self._reject(_pos(node.start_mark), path, message)
        return None

    def _mapping(self, node: yaml.MappingNode, path: JsonPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_seen: dict[str, Position] = {}
        merges: list[yaml.Node] = []
        explicit: list[tuple[str, Position, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key_position = _pos(key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_position, path, "a key must be plain text, not a list or mapping")
                continue
            key: str = key_node.value
            if key in first_seen:
                message = f"duplicate key '{key}' (first given on line {first_seen[key][0]})"
                self._problem(key_position, (*path, key), message)
                continue
            first_seen[key] = key_position
            explicit.append((key, key_position, value_node))
        for merged in merges:
            sources = merged.value if isinstance(merged, yaml.SequenceNode) else [merged]
            # Earlier sources win over later ones, so apply them last.
            for source in reversed(sources):
                if not isinstance(source, yaml.MappingNode):
                    message = "'<<' (merge) needs a mapping or a list of mappings"
                    self._problem(_pos(source.start_mark), path, message)
                    continue
                value = self.build(source, path)
                if isinstance(value, dict):
                    out.update(value)
        for key, key_position, value_node in explicit:
            self.where.keys[(*path, key)] = key_position
            out[key] = self.build(value_node, (*path, key))
        return out


# --- schema validation -----------------------------------------------------------------


# Plain Draft 2020-12, as editors and CI checks read the exported schema: a file passes
# it exactly when it passes here. There a whole number written 200.0 is an integer (JSON
# has one number type; no schema can refuse it), so it is one here too, and _convert
# turns it into the int the typed structs hold.
_Validator = Draft202012Validator


@functools.cache
def _document_validator() -> Validator:
    return _Validator(msgspec.json.schema(PolicyDocument))


_CONFIG_VALIDATORS: dict[type[Any], Validator] = {}


def _config_validator(config_type: type[Any]) -> Validator:
    """One compiled validator per config type (building one costs more than using it)."""
    validator = _CONFIG_VALIDATORS.get(config_type)
    if validator is None:
        validator = _CONFIG_VALIDATORS[config_type] = _Validator(msgspec.json.schema(config_type))
    return validator


def _convert(data: Any, type_: type[Any]) -> Any:
    """``data``, which the schema of ``type_`` accepted, as a ``type_``.

    Lax conversion, for one coercion only: a whole number written as a float (200.0)
    becomes the int the schema counts it as. The other lax coercions (text to a number
    or a boolean) never apply: the schema has refused text where it wants those.
    """
    return msgspec.convert(data, type_, strict=False)


def _schema_issues(validator: Validator, instance: Any, prefix: JsonPath) -> Iterator[_Issue]:
    for error in validator.iter_errors(instance):
        yield from _explain(error, prefix)


_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def _describe(value: Any) -> str:
    """What a YAML value is, in a policy author's words."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a true/false value)"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):
        return "a date"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "an empty value"
    if isinstance(value, int) and len(shown := str(value)) > 60:
        return f"a number of {len(shown)} digits"  # not all of them in the message
    return str(value)


def _one_of(allowed: Sequence[Any]) -> str:
    return ", ".join("null" if a is None else str(a) for a in allowed)


def _did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [c for c in choices if isinstance(c, str)], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _explain(error: ValidationError, prefix: JsonPath) -> Iterator[_Issue]:
    """Reword one jsonschema error for policy authors, placed by its path."""
    path: JsonPath = (*prefix, *error.absolute_path)
    keyword, expected, instance = str(error.validator), _value(error), error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}

    if keyword == "additionalProperties" and isinstance(instance, dict):
        known = list(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        for key in instance:
            if key in known or any(re.search(p, key) for p in patterns):
                continue
            message = f"unknown key '{key}' (expected one of: {', '.join(known) or 'none'})"
            yield _Issue((*path, key), message + _did_you_mean(key, known), at_key=True)
    elif keyword == "required" and isinstance(instance, dict):
        for key in expected:
            if key not in instance:
                yield _Issue(path, f"missing required key '{key}'", at_key=True)
    elif keyword in ("anyOf", "oneOf"):
        yield from _explain_alternatives(error, prefix)
    else:
        yield _Issue(path, _message(keyword, expected, instance, error.message))


def _explain_alternatives(error: ValidationError, prefix: JsonPath) -> Iterator[_Issue]:
    """``anyOf``/``oneOf``: say what the one meant alternative needed.

    Optional fields are ``X | None`` (``anyOf: [X, {type: null}]``); "or nothing" is
    noise to an author who wrote a value, so the null branch is left out.
    """
    path: JsonPath = (*prefix, *error.absolute_path)
    alternatives = _value(error)
    branches: dict[int, list[ValidationError]] = {}
    for sub in error.context or ():
        index = sub.relative_schema_path[0]
        if isinstance(index, int) and alternatives[index] != {"type": "null"}:
            branches.setdefault(index, []).append(sub)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if isinstance(schema.get("discriminator"), dict):
        # A tagged union (classifier engines by "type"): its value declares something
        # the rest of the config refers to. Left out, every rule that uses the engine
        # would read as naming an undeclared one; with a bad value left out (weights:
        # 5), as the default engine, scoring other labels. Only an unknown key inside
        # it may go: it meant nothing.
        for issue in _explain_tagged(error, schema["discriminator"], branches, prefix):
            unknown_key = issue.at_key and issue.path != path
            yield issue if unknown_key else dataclasses.replace(issue, prunable=False)
        return
    if len(branches) == 1:
        for sub in next(iter(branches.values())):
            yield from _explain(sub, prefix)
        return
    subs = [sub for errors in branches.values() for sub in errors]
    if subs and all(s.validator == "type" and not s.relative_path for s in subs):
        types = [t for s in subs for t in _as_list(_value(s))]
        words = " or ".join(dict.fromkeys(_TYPE_WORDS.get(t, t) for t in types))
        yield _Issue(path, f"expected {words}, got {_describe(error.instance)}")
        return
    yield from _explain_best(error, subs, prefix)


def _explain_best(
    error: ValidationError, subs: list[ValidationError], prefix: JsonPath
) -> Iterator[_Issue]:
    best = best_match(subs) if subs else None
    if best is None:
        yield _Issue((*prefix, *error.absolute_path), error.message)
    else:
        yield from _explain(best, prefix)


def _explain_tagged(
    error: ValidationError,
    discriminator: dict[str, Any],
    branches: dict[int, list[ValidationError]],
    prefix: JsonPath,
) -> Iterator[_Issue]:
    """A tagged union: the mistakes of the branch the value's tag picks, else the tag.

    A value of one type is never explained against another's keys: ``{type:
    llama-guard, template: llama-guard-4}`` has a bad template, not unknown keys
    ``model`` and ``template`` of the ``embedding-heads`` engine.
    """
    path: JsonPath = (*prefix, *error.absolute_path)
    instance, alternatives = error.instance, _value(error)
    if not isinstance(instance, dict):
        yield from _explain_best(error, [s for e in branches.values() for s in e], prefix)
        return
    field_name = discriminator.get("propertyName", "type")
    mapping = discriminator.get("mapping", {})
    tag = instance.get(field_name)
    chosen = mapping.get(tag) if isinstance(tag, str) else None
    for index, errors in branches.items():
        if chosen is not None and alternatives[index] == {"$ref": chosen}:
            for sub in errors:
                yield from _explain(sub, prefix)
            return
    # No branch has this tag: the tag is the mistake, not the keys that the closest
    # branch would have wanted.
    tags = list(mapping)
    if field_name not in instance:
        message = f"missing required key '{field_name}' (one of: {_one_of(tags)})"
        yield _Issue(path, message, at_key=True)
        return
    yield _Issue(
        (*path, field_name),
        f"{_show(tag)} is not a valid value (expected one of: {_one_of(tags)})"
        + _did_you_mean(tag, tags),
    )


def _value(error: ValidationError) -> Any:
    """The failed keyword's value in the schema (``validator_value`` is typed loosely)."""
    return error.validator_value


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _message(keyword: str, expected: Any, instance: Any, fallback: str) -> str:
    """The message for a single-keyword failure; jsonschema's own text as a fallback."""
    if keyword == "type":
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in _as_list(expected))
        message = f"expected {words}, got {_describe(instance)}"
        scalar = isinstance(instance, int | float | datetime.date)
        if "string" in _as_list(expected) and scalar:
            message += "; put the value in quotes to make it a string"
        return message
    if keyword == "enum":
        message = f"{_show(instance)} is not a valid value (expected one of: {_one_of(expected)})"
        return message + _did_you_mean(instance, expected)
    if keyword == "const":
        return f"expected {_show(expected)}, got {_show(instance)}"
    if keyword == "pattern":
        if expected == _ID_PATTERN:
            return (
                f"{_show(instance)} is not a valid id: use letters, digits, '_', '.', ':' "
                "and '-', starting with a letter or digit"
            )
        if expected in (r"\S", VISIBLE_PATTERN):
            return "must not be blank"
        if expected == HEADER_VALUE_PATTERN:
            return (
                f"{_show(instance)} cannot be sent in an HTTP header: use printable ASCII "
                "(letters, digits, punctuation, inner spaces), no line breaks"
            )
        return f"{_show(instance)} does not match the pattern {expected}"
    bounds = {
        "minimum": "at least",
        "maximum": "at most",
        "exclusiveMinimum": "greater than",
        "exclusiveMaximum": "less than",
    }
    if keyword in bounds:
        return f"must be {bounds[keyword]} {expected}, got {_show(instance)}"
    if keyword == "minLength":
        return "must not be empty" if expected == 1 else f"must be at least {expected} characters"
    if keyword == "maxLength":
        return f"must be at most {expected} characters, got {len(instance)}"
    if keyword == "minItems":
        return "must not be an empty list" if expected == 1 else f"needs at least {expected} items"
    if keyword == "minProperties":
        return "must not be empty" if expected == 1 else f"needs at least {expected} keys"
    if keyword == "maxItems":
        return f"must have at most {expected} items, got {len(instance)}"
    if keyword == "uniqueItems":
        return "must not list the same item twice"
    return fallback


_MSGSPEC_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
# msgspec writes a mapping's key as "[...]", never the key itself.
_MSGSPEC_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[(\.\.\.)\]")


def _msgspec_issue(
    error: msgspec.ValidationError, prefix: JsonPath, data: Any, type_: type[Any]
) -> _Issue:
    """Place a msgspec conversion error (``... - at `$.rules[0].id```) by its path.

    ``data`` is what failed to convert to ``type_``: a path through a mapping of names
    (``$.classifiers[...]``) does not say which name, so it is found in ``data``. An
    error about a mapping as a whole (a struct's own check) is placed at its key, as a
    missing key is.
    """
    text = str(error)
    match = _MSGSPEC_AT.search(text)
    if match is None:
        return _Issue(prefix, text)
    path: list[str | int] = []
    hidden: set[int] = set()  # where in ``path`` a name msgspec did not write is
    for key, index, unnamed in _MSGSPEC_PART.findall(match["path"]):
        if unnamed:
            found = _failing_key(data, type_, path, hidden, text)
            if found is None:  # the mapping is the nearest place known
                break
            hidden.add(len(path))
            path.append(found)
        else:
            path.append(int(index) if index else key)
    at_key = isinstance(_at(data, path), dict)
    return _Issue((*prefix, *path), text[: match.start()].replace("`", "'"), at_key=at_key)


def _at(data: Any, path: Sequence[str | int]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _failing_key(
    data: Any, type_: type[Any], path: list[str | int], hidden: set[int], text: str
) -> str | None:
    """The key of the mapping at ``path`` whose value fails to convert with ``text``.

    msgspec converts a mapping's entries in order and stops at the first that fails:
    it is the key that ends the shortest first part of the mapping that fails the same
    way. The mappings of names passed on the way (``hidden``) are cut after the name
    taken, so a later name with the same mistake cannot answer for it.
    """
    mapping = _at(data, path)
    if not isinstance(mapping, dict):
        return None
    keys = list(mapping)
    for n in range(1, len(keys) + 1):
        try:
            _convert(_first_part(data, path, hidden, n), type_)
        except msgspec.ValidationError as e:
            if str(e) == text:
                return str(keys[n - 1])
    return None


def _first_part(node: Any, path: Sequence[str | int], hidden: set[int], n: int) -> Any:
    """A copy of ``node`` with the mapping at ``path`` cut to its first ``n`` entries and
    each mapping at a ``hidden`` depth of ``path`` cut after the key ``path`` takes."""
    if not path:
        return dict(list(node.items())[:n])
    head, rest = path[0], path[1:]
    inner = {d - 1 for d in hidden if d > 0}
    if isinstance(node, dict):
        items = list(node.items())
        if 0 in hidden:
            items = items[: [k for k, _ in items].index(head) + 1]
        return {k: _first_part(v, rest, inner, n) if k == head else v for k, v in items}
    return [_first_part(v, rest, inner, n) if i == head else v for i, v in enumerate(node)]


# --- filter entries --------------------------------------------------------------------


def _check_filters(
    data: dict[str, Any], where: _SourceMap, registry: PluginRegistry[FilterSpec]
) -> tuple[list[tuple[FilterSpec, Any]], list[_Issue]]:
    """Check each filter entry against its type; return (spec, typed config) per entry.

    Runs even when the document has other errors, so one pass reports everything.
    The returned list is only complete (one pair per entry) when there are no issues.
    """
    entries = data.get("filters")
    if not isinstance(entries, list):
        return [], []
    resolved: list[tuple[FilterSpec, Any]] = []
    issues: list[_Issue] = []
    first_id: dict[str, JsonPath] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        base: JsonPath = ("filters", i)
        filter_id = entry.get("id")
        if isinstance(filter_id, str):
            if filter_id in first_id:
                line = where.value_at(first_id[filter_id])[0]
                message = f"duplicate filter id '{filter_id}' (first used on line {line})"
                issues.append(_Issue((*base, "id"), message))
            else:
                first_id[filter_id] = (*base, "id")
        filter_type = entry.get("type")
        if not isinstance(filter_type, str):
            continue
        spec = _lookup(registry, filter_type, (*base, "type"), issues)
        if spec is None:
            continue
        issues += _check_stages(spec, entry.get("stages"), (*base, "stages"))
        config = entry.get("config", {})
        if isinstance(config, dict):
            typed = _check_config(spec, config, (*base, "config"), issues)
            resolved.append((spec, typed))
            issues += _dead_rules(spec, entry.get("stages"), typed, (*base, "config"))
    return resolved, issues


def _lookup(
    registry: PluginRegistry[FilterSpec], filter_type: str, path: JsonPath, issues: list[_Issue]
) -> FilterSpec | None:
    known = registry.names()
    if filter_type not in known:
        message = f"unknown filter type '{filter_type}' (known types: {', '.join(known) or 'none'})"
        issues.append(_Issue(path, message + _did_you_mean(filter_type, known)))
        return None
    try:
        return registry.get(filter_type)
    except RegistryError as e:
        issues.append(_Issue(path, f"filter type '{filter_type}' cannot be loaded: {e}"))
        return None


def _check_stages(spec: FilterSpec, stages: Any, path: JsonPath) -> Iterator[_Issue]:
    if not isinstance(stages, list):
        return
    supported = ", ".join(sorted(spec.stages))
    if not stages:
        yield _Issue(
            path,
            "list at least one stage, or remove 'stages' to run at every stage the "
            f"'{spec.type}' filter supports ({supported})",
        )
    for j, stage in enumerate(stages):
        # Not a string (a list, a mapping): the schema says so; `in` would raise.
        if isinstance(stage, str) and stage in _STAGES and Stage(stage) not in spec.stages:
            message = f"the '{spec.type}' filter does not run at stage '{stage}'"
            yield _Issue((*path, j), f"{message} (supported: {supported})")


def _dead_rules(spec: FilterSpec, stages: Any, typed: Any, path: JsonPath) -> Iterator[_Issue]:
    """A rule whose own ``stages`` miss every stage its filter entry runs at would never
    run: the author meant something else, so it is an error, at the rule's stages.

    An entry without ``stages`` runs at every stage its type supports, so a rule can
    also be dead in a filter type that supports fewer stages than the rule names.
    """
    rules = getattr(typed, "rules", None)
    if not isinstance(rules, list):
        return
    if isinstance(stages, list):
        runs = {Stage(s) for s in stages if isinstance(s, str) and s in _STAGES} & spec.stages
        where, fix = (
            "this filter entry",
            "add its stage to the entry's 'stages', or change the rule's",
        )
    elif stages is None:
        runs = set(spec.stages)
        where, fix = f"the '{spec.type}' filter", "change the rule's 'stages'"
    else:  # not a list: reported by the schema
        return
    if not runs:  # the entry's own stages are wrong: reported by _check_stages
        return
    for k, rule in enumerate(rules):
        own = getattr(rule, "stages", None)
        if own and not runs & set(own):
            yield _Issue(
                (*path, "rules", k, "stages"),
                f"rule '{rule.id}' runs at {', '.join(sorted(own))} only, but {where} "
                f"runs at {', '.join(sorted(runs))} only: the rule would never run ({fix})",
            )


def _scoped_tenants(
    filter_id: str, typed: Any, where: _SourceMap, path: JsonPath
) -> Iterator[ScopedTenant]:
    """Each tenant pattern of a rule's ``scope`` in one filter's config, with its place."""
    rules = getattr(typed, "rules", None)
    if not isinstance(rules, list):
        return
    for k, rule in enumerate(rules):
        tenants = getattr(getattr(rule, "scope", None), "tenants", None) or []
        for j, pattern in enumerate(tenants):
            line, column = where.value_at((*path, "rules", k, "scope", "tenants", j))
            yield ScopedTenant(pattern, filter_id, str(rule.id), line, column)


def _check_config(
    spec: FilterSpec, config: dict[str, Any], path: JsonPath, issues: list[_Issue]
) -> Any:
    """Validate one filter's config: its schema, then conversion, then ``spec.validate``."""
    try:
        schema_issues = list(_schema_issues(_config_validator(spec.config_type), config, path))
    except RecursionError:
        # jsonschema descends a recursive schema (a rule's all/any/not) by recursion,
        # some frames a level: nesting the YAML reader still took exhausted the stack.
        issues.append(_Issue(path, _TOO_DEEP))
        return None
    if schema_issues:
        issues += schema_issues
        # Report the config's other problems too (every problem at once): check what is
        # left without the keys the schema refused, when that still makes a config.
        # A value that may not be left out (an engine the rules name) stops this: the
        # rest would be checked against a config that lacks what the author declared.
        removed = [i.path for i in schema_issues]
        pruned = (
            _without(config, [r[len(path) :] for r in removed])
            if all(i.prunable for i in schema_issues)
            else None
        )
        if pruned is not None and spec.validate is not None:
            try:
                typed = _convert(pruned, spec.config_type)
                found = [_config_issue(path, c) for c in spec.validate(typed)]
            except Exception:  # best effort: the schema issues stand
                found = []
            # Not about an object that lost a key here ("a condition needs ..." once
            # its misspelt key is gone): that would be the pruning's own doing.
            issues += [i for i in found if not any(r[: len(i.path)] == i.path for r in removed)]
        return None
    try:
        typed = _convert(config, spec.config_type)
    except msgspec.ValidationError as e:
        issues.append(_msgspec_issue(e, path, config, spec.config_type))
        return None
    if spec.validate is not None:
        try:
            issues += [_config_issue(path, c) for c in spec.validate(typed)]
        except Exception as e:  # a third-party validator's bug still names the filter
            message = f"the '{spec.type}' filter's config check failed: {type(e).__name__}: {e}"
            issues.append(_Issue(path, message))
    return typed


def _config_issue(path: JsonPath, issue: ConfigIssue) -> _Issue:
    return _Issue((*path, *issue.path), issue.message, warning=issue.warning)


def _without(config: dict[str, Any], paths: list[JsonPath]) -> dict[str, Any] | None:
    """``config`` less the mapping keys at ``paths``; None when a path is not a mapping key
    (removing a list item would shift the indices of every later problem)."""
    pruned = copy.deepcopy(config)
    for rel in paths:
        if not rel or not isinstance(rel[-1], str):
            return None
        parent: Any = pruned
        for part in rel[:-1]:
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                return None
        if not isinstance(parent, dict):
            return None
        parent.pop(rel[-1], None)
    return pruned


# --- keys ------------------------------------------------------------------------------


def _dotted(path: JsonPath) -> str:
    """``("filters", 0, "config", "rules", 1, "id")`` -> ``filters[0].config.rules[1].id``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out
