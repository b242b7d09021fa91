"""Hallucination flags: ungrounded claims, unverified citations, knowledge-cutoff questions.

The gateway cannot know the truth; it flags what is unsupported or out of the model's
reach. Three checks, each switched on and given an action in the filter config:

- ``groundedness`` (output): when the request brings sources (the ``documents``
  request field, system messages, tool messages), every sentence of the completion is
  scored for support by them (:mod:`guardrail.filters.grounding`). A sentence below
  ``threshold`` is an ``ungrounded`` finding with its span; the whole answer's score is
  an ``allow`` finding of category ``groundedness`` (the metric and the moderation
  endpoint read it). Without sources there is nothing to check against.
- ``citations`` (output): URLs, DOIs, arXiv ids and numbered or author-year references
  that do not appear in the sources are ``unverified_citation`` findings. With no
  sources at all, every citation is unverified (``without_sources``).
- ``cutoff`` (input and output): dates after the model's training cutoff, and (in
  prompts only) questions about "the latest" or "current" facts, are
  ``knowledge_cutoff`` findings. The cutoff is per model (``models``, glob patterns),
  else ``date``.

Tool calls (``FilterContext.tool_calls``) are not read: a call is an action the model
takes, not a claim, and an earlier call is no question.

Every finding here has ``concern: accuracy``: metrics count them in
``guardrail_hallucination_flags_total`` and never as harmful content. The verdict
cache is off for this filter (``cache_scope = "none"``): its answer depends on the
request's sources and model, not on the text alone. In a stream, a window that would
end at an abbreviation's or initial's full stop is kept back (:meth:`holdback`), so the
sentence is scored whole rather than as the fragment "Restored by J.".
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError
from guardrail.filters.classifiers import (
    ModelDevice,
    ModelDType,
    ProbeSettings,
    shared_local_model,
)
from guardrail.guard.filter import BuildContext, ConfigIssue, FilterSpec, Grounder, text_pass
from guardrail.guard.types import Action, FilterContext, Finding, Stage, Verdict
from guardrail.policy.model import UserText

if TYPE_CHECKING:
    from guardrail.filters.grounding import GroundingScorer

Source = Literal["documents", "system", "tool"]
_DATE = re.compile(r"^(\d{4})(?:-(0[1-9]|1[0-2]))?$")
# A message's sources: documents from the request, then system and tool messages.
_ROLES: dict[str, tuple[str, ...]] = {"system": ("system", "developer"), "tool": ("tool",)}


# -- config ------------------------------------------------------------------------------


class JudgeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A causal LM asked "does the source support the claim?", blended into support scores."""

    model: Annotated[str, _doc("Model folder, .gguf file, or hub id (only when downloads are on).")]
    weight: Annotated[
        float,
        _doc("Share of the judge in a claim's support (the rest is the embedding head)."),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.5
    device: ModelDevice = "auto"
    dtype: ModelDType = "auto"
    max_chars: Annotated[
        int, _doc("Longest source text put in the prompt."), msgspec.Meta(ge=100, le=200_000)
    ] = 4000


class GroundingProbeSettings(ProbeSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A linear probe on a causal LM's hidden states, blended into each claim's support
    (``weights``: a file of scripts/train_grounding_probe.py)."""

    max_chars: Annotated[
        int,
        _doc("Most characters of the sources the probe reads in front of each claim."),
        msgspec.Meta(ge=100, le=20_000),
    ] = 2000
    prefix_cache_mb: Annotated[
        int,
        _doc(
            "Memory for the keys and values of recent prefixes (sources and question), so "
            "that a stream's later windows and a moderation request's other inputs do not "
            "read their sources again (a 768-token prefix holds about 21 MB in fp32); 0: "
            "none kept."
        ),
        msgspec.Meta(ge=0, le=65_536),
    ] = 128


class GroundednessSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Score each sentence of the completion for support by the request's sources."""

    enabled: Annotated[bool, _doc("Run the check.")] = True
    sources: Annotated[
        list[Source],
        _doc(
            "Where sources come from: documents (the request's documents field), system "
            "(system and developer messages), tool (tool messages)."
        ),
    ] = msgspec.field(default_factory=lambda: ["documents", "system", "tool"])
    threshold: Annotated[
        float,
        _doc("A sentence whose support (0-1) is below this is flagged as ungrounded."),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.4
    action: Annotated[Literal["flag", "block"], _doc("What an ungrounded sentence does.")] = "flag"
    message: Annotated[
        UserText | None, _doc("Message users see when an ungrounded answer is blocked.")
    ] = None
    weights: Annotated[
        str | None,
        _doc("Support head .npz (relative to the policy file); default: the shipped one."),
    ] = None
    max_units: Annotated[
        int,
        _doc("Most source sentences (and sentence pairs) embedded per request."),
        msgspec.Meta(ge=1, le=4096),
    ] = 128
    max_claims: Annotated[
        int,
        _doc(
            "Most answer sentences scored per text (each is one embedding and, with a "
            "judge, one forward pass); a longer answer has this many, evenly spread, scored."
        ),
        msgspec.Meta(ge=1, le=4096),
    ] = 256
    judge: Annotated[
        JudgeSettings | None, _doc("Optional judge model blended into each sentence's support.")
    ] = None
    probe: Annotated[
        GroundingProbeSettings | None,
        _doc(
            "Optional probe on a causal LM's hidden states blended into each sentence's "
            "support when the question is known. It runs the sources once per answer "
            "and keeps them for a stream's later windows: 0.15-1.4 s more per answer, "
            "0.15-0.4 s per later window, measured on 2 CPU cores, so raise timeout_ms."
        ),
    ] = None


class CitationSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Flag URLs, DOIs and references that the sources do not contain."""

    enabled: Annotated[bool, _doc("Run the check.")] = True
    action: Annotated[Literal["flag", "block"], _doc("What an unverified citation does.")] = "flag"
    without_sources: Annotated[
        bool,
        _doc("Also flag citations when the request brought no sources (all are unverified)."),
    ] = True


class CutoffSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Flag questions (and answers) about what happened after the model's training data."""

    enabled: Annotated[bool, _doc("Run the check.")] = True
    date: Annotated[
        str | None,
        _doc("The model's knowledge cutoff, YYYY-MM or YYYY; null: dates are not checked."),
    ] = None
    models: Annotated[
        dict[str, str],
        _doc("Cutoff per model name (glob pattern -> YYYY-MM); the first match wins."),
    ] = msgspec.field(default_factory=dict)
    recency: Annotated[
        bool, _doc('Flag "latest", "current", "today" and similar time-sensitive phrasing.')
    ] = True
    terms: Annotated[
        list[str],
        _doc(
            "More time-sensitive phrases (Python regular expressions, case-insensitive, each "
            "compiled on its own)."
        ),
    ] = msgspec.field(default_factory=list)
    stages: Annotated[list[Literal["input", "output"]], _doc("Where the check runs.")] = (
        msgspec.field(default_factory=lambda: ["input", "output"])
    )
    action: Annotated[Literal["flag", "block"], _doc("What a finding does.")] = "flag"
    message: Annotated[UserText | None, _doc("Message users see when this blocks.")] = None


class HallucinationConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Groundedness, citation and knowledge-cutoff checks (all ``concern: accuracy``)."""

    groundedness: Annotated[GroundednessSettings, _doc("Support of the answer by sources.")] = (
        msgspec.field(default_factory=GroundednessSettings)
    )
    citations: Annotated[CitationSettings, _doc("Citations not found in the sources.")] = (
        msgspec.field(default_factory=CitationSettings)
    )
    cutoff: Annotated[CutoffSettings, _doc("Knowledge-cutoff questions.")] = msgspec.field(
        default_factory=CutoffSettings
    )


def parse_date(value: str) -> tuple[int, int]:
    """``(year, month)`` of ``YYYY-MM`` or ``YYYY`` (a bare year means its December)."""
    m = _DATE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not YYYY-MM or YYYY")
    return int(m.group(1)), int(m.group(2) or 12)


def validate(config: HallucinationConfig) -> Iterator[ConfigIssue]:
    cutoff = config.cutoff
    if cutoff.date is not None and not _DATE.match(cutoff.date):
        yield ConfigIssue(("cutoff", "date"), f"{cutoff.date!r} is not YYYY-MM or YYYY")
    for pattern, date in cutoff.models.items():
        if not _DATE.match(date):
            yield ConfigIssue(("cutoff", "models", pattern), f"{date!r} is not YYYY-MM or YYYY")
    for i, term in enumerate(cutoff.terms):
        try:
            re.compile(term, re.IGNORECASE)  # as the filter compiles it
        except (re.error, OverflowError) as e:  # a{99999999999}: OverflowError
            yield ConfigIssue(("cutoff", "terms", i), f"invalid regular expression: {e}")


# -- citations -----------------------------------------------------------------------------

# A URL ends where a Markdown link's target starts: "[https://a.b/c](https://a.b/c)".
_URL = re.compile(r"\b(?:https?://|www\.)(?:(?!\]\()[^\s<>\"'`])+", re.IGNORECASE)
_DOI = re.compile(r"\b10\.\d{4,9}/[^\s<>\"'`]+")
_ARXIV = re.compile(r"\barxiv:\s?\d{4}\.\d{4,5}(?:v\d+)?", re.IGNORECASE)
# Numbered references: "[3]", "[^3]", and runs of them, "[1][7]", "[1, 7]", "[1-7]". Not an
# index in code (`items[0]`, `arr[0][1]`, `x = [1, 2]`): a run follows a space or
# punctuation. A range from 0 is a character class ("[0-9]"): references count from 1.
_CITED = r"(?:[1-9]\d{0,2}\s*[-\u2010-\u2014]\s*\d{1,3}|\d{1,3})"
_NUMBERED_GROUP = rf"\[\^?{_CITED}(?:\s*[,;]\s*{_CITED})*\^?\]"
_NUMBERED = re.compile(rf"(?<![\w\])`=\[])(?<!=\s)(?:{_NUMBERED_GROUP})+")
_GROUP = re.compile(_NUMBERED_GROUP)
_ITEM = re.compile(r"(\d{1,3})(?:\s*[-\u2010-\u2014]\s*(\d{1,3}))?")
_AUTHOR_YEAR = re.compile(
    r"\(([A-Z][\w'-]+)(?: et al\.?| (?:and|&) [A-Z][\w'-]+)?,? (\d{4}[a-z]?)\)"
)
# ASCII and typographic punctuation that ends a sentence around a URL, and Markdown.
_TRAILING = ".,;:!?)]}>\"'*_\u2019\u201d\u3002\uff0c\uff01\uff1f\u2026"


_CLOSING = {")": "(", "]": "[", "}": "{"}
# RFC 3986 unreserved characters mean the same written as %XX or as themselves.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _strip_trailing(raw: str) -> str:
    """``raw`` without the punctuation that ends a sentence or a bracket around it; a
    closing bracket opened inside stays (``https://en.wikipedia.org/wiki/Mercury_(planet)``)."""
    # Counted once and kept up to date: recounting and slicing for each character
    # stripped is quadratic in a URL that ends in a long run of ")" or ".".
    opened = {opener: raw.count(opener) for opener in _CLOSING.values()}
    closed = {closer: raw.count(closer) for closer in _CLOSING}
    end = len(raw)
    while end and raw[end - 1] in _TRAILING:
        char = raw[end - 1]
        opener = _CLOSING.get(char)
        if opener is not None:
            if opened[opener] >= closed[char]:
                break
            closed[char] -= 1
        end -= 1
    return raw[:end]


def _unescape_unreserved(part: str) -> str:
    """``%7E`` is ``~``; any other escape keeps its meaning, written in upper case."""

    def one(m: re.Match[str]) -> str:
        char = chr(int(m.group(1), 16))
        return char if char in _UNRESERVED else "%" + m.group(1).upper()

    return _PERCENT.sub(one, part)


def _norm_url(url: str) -> str:
    """The URL as compared: no scheme, ``www.``, default port, trailing slash or fragment;
    the host in lower case; the query's parameters sorted by name.

    Path and query stay case-sensitive, and every parameter and value is kept: another
    page is another citation.
    """
    if not re.match(r"https?://", url, re.IGNORECASE):
        url = "http://" + url  # "www.example.org/a"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # "http://[x" or a port that is no number: compare it as written
        return url.lower()
    host = (parts.hostname or "").rstrip(".")
    host = host[4:] if host.startswith("www.") else host
    if port is not None and str(port) != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"
    path = _unescape_unreserved(parts.path).rstrip("/")
    params = [_unescape_unreserved(p) for p in parts.query.split("&") if p]
    # Sorted by name only: repeated names ("a=2&a=1") keep their order, which may matter.
    query = "&".join(sorted(params, key=lambda p: p.split("=", 1)[0]))
    return host + path + ("?" + query if query else "")


def _urls(text: str) -> Iterator[tuple[int, int]]:
    """Spans of the URLs in ``text``, without the punctuation after them."""
    for m in _URL.finditer(text):
        yield m.start(), m.start() + len(_strip_trailing(m.group(0)))


def citations(text: str) -> Iterator[tuple[int, int, str, str]]:
    """``(start, end, kind, key)`` of each citation in ``text``; ``key`` is what must match."""
    links = []
    for start, end in _urls(text):
        links.append((start, end))
        yield start, end, "url", _norm_url(text[start:end])

    def in_link(start: int, end: int) -> bool:  # "https://doi.org/10.x/y" is one citation
        return any(a <= start and end <= b for a, b in links)

    for m in _DOI.finditer(text):
        raw = _strip_trailing(m.group(0))
        if not in_link(m.start(), m.start() + len(raw)):
            yield m.start(), m.start() + len(raw), "doi", raw.lower()
    for m in _ARXIV.finditer(text):
        if not in_link(m.start(), m.end()):
            yield m.start(), m.end(), "arxiv", re.sub(r"^arxiv:\s?", "", m.group(0).lower())
    for run in _NUMBERED.finditer(text):
        for group in _GROUP.finditer(text, run.start(), run.end()):
            items = list(_ITEM.finditer(text, group.start(), group.end()))
            for m in items:
                key = m.group(1) if m.group(2) is None else f"{m.group(1)}-{m.group(2)}"
                # A lone "[7]" is flagged brackets and all; in "[1, 7]" the 7 alone.
                span = (group.start(), group.end()) if len(items) == 1 else m.span()
                yield *span, "numbered", key
    for m in _AUTHOR_YEAR.finditer(text):
        yield m.start(), m.end(), "author_year", f"{m.group(1).lower()} {m.group(2)[:4]}"


def _has_doi(doi: str, folded: str) -> bool:
    """A whole DOI of the sources: ``10.1000/123`` is not ``10.1000/1234``."""
    return doi in {_strip_trailing(m) for m in _DOI.findall(folded)}


def _has_arxiv(arxiv: str, folded: str) -> bool:
    """A whole arXiv id of the sources; any version of it is the same paper."""
    base = re.sub(r"v\d+$", "", arxiv)
    return re.search(rf"(?<![\d.]){re.escape(base)}(?!\d)", folded) is not None


# A DOI or arXiv id written as a link is the same reference as the bare id.
_ID_LINK = re.compile(r"^(?:dx\.)?doi\.org/(10\..+)$|^arxiv\.org/(?:abs|pdf)/(.+?)(?:\.pdf)?$")


def verified(
    kind: str, key: str, sources: Sequence[str], folded: str, documents: int | None = None
) -> bool:
    """Whether a citation appears in the sources (``folded``: them, lower-cased, joined).

    ``[n]`` needs at least ``n`` documents (``documents``; default: every source), a
    range ``[n-m]`` each of its numbers. A
    URL must be a whole URL of the sources, not a piece of one; an author-year
    reference needs the name and the year in the same source. URLs are compared in the
    form :func:`_norm_url` gives both sides; DOIs ignore case, as DOIs do.
    """
    if kind == "numbered":
        numbers = [int(n) for n in key.split("-")]  # "7", or a range "1-7"
        limit = len(sources) if documents is None else documents
        return all(1 <= n <= limit for n in numbers)
    if kind == "url":
        link = _ID_LINK.match(key.lower())
        if link is not None:  # doi.org/10.x/y or arxiv.org/abs/2106.01234
            if link.group(1) is not None:
                return _has_doi(link.group(1), folded)
            return _has_arxiv(link.group(2), folded)
        # From the sources as written: a URL's path and query are case-sensitive.
        return key in {_norm_url(s[a:b]) for s in sources for a, b in _urls(s)}
    if kind == "doi":
        return _has_doi(key, folded)
    if kind == "arxiv":
        return _has_arxiv(key, folded)
    if kind == "author_year":
        name, year = key.rsplit(" ", 1)
        return any(
            re.search(rf"\b{re.escape(name)}\b", s) and year in s for s in folded.split("\n\x00")
        )
    return key in folded


# -- knowledge cutoff ----------------------------------------------------------------------

_MONTHS = {
    m: i
    for i, names in enumerate(
        (
            "jan january", "feb february", "mar march", "apr april", "may", "jun june",
            "jul july", "aug august", "sep sept september", "oct october", "nov november",
            "dec december",
        ),
        start=1,
    )
    for m in names.split()
}  # fmt: skip
# A part of a year named by a word, as the latest month it may mean ("late 2023" is
# December at the latest; a date past the cutoff read as earlier is the costlier miss).
_PARTS = {
    "early": 4, "mid": 8, "late": 12, "end": 12, "spring": 6, "summer": 9, "autumn": 12,
    "fall": 12, "winter": 12, "q1": 3, "q2": 6, "q3": 9, "q4": 12, "h1": 6, "h2": 12,
}  # fmt: skip
_YEAR = re.compile(
    # A month's name and its day ("October 7, 2023"), a day and month in dots
    # ("12.05.2025"), a fiscal or calendar year ("FY2025"), or a part of the year
    # ("late 2023", "the end of 2023", "Q4 2023", "fall of 2023") may come first.
    r"(?:\b(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?,?\s+"
    r"(?:(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?,?\s+)?"
    r"|\b(?P<part>" + "|".join(sorted(_PARTS, key=len, reverse=True)) + r")(?:\s+of)?\s+"
    r"|(?<![\w.])(?P<dotted>\d{1,2}\.\d{1,2})\."
    r"|\b(?P<fiscal>fy|cy)\s?)?"
    # Not part of a longer number or a word, and no bare count: "2100 calories", "$2099"
    # ("2025年" is a year: no \b is needed before 年). Codes are _in_code's business.
    r"(?(dotted)|(?(fiscal)|(?<![\dA-Za-z.#$\u00a3\u20ac\u00a5\u20b9])))"
    r"(?P<year>(?:19|20|21)\d\d)(?![\d.,]\d|\d)"
    r"(?!\s*(?:bc|bce|b\.c\.|calories|kcal|kg|km|mg|ml|mah|ohms?|watts?|rpm|dpi|px|mb|gb"
    r"|mhz|ghz|dollars|euros|usd|eur|gbp|yen|points|words|tokens|characters|rows|items"
    r"|people|users|grams|hours|hrs|pages|miles|mi|feet|ft|inches|yards|yds?|lbs?|pounds"
    r"|ounces|oz|tons|tonnes|meters|metres|kilometers|kilometres|liters|litres|gallons"
    r"|degrees|%)\b|\s*\u00b0)",
    re.IGNORECASE,
)
_RECENCY = re.compile(
    r"\b(?:latest|newest|most recent(?:ly)?|up[- ]to[- ]date|currently|right now|"
    r"as of (?:now|today|this year)|at the moment|these days|nowadays|this (?:week|month|year)|"
    r"today(?:'s)?|yesterday|tonight|breaking news|so far this)\b|"
    r"\b(?:the|who is|what is|what's|who's|who are|what are)\s+(?:current|present)\b"
    # Not the electric or water current, nor grammar's or finance's present.
    r"(?!\s+(?:through|in|flowing|flow|density|draw|drawn|limit|source|perfect|tense"
    r"|participle|continuous|progressive|simple|values?)\b)",
    re.IGNORECASE,
)


# A number named as one right before it: "port 2049", "ext. 2030", "Ticket No. 2031",
# "call 555 2030" (the groups of a phone number may come between).
_CODE_WORD = re.compile(
    r"\b(?:port|game|number|model|room|page|suite|flight|ext|extension|tel|phone|fax|call"
    r"|dial|mobile|ticket|order|invoice|sku|id|ref|pin|zip|serial|part|account|acct)\b\.?"
    r"(?:\s*(?:no|nr|number)\b\.?)?[\s#:()+.\d-]*$",
    re.IGNORECASE,
)
# The last group of a phone number written with spaces: after a country or area code
# ("+44 20 7946 2030", "(212) 555 2031") or two more groups that are no years
# ("020 7946 2030"; "2024 2025 2026" is a list of years).
_PHONE_HEAD = re.compile(
    r"(?:(?:\+\d{1,3}|\(\d{1,4}\))[\s.-]*(?:\d{1,5}[\s.-]+)+"
    r"|(?<![\d,.])(?:(?!(?:19|20|21)\d\d\b)\d{2,5}\s+){2})$"
)
_DASH = "[-/\u2010-\u2014]"
# Letters and digit groups joined to the year by dashes or slashes, on either side.
_JOINED_BEFORE = re.compile(rf"(?:[A-Za-z0-9]+{_DASH})+$")
_JOINED_AFTER = re.compile(rf"(?:{_DASH}[A-Za-z0-9]+)+")
_A_YEAR = re.compile(r"(?:19|20|21)\d\d")
# The second year of "2023-24", "2023/24" or "2023\u201324" (not "2023-2024", whose second
# year is read on its own, nor "2023-10-07").
_SPAN_END = re.compile(rf"{_DASH}(\d\d)(?!\d|{_DASH})")
_A_DAY = re.compile(r"(?:0?[1-9]|[12]\d|3[01])(?:T\d*)?")  # "01" of "2030-05-01T10:00"
# A house number: "2030 Main Street", "2031 Elm St.".
_STREET_AFTER = re.compile(
    r"\s+(?:[A-Z][\w'-]*\s+){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln"
    r"|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Parkway|Pkwy|Highway|Hwy)\b"
)


def _is_word(part: str) -> bool:
    """ "mid" of "mid-2030", "era" of "2030-era", "JAN"; "A" of "A-2030-77" is a code."""
    return part.isalpha() and (not part.isupper() or part.lower() in _MONTHS)


def _date_before(parts: list[str]) -> bool:
    """A year's left neighbours that make a date: "2024-" (a range), "05/01/", "mid-"."""
    if len(parts) == 1 and (_A_YEAR.fullmatch(parts[0]) or _is_word(parts[0])):
        return True
    return len(parts) <= 2 and all(p.isdigit() and len(p) <= 2 for p in parts)


def _date_after(parts: list[str], year: int) -> bool:
    """A year's right neighbours that make a date: "-05-01", "-2031" or "-31" (a range), "-era"."""
    first = parts[0]
    if len(parts) == 1 and (_A_YEAR.fullmatch(first) or _is_word(first)):
        return True
    if len(parts) == 1 and len(first) == 2 and first.isdigit() and int(first) > year % 100:
        return True  # "2030-31"
    month = first.isdigit() and len(first) <= 2 and 1 <= int(first) <= 12
    return month and (len(parts) == 1 or (len(parts) == 2 and bool(_A_DAY.fullmatch(parts[1]))))


def _in_code(text: str, start: int, end: int) -> bool:
    """Whether the year-like digits ``text[start:end]`` are a group of a phone number, an
    id or a code ("555-2024", "A-2030-77", "ext. 2030") rather than a year."""
    before = text[max(0, start - 40) : start]
    if _CODE_WORD.search(before) or _PHONE_HEAD.search(before):
        return True
    joined = _JOINED_BEFORE.search(before)
    if joined and not _date_before(re.split(_DASH, joined.group(0))[:-1]):
        return True
    if _STREET_AFTER.match(text, end):
        return True
    joined = _JOINED_AFTER.match(text, end)
    return joined is not None and not _date_after(
        re.split(_DASH, joined.group(0))[1:], int(text[start:end])
    )


def _month_of(text: str, m: re.Match[str]) -> int:
    """The month of the date whose year ``m`` matched: named ("October 7, 2023"), or the
    latest that its numbers may be ("2023-10-07", "10/2023", "12.05.2025"; 05/12 is May
    or December, and a date past the cutoff read as earlier is the costlier miss); 1 for
    a year alone."""
    if m.group("month"):
        return _MONTHS[m.group("month").lower()]
    if m.group("part"):
        return _PARTS[m.group("part").lower()]
    start, end = m.span("year")
    if m.group("dotted"):
        numbers = m.group("dotted").split(".")
    else:
        numbers = []
        before = _JOINED_BEFORE.search(text[max(0, start - 40) : start])
        if before is not None:
            parts = re.split(_DASH, before.group(0))[:-1]
            if len(parts) == 1 and parts[0].lower() in _PARTS:
                return _PARTS[parts[0].lower()]  # "mid-2023", "late-2023"
            numbers = parts if len(parts) <= 2 else []  # "05/01/", "10/"
        after = _JOINED_AFTER.match(text, end)
        if after is not None:
            numbers.append(re.split(_DASH, after.group(0))[1])  # "-10" of "2023-10-07"
    months = [int(n) for n in numbers if n.isdigit() and 1 <= int(n) <= 12]
    return max(months, default=1)


def cutoff_spans(
    text: str, cutoff: tuple[int, int] | None, recency: Sequence[re.Pattern[str]]
) -> Iterator[tuple[int, int]]:
    """Spans of dates after ``cutoff`` and of time-sensitive phrases in ``text``: those
    of the ``recency`` patterns as one alternation of them would find them (the leftmost
    first, at one place the earlier pattern's, none overlapping another)."""
    if cutoff is not None:
        for m in _YEAR.finditer(text):
            year, month, end = int(m.group("year")), _month_of(text, m), m.end()
            span = _SPAN_END.match(text, end)
            if span is not None and int(span.group(1)) > year % 100:
                # "2023-24": a season, or a school or fiscal year, runs into its second
                # year, and ends in its first half (by June).
                year, month, end = year - year % 100 + int(span.group(1)), 6, span.end()
            # The month matters in the cutoff's own year only.
            if year < cutoff[0] or (year == cutoff[0] and month <= cutoff[1]):
                continue
            named = m.group("month") or m.group("fiscal") or m.group("part")
            if named or not _in_code(text, m.start("year"), m.end("year")):
                yield m.start(), end
    found = sorted(
        (m.start(), k, m.end()) for k, pattern in enumerate(recency) for m in pattern.finditer(text)
    )
    end = -1
    for start, _, stop in found:
        if start >= end:
            yield start, stop
            end = max(stop, start + 1)


# -- the filter ----------------------------------------------------------------------------


def shared_scorer(
    env: BuildContext,
    weights: str | None = None,
    *,
    max_units: int = 128,
    judge: JudgeSettings | None = None,
    max_claims: int = 256,
    probe: GroundingProbeSettings | None = None,
) -> GroundingScorer:
    """The process's :class:`GroundingScorer` for these settings (kept across reloads)."""
    from pathlib import Path

    from guardrail.filters.embedder import shared_embedder
    from guardrail.filters.grounding import DEFAULT_HEAD, GroundingScorer, LocalJudge, SupportHead

    path = Path(weights).expanduser() if weights else DEFAULT_HEAD
    if not path.is_absolute():
        path = env.base_dir / path
    embedder = shared_embedder(env)  # never nest resources.get calls
    from guardrail.filters.weights import file_key, file_stamp

    stamp = file_stamp(path)  # new weights over the old file are read again on reload
    head = env.resources.get(
        ("grounding-head", file_key(path)), lambda: SupportHead.load(path), version=stamp
    )
    local_judge = None
    if judge is not None:
        model, tokenizer = shared_local_model(env, judge.model, judge.device, judge.dtype)
        local_judge = LocalJudge(
            model, tokenizer, env.executor, judge.max_chars, source=judge.model
        )
    probe_scorer = None
    if probe is not None:
        from guardrail.filters.probe import DEFAULT_GROUNDING_PROBE, shared_probe

        probe_scorer = shared_probe(probe, env, DEFAULT_GROUNDING_PROBE)
    key = (
        "grounding-scorer",
        file_key(path),
        max_units,
        max_claims,
        judge,
        probe_scorer,
        probe.max_chars if probe else 0,
        probe.prefix_cache_mb if probe else 0,
        env.executor,
    )
    return env.resources.get(
        key,
        lambda: GroundingScorer(
            embedder,
            head,
            max_units=max_units,
            max_claims=max_claims,
            judge=local_judge,
            judge_weight=judge.weight if judge else 0.0,
            probe=probe_scorer,
            probe_chars=probe.max_chars if probe else 0,
            probe_cache_bytes=probe.prefix_cache_mb << 20 if probe else 0,
            executor=env.executor,
        ),
        version=stamp,  # the scorer holds the head: a new head needs a new scorer
    )


def default_grounder(env: BuildContext) -> Grounder:
    """A :data:`Grounder` on the shipped head at the default threshold, loaded on first use
    (off the event loop)."""
    import asyncio

    threshold = GroundednessSettings().threshold

    async def grounder(
        text: str, sources: Sequence[str], question: str | None, scope: str | None
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        scorer = await loop.run_in_executor(env.executor, shared_scorer, env)
        result = await scorer.score(text, sources, question, scope=scope)
        return result.to_dict(text, threshold)

    return grounder


def sources_of(ctx: FilterContext, kinds: Sequence[str]) -> list[str]:
    """The request's sources of the given kinds, in order: documents, system, tool."""
    out: list[str] = []
    if "documents" in kinds:
        out.extend(d for d in ctx.context_documents if d.strip())  # a blank one is none
    roles = {r for k in kinds for r in _ROLES.get(k, ())}
    out.extend(m.content for m in ctx.messages if m.role in roles and m.content.strip())
    return out


def question_of(ctx: FilterContext) -> str | None:
    """The last user message: the question the answer is answering."""
    users = [m.content for m in ctx.messages if m.role == "user"]
    return users[-1] if users else None


class HallucinationFilter:
    """Groundedness, citation and cutoff checks; see the module doc."""

    cache_scope = "none"

    def __init__(self, name: str, config: HallucinationConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self._config = config
        self._env = env
        self.scorer = self._lazy_scorer() if config.groundedness.enabled else None
        cutoff = config.cutoff
        try:
            self._cutoff = parse_date(cutoff.date) if cutoff.date else None
            self._model_cutoffs = [(p, parse_date(d)) for p, d in cutoff.models.items()]
        except ValueError as e:
            raise ConfigError(f"filter {name}: cutoff: {e}") from e
        # Each term on its own, as validated: joined into one alternation, a global flag
        # ("(?i)") not at the start, a group name used twice or a backreference ("\1"
        # meaning another term's group) failed the build or changed meaning.
        self._recency = ((_RECENCY,) if cutoff.recency else ()) + tuple(
            re.compile(t, re.IGNORECASE) for t in cutoff.terms
        )
        self._cutoff_stages = frozenset(Stage(s) for s in cutoff.stages)

    async def groundedness(
        self, text: str, sources: Sequence[str], question: str | None, *, scope: str | None = None
    ) -> dict[str, Any]:
        """``text`` scored against ``sources`` with this filter's scorer and threshold;
        ``scope``: the tenant, whose cached embeddings alone it reuses."""
        scorer = self.scorer if self.scorer is not None else self._lazy_scorer()
        result = await scorer.score(text, sources, question, scope=scope)
        return result.to_dict(text, self._config.groundedness.threshold)

    def _lazy_scorer(self) -> GroundingScorer:
        g = self._config.groundedness
        return shared_scorer(
            self._env,
            g.weights,
            max_units=g.max_units,
            judge=g.judge,
            max_claims=g.max_claims,
            probe=g.probe,
        )

    def cutoff_for(self, model: str | None) -> tuple[int, int] | None:
        if model:
            for pattern, date in self._model_cutoffs:
                if fnmatch.fnmatchcase(model, pattern):
                    return date
        return self._cutoff

    def holdback(self, text: str) -> int:
        """Trailing characters a stream must keep back: a sentence its window would end at
        an abbreviation's or an initial's full stop ("Restored by J. "), so that the
        sentence is scored whole with what follows, not as a claim of its own."""
        from guardrail.filters.grounding import held_claim

        if self.scorer is None:
            return 0
        return held_claim(text)

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        if not text.strip() or ctx.tool_calls or ctx.verbatim:
            # A call's URL or date is what the model acts on, not a claim it makes (and
            # an earlier call is no question): flagged, every tool call was "unverified".
            # A schema, a tool's description, an id or a stop sequence asks nothing
            # either ("Get the latest headlines" was a cutoff question on every request).
            return Verdict()
        findings: list[Finding] = []
        index = ctx.message_index
        if (
            ctx.stage is Stage.INPUT
            and index is not None
            and 0 <= index < len(ctx.messages)
            and ctx.messages[index].content == text
            and ctx.messages[index].role != "user"
        ):
            return Verdict()  # sources and history are not questions
        # (Without an index, as for a moderation request's inputs, the text is no message
        # of the conversation.)
        if self._config.cutoff.enabled and ctx.stage in self._cutoff_stages:
            findings.extend(await self._cutoff_findings(text, ctx))
        if ctx.stage is Stage.OUTPUT:
            sources = sources_of(ctx, self._config.groundedness.sources)
            if self._config.citations.enabled:
                documents = sum(1 for d in ctx.context_documents if d.strip())
                findings.extend(self._citation_findings(text, sources, documents))
            if self.scorer is not None and sources:
                findings.extend(await self._groundedness_findings(text, sources, ctx))
        return Verdict.from_findings(findings)

    async def _cutoff_findings(self, text: str, ctx: FilterContext) -> list[Finding]:
        c = self._config.cutoff
        # Recency phrases are questions' business: an answer's "today" is small talk.
        recency = self._recency if ctx.stage is Stage.INPUT else ()
        cutoff = self.cutoff_for(ctx.model)
        spans = await text_pass(
            self._env.executor, len(text), lambda: list(cutoff_spans(text, cutoff, recency))
        )
        return [
            Finding(
                "knowledge_cutoff",
                1.0,
                Action(c.action),
                rule_id="hallucination.cutoff",
                span=(start, end),
                message=c.message,
                concern="accuracy",
            )
            for start, end in spans
        ]

    def _citation_findings(
        self, text: str, sources: Sequence[str], documents: int
    ) -> Iterator[Finding]:
        """``documents``: how many the request brought; ``[n]`` refers to them only."""
        c = self._config.citations
        if not sources and not c.without_sources:
            return
        folded = "\n\x00".join(sources).lower()
        for start, end, kind, key in citations(text):
            if not verified(kind, key, sources, folded, documents=documents):
                yield Finding(
                    "unverified_citation",
                    1.0,
                    Action(c.action),
                    rule_id=f"hallucination.citations.{kind}",
                    span=(start, end),
                    concern="accuracy",
                )

    async def _groundedness_findings(
        self, text: str, sources: Sequence[str], ctx: FilterContext
    ) -> list[Finding]:
        assert self.scorer is not None
        g = self._config.groundedness
        result = await self.scorer.score(
            text, sources, question_of(ctx), scope=ctx.tenant, window=ctx.window
        )
        if ctx.window is not None and not result.claims:
            # A stream window with no sentence of its own ("Sure!", a list marker) has no
            # score: its 1.0 would weigh in the answer's, where such a sentence weighs
            # nothing when the answer is scored whole.
            return []
        findings = [
            Finding(
                "groundedness",
                result.score,
                Action.ALLOW,
                rule_id="hallucination.groundedness",
                concern="accuracy",
            )
        ]
        for claim in result.unsupported(g.threshold):
            findings.append(
                Finding(
                    "ungrounded",
                    1.0 - claim.support,
                    Action(g.action),
                    rule_id="hallucination.groundedness",
                    span=(claim.start, claim.end),
                    message=g.message,
                    concern="accuracy",
                )
            )
        return findings


SPEC = FilterSpec(
    type="hallucination",
    config_type=HallucinationConfig,
    build=HallucinationFilter,
    description=(
        "Hallucination flags: sentences of the completion not supported by the request's "
        "sources, citations the sources do not contain, and questions past the model's "
        "knowledge cutoff (concern: accuracy, never counted as harmful content)."
    ),
    validate=validate,
)
