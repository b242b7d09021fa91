"""The streaming hold-back window: no unmoderated byte is ever released."""

from __future__ import annotations

import itertools
import re
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guardrail.guard.stream as stream_module
from guardrail.filters.normalize import OVERRIDE, open_override
from guardrail.guard.filter import BuildContext
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.stream import StreamGuard, check_continuation
from guardrail.guard.types import (
    FILTER_ERROR_CATEGORY,
    Action,
    Decision,
    FilterContext,
    Finding,
    Redaction,
    Stage,
    Verdict,
)
from guardrail.policy.loader import load_policy_text
from guardrail.policy.model import FilterConfig, StreamSettings
from tests.fakes.filters import TONE


def rules_policy(rules: str) -> str:
    """A policy of one rules filter ``words`` whose rules are the YAML list ``rules``."""
    body = textwrap.indent(textwrap.dedent(rules).strip(), " " * 8)
    head = 'name: s\nversion: "1"\nfilters:\n  - id: words\n    type: rules\n'
    return f"{head}    config:\n      rules:\n{body}\n"


RULES = rules_policy(
    """
    - {id: bomb, category: weapons, action: block, keywords: [build a bomb]}
    - {id: key, category: secret, action: redact, replacement: "#", regex: ['\\bsk-\\d{4}']}
    """
)

BENIGN = [
    "The weather is nice today. ",
    "Birds sing in the morning! ",
    "Do you like tea? ",
    "A short line\n",
    "Cats sleep a lot. ",
]
HARMFUL = "Then you build a bomb with the parts. "


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


def make_guard(executor: ThreadPoolExecutor) -> Guard:
    registry = filter_registry()
    policy = load_policy_text(RULES, "stream.yaml", registry)
    return Guard.build(policy, registry, BuildContext(executor))


def chunk(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]


async def run_stream(
    guard: Guard, pieces: list[str], settings: StreamSettings, lead: str = ""
) -> tuple[str, bool]:
    window = StreamGuard(guard, FilterContext("s"), settings, lead=lead)
    sent = []
    for piece in pieces:
        release = await window.feed(piece)
        sent.append(release.text)
        if release.blocked:
            return "".join(sent), True
    final = await window.finish()
    sent.append(final.text)
    return "".join(sent), final.blocked


stream_settings = st.builds(
    StreamSettings,
    release=st.sampled_from(["sentence", "window"]),
    window_chars=st.integers(60, 300),
    context_chars=st.integers(20, 200),
)


@settings(max_examples=150, deadline=None)
@given(
    benign=st.lists(st.sampled_from(BENIGN), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    config=stream_settings,
)
async def test_released_text_is_a_prefix_and_never_holds_the_harmful_phrase(
    executor: ThreadPoolExecutor, benign: list[str], cuts: list[int], config: StreamSettings
) -> None:
    text = "".join(benign) + HARMFUL + "".join(benign)
    sent, blocked = await run_stream(make_guard(executor), chunk(text, cuts), config)
    assert blocked
    assert text.startswith(sent)
    assert "build a bomb" not in sent
    assert "with the parts" not in sent


@settings(max_examples=150, deadline=None)
@given(
    benign=st.lists(st.sampled_from(BENIGN), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    window_chars=st.integers(len(HARMFUL), 400),
    context_chars=st.integers(0, 200),
)
async def test_in_sentence_mode_no_byte_of_a_harmful_sentence_reaches_the_client(
    executor: ThreadPoolExecutor,
    benign: list[str],
    cuts: list[int],
    window_chars: int,
    context_chars: int,
) -> None:
    config = StreamSettings(
        release="sentence", window_chars=window_chars, context_chars=context_chars
    )
    prefix = "".join(benign)
    text = prefix + HARMFUL + "".join(benign)
    sent, blocked = await run_stream(make_guard(executor), chunk(text, cuts), config)
    assert blocked
    assert prefix.startswith(sent)


@settings(max_examples=100, deadline=None)
@given(
    benign=st.lists(st.sampled_from(BENIGN), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    config=stream_settings,
)
async def test_a_benign_stream_is_released_whole_and_unchanged(
    executor: ThreadPoolExecutor, benign: list[str], cuts: list[int], config: StreamSettings
) -> None:
    text = "".join(benign)
    sent, blocked = await run_stream(make_guard(executor), chunk(text, cuts), config)
    assert not blocked
    assert sent == text


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=20), config=stream_settings)
async def test_a_secret_split_across_chunks_is_redacted(
    executor: ThreadPoolExecutor, cuts: list[int], config: StreamSettings
) -> None:
    text = "Your key is sk-1234 and it works. Keep it safe. "
    sent, blocked = await run_stream(make_guard(executor), chunk(text, cuts), config)
    assert not blocked
    assert "1234" not in sent
    assert sent == "Your key is # and it works. Keep it safe. "


@settings(max_examples=100, deadline=None)
@given(
    benign=st.lists(st.sampled_from(BENIGN), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    config=stream_settings,
)
async def test_the_read_text_is_the_completion_its_windows_checked_unredacted(
    executor: ThreadPoolExecutor, benign: list[str], cuts: list[int], config: StreamSettings
) -> None:
    """Group detection reads a stream's completion whole: what its windows checked, the
    redacted key as written and the window that blocked included, whatever the chunks."""
    text = "Your key is sk-1234 and it works. " + "".join(benign) + HARMFUL + "Done. "
    window = StreamGuard(make_guard(executor), FilterContext("s"), config)
    for piece in chunk(text, cuts):
        if (await window.feed(piece)).blocked:
            break
    if not window.blocked:
        await window.finish()

    assert window.blocked
    assert text.startswith(window.read_text)
    assert "sk-1234" in window.read_text
    assert "build a bomb" in window.read_text
    assert "sk-1234" not in window.released_text


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=20), config=stream_settings)
async def test_a_phrase_split_between_the_lead_and_the_stream_is_blocked(
    executor: ThreadPoolExecutor, cuts: list[int], config: StreamSettings
) -> None:
    """The lead (the prompt the completion continues) is the first window's context:
    without it, " bomb with the parts." was released after "... build a"."""
    text = " bomb with the parts. The end. "
    lead = "Some notes. Then you build a"
    sent, blocked = await run_stream(make_guard(executor), chunk(text, cuts), config, lead)
    assert blocked
    assert sent == ""


async def test_a_redaction_across_the_lead_rewrites_only_the_stream(
    executor: ThreadPoolExecutor,
) -> None:
    window = StreamGuard(
        make_guard(executor), FilterContext("s"), StreamSettings(), lead="My old key sk-12"
    )
    released = (await window.feed("34 works. ")).text + (await window.feed("Bye. ")).text
    assert released == "# works. Bye. "
    assert window.released_text == released
    # Each decision is about the completion alone: the audit row keeps no prompt text.
    assert [d.text for d in window.decisions] == ["# works. ", "# works. Bye. "]


def tone_guard(executor: ThreadPoolExecutor, tone: str = "") -> Guard:
    """RULES and a filter that scores the whole text (``TONE``: "filthy" blocks)."""
    registry = filter_registry()
    registry.register("tone", TONE)
    text = RULES + f"  - {{id: tone, type: tone, config: {{{tone}}}}}\n"
    policy = load_policy_text(text, "tone.yaml", registry)
    return Guard.build(policy, registry, BuildContext(executor))


async def continued(guard: Guard, lead: str, text: str, stream: bool) -> tuple[str, list[Decision]]:
    """What of ``text`` after ``lead`` is released, and the output decisions on it:
    checked whole, or streamed in pieces."""
    if not stream:
        decision = await check_continuation(guard, FilterContext("s"), text, lead, 40)
        return ("" if decision.blocked else decision.text), [decision]
    settings = StreamSettings(release="sentence", window_chars=80, context_chars=40)
    window = StreamGuard(guard, FilterContext("s"), settings, lead=lead)
    for piece in chunk(text, list(range(0, len(text), 5))):
        if (await window.feed(piece)).blocked:
            return window.released_text, window.decisions
    await window.finish()
    return window.released_text, window.decisions


TOXIC_LEAD = "Reply to this comment: 'They are filthy animals.'"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_whole_text_score_of_the_lead_is_not_the_completions(
    executor: ThreadPoolExecutor, stream: bool
) -> None:
    """A finding with no span rests on every character checked: the prompt's toxicity,
    read with the completion's start, withheld the harmless refusal after it."""
    text = " I won't write that. Everyone deserves respect. "
    released, decisions = await continued(tone_guard(executor), TOXIC_LEAD, text, stream)
    assert released == text
    assert all(d.action is Action.ALLOW for d in decisions)
    # The scores reported are the completion's own, per filter too.
    assert {(f.category, f.score) for d in decisions for f in d.findings} == {("toxicity", 0.1)}
    scores = {f.score for d in decisions for o in d.outcomes for f in o.verdict.findings}
    assert scores == {0.1}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("lead", "text", "category"),
    [
        ("Some notes. Then", " you are filthy. The end. ", "toxicity"),
        # The lead's score set aside, a phrase across the join still decides.
        (TOXIC_LEAD + " Then you build a", " bomb with the parts. The end. ", "weapons"),
    ],
)
async def test_a_completion_is_still_blocked_for_its_own_score_or_a_phrase_across_the_join(
    executor: ThreadPoolExecutor, lead: str, text: str, category: str, stream: bool
) -> None:
    released, decisions = await continued(tone_guard(executor), lead, text, stream)
    assert (released, decisions[-1].blocked) == ("", True)
    assert [f.category for f in decisions[-1].findings if f.action is Action.BLOCK] == [category]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_filter_that_fails_on_the_completion_without_its_lead_fails_closed(
    executor: ThreadPoolExecutor, stream: bool
) -> None:
    """It gave no score for the completion alone: what it found on the joined text stays
    beside its failure, and the stricter of the two decides (a failure may tighten the
    decision, never loosen it)."""
    guard = tone_guard(executor, "fail_without: comment")
    released, decisions = await continued(guard, TOXIC_LEAD, " I won't write that. ", stream)
    assert (released, decisions[-1].blocked) == ("", True)
    categories = sorted(f.category for f in decisions[-1].findings)
    assert categories == sorted([FILTER_ERROR_CATEGORY, "toxicity"])
    assert [o.status for o in decisions[-1].outcomes] == ["ok", "error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_whole_text_score_the_join_raises_still_decides(
    executor: ThreadPoolExecutor, stream: bool
) -> None:
    """Neither the lead ("... They are fil") nor the completion ("thy animals ...") scores
    alone; the joined text does. Taken from the completion alone, it had passed."""
    guard = tone_guard(executor)
    released, decisions = await continued(
        guard, "Say what you think. They are fil", "thy animals, all of them. ", stream
    )
    assert (released, decisions[-1].blocked) == ("", True)
    assert [f.category for f in decisions[-1].findings] == ["toxicity"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failure_of_the_check_without_the_lead_never_loosens_the_decision(
    executor: ThreadPoolExecutor, stream: bool
) -> None:
    """The joined check blocks on the completion's own word; the check without the lead
    fails, and its on_error is flag: the block stands (the flag alone had released it)."""
    registry = filter_registry()
    registry.register("tone", TONE)
    text = RULES + "  - {id: tone, type: tone, on_error: flag, config: {fail_without: Notes}}\n"
    guard = Guard.build(
        load_policy_text(text, "tone.yaml", registry), registry, BuildContext(executor)
    )
    released, decisions = await continued(guard, "Notes:", " you are filthy. ", stream)
    assert (released, decisions[-1].blocked) == ("", True)


async def test_text_is_held_until_a_sentence_ends(executor: ThreadPoolExecutor) -> None:
    window = StreamGuard(make_guard(executor), FilterContext("s"), StreamSettings())
    assert (await window.feed("Hello wor")).text == ""
    assert window.held_chars == 9
    assert (await window.feed("ld. How")).text == "Hello world. "
    assert (await window.finish()).text == "How"


async def test_window_mode_releases_in_blocks_at_word_boundaries(
    executor: ThreadPoolExecutor,
) -> None:
    config = StreamSettings(release="window", window_chars=10, context_chars=5)
    window = StreamGuard(make_guard(executor), FilterContext("s"), config)
    assert (await window.feed("one two. three four")).text == "one two. three "
    assert window.held_chars == len("four")


@pytest.mark.parametrize(("context_chars", "caught"), [(30, True), (0, False)])
async def test_a_phrase_split_across_windows_is_caught_only_with_context(
    executor: ThreadPoolExecutor, context_chars: int, caught: bool
) -> None:
    config = StreamSettings(release="window", window_chars=12, context_chars=context_chars)
    window = StreamGuard(make_guard(executor), FilterContext("s"), config)
    sent = []
    for piece in ["so you build ", "a bomb right now"]:
        release = await window.feed(piece)
        sent.append(release.text)
    final = await window.finish() if not window.blocked else None
    if final is not None:
        sent.append(final.text)
    assert window.blocked is caught
    # "build a" alone is not harmful and was released before "bomb" arrived.
    assert "build a" in "".join(sent)
    assert ("bomb" in "".join(sent)) is not caught


async def test_a_large_chunk_is_released_window_by_window(executor: ThreadPoolExecutor) -> None:
    config = StreamSettings(release="sentence", window_chars=30, context_chars=10)
    window = StreamGuard(make_guard(executor), FilterContext("s"), config)
    text = "First sentence here. Second sentence here. Third one. Tail"
    release = await window.feed(text)
    assert release.text == "First sentence here. Second sentence here. Third one. "
    assert len(window.decisions) == 3
    assert (await window.finish()).text == "Tail"


class _Counting:
    """Allows everything and counts its checks."""

    name = "count"
    stages = frozenset({Stage.OUTPUT})

    def __init__(self) -> None:
        self.checks = 0

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        self.checks += 1
        return Verdict()


async def test_a_large_chunk_yields_each_window_before_the_next_is_checked(
    executor: ThreadPoolExecutor,
) -> None:
    """A megabyte chunk's first window is not held until its last one is checked."""
    policy = make_guard(executor).policy
    counting = _Counting()
    config = FilterConfig("count", "count", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, counting)])
    settings = StreamSettings(release="window", window_chars=20, context_chars=5)
    window = StreamGuard(guard, FilterContext("s"), settings)
    text = "word " * 40
    sent = []
    async for release in window.releases(text):
        sent.append(release.text)
        assert counting.checks == len(sent)  # this window's check only, none ahead
    assert len(sent) == 10
    assert "".join(sent) + (await window.finish()).text == text


@pytest.mark.parametrize("release", ["sentence", "window"])
async def test_a_long_text_without_a_sentence_end_is_cut_into_windows(
    executor: ThreadPoolExecutor, release: str
) -> None:
    settings = StreamSettings(release=release, window_chars=30, context_chars=10)
    window = StreamGuard(make_guard(executor), FilterContext("s"), settings)
    text = "word " * 2000 + "end. Then more"
    released = [r.text async for r in window.releases(text)]
    assert all(0 < len(t) <= 30 for t in released)
    assert "".join(released) + (await window.finish()).text == text


async def test_window_mode_cuts_at_a_line_break_too_never_inside_a_secret(
    executor: ThreadPoolExecutor,
) -> None:
    """Lines with no space are cut at their line break, not through the word at the limit."""
    settings = StreamSettings(release="window", window_chars=30, context_chars=10)
    window = StreamGuard(make_guard(executor), FilterContext("s"), settings)
    released = [r.text async for r in window.releases("line\n" * 5 + "abc,sk-1234 x")]
    released.append((await window.finish()).text)
    assert released[0] == "line\n" * 5
    assert "".join(released) == "line\n" * 5 + "abc,# x"


@pytest.mark.parametrize("pad", range(12))
async def test_minified_json_is_cut_between_values_never_through_a_secret(
    executor: ThreadPoolExecutor, pad: int
) -> None:
    """No whitespace at all: the cut falls after the last delimiter of the window (a
    comma, a quote, a brace), not at the limit through a value that a rule redacts."""
    settings = StreamSettings(release="window", window_chars=30, context_chars=10)
    window = StreamGuard(make_guard(executor), FilterContext("s"), settings)
    reply = '{"note":"' + "x" * pad + '","key":"sk-1234","more":"' + "y" * 40 + '"}'
    released = [r.text async for r in window.releases(reply)]
    released.append((await window.finish()).text)
    out = "".join(released)
    assert out == reply.replace("sk-1234", "#")
    assert len(released) > 2  # still released window by window


class _TagHolder:
    """A filter that needs an unfinished ``<TAG...`` kept back, like a PII placeholder."""

    name = "tags"
    stages = frozenset({Stage.OUTPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()

    def holdback(self, text: str) -> int:
        start = text.rfind("<")
        return len(text) - start if start >= 0 and ">" not in text[start:] else 0


async def test_a_filter_can_hold_back_an_unfinished_placeholder(
    executor: ThreadPoolExecutor,
) -> None:
    policy = make_guard(executor).policy
    config = FilterConfig("tags", "tags", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _TagHolder())])
    settings = StreamSettings(release="window", window_chars=12, context_chars=0)
    window = StreamGuard(guard, FilterContext("s"), settings)
    first = await window.feed("Dear <PERSON_1")
    assert first.text == "Dear "  # not "Dear <PERSON_1": the placeholder is unfinished
    second = await window.feed("> said hi and left.")
    assert (first.text + second.text + (await window.finish()).text) == (
        "Dear <PERSON_1> said hi and left."
    )


class _AbbreviationHolder:
    """Keeps back a window that its cut would end at "Dr. ", like the hallucination
    filter keeping back a sentence until the name after the abbreviation is seen."""

    name = "abbreviations"
    stages = frozenset({Stage.OUTPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()

    def holdback(self, text: str) -> int:
        return len(text) if text.endswith("Dr. ") else 0


async def test_when_a_full_window_is_kept_back_to_its_last_sentence_end_then_it_is_cut_at_its_size(
    executor: ThreadPoolExecutor,
) -> None:
    """A sentence-mode window whose only sentence end a filter keeps back ("Dr. ") had
    nothing released until the backend was done, however long the sentence ran."""
    policy = make_guard(executor).policy
    config = FilterConfig("abbr", "abbr", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _AbbreviationHolder())])
    settings = StreamSettings(release="sentence", window_chars=30, context_chars=10)
    window = StreamGuard(guard, FilterContext("s"), settings)
    assert (await window.feed("Ask Dr. ")).text == ""  # kept until "Smith" is seen
    text = "Ask Dr. " + "word " * 20 + "end. "
    pieces = chunk(text[8:], [5, 40, 70])
    released = [r.text for piece in pieces async for r in window.releases(piece)]
    assert released[0].startswith("Ask Dr. word")  # before the sentence, or the stream, ends
    assert all(0 < len(t) <= 30 for t in released)
    assert "".join(released) + (await window.finish()).text == text


class _ItemHolder:
    """Keeps back the last item of a list ("97, "), as the pii filter keeps back a
    number that may be an entity's start: at every cut the hold-back moves back to,
    one more item is kept."""

    name = "items"
    stages = frozenset({Stage.OUTPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()

    def holdback(self, text: str) -> int:
        item = re.search(r"\d+, $", text)
        return len(item.group()) if item else 0


@pytest.mark.parametrize("release", ["sentence", "window"])
async def test_when_the_hold_back_never_settles_then_a_full_window_is_still_released(
    executor: ThreadPoolExecutor, release: str
) -> None:
    """The cut moved back one item per step until its steps ran out (or it reached the
    window's start), and nothing was released until the backend was done."""
    policy = make_guard(executor).policy
    config = FilterConfig("items", "items", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _ItemHolder())])
    settings = StreamSettings(release=release, window_chars=60, context_chars=10)
    window = StreamGuard(guard, FilterContext("s"), settings)
    text = "".join(f"{i}, " for i in range(1, 200))
    released = [
        r.text
        for piece in chunk(text, list(range(0, 900, 7)))
        async for r in window.releases(piece)
    ]
    assert len(released) > len(text) // 60
    assert all(0 < len(t) <= 60 for t in released)
    assert "".join(released) + (await window.finish()).text == text


class _BrokenHolder:
    """A plugin filter whose hold-back raises (or answers a non-count)."""

    name = "broken"
    stages = frozenset({Stage.OUTPUT})

    def __init__(self, answer: object) -> None:
        self.answer = answer

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()

    def holdback(self, text: str) -> int:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[return-value]


@pytest.mark.parametrize("answer", [RuntimeError("bug"), "3", 2.0, None])
async def test_a_failing_holdback_holds_the_text_for_the_final_check(
    executor: ThreadPoolExecutor, answer: object
) -> None:
    """It had ended the stream with an internal error; now nothing it may have needed
    kept is released, and the whole text is checked once the backend is done."""
    policy = make_guard(executor).policy
    config = FilterConfig("broken", "broken", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _BrokenHolder(answer))])
    settings = StreamSettings(release="sentence", window_chars=20, context_chars=0)
    window = StreamGuard(guard, FilterContext("s"), settings)
    assert (await window.feed("One. Two three four five six. ")).text == ""
    assert (await window.finish()).text == "One. Two three four five six. "
    assert window.holdback_failures == ["broken"]  # once, however often it failed


class _LateBreaker(_ItemHolder):
    """Keeps back the last item of a list, and fails on a text shorter than ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def holdback(self, text: str) -> int:
        if len(text) < self.at:
            raise RuntimeError("bug")
        return super().holdback(text)


async def test_a_holdback_that_fails_after_the_cut_moved_back_still_holds_the_text(
    executor: ThreadPoolExecutor,
) -> None:
    """A full window whose hold-back does not settle is released at its first step's
    cut: a failure at a later step is no step that did not settle."""
    policy = make_guard(executor).policy
    config = FilterConfig("late", "late", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _LateBreaker(at=50))])
    settings = StreamSettings(release="window", window_chars=60, context_chars=10)
    window = StreamGuard(guard, FilterContext("s"), settings)
    text = "".join(f"{i}, " for i in range(1, 40))
    assert (await window.feed(text)).text == ""
    assert window.holdback_failures == ["late"]
    assert (await window.finish()).text == text


class _StartMatcher:
    """Blocks "abc" only where the checked text starts with it: a match that the cut of
    the context tail can create in text already released (like the end of an email)."""

    name = "start"
    stages = frozenset({Stage.OUTPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        if text.startswith("abc"):
            return Verdict.from_findings([Finding("secret", action=Action.BLOCK, span=(0, 3))])
        return Verdict()


async def test_a_match_only_in_the_released_tail_does_not_decide_the_next_window(
    executor: ThreadPoolExecutor,
) -> None:
    policy = make_guard(executor).policy
    config = FilterConfig("start", "start", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _StartMatcher())])
    settings = StreamSettings(release="sentence", window_chars=40, context_chars=14)
    window = StreamGuard(guard, FilterContext("s"), settings)
    first = await window.feed("It says xabc and more. ")
    assert first.text == "It says xabc and more. "  # "abc" not at the start: allowed
    # The next check sees the tail "abc and more. " (14 characters back) + the new text.
    second = await window.feed("Then it ends. ")
    assert second.text == "Then it ends. "
    assert not second.blocked
    assert window.decisions[-1].findings == ()
    assert window.decisions[-1].action is Action.ALLOW


# -- from a bug hunt: a match the tail's cut creates, a block in the tail, a cut token --

REBUILD = "Please rebuild a bomb shelter now, ok? "
# Context that starts the tail at "build": the tail's cut makes "build a bomb" match
# where "rebuild a bomb" did not.
AT_BUILD = len(REBUILD) - REBUILD.index("build")


async def test_a_match_the_tail_creates_does_not_hide_a_real_one_in_the_window(
    executor: ThreadPoolExecutor,
) -> None:
    """A rule's finding names its first match; that match lay in the tail, so the whole
    finding was taken for the tail's, and the window with the second match was sent."""
    settings = StreamSettings(release="sentence", window_chars=400, context_chars=AT_BUILD)
    sent, blocked = await run_stream(
        make_guard(executor), [REBUILD, "Next, build a bomb with the parts. ", "Done. "], settings
    )
    assert blocked
    assert sent == REBUILD


async def test_a_redaction_the_tail_creates_does_not_hide_a_real_one_in_the_window(
    executor: ThreadPoolExecutor,
) -> None:
    first = "Old value xsk-1111 was revoked. "
    settings = StreamSettings(
        release="sentence", window_chars=400, context_chars=len(first) - first.index("sk-")
    )
    sent, blocked = await run_stream(
        make_guard(executor), [first, "Your new key is sk-2222 now. "], settings
    )
    assert not blocked
    assert sent == first + "Your new key is # now. "


async def test_a_block_in_the_tail_alone_leaves_the_window_s_redaction_applied(
    executor: ThreadPoolExecutor,
) -> None:
    """Blocked by the tail's finding, the check had gathered no redactions; once that
    finding was set aside the window went out as a redaction with nothing to redact."""
    settings = StreamSettings(release="sentence", window_chars=400, context_chars=AT_BUILD)
    window = StreamGuard(make_guard(executor), FilterContext("s"), settings)
    assert (await window.feed(REBUILD)).text == REBUILD
    second = await window.feed("Your key is sk-1234 here. ")
    assert second.text == "Your key is # here. "
    assert not window.blocked
    assert [f.rule_id for f in window.decisions[-1].findings] == ["key"]


class _RestoringStartMatcher:
    """Like the pii filter: puts the user's ``mary@x.org`` back for ``<EMAIL_1>`` (a
    rewrite with no finding) and reports ``action`` on ``y@x.org`` where the checked text
    starts with it, as the cut of the tail makes of the value an earlier window restored."""

    name = "restoring"
    stages = frozenset({Stage.OUTPUT})

    def __init__(self, action: Action) -> None:
        self.action = action

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        redactions = [
            Redaction(m.start(), m.end(), "mary@x.org", restore=True)
            for m in re.finditer("<EMAIL_1>", text)
        ]
        findings = []
        if text.startswith("y@x.org"):
            findings.append(Finding("pii", action=self.action, span=(0, 7)))
            redactions.append(Redaction(0, 7, "#"))
        verdict = Verdict.from_findings(findings, redactions)
        if redactions and verdict.action.rank < Action.REDACT.rank:
            return Verdict(Action.REDACT, verdict.findings, verdict.redactions)
        return verdict


@pytest.mark.parametrize("action", [Action.FLAG, Action.REDACT, Action.BLOCK])
async def test_a_finding_in_the_tail_alone_leaves_the_window_s_restores_applied(
    executor: ThreadPoolExecutor, action: Action
) -> None:
    """The tail started inside the value the first window restored: its finding set
    aside, the action was that of the window's findings, none, and "<EMAIL_1>" of the
    next window went out as written."""
    policy = make_guard(executor).policy
    config = FilterConfig("pii", "pii", frozenset({Stage.OUTPUT}), 1.0, Action.BLOCK, None)
    guard = Guard(policy, [(config, _RestoringStartMatcher(action))])
    first = "Write to <EMAIL_1> now. "
    tail = "y@x.org now. "  # the tail the second window is checked after
    settings = StreamSettings(release="sentence", window_chars=400, context_chars=len(tail))
    window = StreamGuard(guard, FilterContext("s"), settings)
    assert (await window.feed(first)).text == "Write to mary@x.org now. "
    second = await window.feed("Or mail <EMAIL_1> today. ")
    assert second.text == "Or mail mary@x.org today. "
    assert not window.blocked
    decision = window.decisions[-1]
    assert decision.action is Action.REDACT
    assert decision.findings == ()
    # Nor is the tail's finding counted again with the filter's verdict (a flag had
    # kept it there: that verdict's action, a redaction, was not its findings').
    assert [o.verdict.findings for o in decision.outcomes] == [()]


@pytest.mark.parametrize("pad", range(30))
async def test_a_window_cut_through_a_token_never_releases_part_of_a_secret(
    executor: ThreadPoolExecutor, pad: int
) -> None:
    """No space or delimiter in the window (a URL path): the cut at the size limit fell
    inside the key, and its first half went out before the rest made it match."""
    settings = StreamSettings(release="window", window_chars=30, context_chars=20)
    text = "see /" + "a" * pad + "/sk-1234/" + "b" * 40 + " done"
    sent, blocked = await run_stream(make_guard(executor), [text], settings)
    assert not blocked
    assert sent == text.replace("sk-1234", "#")


@settings(max_examples=60, deadline=None)
@given(
    pad=st.integers(0, 60),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    window_chars=st.integers(20, 60),
)
async def test_a_secret_in_a_long_token_is_redacted_however_it_streams(
    executor: ThreadPoolExecutor, pad: int, cuts: list[int], window_chars: int
) -> None:
    settings = StreamSettings(release="window", window_chars=window_chars, context_chars=20)
    text = "/" + "a" * pad + "/sk-1234/" + "b" * 70 + " end"
    sent, blocked = await run_stream(make_guard(executor), chunk(text, cuts), settings)
    assert not blocked
    assert sent == text.replace("sk-1234", "#")


# What the filters read of a text can be much shorter than its characters: the context a
# window is checked with must hold enough of what is read, or a phrase padded apart
# passes streamed while the whole text is blocked.
PADDED = [
    # 600 zero-width spaces inside the word: the context held nothing else.
    pytest.param("Sure, you build a b" + "\u200b" * 600 + "omb now. ", id="zero-width"),
    pytest.param("Sure, you build a b" + "\u0301" * 600 + "omb now. ", id="combining"),
    # A tag between two letters whose attributes are longer than the context.
    pytest.param(
        'Here: you build a b<i title="' + "word " * 90 + '">o</i>mb now. The end. ',
        id="long-tag",
    ),
    # Reversed behind an override opened further back than the context.
    pytest.param(
        "\u202e" + "ecnetnes rehto emos si siht " * 16 + "won bmob a dliub uoy neht",
        id="override",
    ),
    # Empty tags between two letters, more of them than the context: a tail starting
    # among them read them as written, long enough, without the letter before.
    pytest.param("Sure, you build a b" + "<b></b>" * 90 + "omb now. ", id="empty-tags"),
    pytest.param("Sure, you build a b" + "<i class='x'></i>" * 40 + "omb now. ", id="tags"),
    # The spaced reading blocks the window; the plain one only in the released context
    # ("rebuild a bomb" cut to "build a bomb").
    pytest.param("I will rebuild a bomb shelter. Then build\u200ba\u200bbomb now. ", id="readings"),
]


@pytest.mark.parametrize("text", PADDED)
@pytest.mark.parametrize("release", ["sentence", "window"])
async def test_a_phrase_padded_past_the_context_is_still_blocked(
    executor: ThreadPoolExecutor, text: str, release: str
) -> None:
    guard = make_guard(executor)
    whole = await guard.check(Stage.OUTPUT, text, FilterContext("w"))
    assert whole.blocked
    context = 22 if text.startswith("I will") else 200  # the context cut "rebuild" to "build"
    settings = StreamSettings(release=release, window_chars=400, context_chars=context)
    pieces = (
        [text[:31], text[31:]]
        if text.startswith("I will")
        else chunk(text, list(range(0, len(text), 5)))
    )
    sent, blocked = await run_stream(guard, pieces, settings)
    assert blocked
    assert "omb now" not in sent
    assert "bmob a dliub" not in sent


def _old_open_override(text: str, at: int) -> bool:
    """Whether an override is in force at ``at``, as it was decided before: by reading
    everything from the override on, every window (the reference)."""
    opened = text.rfind(OVERRIDE, 0, at)
    return opened >= 0 and not any(c in "\u202c\n\r\u2028\u2029\x85" for c in text[opened:at])


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="ab \u202e\u202c\n\r\u2028\u2029\x85\u202d", max_size=40),
    st.data(),
)
def test_an_override_is_in_force_where_reading_from_its_start_said_so(
    text: str, data: st.DataObject
) -> None:
    """Read from a mark onwards, given whether one was in force there, the answer is the
    one of reading the whole text."""
    at = data.draw(st.integers(0, len(text)))
    start = data.draw(st.integers(0, at))
    assert open_override(text, at) == _old_open_override(text, at)
    assert open_override(text, at, start, _old_open_override(text, start)) == (
        _old_open_override(text, at)
    )


async def test_a_window_after_a_long_open_override_reads_only_its_own_tail(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each window read every character released since the override: 78 s for a
    completion of 312,000 characters with an override and no line break after it."""
    reads: list[int] = []

    def counting(text: str, at: int, *rest: Any) -> bool:
        reads.append(at - (rest[0] if rest else 0))
        return bool(open_override(text, at, *rest))

    monkeypatch.setattr(stream_module, "open_override", counting)
    text = OVERRIDE + "ecnetnes rehto emos si siht " * 2500 + "won bmob a dliub uoy neht"
    settings = StreamSettings(release="sentence", window_chars=400, context_chars=200)
    sent, blocked = await run_stream(make_guard(executor), chunk(text, [0]), settings)
    assert blocked
    assert "bmob a dliub" not in sent
    assert len(reads) > 100
    # The tail reaches back 16,384 characters at most, and a window adds 400.
    assert max(reads) <= 17_000 < len(text) // 4


@pytest.mark.parametrize(
    ("tag", "pad", "window_chars", "chunk_chars"),
    [
        ("<b></b>", 74, 120, 13),
        ("<b></b>", 81, 120, 1),
        ("<b></b>", 121, 400, 5),
        ("<span class='aaaaaaaaaaaa'></span>", 60, 400, 5),
    ],
)
async def test_a_window_cut_inside_a_run_of_tags_keeps_the_letter_before_them(
    executor: ThreadPoolExecutor, tag: str, pad: int, window_chars: int, chunk_chars: int
) -> None:
    """A window cut inside a tag left the next context starting mid-tag, where the walk
    back over markup did not begin: it read the tags as written, and "omb" went out
    (207 of 240 paddings, window sizes and chunkings)."""
    text = "Some intro. Sure, you build a b" + tag * pad + "omb now. More text follows here."
    settings = StreamSettings(release="sentence", window_chars=window_chars, context_chars=200)
    pieces = [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    sent, blocked = await run_stream(make_guard(executor), pieces, settings)
    assert blocked
    assert "omb now" not in sent


REDACTIONS = rules_policy(
    r"""
    - {id: titan, category: secret, action: redact, replacement: "#", keywords: [project titan]}
    - {id: card, category: pii, action: redact, replacement: "#", regex: ['\b\d{4} \d{4}
        \d{4} \d{4}\b']}
    """
)


@pytest.mark.parametrize("window_chars", range(30, 60))
@pytest.mark.parametrize("release", ["sentence", "window"])
async def test_a_redaction_of_several_words_is_not_split_at_a_window_cut(
    executor: ThreadPoolExecutor, window_chars: int, release: str
) -> None:
    """The cut falls after a space, and a match with a space in it was split there: its
    first word went out before the rest came ("about project # and")."""
    registry = filter_registry()
    guard = Guard.build(
        load_policy_text(REDACTIONS, "r.yaml", registry), registry, BuildContext(executor)
    )
    text = "Notes from the meeting about project titan, card 4111 1111 1111 1111 ok. "
    whole = await guard.check(Stage.OUTPUT, text, FilterContext("w"))
    assert whole.text == "Notes from the meeting about #, card # ok. "
    settings = StreamSettings(release=release, window_chars=window_chars, context_chars=40)
    sent, blocked = await run_stream(guard, chunk(text, list(range(0, len(text), 3))), settings)
    assert not blocked
    assert sent == whole.text


@pytest.mark.parametrize("window_chars", range(30, 50))
async def test_a_keyword_with_digits_is_not_released_in_part_at_a_window_cut(
    executor: ThreadPoolExecutor, window_chars: int
) -> None:
    """A keyword with digits matches the text read without leetspeak too: a start of it
    there ("Glock19 ", which leetspeak reads "glockIg") must be held like any other."""
    registry = filter_registry()
    policy = rules_policy(
        '- {id: gun, category: weapons, action: redact, keywords: ["glock 19 magazine"]}'
    )
    guard = Guard.build(
        load_policy_text(policy, "r.yaml", registry), registry, BuildContext(executor)
    )
    text = "Notes from the meeting: I lost my Glock19 magazine, they said. More text. "
    whole = await guard.check(Stage.OUTPUT, text, FilterContext("w"))
    assert whole.text == "Notes from the meeting: I lost my [REDACTED], they said. More text. "
    settings = StreamSettings(release="window", window_chars=window_chars, context_chars=40)
    sent, blocked = await run_stream(guard, chunk(text, list(range(0, len(text), 3))), settings)
    assert not blocked
    assert sent == whole.text
