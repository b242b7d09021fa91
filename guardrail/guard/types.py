"""What filters return and what the guard decides.

Verdicts combine: the strictest action wins (allow < flag < redact < block) and
redactions compose. Filters express redactions as spans of the text they were given,
so concurrent filters never fight over a rewritten string; the guard applies them all.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from guardrail.chat import Message

Concern = Literal["harm", "accuracy"]

FILTER_ERROR_CATEGORY = "filter_error"
"""The category of the finding a failed filter leaves (its policy's ``on_error`` action).
A failure is not harmful content: it is counted in ``guardrail_filter_errors_total``."""


class Stage(enum.StrEnum):
    """Where a text is checked: the prompt on its way in, the completion on its way out."""

    INPUT = "input"
    OUTPUT = "output"


class Action(enum.StrEnum):
    """What a verdict asks for, from the least to the most strict."""

    ALLOW = "allow"
    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def strictest(cls, actions: Iterable[Action]) -> Action:
        return max(actions, key=_RANK.__getitem__, default=cls.ALLOW)


_RANK = {Action.ALLOW: 0, Action.FLAG: 1, Action.REDACT: 2, Action.BLOCK: 3}


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a filter found.

    ``filter_id`` is the policy's id of the filter; the guard fills it in, so a filter
    need not know how the policy named it. ``span`` is ``(start, end)`` in the checked
    text; ``extent``, when the finding rests on more than that one span (a rule whose
    pattern matched several times, or whose parts matched apart), runs from the first
    match's start to the last one's end. ``message`` is the policy author's text for
    users, if the rule has one.
    ``concern`` says what the finding is about: ``harm`` (counted as harmful content)
    or ``accuracy`` (hallucination flags: ungrounded claims, unverified citations,
    questions past the model's knowledge cutoff), counted apart so a doubtful fact is
    never reported as harmful content.
    """

    category: str
    score: float = 1.0
    action: Action = Action.FLAG
    rule_id: str | None = None
    span: tuple[int, int] | None = None
    message: str | None = None
    filter_id: str = ""
    severity: str | None = None
    concern: Concern = "harm"
    extent: tuple[int, int] | None = None

    @property
    def reach(self) -> tuple[int, int] | None:
        """All the checked text this finding rests on: ``extent``, else ``span``."""
        return self.extent if self.extent is not None else self.span

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "filter": self.filter_id,
            "category": self.category,
            "score": round(self.score, 6),
            "action": self.action.value,
        }
        if self.rule_id is not None:
            out["rule_id"] = self.rule_id
        if self.span is not None:
            out["span"] = list(self.span)
        if self.severity is not None:
            out["severity"] = self.severity
        if self.concern != "harm":
            out["concern"] = self.concern
        return out


@dataclass(frozen=True, slots=True)
class Redaction:
    """Replace ``text[start:end]`` with ``replacement``.

    ``restore``: the replacement is the user's own value put back for a placeholder
    (reversible PII redaction), so the result holds personal data again; the audit
    log's redacted text must not keep it.
    """

    start: int
    end: int
    replacement: str
    restore: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """A filter's answer for one text.

    ``score``: the filter's highest score of the whole text, for a filter that scores
    every text (toxicity), whether or not a finding carries it: a filter that reports
    only the findings that act (toxicity with ``report_scores: false``) still gives the
    monitoring histograms a score of every text, not of the flagged ones alone.
    """

    action: Action = Action.ALLOW
    findings: tuple[Finding, ...] = ()
    redactions: tuple[Redaction, ...] = ()
    score: float | None = None

    @classmethod
    def from_findings(
        cls,
        findings: Iterable[Finding],
        redactions: Iterable[Redaction] = (),
        *,
        score: float | None = None,
    ) -> Verdict:
        """The verdict whose action is the strictest of its findings."""
        found = tuple(findings)
        return cls(Action.strictest(f.action for f in found), found, tuple(redactions), score)


ALLOW = Verdict()


def apply_redactions(text: str, redactions: Iterable[Redaction]) -> str:
    """Apply span redactions to ``text``.

    Overlapping spans merge into their union, replaced by the replacement of the
    widest span among them, so no character any filter asked to hide survives.
    """
    merged = _merged_runs(redactions, len(text))
    if not merged:
        return text
    out: list[str] = []
    pos = 0
    for start, end, repl in merged:
        out.append(text[pos:start])
        out.append(repl)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def redacted_span(span: tuple[int, int], redactions: Iterable[Redaction]) -> tuple[int, int]:
    """``span`` of a text as a span of that text with ``redactions`` applied
    (:func:`apply_redactions`; they lie in the text, as a decision's do): moved by the
    replacements before it, and an end inside a replaced run taken to the replacement's
    end (a start, to its start), so the span covers what became of what it covered."""

    def moved(pos: int, *, end: bool) -> int:
        shift = 0
        for start, stop, repl in merged:
            if pos <= start:
                break
            if pos < stop:  # inside the run
                return start + shift + (len(repl) if end else 0)
            shift += len(repl) - (stop - start)
        return pos + shift

    merged = _merged_runs(redactions, None)
    return moved(span[0], end=False), moved(span[1], end=True)


def _merged_runs(redactions: Iterable[Redaction], length: int | None) -> list[tuple[int, int, str]]:
    """The runs :func:`apply_redactions` replaces in a text of ``length`` characters
    (``None``: the redactions lie in it), in order: ``(start, end, replacement)``."""
    clipped = (
        (max(0, r.start), r.end if length is None else min(length, r.end), r.replacement)
        for r in redactions
    )
    # A span wholly outside the text hides nothing (it must not insert its replacement).
    spans = sorted(span for span in clipped if span[1] > span[0])
    merged: list[list[Any]] = []
    for start, end, repl in spans:
        if merged and start < merged[-1][1]:
            last = merged[-1]
            if end - start > last[3]:
                last[2], last[3] = repl, end - start
            last[1] = max(last[1], end)
        else:
            merged.append([start, end, repl, end - start])
    return [(start, end, repl) for start, end, repl, _ in merged]


@dataclass(frozen=True, slots=True)
class FilterContext:
    """What a filter may know about the request besides the text it checks.

    ``messages`` is the conversation (the chat messages, or the completions prompt as
    one user message; a moderation request's ``prompt``). ``message_index`` says which
    of them the checked text is, and :attr:`message` gives that message: a filter need
    not check either. The index is always a valid index of ``messages`` (checked when
    the context is made), and the guard hands a filter an index only when that
    message's content *is* the text being checked; otherwise it is ``None``: a
    completion or stream window, each input of a moderation request, a response
    format's schema, the joined conversation a conversation-level filter sees.

    ``state`` is request-scoped scratch space (for example a PII filter's placeholder
    mapping), keyed by filter id by convention: it lives exactly as long as the
    request and is never shared between requests.

    ``window`` is the ``[start, end)`` of the checked text that is being decided when
    the text around it is decided apart: a stream window, checked after the released
    text before it (and with a look-ahead after it); ``None``: all of it. Spans still
    index the whole checked text. A filter that scores the whole text scores this part
    (the hallucination filter: the sentences that rest on it), so text already decided
    is not scored again with every window it is the context of. It belongs to one
    text: :meth:`at` (for another stage or message) leaves it out.

    ``tool_calls`` says the checked text is tool calls (their ids, names and arguments),
    the model's actions, not its words: harm filters read them as any text, but they
    make no claim to check for accuracy and ask no question. It belongs to one text:
    :meth:`at` leaves it out.

    ``verbatim`` says the checked text is a part of the request sent as written, not a
    message: a ``response_format``'s schema, tool definitions, ids, stop sequences. The
    model reads it, so harm filters do, but it asks no question ("Get the latest
    headlines" describes a tool). It belongs to one text: :meth:`at` leaves it out.

    ``identifiers`` are the ``[start, end)`` spans of the checked text that are
    identifiers (tool call ids, function names, each read several ways): words and
    patterns are looked for in them, but they are not prose, and a model (a rules
    classifier, semantic examples) reads none of them: a random id scored as a prompt
    injection. It belongs to one text: :meth:`at` leaves it out.
    """

    request_id: str
    stage: Stage = Stage.INPUT
    tenant: str = "default"
    route: str = ""
    model: str | None = None
    messages: tuple[Message, ...] = ()
    message_index: int | None = None
    context_documents: tuple[str, ...] = ()
    state: dict[str, Any] = field(default_factory=dict)
    window: tuple[int, int] | None = None
    tool_calls: bool = False
    verbatim: bool = False
    identifiers: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        index = self.message_index
        # Negative indexes too: messages[-1] would quietly name another message.
        if index is not None and not 0 <= index < len(self.messages):
            raise ValueError(
                f"message_index {index} is not an index of the {len(self.messages)} messages"
            )

    @property
    def message(self) -> Message | None:
        """The message whose text is being checked, or ``None`` (see the class doc)."""
        index = self.message_index
        return None if index is None else self.messages[index]

    def at(self, stage: Stage, message_index: int | None = None) -> FilterContext:
        """The same request context for another stage or message (``state`` is shared)."""
        # Spelled out rather than dataclasses.replace: this runs once per message.
        return FilterContext(
            request_id=self.request_id,
            stage=stage,
            tenant=self.tenant,
            route=self.route,
            model=self.model,
            messages=self.messages,
            message_index=message_index,
            context_documents=self.context_documents,
            state=self.state,
        )


FilterStatus = Literal["ok", "error", "timeout"]
# Whether the verdict came from the verdict cache: "off" when the filter or stage is
# not cached, "hit" when reused, "miss" when computed (and stored if it succeeded).
CacheResult = Literal["off", "hit", "miss"]


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    """How one filter fared on one text: its verdict, its time, and whether it failed.

    ``error`` names the exception type only; exception messages may quote user text.
    """

    filter_id: str
    filter_type: str
    verdict: Verdict
    duration_s: float
    status: FilterStatus = "ok"
    error: str | None = None
    cache: CacheResult = "off"


@dataclass(frozen=True, slots=True)
class Decision:
    """The guard's answer for one text at one stage, under one policy version.

    ``text`` is the text as the policy left it (its ``redactions`` applied);
    ``checked`` the text the filters read, where a redaction rewrote it (``None``: it
    is ``text``). It holds what the policy hid: group detection reads it (a redacted
    slur still names its group), nothing logs or sends it.
    """

    stage: Stage
    action: Action
    text: str
    findings: tuple[Finding, ...]
    outcomes: tuple[FilterOutcome, ...]
    policy_name: str
    policy_version: str
    redactions: tuple[Redaction, ...] = ()
    checked: str | None = None

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    @property
    def failed(self) -> bool:
        """Whether some filter failed on the text (an error, a timeout). Its ``on_error``
        decided for it, so what it would have redacted is unknown: the text may hold it."""
        return any(o.status != "ok" for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage.value,
            "action": self.action.value,
            "policy": {"name": self.policy_name, "version": self.policy_version},
            "findings": [f.to_dict() for f in self.findings],
        }
