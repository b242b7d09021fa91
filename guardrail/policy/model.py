"""The policy document as typed structs, and the resolved runtime :class:`Policy`.

The structs are the single source of the policy language: the loader validates YAML
against the JSON Schema generated from them (``policies/schema.json``), and field
descriptions become editor hover text.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from guardrail.docs import doc as _doc
from guardrail.errors import Problem
from guardrail.guard.types import Action, Stage
from guardrail.policy.openai_categories import DEFAULT_OPENAI_MAPPING, OpenAICategory

Id = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$(?!\n)",
        max_length=128,
        description="Identifier: letters, digits, '_', '.', ':', '-'.",
    ),
]
# A filter check's time limit, at most an hour: a bound keeps an absurd value (a number
# of 400 digits) from overflowing on its way to seconds.
MAX_TIMEOUT_MS = 3_600_000
# A value sent as an HTTP header (the policy version): visible ASCII, inner spaces.
# "$(?!\n)": Python's "$" also matches before a final line break, which an HTTP header
# cannot hold (a version "1\n" passed and then broke every response); JSON Schema's "$"
# (ECMA-262) is the end of the text, and the lookahead changes nothing there.
HEADER_VALUE_PATTERN = r"^[!-~](?:[ -~]*[!-~])?$(?!\n)"
OnError = Literal["block", "flag", "allow"]
# A text users see on a block (an error message, a refusal): a blank one answered with
# "message": "", which tells the user nothing. Characters that show nothing are blank
# too (Python's \S takes them, and ECMA's \S a BOM): every one of the Basic Multilingual
# Plane that normalisation deletes as invisible (guardrail.filters.normalize's
# invisible_chars: zero-width and format characters, controls, variation selectors,
# Hangul fillers, the blank braille pattern), written out so importing this module scans
# no tables; a JSON Schema pattern cannot portably name characters past it.
VISIBLE_PATTERN = (
    r"[^\s\u0000-\u0008\u000e-\u001f\u007f-\u009f\u00ad\u034f\u0600-\u0605\u061c\u06dd"
    r"\u070f\u0890\u0891\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    r"\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb]"
)
UserText = Annotated[str, msgspec.Meta(pattern=VISIBLE_PATTERN)]


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How streamed completions are held back and moderated before release."""

    release: Annotated[
        Literal["sentence", "window"],
        _doc(
            "'sentence': release held text at each sentence end (or when window_chars is "
            "reached); 'window': release only in blocks of window_chars."
        ),
    ] = "sentence"
    window_chars: Annotated[
        int,
        _doc(
            "Most characters held back before they are checked and released (a window cut "
            "inside a token also holds the rest of the token, up to 64 characters)."
        ),
        msgspec.Meta(ge=1, le=100_000),
    ] = 400
    context_chars: Annotated[
        int,
        _doc(
            "Characters of already released text checked again with each held window, so "
            "a phrase split across windows is still seen whole (and of the text a completion "
            "continues, a completions prompt or a trailing assistant message, checked with "
            "the completion's start, streamed or not); a window cut inside a token "
            "(no space or delimiter in it) is checked with the rest of the token too, up to "
            "this many characters or 64."
        ),
        msgspec.Meta(ge=0, le=100_000),
    ] = 200


class Messages(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What users see when something is blocked (a rule's own message wins)."""

    input_blocked: Annotated[UserText, _doc("Error message for a blocked prompt.")] = (
        "Your request was blocked by the content policy."
    )
    output_blocked: Annotated[
        UserText, _doc("Refusal text that replaces a blocked completion.")
    ] = "I can't help with that."


class FilterEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One filter instance in the pipeline."""

    id: Annotated[Id, _doc("Unique id of this filter in the policy; used in findings.")]
    type: Annotated[str, _doc("Filter type, e.g. 'rules' (see the registry).")]
    stages: Annotated[
        Annotated[list[Stage], msgspec.Meta(min_length=1)] | None,
        _doc("Stages to run at; default: every stage the type supports."),
    ] = None
    enabled: Annotated[bool, _doc("Set false to keep the entry but not run it.")] = True
    timeout_ms: Annotated[
        Annotated[int, msgspec.Meta(ge=1, le=MAX_TIMEOUT_MS)] | None,
        _doc("Time limit per check; default: the policy's timeout_ms."),
    ] = None
    on_error: Annotated[
        OnError | None,
        _doc("Action when this filter errors or times out; default: the policy's on_error."),
    ] = None
    config: Annotated[
        dict[str, Any], _doc("The filter type's own settings, validated by its schema.")
    ] = msgspec.field(default_factory=dict)


class PolicyTest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An example the policy must decide as expected (run by `guardrail policy test`)."""

    input: Annotated[str, _doc("The text to check.")]
    expect: Annotated[Action, _doc("The expected action.")]
    stage: Annotated[Stage, _doc("Stage to check at.")] = Stage.INPUT
    name: Annotated[str | None, _doc("Optional label shown in reports.")] = None
    tenant: Annotated[str, _doc("Tenant the request comes from (for scoped rules).")] = "default"
    route: Annotated[
        Literal["chat", "completions", "moderations"],
        _doc("Route of the request (for scoped rules)."),
    ] = "chat"
    model: Annotated[str | None, _doc("Requested model (for scoped rules).")] = None
    context: Annotated[
        list[str],
        _doc("Sources the request brought (documents), for groundedness at the output stage."),
    ] = msgspec.field(default_factory=list)
    prompt: Annotated[
        str | None, _doc("The user's question the checked text answers (output stage).")
    ] = None


class PolicyDocument(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Guardrail policy file."""

    name: Annotated[Id, _doc("Policy name, reported with every decision.")]
    version: Annotated[
        str,
        _doc(
            "Policy version, stamped on every decision and sent in the "
            "x-guardrail-policy-version header; bump it on every change. Printable ASCII "
            "(letters, digits, punctuation, inner spaces)."
        ),
        # An HTTP header value: no line breaks, no non-ASCII (they would break responses).
        msgspec.Meta(min_length=1, max_length=64, pattern=HEADER_VALUE_PATTERN),
    ]
    description: Annotated[str, _doc("What this policy is for.")] = ""
    on_error: Annotated[
        OnError, _doc("Action when a filter errors or times out. 'block' fails closed.")
    ] = "block"
    timeout_ms: Annotated[
        int,
        _doc("Default time limit for one filter check, in milliseconds."),
        msgspec.Meta(ge=1, le=MAX_TIMEOUT_MS),
    ] = 2000
    messages: Annotated[Messages, _doc("Texts users see on a block.")] = msgspec.field(
        default_factory=Messages
    )
    stream: Annotated[StreamSettings, _doc("Streaming hold-back settings.")] = msgspec.field(
        default_factory=StreamSettings
    )
    filters: Annotated[list[FilterEntry], _doc("The filters, run concurrently per stage.")] = (
        msgspec.field(default_factory=list)
    )
    tests: Annotated[list[PolicyTest], _doc("Examples checked by `guardrail policy test`.")] = (
        msgspec.field(default_factory=list)
    )
    openai_categories: Annotated[
        dict[
            Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"\S")],
            list[OpenAICategory],
        ],
        _doc(
            "OpenAI moderation keys each of the policy's categories counts toward in "
            "/v1/moderations results (an OpenAI key's score is the highest of its "
            "categories', true when any acted). A row replaces the built-in one for that "
            "category (README); [] maps it to none."
        ),
    ] = msgspec.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """A filter entry resolved against its type: typed config, defaults filled in."""

    id: str
    type: str
    stages: frozenset[Stage]
    timeout_s: float
    on_error: Action
    config: Any


def scope_matches(pattern: str, value: str) -> bool:
    """Whether a rule's ``scope`` pattern takes ``value`` (a tenant, a model).

    A pattern is a glob (``fnmatch``, case-sensitive), but one that is the value itself
    always takes it: a tenant named ``team[eu]`` is in ``tenants: ["team[eu]"]``, which
    as a glob would take ``teame`` instead, and never ``team[eu]``.
    """
    return pattern == value or fnmatch.fnmatchcase(value, pattern)


@dataclass(frozen=True, slots=True)
class ScopedTenant:
    """A tenant pattern of a rule's ``scope``, and where the policy file gives it."""

    pattern: str
    filter_id: str
    rule_id: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Policy:
    """A loaded, validated policy. ``digest`` is the sha256 of the file's bytes.

    ``test_positions`` holds the 1-based ``(line, column)`` where each of ``tests``
    starts in the policy text, in the same order, so `guardrail policy test` names a
    test as ``file:line:column`` like every other policy error. ``filter_positions``
    holds, for each of ``filters``, its entry's index in the file's ``filters`` list and
    its ``(line, column)``, so a filter that does not build (a weights file missing) is
    named there too. ``scoped_tenants``: each tenant pattern of a rule's ``scope``, to
    check against the tenants there are. ``openai_categories`` maps a category onto the
    OpenAI moderation keys it counts toward: the built-in table with the file's rows
    over it. ``warnings``: what loads but likely does not do what its author means (a
    one-character Chinese keyword), located like errors; shown, never fatal.
    """

    name: str
    version: str
    description: str
    digest: str
    source: Path | None
    on_error: Action
    messages: Messages
    stream: StreamSettings
    filters: tuple[FilterConfig, ...]
    tests: tuple[PolicyTest, ...]
    test_positions: tuple[tuple[int, int], ...] = ()
    filter_positions: tuple[tuple[int, int, int], ...] = ()
    scoped_tenants: tuple[ScopedTenant, ...] = ()
    warnings: tuple[Problem, ...] = ()
    openai_categories: Mapping[str, tuple[OpenAICategory, ...]] = field(
        default_factory=lambda: dict(DEFAULT_OPENAI_MAPPING)
    )
