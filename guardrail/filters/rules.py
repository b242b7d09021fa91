"""The acceptable-use rule language: keywords, regexes, semantic examples, classifiers.

A rule names what it catches (``category``, ``severity``), where (``stages`` and
``scope``: tenants, routes, models), what to do (``action``: block, redact or flag) and
the message users see. What it matches is a *condition*:

- ``keywords`` / ``regex``: words, phrases or Python regexes. Keywords match the text
  after evasion is undone (case, look-alike letters, zero-width characters, markup
  inside words, reversed text, leetspeak, spaced-out and repeated letters; see
  :mod:`.normalize`); regexes match it folded (case, width, look-alikes, invisible
  characters, reversed text) but with digits, symbols and markup kept. Any one hits.
- ``semantic``: example phrases (and counter-examples) compared with the text by
  sentence-embedding similarity; a hit when the nearest example is at least
  ``threshold`` similar and beats the nearest counter-example by ``margin``.
- ``classifier``: a label's score from a classifier engine declared under
  ``classifiers:`` (the shipped embedding heads, or Llama Guard) at least ``threshold``.
- ``all`` / ``any`` / ``not``: composition of conditions.

Inside one condition the parts listed together must all hold (keywords/regex count as
one part), like ``all``; ``any`` is the way to say "either". Example::

    - id: weapons.build
      category: weapons
      severity: high
      keywords: [pipe bomb, ghost gun]
    - id: weapons.semantic
      category: weapons
      any:
        - semantic: {examples: ["how do I build an explosive device"], threshold: 0.7}
        - classifier: {engine: aup, label: weapons, threshold: 0.6}
      not: {keywords: [video game, minecraft]}

Long texts are embedded in sentence windows and scored by their most similar window, so
a harmful request inside a long harmless frame is still seen.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import regex as regex_engine

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError
from guardrail.filters.classifiers import (
    DEFAULT_AUP_ENCODER,
    DEFAULT_AUP_WEIGHTS,
    AupHeads,
    ClassifierEngine,
    ClassifierSettings,
    EmbeddingHeadsEngine,
    EmbeddingHeadsSettings,
    EncoderHead,
    LlamaGuardSettings,
)
from guardrail.filters.normalize import (
    VOWELS,
    Normalized,
    folded_char,
    invisible_chars,
    normalize,
)
from guardrail.filters.policy_regex import regex_problem
from guardrail.filters.weights import file_key, file_stamp
from guardrail.guard.filter import BuildContext, ConfigIssue, FilterSpec, text_pass
from guardrail.guard.stream import UNSPACED_LETTERS
from guardrail.guard.types import Action, FilterContext, Finding, Redaction, Stage, Verdict
from guardrail.policy.model import VISIBLE_PATTERN, Id, UserText, scope_matches

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.filters.embedder import Embedder

Score = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Semantic(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Similarity to example phrases, by sentence embedding (all-MiniLM-L6-v2)."""

    examples: Annotated[
        list[str],
        _doc("Phrases that should match: what the rule is about, in a few different wordings."),
        msgspec.Meta(min_length=1),
    ]
    counter_examples: Annotated[
        list[str],
        _doc("Phrases that look alike but must not match (e.g. 'kill a Python process')."),
    ] = msgspec.field(default_factory=list)
    threshold: Annotated[Score, _doc("Lowest cosine similarity to an example that matches.")] = 0.6
    margin: Annotated[
        float,
        _doc("How much closer the nearest example must be than the nearest counter-example."),
        msgspec.Meta(ge=-1.0, le=1.0),
    ] = 0.0


class ClassifierCondition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A label's score from a classifier engine declared in the filter's ``classifiers``."""

    engine: Annotated[Id, _doc("Name of an engine under the filter's 'classifiers'.")]
    label: Annotated[str, _doc("Label to score, e.g. a category name or 'unsafe'.")]
    threshold: Annotated[Score, _doc("Lowest score that matches.")] = 0.5


# What the loader refuses, said in the schema too, so an editor refuses it as well:
# a condition of no parts ("not: {}"), a list of no conditions ("any: []", which held),
# a keyword of no text.
_NOT_EMPTY = msgspec.Meta(extra_json_schema={"minProperties": 1})
# A keyword of invisible characters alone is empty once they are removed.
Keyword = Annotated[str, msgspec.Meta(pattern=VISIBLE_PATTERN)]


class Condition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a rule matches. Parts listed together must all hold (keywords/regex are one part)."""

    keywords: Annotated[
        list[Keyword],
        _doc("Words or phrases matched whole, after evasion is undone; any one hits."),
    ] = msgspec.field(default_factory=list)
    regex: Annotated[
        list[str],
        _doc("Python regular expressions on the normalised (lower-case) text; any one hits."),
    ] = msgspec.field(default_factory=list)
    semantic: Annotated[Semantic | None, _doc("Example phrases matched by meaning.")] = None
    classifier: Annotated[ClassifierCondition | None, _doc("A classifier label's score.")] = None
    all_of: Annotated[
        Annotated[list[Annotated[Condition, _NOT_EMPTY]], msgspec.Meta(min_length=1)] | None,
        _doc("Every one of these conditions holds."),
    ] = msgspec.field(default=None, name="all")
    any_of: Annotated[
        Annotated[list[Annotated[Condition, _NOT_EMPTY]], msgspec.Meta(min_length=1)] | None,
        _doc("At least one of these conditions holds."),
    ] = msgspec.field(default=None, name="any")
    # The Meta sits outside the union: msgspec drops one on a struct inside it.
    none_of: Annotated[Condition | None, _doc("This condition does not hold."), _NOT_EMPTY] = (
        msgspec.field(default=None, name="not")
    )


class Scope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a rule applies; each list holds glob patterns, empty means everywhere."""

    tenants: Annotated[
        list[str], _doc("Tenant names ('*' globs allowed; a tenant's own name matches it).")
    ] = msgspec.field(default_factory=list)
    routes: Annotated[
        list[Literal["chat", "completions", "moderations"]],
        _doc("Routes: chat (/v1/chat/completions), completions, moderations."),
    ] = msgspec.field(default_factory=list)
    models: Annotated[
        list[str], _doc("Requested model names ('*' globs allowed; a model's own name matches it).")
    ] = msgspec.field(default_factory=list)


class Rule(Condition, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One rule: a condition plus what it is, where it applies, and what it does."""

    id: Annotated[Id, _doc("Unique rule id, reported in findings.")]
    category: Annotated[
        str,
        _doc("Category reported in findings and metrics (a fixed set)."),
        msgspec.Meta(min_length=1, max_length=128, pattern=VISIBLE_PATTERN),
    ]
    description: Annotated[
        str, _doc("What the rule is for; also the category text shown to Llama Guard.")
    ] = ""
    severity: Annotated[
        Literal["low", "medium", "high", "critical"], _doc("Severity reported in findings.")
    ] = "medium"
    stages: Annotated[
        Annotated[list[Stage], msgspec.Meta(min_length=1)] | None,
        _doc(
            "Stages this rule applies to, among its filter entry's (a rule that shares none "
            "is an error); default: the filter's stages."
        ),
    ] = None
    scope: Annotated[Scope | None, _doc("Tenants, routes and models the rule applies to.")] = None
    action: Annotated[Literal["block", "redact", "flag"], _doc("What a match does.")] = "block"
    message: Annotated[
        UserText | None, _doc("Message users see when this rule blocks; default: the policy's.")
    ] = None
    score: Annotated[Score, _doc("Score reported for a keyword or regex hit.")] = 1.0
    replacement: Annotated[
        str, _doc("Text that replaces each keyword/regex hit when action is redact.")
    ] = "[REDACTED]"


class RulesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a ``rules`` filter."""

    rules: Annotated[list[Rule], _doc("The rules, all checked on every text.")] = msgspec.field(
        default_factory=list
    )
    classifiers: Annotated[
        dict[Id, ClassifierSettings],
        _doc("Classifier engines by name, for 'classifier' conditions ('type' picks one)."),
    ] = msgspec.field(default_factory=dict)
    segment_chars: Annotated[
        int,
        _doc("Texts longer than this are embedded in sentence windows of about this size."),
        msgspec.Meta(ge=50, le=5000),
    ] = 320
    max_segments: Annotated[
        int,
        _doc(
            "Most windows embedded per text. Every window of a text is embedded; a text of "
            "more windows fails the filter (its on_error applies) instead of being checked "
            "in part."
        ),
        # 16384 windows of the default size cover the largest body the gateway accepts.
        msgspec.Meta(ge=1, le=16384),
    ] = 48


# -- validation ----------------------------------------------------------------------------

ConfigPath = tuple[str | int, ...]


_MAX_NESTING = 32
"""The most levels of ``all``/``any``/``not`` inside one another in a rule.

Checking and matching a condition take a level of Python's stack per level: a rule nested
130 deep exhausted it in the loader's schema check (a traceback, or a reload's bare
"RecursionError"), and how deep that happens depends on the caller's own stack. A fixed
limit, far above what a rule needs, says the same in ``policy validate`` and a reload."""


def _walk(cond: Condition, path: ConfigPath) -> Iterator[tuple[Condition, ConfigPath]]:
    yield cond, path
    for key, children in (("all", cond.all_of), ("any", cond.any_of)):
        for i, child in enumerate(children or ()):
            yield from _walk(child, (*path, key, i))
    if cond.none_of is not None:
        yield from _walk(cond.none_of, (*path, "not"))


def _has_part(cond: Condition) -> bool:
    return bool(
        cond.keywords
        or cond.regex
        or cond.semantic
        or cond.classifier
        or cond.all_of
        or cond.any_of
        or cond.none_of is not None
    )


def _positive_only_negation(cond: Condition) -> bool:
    """True when nothing but ``not`` is given: a rule that matches almost every text."""
    parts = [cond.keywords or cond.regex, cond.semantic, cond.classifier, cond.all_of, cond.any_of]
    return cond.none_of is not None and not any(parts)


def _needs_a_match(cond: Condition) -> bool:
    """Whether the condition can only hold when something is found in the text.

    ``all: [{not: ...}]`` or ``any: [{keywords: ...}, {not: ...}]`` can hold on ``not``
    alone, like a bare ``not``.
    """
    if cond.keywords or cond.regex or cond.semantic or cond.classifier:
        return True
    if cond.all_of and any(_needs_a_match(c) for c in cond.all_of):
        return True
    any_of = cond.any_of or []
    return bool(any_of) and all(_needs_a_match(c) for c in any_of)


def validate(config: RulesConfig) -> Iterator[ConfigIssue]:
    """What a schema cannot say: unique ids, compiling regexes, known engines and labels."""
    seen: set[str] = set()
    for i, rule in enumerate(config.rules):
        base: ConfigPath = ("rules", i)
        if rule.id in seen:
            yield ConfigIssue((*base, "id"), f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        if _positive_only_negation(rule):
            yield ConfigIssue(
                (*base, "not"),
                "a rule needs something to match besides 'not' (it would hit nearly every text)",
            )
        elif _has_part(rule) and not _needs_a_match(rule):
            yield ConfigIssue(
                base,
                "a rule needs something to match besides 'not': here 'all'/'any' can hold "
                "on a 'not' alone (it would hit nearly every text)",
            )
        if rule.action == "redact" and not (rule.keywords or rule.regex):
            yield ConfigIssue(
                (*base, "action"),
                "action redact needs keywords or regex on the rule itself (the spans to hide)",
            )
        depth = max(sum(isinstance(key, str) for key in p) for _, p in _walk(rule, ()))
        if depth > _MAX_NESTING:
            yield ConfigIssue(
                base,
                f"conditions nest {depth} levels deep ('all', 'any' and 'not' inside one "
                f"another); at most {_MAX_NESTING}",
            )
        for cond, path in _walk(rule, base):
            if not _has_part(cond):
                yield ConfigIssue(
                    path, "a condition needs keywords, regex, semantic, classifier, all, any or not"
                )
            # Beside other parts an empty list was skipped: 'any: []' held ("any of
            # nothing") and the rule matched on the other parts alone.
            for key, children in (("all", cond.all_of), ("any", cond.any_of)):
                if children is not None and not children:
                    yield ConfigIssue((*path, key), f"'{key}' needs at least one condition")
            for j, kw in enumerate(cond.keywords):
                if not normalize(kw).text:
                    yield ConfigIssue((*path, "keywords", j), "empty keyword")
                elif _UNSPACED.fullmatch(kw.strip()):
                    # It has no edges (the script has no spaces), so it is found inside
                    # every word that holds it: 毒 in 病毒 ("virus") and 消毒液.
                    yield ConfigIssue(
                        (*path, "keywords", j),
                        f"the one-character keyword {kw.strip()!r} is in a script written "
                        "without spaces, so it matches inside every word that holds it; "
                        "list the words you mean",
                        warning=True,
                    )
            if cond.semantic is not None:
                yield from _semantic_issues(cond.semantic, (*path, "semantic"))
            for j, pattern in enumerate(cond.regex):
                try:
                    compiled = re.compile(pattern)
                except (re.error, OverflowError) as e:  # a{99999999999}: OverflowError
                    yield ConfigIssue((*path, "regex", j), f"invalid regex: {e}")
                    continue
                hidden = sorted(set(pattern) & invisible_chars())
                if hidden:
                    # Folding leaves a zero-width space as it is, but the text loses it:
                    # "bo\u200bmb" loaded and could never match.
                    shown = ", ".join(f"U+{ord(c):04X}" for c in hidden)
                    yield ConfigIssue(
                        (*path, "regex", j),
                        f"regex holds invisible characters ({shown}) that the text it runs on "
                        "never holds (they are removed, and tag characters read as the ASCII "
                        "they encode); remove them",
                    )
                unfoldable = sorted(
                    {
                        c
                        for c in pattern
                        if not c.isascii() and c not in hidden and folded_char(c) != c.lower()
                    }
                )
                if unfoldable:
                    # Regexes see the text folded: "cocaína" reads "cocaina" there.
                    shown = ", ".join(f"{c!r} (reads {folded_char(c)!r})" for c in unfoldable)
                    yield ConfigIssue(
                        (*path, "regex", j),
                        f"regex holds characters the folded text it runs on never holds: "
                        f"{shown}; write them as they read",
                    )
                problem = regex_problem(
                    pattern,
                    regex_engine.IGNORECASE,  # as the filter compiles it
                    refused="regex not supported by the time-limited regex engine",
                )
                if problem is not None:
                    yield ConfigIssue((*path, "regex", j), problem)
                    continue
                if _longest_match(pattern) == 0:
                    # Sample texts cannot show this: "(?=how to make a bomb)" matches
                    # none of them, and at run time finds nothing in any text.
                    yield ConfigIssue(
                        (*path, "regex", j),
                        "regex only ever matches empty text (anchors, lookarounds), and an "
                        "empty match finds nothing: the rule would never fire; make it match "
                        "at least one character",
                    )
                elif compiled.match("") or any(
                    m.end() == m.start() for m in compiled.finditer(_ZERO_WIDTH_PROBE)
                ):
                    # "\b" or "(?=\w)" miss "" but match between characters of any text.
                    yield ConfigIssue(
                        (*path, "regex", j),
                        "regex matches empty text (it would hit every message); "
                        "make it match at least one character",
                    )
            if cond.classifier is not None and cond.classifier.engine not in config.classifiers:
                known = ", ".join(sorted(config.classifiers)) or "none declared"
                yield ConfigIssue(
                    (*path, "classifier", "engine"),
                    f"unknown classifier engine {cond.classifier.engine!r} ({known})",
                )
            elif cond.classifier is not None:
                settings = config.classifiers[cond.classifier.engine]
                labels = _shipped_labels(settings)
                if labels is not None and cond.classifier.label not in labels:
                    yield ConfigIssue(
                        (*path, "classifier", "label"),
                        f"classifier engine {cond.classifier.engine!r} does not score "
                        f"{cond.classifier.label!r} (it scores: {', '.join(sorted(labels))})",
                    )
    yield from _description_issues(config)


def _description_issues(config: RulesConfig) -> Iterator[ConfigIssue]:
    """A Llama Guard ``descriptions`` key that no rule asks that engine for (a typo, or
    ``unsafe``, which has no category) would describe nothing: the intended category
    then goes to the model with the rule's description or none."""
    asked: dict[str, set[str]] = {}
    for i, rule in enumerate(config.rules):
        for cond, _ in _walk(rule, ("rules", i)):
            if cond.classifier is not None:
                asked.setdefault(cond.classifier.engine, set()).add(cond.classifier.label)
    for name, settings in config.classifiers.items():
        if not isinstance(settings, LlamaGuardSettings):
            continue
        categories = asked.get(name, set()) - {"unsafe"}
        for label in settings.descriptions:
            if label not in categories:
                used = ", ".join(sorted(categories)) or "none"
                yield ConfigIssue(
                    ("classifiers", name, "descriptions", label),
                    f"no rule asks engine {name!r} for label {label!r}, so this describes "
                    f"no category (the categories rules ask for: {used})",
                )


def _model_reading(text: str) -> str:
    """``text`` as the embedding models read it: normalised, typed apostrophes kept (the
    shipped heads were trained on that reading; keywords and regexes fold them)."""
    return normalize(text, apostrophes=False).text


def _semantic_issues(semantic: Semantic, path: ConfigPath) -> Iterator[ConfigIssue]:
    """Examples with no words (blank, emoji only) embed like any other text with none and
    matched "ok" and "👍"; a counter-example equal to an example could never win."""
    examples = {}
    for key in ("examples", "counter_examples"):
        for j, text in enumerate(getattr(semantic, key)):
            folded = _model_reading(text)
            if not any(c.isalnum() for c in folded):
                yield ConfigIssue((*path, key, j), "an example needs words: it has none")
            elif key == "examples":
                examples[folded] = j
            elif folded in examples:
                yield ConfigIssue(
                    (*path, key, j),
                    f"the same text as examples[{examples[folded]}]: it could never win",
                )


@functools.cache
def _default_heads_labels() -> frozenset[str]:
    return frozenset(AupHeads.load(DEFAULT_AUP_WEIGHTS).categories) | {"unsafe"}


def _shipped_labels(settings: object) -> frozenset[str] | None:
    """The labels of an engine whose weights are known without the policy's folder (the
    shipped heads), else None: other weights are checked when the policy is built."""
    if isinstance(settings, EmbeddingHeadsSettings) and settings.weights is None:
        return _default_heads_labels()
    return None


# -- compiled form --------------------------------------------------------------------------


def _regex_time_limit(chars: int) -> float:
    """Seconds one policy regex may run on a text of ``chars`` characters.

    A short text's regexes run on the event loop (a thread would cost more than most
    matches take; a long text's and a shadow policy's run on the executor, see
    :data:`LOOP_REGEX_CHARS`), so one that backtracks without end on some input
    ("^(a|aa)+$" on "aaaa...b") would stop every request; the filter's own time limit
    cannot interrupt code that never yields.
    The ``regex`` engine stops a match past its limit with TimeoutError, which the guard
    counts as the filter timing out (on_error applies). A linear regex reads tens of
    characters a microsecond (about 56 for the default policy's); the limit allows one.
    """
    return _REGEX_TIME_BASE_S + chars * 1e-6


_REGEX_TIME_BASE_S = 0.1
# The default policy's seven input regexes took 1.5 ms together on 10,000 characters of
# prose and 3.1 ms on text full of near matches ("how to build a treehouse", "bath
# bombs"), 15-31 ms on 100,000 and 146-305 ms on 1,000,000 (its three output regexes
# half that; thread CPU time, best of 5, on one core of the 2-core dev machine); a thread
# hop costs about 0.2 ms. Up to this many characters a text's regexes run on the event
# loop; a longer one's on the executor, where the regex engine lets the loop run while it
# matches (it releases the GIL). On the loop, a /v1/moderations check of a 1 MB answer
# (stage output) held every request, /healthz too, for 74-172 ms.
LOOP_REGEX_CHARS = 10_000
# The re module's own parser: private, but the one sound way to know what a pattern can
# span (sample texts miss a lookahead's words); every pattern it sees here compiled with
# re. Through import_module since the type stubs do not list it.
_RE_PARSER: Any = importlib.import_module("re._parser")


def _longest_match(pattern: str) -> int:
    """The most characters one match of ``pattern`` can span (0: only empty matches)."""
    width: tuple[int, int] = _RE_PARSER.parse(pattern).getwidth()
    return width[1]


# Text a regex is tried on at validation: one that matches it empty somewhere ("\b",
# "(?=\w)", "x*") matches every message.
_ZERO_WIDTH_PROBE = "Ab 1.\n-x"
_SPELL_SEPARATOR = r"[ ._*/,~:'-]"
# Normalised text is lower case but for "I", a leet "1" or "|" that reads as i or l.
_LETTER_CLASS = {"i": "[iI]", "l": "[lI]", "I": "[ilI]"}


def _letter(char: str) -> str:
    return _LETTER_CLASS.get(char) or re.escape(char)


def _word_pattern(word: str) -> str:
    """A word as written (a consonant beside another may be doubled, see _doublable), or
    spelled out one letter at a time (``b o m b``, ``b.o.m.b``)."""
    twice = _doublable(word)
    plain = "".join(_letter(c) + ("{1,2}" if k in twice else "") for k, c in enumerate(word))
    if len(word) < 3:
        return plain
    spelled = _SPELL_SEPARATOR.join(_letter(c) for c in word)
    return f"(?:{plain}|{spelled})"


# Letters may be written more than once ("boommb", "kiiill") in a word of at least this
# many letters, when the match has at least _STRETCH_MIN letters more than the keyword.
# One doubled letter is no evasion in general: too many real words are another with one
# letter doubled ("rapped"/"raped", "shoot"/"shot", "dinner"/"diner"; the exception is
# _doublable); short keywords never stretch ("good"/"god", "poop"/"pop", and "goood
# morning").
_STRETCH_WORD = 4
_STRETCH_MIN = 2


def _stretched_word(word: str) -> str:
    """``word`` with each run of a letter written once or more often than that."""
    if len(word) < _STRETCH_WORD:
        return "".join(_letter(c) for c in word)
    out = []
    for char, run in itertools.groupby(word):
        count = len(list(run))
        if char.isalpha() and char != "I":
            # The run as the keyword has it, then more of the plain letter: neighbouring
            # runs are of other letters, so no two quantifiers compete for a character.
            out.append(f"{_letter(char)}{{{count}}}{re.escape(char)}*")
        else:
            out.append(_letter(char) * count)
    return "".join(out)


# One letter written twice hides a keyword where doubling it makes no other word: a
# consonant that touches another consonant in the keyword ("mb" in "bomb", "th" in
# "meth"), doubled ("bommb", "bombb"), however short of _STRETCH_MIN extra letters it falls.
# Words do double a consonant there ("address", "little", "calls"), but their single-letter
# spelling is a misspelling ("adress", "litle"), not a keyword. Between vowels, or as a
# vowel, the doubled word is too often another word ("rapped"/"raped", "dinner"/"diner",
# "shoot"/"shot"), and those keep the two-letter rule.


def _consonant(char: str) -> bool:
    # "I" is a leet 1 or |, either i or l: neither a known consonant nor a vowel.
    return char.isascii() and char.islower() and char not in VOWELS


def _doublable(word: str) -> frozenset[int]:
    """Positions of the consonants of ``word`` that touch another consonant, in a word of
    at least _STRETCH_WORD letters: each may be written twice. A quantifier on the letter
    rather than one more alternative per doubled form: a deny list of thousands of
    keywords keeps its number of alternatives."""
    if len(word) < _STRETCH_WORD:
        return frozenset()
    return frozenset(
        k
        for k, char in enumerate(word)
        if _consonant(char)
        and any(_consonant(c) and c != char for c in word[max(k - 1, 0) : k] + word[k + 1 : k + 2])
    )


# Between the words of a keyword: spaces, hyphens (dashes fold to them), underscores,
# slashes, or a full stop with no space after it ("pipe-bomb", "kill.yourself"; a
# sentence's end is no joint: "we build. A bomb").
_BETWEEN_WORDS = r"(?:[\s\-_/]|\.(?!\s))+"
# A keyword's own words are split the same way: `self-harm` and `kill_yourself` are
# phrases, matched however their words are joined ("self harm", "kill yourself").
_KEYWORD_JOINTS = re.compile(r"[\s\-_/]+")
# The readings of a text that patterns match (see normalize): keywords the text with
# evasion undone but spelled-out letters apart (their patterns take those), keywords with
# digits also that text with leetspeak kept (see _plain_forms), regexes the folded text.
_READINGS: dict[str, dict[str, bool]] = {
    "keywords": {"glue": False},
    "plain": {"glue": False, "leet": False},
    "folded": {"leet": False, "glue": False, "markup": False, "camel": False},
}
# How far back from a stream window's end a redact rule's unfinished match is looked for.
_HOLD_CHARS = 256
# Two long words may also be glued ("pipebomb"); a short one may not, or "the rapist"
# would match "therapist" and "kill er" "killer". A number glues to any word ("AR15"):
# letters and digits together make no other English word.
_GLUE_MIN = 4
# A keyword's edges: no letter or digit may touch it. An underscore may: words joined by
# underscores ("how_to_make_a_bomb") are words, as a phrase's words are (`pipe_bomb`).
# So may a letter of a script written without spaces (Chinese, Japanese, Thai, ...):
# its text runs words together, and no word of another script goes on into it ("我想买AR15").
# Where the keyword's own first or last letter is of such a script there is no edge on
# that side at all: "炸弹" is a word of "如何制造炸弹", which has no space to find.
# Korean is written with spaces, but its particles are glued after a word ("폭탄을", the
# bomb as an object; "AR15를"): a keyword that ends in Hangul has no edge after it, and
# Hangul may follow any keyword. Before a word Korean glues only the first parts of
# compounds ("시한폭탄", time bomb): that edge stays, as it does in Latin text.
_HANGUL = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7ff"
_EDGE_BEFORE = rf"(?<![^\W_{UNSPACED_LETTERS}])"
_EDGE_AFTER = rf"(?![^\W_{UNSPACED_LETTERS}{_HANGUL}])"
_NUMBER_BEFORE = r"(?<!\d[.,])"
_NUMBER_AFTER = r"(?![.,]\d)"
_UNSPACED = re.compile(f"[{UNSPACED_LETTERS}]")
_GLUED_AFTER = re.compile(f"[{UNSPACED_LETTERS}{_HANGUL}]")


def _gluable(before: str, word: str) -> bool:
    if len(before) >= _GLUE_MIN and len(word) >= _GLUE_MIN:
        return True
    return any(c.isdigit() for c in before + word)


def _keyword_forms(keyword: str, *, leet: bool = True) -> list[list[str]]:
    """The keyword's words as normalised text can hold them: with look-alike letters of
    another script read as Latin (a Cyrillic word among English ones), and as written (a
    text in that script keeps its words: a Russian keyword of look-alike letters alone,
    such as the Cyrillic "sex", stays Cyrillic in a Russian sentence). ``leet=False``
    reads its digits and symbols as written."""
    forms: list[list[str]] = []
    for unconfuse in (True, False):
        text = normalize(keyword, glue=False, unconfuse=unconfuse, leet=leet).text
        # A keyword of joints alone ("--") keeps them as its one word.
        words = [w for w in _KEYWORD_JOINTS.split(text) if w] or [text]
        if words not in forms:
            forms.append(words)
    return forms


def _keyword_pattern(words: list[str], *, stretch: bool = False) -> str:
    word_pattern = _stretched_word if stretch else _word_pattern
    body = word_pattern(words[0]) if words else ""
    for before, word in itertools.pairwise(words):
        body += f"(?:{_BETWEEN_WORDS})?" if _gluable(before, word) else _BETWEEN_WORDS
        body += word_pattern(word)
    first, last = (words[0][:1], words[-1][-1:]) if words else ("", "")
    opening = "" if _UNSPACED.fullmatch(first) else _EDGE_BEFORE
    closing = "" if _GLUED_AFTER.fullmatch(last) else _EDGE_AFTER
    # A number's decimals or thousands go on past a keyword's digits: "911.5" and
    # "1,911" hold no 911 ("call 911." does).
    if first.isdigit():
        opening += _NUMBER_BEFORE
    if last.isdigit():
        closing += _NUMBER_AFTER
    return f"{opening}{body}{closing}"


def _plain_forms(keyword: str) -> list[list[str]]:
    """The keyword's words read without leetspeak, if it holds digits or symbols that
    leetspeak reads, for the text read without it too.

    Leetspeak is read by word, and the keyword is a word alone: `AR15` reads `arIs`
    while "I want an AR15" keeps `ar15` (a code of two capitals), `glock 19` keeps its
    number while "Glock19" reads `glockIg`, and `3d print` keeps `3d` while "3d-print"
    reads `ed-print`. Each missed the spelling it was written for."""
    plain = _keyword_forms(keyword, leet=False)
    if any(c.isdigit() for words in plain for c in "".join(words)):
        return plain
    return [words for words in plain if words not in _keyword_forms(keyword)]


def _compile_pattern(cond: Condition) -> _Pattern | None:
    forms = [words for k in cond.keywords for words in _keyword_forms(k)]
    keywords = [_keyword_pattern(words) for words in forms]
    plain = [_keyword_pattern(words) for k in cond.keywords for words in _plain_forms(k)]
    if not keywords and not cond.regex:
        return None
    # A group per keyword that can stretch: its number says how many letters it has.
    stretchy = [words for words in forms if any(len(w) >= _STRETCH_WORD for w in words)]
    stretched = "|".join(f"({_keyword_pattern(words, stretch=True)})" for words in stretchy)
    # Each regex on its own, as validated: joined into one alternation, a global flag
    # ("(?i)") not at the start, a group name used twice or a backreference ("\1"
    # meaning another regex's group) would fail or change meaning. Keywords are matched
    # case-sensitively: the text is folded, and its one capital is the leet "I".
    return _Pattern(
        re.compile("|".join(keywords)) if keywords else None,
        tuple(
            regex_engine.compile(r, regex_engine.IGNORECASE | regex_engine.VERSION0)
            for r in cond.regex
        ),
        re.compile(stretched) if stretched else None,
        tuple(sum(c.isalpha() for c in "".join(words)) for words in stretchy),
        re.compile("|".join(plain)) if plain else None,
    )


@dataclass(frozen=True, slots=True)
class _Pattern:
    """Keywords match the fully normalised text (and the text without leetspeak, see
    ``plain``); regexes the folded text."""

    keywords: re.Pattern[str] | None
    # The policy author's, on the regex engine: time-limited, see _regex_time_limit.
    regexes: tuple[regex_engine.Pattern[str], ...]
    # Keywords with letters written more than once; group i is keyword form i, and hits
    # with fewer than _STRETCH_MIN letters more than its letters[i] are dropped.
    stretched: re.Pattern[str] | None = None
    letters: tuple[int, ...] = ()
    # Keywords with digits or leet symbols read as written, on the text read so too (see
    # _plain_forms): a hit on either reading counts.
    plain: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class _SemanticIndex:
    examples: npt.NDArray[np.float32]
    counters: npt.NDArray[np.float32] | None
    threshold: float
    margin: float

    def score(self, embeddings: npt.NDArray[np.float32]) -> tuple[bool, float]:
        """(hit, best similarity) over the text's windows."""
        if len(embeddings) == 0:
            return False, 0.0
        sims = (embeddings @ self.examples.T).max(axis=1)
        if self.counters is not None:
            against = (embeddings @ self.counters.T).max(axis=1)
            ok = (sims >= self.threshold) & (sims - against >= self.margin)
        else:
            ok = sims >= self.threshold
        return bool(ok.any()), float(sims.max())


@dataclass(slots=True)
class _Node:
    pattern: _Pattern | None = None
    pattern_score: float = 1.0
    semantic: _SemanticIndex | None = None
    classifier: ClassifierCondition | None = None
    all_of: list[_Node] = field(default_factory=list)
    any_of: list[_Node] = field(default_factory=list)
    none_of: _Node | None = None


@dataclass(frozen=True, slots=True)
class _Match:
    hit: bool
    score: float = 0.0
    spans: tuple[tuple[int, int], ...] = ()
    # The spans of the node's own keywords and regexes, not its children's: what a
    # redaction hides (a child's match is context: "card number" in "my card number is").
    own: tuple[tuple[int, int], ...] = ()


_MISS = _Match(False)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    node: _Node
    stages: frozenset[Stage]
    scope: Scope | None

    def applies(self, ctx: FilterContext) -> bool:
        if ctx.stage not in self.stages:
            return False
        scope = self.scope
        if scope is None:
            return True

        def ok(patterns: Sequence[str], value: str | None) -> bool:
            return not patterns or any(scope_matches(p, value or "") for p in patterns)

        return (
            ok(scope.tenants, ctx.tenant)
            and ok(scope.routes, ctx.route)
            and ok(scope.models, ctx.model)
        )


# The windows a check worked out for its text, off the event loop when the text is long,
# handed to an engine that splits the text again (a fine-tuned encoder, a probe) through
# RulesFilter.windows. Set in the engine's own task, for the duration of its call: no
# other check sees it, and the filter it was made by is part of it (another rules filter
# may cut the same text object into other windows).
_KNOWN_WINDOWS: contextvars.ContextVar[tuple[RulesFilter, str, list[str]] | None] = (
    contextvars.ContextVar("rules_known_windows", default=None)
)


def _regex_spans(
    regexes: Sequence[regex_engine.Pattern[str]], folded: Normalized
) -> list[tuple[int, int]]:
    """Where ``regexes`` match the folded text, each within its time limit."""
    limit = _regex_time_limit(len(folded.text))
    # An empty match (a lookahead, "\S*" with nothing after its anchor) finds nothing:
    # span() widens it to a character, which a redaction then ate.
    return [
        folded.span(m.start(), m.end())
        for regex in regexes
        for m in regex.finditer(folded.text, timeout=limit)
        if m.end() > m.start()
    ]


def _blanked(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` with ``spans`` written as spaces (the same length, so spans still index it)."""
    if not spans:
        return text
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


class _Check:
    """One text being checked: normalised once, embedded once, each engine run once.

    Each pass over a long text runs on the executor (see :func:`text_pass`)."""

    def __init__(self, filt: RulesFilter, text: str, ctx: FilterContext, norm: Normalized) -> None:
        self.filt = filt
        self.text = text
        # What the models read: the text less its identifiers (FilterContext.identifiers),
        # blanked to keep the length. Keywords and regexes read all of it.
        self.prose = _blanked(text, ctx.identifiers)
        self.ctx = ctx
        self.norm = norm
        self._folded: Normalized | None = None
        self._plain: Normalized | None = None
        self._windows: asyncio.Task[list[str]] | None = None
        self._embeddings: asyncio.Task[Any] | None = None
        self._scores: dict[str, asyncio.Task[dict[str, float]]] = {}

    async def windows(self) -> list[str]:
        if self._windows is None:
            self._windows = asyncio.ensure_future(
                text_pass(self.filt.executor, len(self.prose), self.filt.windows, self.prose)
            )
        return await self._windows

    async def embeddings(self) -> npt.NDArray[np.float32]:
        if self._embeddings is None:
            self._embeddings = asyncio.ensure_future(self._embed())
        result: npt.NDArray[np.float32] = await self._embeddings
        return result

    async def _embed(self) -> npt.NDArray[np.float32]:
        return await self.filt.embed(await self.windows(), self.ctx.tenant)

    async def scores(self, engine: str) -> dict[str, float]:
        task = self._scores.get(engine)
        if task is None:
            task = self._scores[engine] = asyncio.ensure_future(self._engine_scores(engine))
        return await task

    async def _engine_scores(self, name: str) -> dict[str, float]:
        engine = self.filt.engines[name]
        embeddings = None
        if engine.uses_embeddings:
            embeddings = await self.embeddings()
            known = _KNOWN_WINDOWS.set((self.filt, self.prose, await self.windows()))
            try:
                return await engine.scores(self.prose, self.ctx, embeddings)
            finally:
                _KNOWN_WINDOWS.reset(known)
        return await engine.scores(self.prose, self.ctx, embeddings)

    async def _pattern_spans(self, pattern: _Pattern) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        if pattern.keywords is not None:
            norm = self.norm
            found += [norm.span(m.start(), m.end()) for m in pattern.keywords.finditer(norm.text)]
        if pattern.stretched is not None:
            norm = self.norm
            for m in pattern.stretched.finditer(norm.text):
                extra = (
                    sum(c.isalpha() for c in m.group()) - pattern.letters[(m.lastindex or 1) - 1]
                )
                if extra >= _STRETCH_MIN:
                    found.append(norm.span(m.start(), m.end()))
        if pattern.plain is not None:
            if self._plain is None:
                self._plain = await text_pass(
                    self.filt.executor, len(self.text), normalize, self.text, **_READINGS["plain"]
                )
            plain = self._plain
            found += [plain.span(m.start(), m.end()) for m in pattern.plain.finditer(plain.text)]
        if pattern.regexes:
            if self._folded is None:
                self._folded = await text_pass(
                    self.filt.executor, len(self.text), normalize, self.text, **_READINGS["folded"]
                )
            folded = self._folded
            if self.filt.regexes_off_loop or len(self.text) > LOOP_REGEX_CHARS:
                loop = asyncio.get_running_loop()
                found += await loop.run_in_executor(
                    self.filt.executor, _regex_spans, pattern.regexes, folded
                )
            else:
                found += _regex_spans(pattern.regexes, folded)
        return sorted(s for s in found if s[1] > s[0])

    async def match(self, node: _Node) -> _Match:
        """All listed parts must hold; cheap parts first, stop at the first miss."""
        scores: list[float] = []
        spans: list[tuple[int, int]] = []
        own: list[tuple[int, int]] = []
        if node.pattern is not None:
            own = await self._pattern_spans(node.pattern)
            if not own:
                return _MISS
            scores.append(node.pattern_score)
            spans += own
        if (node.semantic is not None or node.classifier is not None) and not self.prose.strip():
            return _MISS  # identifiers alone: nothing a model reads
        if node.semantic is not None:
            hit, sim = node.semantic.score(await self.embeddings())
            if not hit:
                return _MISS
            scores.append(sim)
        if node.classifier is not None:
            cond = node.classifier
            value = (await self.scores(cond.engine)).get(cond.label, 0.0)
            if value < cond.threshold:
                return _MISS
            scores.append(value)
        for child in node.all_of:
            m = await self.match(child)
            if not m.hit:
                return _MISS
            scores.append(m.score)
            spans += m.spans
        if node.any_of:
            best: _Match | None = None
            for child in node.any_of:
                m = await self.match(child)
                if m.hit and (best is None or m.score > best.score):
                    best = m
                    if m.score >= 1.0:
                        break
            if best is None:
                return _MISS
            scores.append(best.score)
            spans += best.spans
        if node.none_of is not None and (await self.match(node.none_of)).hit:
            return _MISS
        return _Match(True, min(scores) if scores else 1.0, tuple(spans), tuple(own))


def _engine_labels(config: RulesConfig) -> dict[str, list[tuple[str, str]]]:
    """Per engine, the (label, description) pairs rules ask for, in order of appearance."""
    out: dict[str, dict[str, str]] = {}
    for rule in config.rules:
        for cond, _ in _walk(rule, ()):
            if cond.classifier is not None:
                labels = out.setdefault(cond.classifier.engine, {})
                labels.setdefault(cond.classifier.label, rule.description)
    return {name: list(labels.items()) for name, labels in out.items()}


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def build_engine(
    name: str,
    settings: ClassifierSettings,
    labels: list[tuple[str, str]],
    env: BuildContext,
    windows: Callable[[str], list[str]] | None = None,
) -> ClassifierEngine:
    """The engine for ``settings``; models are shared through ``env.resources``.
    ``windows`` splits a text as the filter does for its embeddings (normalised, in
    sentence windows): a fine-tuned encoder scores the same windows."""
    if isinstance(settings, EmbeddingHeadsSettings):
        weights = (
            _resolve(env.base_dir, settings.weights) if settings.weights else DEFAULT_AUP_WEIGHTS
        )
        heads = env.resources.get(
            ("aup-heads", file_key(weights)),
            lambda: AupHeads.load(weights),
            version=file_stamp(weights),
        )
        encoder = None
        if settings.encoder is not None:
            path = (
                DEFAULT_AUP_ENCODER
                if settings.encoder == "default"
                else _resolve(env.base_dir, settings.encoder)
            )
            encoder = _encoder(path, env)
        probe = None
        if settings.probe is not None:  # never with an encoder: the settings refuse it
            from guardrail.filters.probe import shared_probe

            probe = shared_probe(settings.probe, env)
        engine: ClassifierEngine = EmbeddingHeadsEngine(heads, encoder, windows, probe)
    else:
        engine = _llama_guard(settings, labels, env)
    unknown = sorted({label for label, _ in labels} - engine.labels)
    if unknown:
        raise ConfigError(
            f"classifier engine {name!r} does not score {', '.join(unknown)} "
            f"(it scores: {', '.join(sorted(engine.labels))})"
        )
    return engine


def _encoder(path: Path, env: BuildContext) -> tuple[EncoderHead, Embedder]:
    """The fine-tuned encoder of ``path``: its head, and an embedder on a copy of the
    sentence encoder with its updates merged (one copy per process and file version,
    in the settings' embedding precision, with its own cache)."""
    from guardrail.filters.embedder import (
        CachingModel,
        Embedder,
        load_sentence_model,
        resolve_precision,
    )

    stamp = file_stamp(path)
    head = env.resources.get(
        ("aup-encoder", file_key(path)), lambda: EncoderHead.load(path), version=stamp
    )
    precision = resolve_precision(env.embedding_precision)
    model = env.resources.get(
        ("aup-encoder-model", file_key(path), precision),
        lambda: CachingModel(head.merged(load_sentence_model(precision))),
        version=stamp,
    )
    embedder = env.resources.get(
        ("aup-encoder-embedder", file_key(path), precision, env.executor),
        lambda: Embedder(model, env.executor),
        version=stamp,
    )
    return head, embedder


def _llama_guard(
    settings: LlamaGuardSettings, labels: list[tuple[str, str]], env: BuildContext
) -> ClassifierEngine:
    from guardrail.filters.classifiers import shared_local_model
    from guardrail.filters.llama_guard import LlamaGuardEngine, taxonomy

    model, tokenizer = shared_local_model(env, settings.model, settings.device, settings.dtype)
    categories = taxonomy(
        [(label, d) for label, d in labels if label != "unsafe"],
        settings.template,
        settings.descriptions,
    )
    return LlamaGuardEngine(model, tokenizer, settings, categories, env.executor)


class RulesFilter:
    """Runs the rules on each text: patterns on the event loop (a long text's regexes and
    a shadow policy's on the executor, see :data:`LOOP_REGEX_CHARS` and
    ``BuildContext.regexes_off_loop``), models on the executor (and a long text's
    normalisation, see :func:`text_pass`)."""

    def __init__(self, name: str, config: RulesConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self._config = config
        self.executor = env.executor
        self.regexes_off_loop = env.regexes_off_loop
        labels = _engine_labels(config)
        self.engines: dict[str, ClassifierEngine] = {
            engine: build_engine(engine, settings, labels.get(engine, []), env, self.windows)
            for engine, settings in config.classifiers.items()
            if engine in labels
        }
        needs_embedder = any(
            cond.semantic is not None for rule in config.rules for cond, _ in _walk(rule, ())
        ) or any(e.uses_embeddings for e in self.engines.values())
        self._embedder: Embedder | None = None
        if needs_embedder:
            from guardrail.filters.embedder import shared_embedder

            self._embedder = shared_embedder(env)
        self._rules = [
            _CompiledRule(
                rule,
                self._compile(rule, rule.score),
                frozenset(rule.stages) if rule.stages else frozenset(Stage),
                rule.scope,
            )
            for rule in config.rules
        ]
        # Output redact rules' own patterns, for streams (see holdback): the keywords in
        # the regex engine, which can tell a match the text's end may have cut.
        self._unfinished: list[tuple[Any, str]] = []
        for compiled in self._rules:
            own = compiled.node.pattern
            if compiled.rule.action != "redact" or Stage.OUTPUT not in compiled.stages:
                continue
            if own is None:
                continue
            if own.keywords is not None:
                self._unfinished.append((regex_engine.compile(own.keywords.pattern), "keywords"))
            if own.plain is not None:
                self._unfinished.append((regex_engine.compile(own.plain.pattern), "plain"))
            self._unfinished += [(r, "folded") for r in own.regexes]
        # The verdict depends on the text alone unless a rule is scoped to tenants,
        # routes or models, or a classifier reads the conversation (Llama Guard at output).
        scoped = any(r.scope is not None for r in config.rules)
        reads_context = any(not e.uses_embeddings for e in self.engines.values())
        self.cache_scope = "none" if scoped or reads_context else "text"

    def _compile(self, cond: Condition, pattern_score: float) -> _Node:
        return _Node(
            pattern=_compile_pattern(cond),
            pattern_score=pattern_score,
            semantic=self._index(cond.semantic) if cond.semantic else None,
            classifier=cond.classifier,
            all_of=[self._compile(c, pattern_score) for c in cond.all_of or ()],
            any_of=[self._compile(c, pattern_score) for c in cond.any_of or ()],
            none_of=self._compile(cond.none_of, pattern_score) if cond.none_of else None,
        )

    def _index(self, semantic: Semantic) -> _SemanticIndex:
        assert self._embedder is not None
        examples = self._embedder.encode_sync([_model_reading(e) for e in semantic.examples])
        counters = (
            self._embedder.encode_sync([_model_reading(e) for e in semantic.counter_examples])
            if semantic.counter_examples
            else None
        )
        return _SemanticIndex(examples, counters, semantic.threshold, semantic.margin)

    def holdback(self, text: str) -> int:
        """Streams: the trailing characters of ``text`` that may start a redact rule's
        match cut by the window's end ("project " of the keyword "project titan", "4111 "
        of a card number's regex), held so the next window has the match whole. Released,
        that start could not be hidden when the rest came. Looked for in the last
        ``_HOLD_CHARS`` characters only."""
        if not self._unfinished or not text:
            return 0
        piece = text[-_HOLD_CHARS:]
        readings: dict[str, Normalized] = {}
        earliest = len(piece)
        for pattern, reading in self._unfinished:
            if reading not in readings:
                readings[reading] = normalize(piece, **_READINGS[reading])
            norm = readings[reading]
            limit = _regex_time_limit(len(norm.text))
            for m in pattern.finditer(norm.text, partial=True, timeout=limit):
                if m.partial and m.start() < len(norm.text):
                    earliest = min(earliest, norm.span(m.start(), m.start() + 1)[0])
        return len(piece) - earliest

    def windows(self, text: str) -> list[str]:
        """The pieces of ``text`` that are embedded: normalised, in sentence windows."""
        from guardrail.filters.embedder import segments

        known = _KNOWN_WINDOWS.get()
        if known is not None and known[0] is self and known[1] is text:
            return list(known[2])
        return segments(_model_reading(text), self._config.segment_chars, self._config.max_segments)

    async def embed(self, windows: list[str], scope: str | None = None) -> npt.NDArray[np.float32]:
        """The embeddings of a text's :meth:`windows`, cached for ``scope`` (the tenant)
        only."""
        assert self._embedder is not None
        return await self._embedder.encode(windows, scope)

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        applicable = [r for r in self._rules if r.applies(ctx)]
        if not applicable or not text.strip():
            return Verdict()
        norm = await text_pass(self.executor, len(text), normalize, text, **_READINGS["keywords"])
        check = _Check(self, text, ctx, norm)
        findings: list[Finding] = []
        redactions: list[Redaction] = []
        for compiled in applicable:
            match = await check.match(compiled.node)
            if not match.hit:
                continue
            rule = compiled.rule
            action = Action(rule.action)
            spans = match.spans
            findings.append(
                Finding(
                    category=rule.category,
                    score=match.score,
                    action=action,
                    rule_id=rule.id,
                    span=spans[0] if spans else None,
                    message=rule.message,
                    severity=rule.severity,
                    # A stream's check needs all of it: a first match in text already
                    # released must not hide a second one in the new window.
                    extent=(min(s for s, _ in spans), max(e for _, e in spans))
                    if len(spans) > 1
                    else None,
                )
            )
            if action is Action.REDACT:
                redactions += [Redaction(s, e, rule.replacement) for s, e in match.own]
        return Verdict.from_findings(findings, redactions)


SPEC = FilterSpec(
    type="rules",
    config_type=RulesConfig,
    build=RulesFilter,
    description=(
        "Acceptable-use rules: keywords and regexes (evasion-normalised), semantic examples, "
        "classifier labels (embedding heads, Llama Guard), composed with all/any/not; "
        "per-rule category, severity, stages, scope, action and message."
    ),
    validate=validate,
)
