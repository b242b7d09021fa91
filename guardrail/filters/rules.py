"""Keyword and regex rules, matched on normalised text (see :mod:`.normalize`).

A rule names what it catches (``category``), where (``stages``), and what to do
(``action``: block, redact or flag) with the message users see. Keywords match whole
words or phrases; regexes are Python ``re`` patterns, matched case-insensitively on
the normalised text. The full acceptable-use language builds on this filter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Literal

import msgspec

from guardrail.docs import doc as _doc
from guardrail.filters.normalize import normalize
from guardrail.guard.filter import BuildContext, ConfigIssue, FilterSpec
from guardrail.guard.types import Action, FilterContext, Finding, Redaction, Stage, Verdict
from guardrail.policy.model import Id


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One keyword/regex rule."""

    id: Annotated[Id, _doc("Unique rule id, reported in findings.")]
    category: Annotated[str, _doc("Category reported in findings and metrics (a fixed set).")]
    description: Annotated[str, _doc("What the rule is for (for policy readers).")] = ""
    stages: Annotated[
        list[Stage] | None, _doc("Stages this rule applies to; default: the filter's stages.")
    ] = None
    action: Annotated[Literal["block", "redact", "flag"], _doc("What a match does.")] = "block"
    message: Annotated[
        str | None, _doc("Message users see when this rule blocks; default: the policy's.")
    ] = None
    keywords: Annotated[list[str], _doc("Words or phrases matched whole, after normalisation.")] = (
        msgspec.field(default_factory=list)
    )
    regex: Annotated[list[str], _doc("Python regular expressions, matched case-insensitively.")] = (
        msgspec.field(default_factory=list)
    )
    score: Annotated[float, _doc("Score reported for a match."), msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    replacement: Annotated[str, _doc("Text that replaces a match when action is redact.")] = (
        "[REDACTED]"
    )


class RulesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a ``rules`` filter."""

    rules: Annotated[list[Rule], _doc("The rules, all checked on every text.")] = msgspec.field(
        default_factory=list
    )


def _keyword_pattern(keyword: str) -> str:
    words = normalize(keyword).text.split(" ")
    body = r"\s*".join(re.escape(w) for w in words if w)
    return rf"(?<!\w){body}(?!\w)"


def _compile(rule: Rule) -> re.Pattern[str]:
    parts = [_keyword_pattern(k) for k in rule.keywords]
    parts += [f"(?:{r})" for r in rule.regex]
    return re.compile("|".join(parts), re.IGNORECASE)


def validate(config: RulesConfig) -> Iterator[ConfigIssue]:
    """Rule ids are unique, each rule has something to match, every regex compiles."""
    seen: set[str] = set()
    for i, rule in enumerate(config.rules):
        if rule.id in seen:
            yield ConfigIssue(("rules", i, "id"), f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        if not rule.keywords and not rule.regex:
            yield ConfigIssue(("rules", i), "a rule needs at least one keyword or regex")
        for j, kw in enumerate(rule.keywords):
            if not normalize(kw).text:
                yield ConfigIssue(("rules", i, "keywords", j), "empty keyword")
        for j, pattern in enumerate(rule.regex):
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                yield ConfigIssue(("rules", i, "regex", j), f"invalid regex: {e}")
                continue
            if compiled.match(""):
                yield ConfigIssue(("rules", i, "regex", j), "regex matches the empty string")


class RulesFilter:
    """Runs keyword and regex rules. Cheap enough to run on the event loop."""

    # The verdict depends on the text alone, so the verdict cache may reuse it.
    cache_scope = "text"

    def __init__(self, name: str, config: RulesConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self._rules = [
            (rule, _compile(rule), frozenset(rule.stages) if rule.stages else frozenset(Stage))
            for rule in config.rules
        ]

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        norm = normalize(text)
        findings: list[Finding] = []
        redactions: list[Redaction] = []
        for rule, pattern, stages in self._rules:
            if ctx.stage not in stages:
                continue
            spans = [norm.span(m.start(), m.end()) for m in pattern.finditer(norm.text)]
            spans = [s for s in spans if s[1] > s[0]]
            if not spans:
                continue
            action = Action(rule.action)
            findings.append(
                Finding(
                    category=rule.category,
                    score=rule.score,
                    action=action,
                    rule_id=rule.id,
                    span=spans[0],
                    message=rule.message,
                )
            )
            if action is Action.REDACT:
                redactions += [Redaction(s, e, rule.replacement) for s, e in spans]
        return Verdict.from_findings(findings, redactions)


SPEC = FilterSpec(
    type="rules",
    config_type=RulesConfig,
    build=RulesFilter,
    description="Keyword and regex rules with per-rule category, stages, action and message.",
    validate=validate,
)
