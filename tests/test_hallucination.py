"""Hallucination flags: groundedness, citations, knowledge cutoff, self-consistency.

The groundedness tests run the real shipped head over the real all-MiniLM-L6-v2 model.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.api.consistency import ConsistencyChecker
from guardrail.backends.base import Completion, GenerationRequest
from guardrail.chat import Message
from guardrail.errors import BackendUnavailable, ConfigError, PolicyError
from guardrail.evaluation import auroc, evaluate, read_dataset
from guardrail.filters.grounding import (
    DEFAULT_HEAD,
    GroundingScorer,
    SupportHead,
    claims_of,
    held_claim,
    sentence_spans,
)
from guardrail.filters.hallucination import (
    HallucinationConfig,
    HallucinationFilter,
    citations,
    cutoff_spans,
    parse_date,
    shared_scorer,
)
from guardrail.guard.filter import BuildContext
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.stream import StreamGuard
from guardrail.guard.types import Action, Decision, FilterContext, Finding, Stage
from guardrail.policy.loader import load_policy, load_policy_text
from guardrail.policy.model import StreamSettings
from tests.conftest import DEFAULT_POLICY, tiny_decoder
from tests.fakes.backend import FakeBackend
from tests.sse import content, frames

SOURCE = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. "
    "It is 330 metres tall and was designed by the engineering firm of Gustave Eiffel."
)
QUESTION = "When was the Eiffel Tower built?"

POLICY = """
name: facts
version: "1"
filters:
  - id: facts
    type: hallucination
    config:
      groundedness: {threshold: 0.5, action: flag}
      cutoff: {date: "2023-07", models: {"future-*": "2030-01"}}
"""


@pytest.fixture(scope="module")
def env() -> Iterator[BuildContext]:
    with ThreadPoolExecutor(2) as pool:
        yield BuildContext(executor=pool)


@pytest.fixture(scope="module")
def scorer(env: BuildContext) -> GroundingScorer:
    return shared_scorer(env)


def make_filter(env: BuildContext, **config: Any) -> HallucinationFilter:
    import msgspec

    return HallucinationFilter("facts", msgspec.convert(config, HallucinationConfig), env)


def out_ctx(*messages: Message, documents: tuple[str, ...] = (), model: str | None = None):  # type: ignore[no-untyped-def]
    return FilterContext(
        "r1", stage=Stage.OUTPUT, messages=messages, context_documents=documents, model=model
    )


# -- sentences and claims ------------------------------------------------------------------


def test_sentences_are_split_with_spans_into_the_original_text() -> None:
    text = "  First one. Second one!\nThird? Last without a stop"
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == [
        "First one.",
        "Second one!",
        "Third?",
        "Last without a stop",
    ]


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        # List markers and step headings are no claims, and no sentence of their own.
        (
            "1. Boil water.\n2. Pour it over the leaves.\n3) Steep.",
            ["Boil water.", "Pour it over the leaves.", "Steep."],
        ),
        ("Step 1. Boil water.", ["Boil water."]),
        ("- Boil water\n* Steep", ["Boil water", "Steep"]),
        # Abbreviations and initials end no sentence; articles are no list markers.
        (
            "Boil water, e.g. in a kettle. Ask Dr. Smith.",
            ["Boil water, e.g. in a kettle.", "Ask Dr. Smith."],
        ),
        ("See J. Doe here. A cat sat. I ran.", ["See J. Doe here.", "A cat sat.", "I ran."]),
        (
            "John F. Kennedy was shot. It was restored by J. R. Smith. See no. 5 on p. 12.",
            ["John F. Kennedy was shot.", "It was restored by J. R. Smith.", "See no. 5 on p. 12."],
        ),
        # A lone letter or "no" that ends a sentence ends it: the next sentence is a claim
        # of its own, not averaged into a supported one.
        (
            "It was plan B. It was painted gold by Napoleon.",
            ["It was plan B.", "It was painted gold by Napoleon."],
        ),
        ("Take vitamin C. Oranges have it.", ["Take vitamin C.", "Oranges have it."]),
        (
            "The answer is no. The Eiffel Tower is in Berlin.",
            ["The answer is no.", "The Eiffel Tower is in Berlin."],
        ),
        # Initialisms, "Mt.", "Inc.", units and months end no sentence ("The U.S." was a
        # claim of its own), unless a capitalised little word clearly starts the next.
        (
            "The U.S. Army was founded in 1775. It fought the British.",
            ["The U.S. Army was founded in 1775.", "It fought the British."],
        ),
        (
            "He lives in Washington, D.C. with his wife.",
            ["He lives in Washington, D.C. with his wife."],
        ),
        ("It closes at 5 p.m. every day.", ["It closes at 5 p.m. every day."]),
        (
            "Mt. Everest is tall. Apple Inc. makes phones.",
            ["Mt. Everest is tall.", "Apple Inc. makes phones."],
        ),
        (
            "It is 5 ft. tall. Sales rose in Jan. 2023.",
            ["It is 5 ft. tall.", "Sales rose in Jan. 2023."],
        ),
        ("She has a Ph.D. in physics.", ["She has a Ph.D. in physics."]),
        ("I live in the U.S. It is big.", ["I live in the U.S.", "It is big."]),
        ("He arrived at 5 p.m. She left.", ["He arrived at 5 p.m.", "She left."]),
        # Chinese full stops need no space after them.
        (
            "埃菲尔铁塔于1889年建成。它在1950年被搬到了伦敦。",
            ["埃菲尔铁塔于1889年建成。", "它在1950年被搬到了伦敦。"],
        ),
        ("是吗\uff1f对\uff01好。", ["是吗\uff1f", "对\uff01", "好。"]),
    ],
)
def test_sentences_of_lists_abbreviations_and_chinese(text: str, sentences: list[str]) -> None:
    assert [text[a:b] for a, b in sentence_spans(text)] == sentences


@pytest.mark.parametrize(
    ("text", "held"),
    [
        ("Restored by J. ", "Restored by J. "),
        ("It is red. Restored by J. ", "Restored by J. "),
        ("It is red. The painting (fig. ", "The painting (fig. "),
        ("It was plan B. ", "It was plan B. "),  # "B. Smith" or "B. It": not yet known
        ("The answer is no. ", "The answer is no. "),
        ("It is red. The U.S. ", "The U.S. "),  # "U.S. Army" or "U.S. It": not yet known
        ("It closes at 5 p.m. ", "It closes at 5 p.m. "),
        ("The U.S. Army was founded. ", ""),
        ("See J. Doe here. It is red. ", ""),
        ("It is red. Restored by J. Smith in ", ""),  # cut mid-sentence: not a full stop
        ("It is red!  ", ""),
    ],
)
def test_a_stream_keeps_back_a_sentence_cut_at_a_full_stop_that_may_end_none(
    text: str, held: str
) -> None:
    assert held_claim(text) == len(held)


def test_a_sentence_without_content_words_is_not_a_claim() -> None:
    text = "Sure! It was completed in 1889."
    assert [text[a:b] for a, b, _ in claims_of(text)] == ["It was completed in 1889."]


# -- groundedness ---------------------------------------------------------------------------


PAINTING = (
    "Dr. Smith of the St. Louis museum restored the painting in 1975. "
    "The painting was sold in 1990 for 2 million dollars."
)
BLOCKING = """
name: s
version: "1"
filters:
  - id: facts
    type: hallucination
    timeout_ms: 60000
    config:
      groundedness: {threshold: 0.4, action: block}
      citations: {enabled: false}
      cutoff: {enabled: false}
"""


@pytest.mark.parametrize(
    "answer",
    [
        "Restored by J. Smith in 1975, the painting was sold in 1990.",
        "The painting (fig. 2) was restored by Dr. Smith in 1975.",
        "The painting was restored in 1975 by a conservator, i.e. Dr. Smith.",
    ],
)
async def test_a_streamed_answer_is_scored_in_the_sentences_of_the_whole_answer(
    env: BuildContext, answer: str
) -> None:
    """The stream had cut it at "J. ", and "Restored by J." was scored as a claim: an
    answer that passes whole was blocked when streamed."""
    guard = Guard.build(
        load_policy_text(BLOCKING, "s.yaml", filter_registry()), filter_registry(), env
    )
    ctx = out_ctx(Message("system", PAINTING), Message("user", "Who restored the painting?"))
    assert (await guard.check(Stage.OUTPUT, answer, ctx)).action is Action.ALLOW
    window = StreamGuard(guard, ctx, StreamSettings())
    sent = [(await window.feed(word)).text for word in re.split(r"(?<= )", answer)]
    sent.append((await window.finish()).text)
    assert not window.blocked
    assert "".join(sent) == answer


@pytest.mark.parametrize(
    ("source", "question", "answer"),
    [
        (
            "The United States Army was established on June 14, 1775, by the Continental Congress.",
            "When was the US Army founded?",
            "The U.S. Army was founded in 1775.",
        ),
        (
            "Mount Everest, in Nepal, is 8,849 metres tall.",
            "How tall is Everest?",
            "Mt. Everest is 8,849 metres tall.",
        ),
        (
            "The store opens at 9 in the morning and closes at 5 in the afternoon.",
            "When does it close?",
            "It closes at 5 p.m. every day.",
        ),
    ],
)
async def test_an_abbreviation_inside_a_supported_sentence_is_no_ungrounded_fragment(
    env: BuildContext, source: str, question: str, answer: str
) -> None:
    """ "The U.S." was scored as a claim of its own (support 0.20) and blocked the answer,
    whole or streamed."""
    guard = Guard.build(
        load_policy_text(BLOCKING, "s.yaml", filter_registry()), filter_registry(), env
    )
    ctx = out_ctx(Message("system", source), Message("user", question))
    verdict = await guard.check(Stage.OUTPUT, answer, ctx)
    assert verdict.action is Action.ALLOW, verdict.findings
    window = StreamGuard(guard, ctx, StreamSettings())
    sent = [(await window.feed(word)).text for word in re.split(r"(?<= )", answer)]
    sent.append((await window.finish()).text)
    assert not window.blocked
    assert "".join(sent) == answer


async def test_a_sentence_taken_from_the_source_is_supported(scorer: GroundingScorer) -> None:
    result = await scorer.score("It is 330 metres tall.", [SOURCE], "How tall is it?")
    assert result.score > 0.5
    assert result.unsupported(0.5) == []


async def test_a_contradicted_claim_scores_below_a_paraphrase(scorer: GroundingScorer) -> None:
    paraphrase = await scorer.score("It was finished in 1889.", [SOURCE], QUESTION)
    contradiction = await scorer.score(
        "It was finished in 1925 by an Italian architect.", [SOURCE], QUESTION
    )
    off_topic = await scorer.score("Penguins live in Antarctica.", [SOURCE], QUESTION)
    assert contradiction.score < paraphrase.score
    assert off_topic.score < paraphrase.score
    assert off_topic.score < 0.5


async def test_each_unsupported_sentence_is_reported_with_its_span(
    scorer: GroundingScorer,
) -> None:
    answer = "The tower was completed in 1889. It was moved to London in 1950 by the Queen."
    result = await scorer.score(answer, [SOURCE], QUESTION)
    bad = result.unsupported(0.5)
    assert [answer[c.start : c.end] for c in bad] == [
        "It was moved to London in 1950 by the Queen."
    ]
    assert 0.0 <= result.score <= 1.0
    assert len(result.claims) == 2


@pytest.mark.parametrize(
    "lead", ["The tower was completed in 1889 as plan B.", "The answer is no."]
)
async def test_an_unsupported_sentence_after_a_lone_letter_or_no_is_a_claim_of_its_own(
    scorer: GroundingScorer, lead: str
) -> None:
    answer = f"{lead} It was painted gold by Napoleon."
    result = await scorer.score(answer, [SOURCE], QUESTION)
    assert [answer[c.start : c.end] for c in result.claims] == [lead, answer[len(lead) + 1 :]]
    assert answer[result.claims[1].start :] in [
        answer[c.start : c.end] for c in result.unsupported(0.5)
    ]


async def test_without_sources_every_claim_is_unsupported(scorer: GroundingScorer) -> None:
    result = await scorer.score("The tower is in Paris.", [], QUESTION)
    assert result.score == 0.0


async def test_the_filter_flags_ungrounded_sentences_against_documents_and_system(
    env: BuildContext,
) -> None:
    filt = make_filter(env, citations={"enabled": False}, cutoff={"enabled": False})
    answer = "The tower was completed in 1889. It was moved to London in 1950 by the Queen."
    for ctx in (
        out_ctx(Message("user", QUESTION), documents=(SOURCE,)),
        out_ctx(Message("system", SOURCE), Message("user", QUESTION)),
    ):
        verdict = await filt.check(answer, ctx)
        assert verdict.action is Action.FLAG
        kinds = {f.category: f for f in verdict.findings}
        assert kinds["groundedness"].action is Action.ALLOW
        assert kinds["ungrounded"].span == (answer.index("It was moved"), len(answer))
        assert all(f.concern == "accuracy" for f in verdict.findings)


async def test_the_filter_does_nothing_for_groundedness_without_sources(
    env: BuildContext,
) -> None:
    filt = make_filter(env)
    verdict = await filt.check("It was moved to London.", out_ctx(Message("user", QUESTION)))
    assert verdict.findings == ()


async def test_sources_can_be_limited_to_documents(env: BuildContext) -> None:
    filt = make_filter(env, groundedness={"sources": ["documents"]}, citations={"enabled": False})
    ctx = out_ctx(Message("system", SOURCE), Message("user", QUESTION))
    assert (await filt.check("It was moved to London.", ctx)).findings == ()


async def test_block_action_blocks_an_ungrounded_answer(env: BuildContext) -> None:
    filt = make_filter(env, groundedness={"action": "block", "message": "Unsupported."})
    ctx = out_ctx(Message("user", QUESTION), documents=(SOURCE,))
    verdict = await filt.check("Penguins built it in 1950 in Antarctica.", ctx)
    assert verdict.action is Action.BLOCK
    assert any(f.message == "Unsupported." for f in verdict.findings)


def test_weights_built_for_other_features_are_refused(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "head.npz"
    np.savez(path, feature_version=np.array(99))
    with pytest.raises(ConfigError, match="feature version 99"):
        SupportHead.load(path)
    head = SupportHead.load(DEFAULT_HEAD)
    assert {v: h.coef.shape for v, h in head.variants.items()} == {"question": (8,), "plain": (8,)}


@pytest.mark.parametrize(
    ("array", "value"),
    [
        ("question_mean", [0.0] * 5),
        ("plain_scale", [[1.0] * 8] * 3),
        ("question_scale", [0.0] * 8),
        ("plain_scale", [float("nan")] * 8),
        ("question_coef", [float("inf")] * 8),
        ("plain_intercept", float("nan")),
    ],
)
def test_when_a_head_file_has_misshapen_or_non_finite_weights_then_it_is_refused_at_load(
    tmp_path: Path, array: str, value: Any
) -> None:
    import numpy as np

    arrays = dict(np.load(DEFAULT_HEAD, allow_pickle=False))
    arrays[array] = np.array(value)
    path = tmp_path / "head.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match="grounding weights"):
        SupportHead.load(path)


# -- citations ------------------------------------------------------------------------------


def test_citations_are_found_with_their_kinds() -> None:
    text = (
        "See https://example.org/a/b. Also doi 10.1000/xyz123, arXiv:2106.01234v2, "
        "as shown [2] (Smith et al., 2019)."
    )
    found = [(kind, text[a:b]) for a, b, kind, _ in citations(text)]
    assert found == [
        ("url", "https://example.org/a/b"),
        ("doi", "10.1000/xyz123"),
        ("arxiv", "arXiv:2106.01234v2"),
        ("numbered", "[2]"),
        ("author_year", "(Smith et al., 2019)"),
    ]


async def test_citations_in_the_sources_are_verified_others_flagged(env: BuildContext) -> None:
    filt = make_filter(env, groundedness={"enabled": False}, cutoff={"enabled": False})
    docs = ("Read more at https://www.example.org/guide/ for details.", "Second document.")
    answer = "See example.org/guide [1] and [2], and http://made-up.example/x [3]."
    verdict = await filt.check(answer, out_ctx(documents=docs))
    flagged = [answer[f.span[0] : f.span[1]] for f in verdict.findings if f.span]
    assert flagged == ["http://made-up.example/x", "[3]"]
    assert {f.rule_id for f in verdict.findings} == {
        "hallucination.citations.url",
        "hallucination.citations.numbered",
    }


@pytest.mark.parametrize(
    ("answer", "flagged"),
    [
        # A URL must be a whole URL of the sources: not another host, not a piece of one.
        ("See https://example.com/returns or https://shop.example.com/re", 2),
        ("See https://shop.example.com/returns/ now.", 0),
        # Typographic punctuation and Markdown after a URL are not part of it.
        ("See \u201chttps://shop.example.com/returns\u201d.", 0),
        ("\u8be6\u89c1 https://shop.example.com/returns\u3002", 0),
        ("See **https://shop.example.com/returns**.", 0),
        # A DOI or arXiv id written as a link is the bare id of the sources.
        ("See https://doi.org/10.1000/xyz123 and https://arxiv.org/abs/2106.01234", 0),
        # A Markdown link whose text is its URL is one URL of the sources, not
        # "https://...returns](https://...returns".
        ("See [https://shop.example.com/returns](https://shop.example.com/returns).", 0),
        # A DOI or arXiv id must be a whole id of the sources, not the start of a longer one.
        ("See doi:10.1000/xyz12 and arXiv:2106.0123.", 2),
        ("See arXiv:2106.01234v2.", 0),
        # A link to an id not in the sources is one unverified citation, not two.
        ("See https://doi.org/10.1000/other and https://arxiv.org/abs/2201.00001", 2),
        # An author-year reference needs the name and the year.
        ("(Smithson, 2021)", 1),
        ("(Smith, 2020)", 1),
        ("(Smith, 2019)", 0),
        # [n] counts documents, not system or tool messages; code indexes are no references.
        ("As shown in [1] and [2].", 1),
        ("Use `items[0]` or x[1] for the first item.", 0),
        ("Use arr[0][1], x[1, 2], y = [1, 2, 3] or the class [0-9].", 0),
    ],
)
async def test_citations_match_whole_sources(env: BuildContext, answer: str, flagged: int) -> None:
    filt = make_filter(env, groundedness={"enabled": False}, cutoff={"enabled": False})
    docs = (
        "Returns: https://shop.example.com/returns. See doi:10.1000/xyz123 and "
        "arXiv:2106.01234. Smith wrote it in 2019 at the Smithsonian.",
    )
    system = Message("system", "Be brief.")
    tool = Message("tool", "{}", "call_1")
    verdict = await filt.check(answer, out_ctx(system, tool, documents=docs))
    assert len(verdict.findings) == flagged, [answer[slice(*f.span)] for f in verdict.findings]


@pytest.mark.parametrize(
    ("answer", "flagged"),
    [
        # The same URL written another way: scheme and host case, a default port, a
        # trailing slash, percent-encoded unreserved characters, query order, a fragment.
        ("See HTTPS://Docs.Example.COM/Guide/Start?b=2&a=1.", 0),
        (
            "See https://docs.example.com:443/Guide/Start?b=2&a=1 or http://docs.example.com:80/Guide/Start?b=2&a=1",
            0,
        ),
        ("See https://docs.example.com/Guide/Start/?a=1&b=2#install", 0),
        ("See https://docs.example.com/%47uide/Start?a=%31&b=2", 0),
        ("See https://docs.example.com/~bob/notes and https://docs.example.com/%7ebob/notes/", 0),
        ("See https://docs.example.com/Guide/Start?b=2&a=1#top).", 0),
        (
            "(https://docs.example.com/Guide/Start?a=1&b=2), [https://docs.example.com/~bob/notes]",
            0,
        ),
        # A URL whose own brackets are balanced keeps its closing one.
        ("See https://en.wikipedia.org/wiki/Mercury_(planet).", 0),
        ("See (https://en.wikipedia.org/wiki/Mercury_(planet)).", 0),
        ("See https://en.wikipedia.org/wiki/Mercury_(element).", 1),
        # Another path, host, port, query value or missing parameter is another URL.
        ("See https://docs.example.com/guide/start?a=1&b=2", 1),
        ("See https://docs.example.com/Guide/Stop?a=1&b=2", 1),
        ("See https://docs.example.org/Guide/Start?a=1&b=2", 1),
        ("See https://docs.example.com:8443/Guide/Start?a=1&b=2", 1),
        ("See https://docs.example.com/Guide/Start?a=1&b=3", 1),
        ("See https://docs.example.com/Guide/Start?a=1", 1),
        ("See https://docs.example.com/Guide/Start", 1),
        ("See https://docs.example.com/Guide/Start?a=1&b=2&c=3", 1),
        # DOIs are case-insensitive, bare or as links.
        ("See doi:10.1000/ABC.Def-9 and https://doi.org/10.1000/abc.def-9", 0),
        ("See https://DOI.org/10.1000/ABC.DEF-9.", 0),
        ("See doi:10.1000/abc.def-8", 1),
    ],
)
async def test_urls_match_the_sources_after_canonicalisation(
    env: BuildContext, answer: str, flagged: int
) -> None:
    filt = make_filter(env, groundedness={"enabled": False}, cutoff={"enabled": False})
    docs = (
        "Start here: https://docs.example.com/Guide/Start?a=1&b=2 and "
        "https://docs.example.com/~bob/notes. Mercury: "
        "https://en.wikipedia.org/wiki/Mercury_(planet). See doi:10.1000/abc.DEF-9.",
    )
    verdict = await filt.check(answer, out_ctx(documents=docs))
    assert len(verdict.findings) == flagged, [answer[slice(*f.span)] for f in verdict.findings]


@pytest.mark.parametrize(
    ("answer", "flagged"),
    [
        ("Refunds take 30 days [7].", ["[7]"]),
        # Only the first of adjacent references was read; lists, ranges and footnote
        # marks were not read at all.
        ("Refunds take 30 days [1][7].", ["[7]"]),
        ("Refunds take 30 days [1][2], shipping is free [2][1].", []),
        ("Refunds take 30 days [1, 7].", ["7"]),
        ("Refunds take 30 days [1; 2].", []),
        ("Refunds take 30 days [1-7] or [1\u20133].", ["[1-7]", "[1\u20133]"]),
        ("Refunds take 30 days [1-2].", []),
        ("Refunds take 30 days [^1][^7].", ["[^7]"]),
    ],
)
async def test_each_number_of_adjacent_listed_and_ranged_references_is_checked(
    env: BuildContext, answer: str, flagged: list[str]
) -> None:
    filt = make_filter(env, groundedness={"enabled": False}, cutoff={"enabled": False})
    docs = ("Refunds take 30 days.", "Shipping is free.")
    verdict = await filt.check(answer, out_ctx(documents=docs))
    assert [answer[slice(*f.span)] for f in verdict.findings if f.span] == flagged


async def test_blank_documents_are_no_sources(env: BuildContext) -> None:
    # They flagged every sentence of the answer as ungrounded, with support 0.
    filt = make_filter(env, cutoff={"enabled": False})
    verdict = await filt.check("Boil water. Steep it.", out_ctx(documents=("", "  ")))
    assert verdict.findings == ()


async def test_without_sources_citations_are_unverified_unless_configured(
    env: BuildContext,
) -> None:
    answer = "The study is at https://doi.org/10.1234/abcd."
    flagged = make_filter(env, groundedness={"enabled": False})
    quiet = make_filter(env, groundedness={"enabled": False}, citations={"without_sources": False})
    assert (await flagged.check(answer, out_ctx())).action is Action.FLAG
    assert (await quiet.check(answer, out_ctx())).findings == ()


# -- knowledge cutoff -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Who won the 2024 election?", ["2024"]),
        ("What happened in August 2023?", ["August 2023"]),
        ("What happened in March 2023?", []),
        ("Who won the World Cup in 2018?", []),
        ("What is the latest iPhone?", ["latest"]),
        ("Who is the current prime minister?", ["the current"]),
        ("Explain how an electric current flows.", []),
        ("What is the price of bitcoin right now?", ["right now"]),
        # Not the time: a current in a circuit, a tense, counts and codes.
        ("What is the current through a 10 ohm resistor?", []),
        ("How do I use the present perfect tense?", []),
        ("Is 2100 calories a day enough?", []),
        ("How do I beat the game 2048? Is port 2049 open?", []),
        # A price is no year: "$2099" once read as a date past the cutoff.
        ("Is a $2099 laptop worth it, or one at \u20ac2100 or \u00a32050?", []),
        ("Room 2101 is on page 2045; it weighs 2050 grams; meet at 2030 hours.", []),
        ("Is flight 2024 on time? What did suite 2030 cost in 2025?", ["2025"]),
        ("2025\u5e74\u53d1\u751f\u4e86\u4ec0\u4e48\uff1f", ["2025"]),
    ],
)
def test_cutoff_spans(text: str, expected: list[str]) -> None:
    from guardrail.filters.hallucination import _RECENCY

    spans = cutoff_spans(text, parse_date("2023-07"), (_RECENCY,))
    assert [text[a:b] for a, b in spans] == expected


@pytest.mark.parametrize(
    "text",
    [
        # Digit groups of phone numbers: the last group once read as a year.
        "Call 555-2024 to book.",
        "Call +1 (212) 555-2031 or 1-800-555-2030.",
        "Call +44 20 7946 2030 or 020 7946 2031.",
        "Call 555 2030, ext. 2030, tel: 2031, phone 555 2031.",
        # Ids and codes joined to letters or other digit groups.
        "Your order A-2030-77 shipped; see ticket #2031 and Ticket No. 2030.",
        "SKU 4412-2030 and part 2030-4412 are in stock; ID 2030-A too.",
        "Invoice 2030/4412 is due; code 12-345-2031 is void.",
    ],
)
def test_phone_numbers_ids_and_codes_are_no_years(text: str) -> None:
    assert list(cutoff_spans(text, parse_date("2023-07"), ())) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What happens in 2031?", ["2031"]),
        ("Plans for March 2030 and May 1, 2030.", ["March 2030", "May 1, 2030"]),
        ("Due 2030-05-01 or 2030-05-01T10:00, else 2031-12.", ["2030", "2030", "2031"]),
        ("On 05/01/2030 or 1-5-2030 or 12/2030.", ["2030", "2030", "2030"]),
        ("Who wins the 2030 election? Done by 2030.", ["2030", "2030"]),
        (
            "From 2024-2026, then 2030\u20132031 and the 2030-31 season.",
            ["2024", "2026", "2030", "2031", "2030-31"],
        ),
        (
            "In mid-2030, the 2030s, (2031), JAN-2031 and post-2030 plans.",
            ["2030", "2030", "2031", "2031", "2030"],
        ),
        (
            "The 2030-era cars, Vision 2030 and the years 2030, 2031 and 2032.",
            ["2030", "2030", "2030", "2031", "2032"],
        ),
    ],
)
def test_dates_and_years_near_digits_and_dashes_are_still_years(
    text: str, expected: list[str]
) -> None:
    spans = cutoff_spans(text, parse_date("2023-07"), ())
    assert [text[a:b] for a, b in spans] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The month was read from "Month YYYY" only; any other date was taken for January
        # of its year, so a date later in the cutoff's year (2023-07) was missed.
        (
            "What happened on October 7, 2023, or on the 7th October 2023?",
            ["October 7, 2023", "October 2023"],
        ),
        (
            "What happened on 2023-10-07, in 2023-12, in 10/2023 or on 2023/08/01?",
            ["2023", "2023", "2023", "2023"],
        ),
        ("What happened on 12.05.2025 or 05.12.2023?", ["12.05.2025", "05.12.2023"]),
        # Day and month in either order: the later possible month.
        ("What happened on 07/08/2023 or 08/07/2023?", ["2023", "2023"]),
        ("What did FY2025 and FY 2024 bring?", ["FY2025", "FY 2024"]),
        # Not past the cutoff: earlier months of its year.
        ("What happened on July 4, 2023, 2023-07-15, 07/15/2023, 03.07.2023 or 2023-03?", []),
        # A part of the year named by a word ends as late as the word allows: "late 2023"
        # was read as January, before a July cutoff.
        (
            "What happened in late 2023, at the end of 2023, in Q4 2023 or in H2 2023?",
            ["late 2023", "end of 2023", "Q4 2023", "H2 2023"],
        ),
        # "mid-2023" may be August.
        (
            "And in autumn 2023, in the fall of 2023, in winter 2023 or in mid-2023?",
            ["autumn 2023", "fall of 2023", "winter 2023", "2023"],
        ),
        ("Not in early 2023, Q1 2023, Q2 2023, H1 2023 or spring 2023.", []),
        # A season or a fiscal year written "2023-24" runs into its second year.
        ("Who won the 2022-23 season, and who leads 2023-24?", ["2023-24"]),
    ],
)
def test_a_dates_month_is_read_from_numeric_and_day_first_dates(
    text: str, expected: list[str]
) -> None:
    spans = cutoff_spans(text, parse_date("2023-07"), ())
    assert [text[a:b] for a, b in spans] == expected


@pytest.mark.parametrize(
    "text",
    [
        "It is 2025 miles away and weighs 2025 lbs, 2030 pounds or 2030 kg.",
        "It costs 2025 USD or 2030 yen.",
        "I live at 2030 Main Street, near 2031 Elm St. and 2032 Old Mill Road.",
        "Steel melts near 2500°F; the kiln reached 2025 °C, or 2030 degrees.",
    ],
)
def test_distances_weights_currencies_and_house_numbers_are_no_years(text: str) -> None:
    assert list(cutoff_spans(text, parse_date("2023-07"), ())) == []


async def test_cutoff_is_per_model_and_only_on_user_messages(env: BuildContext) -> None:
    filt = make_filter(
        env,
        groundedness={"enabled": False},
        cutoff={"date": "2023-07", "models": {"future-*": "2030-01"}, "recency": False},
    )
    user = Message("user", "What happened in 2025?")
    for model, expected in (("llama-2-7b-chat", Action.FLAG), ("future-model", Action.ALLOW)):
        ctx = FilterContext("r", stage=Stage.INPUT, messages=(user,), message_index=0, model=model)
        assert (await filt.check(user.content, ctx)).action is expected
    system = Message("system", "Today is 2026-11-22.")
    ctx = FilterContext("r", stage=Stage.INPUT, messages=(system,), message_index=0)
    assert (await filt.check(system.content, ctx)).findings == ()


@pytest.mark.parametrize(
    ("terms", "text", "expected"),
    [
        # Joined into one alternation, each of these failed the filter's build (a global
        # flag not at the start; a group name used twice) or never matched (a
        # backreference that meant the first term's group), though each term loaded.
        (["(?i)what changed"], "What changed since then?", ["What changed"]),
        (
            ["(?P<v>beta) testers", "(?P<v>nightly) builds"],
            "Any nightly builds?",
            ["nightly builds"],
        ),
        (["(\\w+) and \\1 again", "(go)\\1 live"], "Do we gogo live?", ["gogo live"]),
        # Read as one alternation: the leftmost match, the earlier pattern's at one place.
        (["latest news", "news today"], "The latest news today", ["latest", "news today"]),
    ],
)
async def test_each_cutoff_term_means_what_it_means_on_its_own(
    env: BuildContext, terms: list[str], text: str, expected: list[str]
) -> None:
    filt = make_filter(env, groundedness={"enabled": False}, cutoff={"terms": terms})
    user = Message("user", text)
    ctx = FilterContext("r", stage=Stage.INPUT, messages=(user,), message_index=0)
    findings = (await filt.check(text, ctx)).findings
    assert [text[f.span[0] : f.span[1]] for f in findings if f.span] == expected


def test_a_bad_cutoff_date_stops_the_policy_with_file_and_line(
    write_policy: Callable[[str], Path],
) -> None:
    path = write_policy(POLICY.replace('"2023-07"', '"July 2023"'))
    with pytest.raises(PolicyError) as e:
        load_policy(path, filter_registry())
    assert f"{path}:9:" in str(e.value)
    assert "filters[0].config.cutoff.date" in str(e.value)


# -- metrics, API and moderation ------------------------------------------------------------


@pytest.fixture
def facts_app(
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> Callable[..., Litestar]:
    from guardrail.app import create_app
    from guardrail.settings import Settings

    def make(policy: str = POLICY, **overrides: Any) -> Litestar:
        settings = Settings(policy=str(write_policy(policy)), **overrides)
        return create_app(settings, backend=backend, metrics_registry=metrics_registry)

    return make


@pytest.mark.parametrize("stream", [False, True])
def test_a_prefill_s_claims_are_not_scored_as_the_answer_s(
    facts_app: Callable[..., Litestar],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
    stream: bool,
) -> None:
    """The answer continues a trailing assistant message (a prefill), read as its output
    check's context: the groundedness score recorded is the answer's alone, as without
    the prefill (it was that of the prefill's unsupported claim and the answer together:
    0.27 against 0.66)."""
    backend.reply = "It was completed in 1889."
    documents = [{"title": "Eiffel Tower", "text": SOURCE}]
    user = {"role": "user", "content": QUESTION}
    prefill = {"role": "assistant", "content": "It was moved to London in 1950 by the Queen."}
    scores = []
    with TestClient(app=facts_app(UNHURRIED)) as client:
        for messages in ([user], [user, prefill]):
            body = {"model": "fake-model", "messages": messages, "documents": documents}
            r = client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 200, r.text
            labels = {"stage": "output"}
            total = metrics_registry.get_sample_value("guardrail_groundedness_score_sum", labels)
            assert total is not None
            scores.append(total - sum(scores))
    assert scores[1] == pytest.approx(scores[0], abs=1e-6)
    assert scores[0] > 0.5


# The embedder loads in the first check: on a busy machine past the default 2 s.
UNHURRIED = POLICY.replace("type: hallucination\n", "type: hallucination\n    timeout_ms: 60000\n")
UNSUPPORTED = "It was moved to London in 1950 by the Queen and repainted gold by Napoleon's heirs."
SUPPORTED = (
    "It is 330 metres tall. It is in Paris. It was completed in 1889. Eiffel's firm designed "
    "it. It was for the World's Fair."
)


@pytest.mark.parametrize(
    "reply",
    [f"{UNSUPPORTED} {SUPPORTED}", f"{SUPPORTED} {UNSUPPORTED}"],
    ids=["unsupported-first", "unsupported-last"],
)
def test_a_streamed_answer_scores_as_the_same_answer_sent_whole(
    facts_app: Callable[..., Litestar],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
    reply: str,
) -> None:
    """Each window was scored with the 200 released characters it is checked after:
    their sentences scored again, and the window weighed with them, so these six
    sentences scored 0.368 or 0.626 streamed, by where the unsupported one sits, and
    0.463 whole."""
    backend.reply = reply
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": QUESTION}],
        "documents": [SOURCE],
    }
    labels = {"stage": "output"}
    scores: list[float] = []
    with TestClient(app=facts_app(UNHURRIED)) as client:
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 200, r.text
            total = metrics_registry.get_sample_value("guardrail_groundedness_score_sum", labels)
            assert total is not None
            scores.append(total - sum(scores))
    assert metrics_registry.get_sample_value("guardrail_groundedness_score_count", labels) == 2
    # Each sentence is a window here and scores as it does whole; only the weights
    # differ: a window weighs its characters, a sentence of a whole answer its content
    # words (the metric sees no words), 0.001 and 0.005 apart on these two answers.
    assert scores[1] == pytest.approx(scores[0], abs=0.02)


REFUNDS = "Refund requests go to refunds@acme-shop.com within 30 days of delivery."


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_answer_with_the_placeholders_the_model_saw_is_scored_against_sources_in_that_form(
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
    stream: bool,
) -> None:
    """The default policy hands the model "<EMAIL_ADDRESS_1>" for the passage's address
    and the model answers with it: that answer was scored against the raw system message,
    documents and question, where no placeholder is, and flagged ungrounded (0.76)."""
    from guardrail.app import create_app
    from guardrail.settings import Settings

    # The default policy's 2 s per check may pass while its models load on a busy machine.
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    policy = write_policy(text.replace("timeout_ms: 2000", "timeout_ms: 60000"))
    backend.reply = "Send it to <EMAIL_ADDRESS_1> within 30 days of delivery."
    app = create_app(
        Settings(policy=str(policy)), backend=backend, metrics_registry=metrics_registry
    )
    with TestClient(app=app) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [
                    {"role": "system", "content": "Answer from this passage: " + REFUNDS},
                    {"role": "user", "content": "Where do I send a refund request?"},
                ],
                "documents": [REFUNDS],
                "stream": stream,
            },
        )
    assert r.status_code == 200, r.text
    if stream:
        got = content(r.text)
        guardrail = next(f["guardrail"] for f in frames(r.text) if "guardrail" in f)
    else:
        got = r.json()["choices"][0]["message"]["content"]
        guardrail = r.json()["guardrail"]
    assert "<EMAIL_ADDRESS_1>" in (backend.requests[0].messages or ())[0].content
    assert got == "Send it to refunds@acme-shop.com within 30 days of delivery."
    assert [f["category"] for f in guardrail["findings"]] == ["pii"]  # the input's redaction
    labels = {"stage": "output"}
    score = metrics_registry.get_sample_value("guardrail_groundedness_score_sum", labels)
    assert score is not None
    assert score > 0.4


def test_chat_with_documents_flags_the_ungrounded_sentence(
    facts_app: Callable[..., Litestar], backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    backend.reply = "It was completed in 1889. It was moved to London in 1950 by the Queen."
    with TestClient(app=facts_app()) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": QUESTION}],
                "documents": [{"title": "Eiffel Tower", "text": SOURCE}],
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-guardrail-action"] == "flag"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == backend.reply  # flagged, not changed
    findings = body["guardrail"]["findings"]
    assert [f["category"] for f in findings] == ["ungrounded"]
    assert findings[0]["concern"] == "accuracy"
    assert findings[0]["span"] == [backend.reply.index("It was moved"), len(backend.reply)]
    # The documents stay in the gateway: the backend never sees them.
    assert all(SOURCE not in m.content for m in backend.requests[0].messages or ())
    labels = {"stage": "output", "kind": "ungrounded"}
    assert metrics_registry.get_sample_value("guardrail_hallucination_flags_total", labels) == 1
    assert (
        metrics_registry.get_sample_value("guardrail_groundedness_score_count", {"stage": "output"})
        == 1
    )
    harmful = metrics_registry.get_sample_value(
        "guardrail_harmful_content_total",
        {"stage": "output", "category": "ungrounded", "tenant": "default", "policy_version": "1"},
    )
    assert harmful is None


def test_a_question_past_the_cutoff_is_flagged_on_input(
    facts_app: Callable[..., Litestar], backend: FakeBackend
) -> None:
    with TestClient(app=facts_app()) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "Who won the 2025 Tour de France?"}],
            },
        )
    assert r.status_code == 200
    assert [f["category"] for f in r.json()["guardrail"]["findings"]] == ["knowledge_cutoff"]
    assert len(backend.requests) == 1  # a flag never stops the request


def test_documents_must_be_strings_or_text_objects(facts_app: Callable[..., Litestar]) -> None:
    with TestClient(app=facts_app()) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "hi"}],
                "documents": [{"body": "no text field"}],
            },
        )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_moderation_with_context_returns_groundedness_per_input(
    facts_app: Callable[..., Litestar],
) -> None:
    supported = "It was completed in 1889."
    invented = "It was built in 1925 on the Moon."
    with TestClient(app=facts_app()) as client:
        r = client.post(
            "/v1/moderations",
            json={
                "input": [supported, invented],
                "stage": "output",
                "context": [SOURCE],
                "prompt": QUESTION,
            },
        )
        plain = client.post("/v1/moderations", json={"input": supported})
        empty = [
            client.post("/v1/moderations", json={"input": supported, "context": c})
            for c in ("", [], ["  "])
        ]
    assert r.status_code == 200, r.text
    # Without sources nothing is scored (not "everything unsupported").
    for answer in empty:
        assert answer.status_code == 200, answer.text
        assert "groundedness" not in answer.json()["results"][0]
    good, bad = (res["groundedness"] for res in r.json()["results"])
    assert good["score"] > bad["score"]
    assert good["unsupported"] == []
    assert bad["unsupported"][0]["text"] == invented
    assert bad["unsupported"][0]["span"] == [0, len(invented)]
    assert "groundedness" not in plain.json()["results"][0]


@pytest.mark.parametrize(
    "extra", [{}, {"prompt": "Tell me about the tower."}], ids=["no prompt", "with a prompt"]
)
def test_moderation_inputs_are_checked_as_inputs_not_as_conversation_messages(
    facts_app: Callable[..., Litestar], extra: dict[str, Any]
) -> None:
    # A moderation request numbers its inputs; the filter once read that number as an
    # index into the (empty or one-message) conversation and failed on every input.
    with TestClient(app=facts_app()) as client:
        r = client.post(
            "/v1/moderations",
            json={"input": ["The tower is tall.", "Who won the 2025 Tour de France?"], **extra},
        )
    assert r.status_code == 200, r.text
    plain, recent = r.json()["results"]
    assert plain["action"] == "allow"
    assert plain["findings"] == []
    assert [f["category"] for f in recent["findings"]] == ["knowledge_cutoff"]


def test_an_accuracy_flag_alone_does_not_flag_a_moderation_input(
    facts_app: Callable[..., Litestar],
) -> None:
    """LangChain's moderation chain reads ``flagged`` alone: a question past the cutoff
    was refused as harmful, with every OpenAI category false."""
    with TestClient(app=facts_app()) as client:
        r = client.post("/v1/moderations", json={"input": "Who won the 2025 Tour de France?"})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["action"], result["flagged"]) == ("flag", False)
    assert [f["category"] for f in result["findings"]] == ["knowledge_cutoff"]


def test_moderation_context_works_without_a_grounding_filter(client: TestClient[Any]) -> None:
    r = client.post(
        "/v1/moderations",
        json={"input": "Penguins live in the desert.", "stage": "output", "context": SOURCE},
    )
    assert r.status_code == 200, r.text
    report = r.json()["results"][0]["groundedness"]
    assert report["threshold"] == 0.4
    assert 0.0 <= report["score"] < 0.4


def test_policy_tests_can_carry_context_and_prompt(write_policy: Callable[[str], Path]) -> None:
    text = POLICY + (
        "tests:\n"
        "  - stage: output\n"
        "    input: It was moved to London in 1950 by the Queen.\n"
        '    context: ["' + SOURCE + '"]\n'
        "    prompt: " + QUESTION + "\n"
        "    expect: flag\n"
    )
    policy = load_policy(write_policy(text), filter_registry())
    test = policy.tests[0]
    assert test.context == [SOURCE]
    assert test.prompt == QUESTION


# -- self-consistency -----------------------------------------------------------------------


@dataclass
class VaryingBackend(FakeBackend):
    """Answers each extra sample with the next scripted reply."""

    samples: list[str] = field(default_factory=list)
    drawn: int = 0

    async def generate(self, request: GenerationRequest) -> Completion:
        if request.params.temperature == 1.0 and self.samples:
            self.requests.append(request)
            text = self.samples[self.drawn % len(self.samples)]
            self.drawn += 1
            return Completion(text, "stop")
        return await super().generate(request)


def test_inline_consistency_flags_an_answer_the_samples_disagree_with(
    write_policy: Callable[[str], Path], metrics_registry: CollectorRegistry
) -> None:
    backend = VaryingBackend(
        reply="The tower was completed in 1889.",
        samples=[
            "Bananas are rich in potassium.",
            "The Moon has no atmosphere.",
            "Chess has sixty-four squares.",
        ],
    )
    from guardrail.app import create_app
    from guardrail.settings import Settings

    settings = Settings(
        policy=str(write_policy(POLICY)),
        consistency_sample_rate=1.0,
        consistency_mode="inline",
    )
    app = create_app(settings, backend=backend, metrics_registry=metrics_registry)
    with TestClient(app=app) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": QUESTION}]},
        )
    assert r.status_code == 200, r.text
    findings = r.json()["guardrail"]["findings"]
    assert [f["category"] for f in findings] == ["inconsistent"]
    assert backend.drawn == 3
    sample_requests = [q for q in backend.requests if q.params.temperature == 1.0]
    assert all(q.request_id.startswith(sample_requests[0].request_id[:-1]) for q in sample_requests)
    assert (
        metrics_registry.get_sample_value("guardrail_consistency_score_count", {"mode": "inline"})
        == 1
    )
    assert (
        metrics_registry.get_sample_value(
            "guardrail_hallucination_flags_total", {"stage": "output", "kind": "inconsistent"}
        )
        == 1
    )


async def test_consistent_samples_score_higher_and_background_mode_never_waits(
    scorer: GroundingScorer,
) -> None:
    recorded: list[tuple[str, float]] = []
    counted: list[str] = []

    async def get_scorer() -> GroundingScorer:
        return scorer

    def checker(samples: list[str], **kw: Any) -> tuple[ConsistencyChecker, VaryingBackend]:
        backend = VaryingBackend(samples=samples)
        c = ConsistencyChecker(
            get_scorer,
            lambda mode, s: recorded.append((mode, s)),
            rate=1.0,
            count=counted.append,
            **kw,
        )
        return c, backend

    request = GenerationRequest("m", "req-1", messages=(Message("user", QUESTION),))
    answer = "The tower was completed in 1889."
    agree, b1 = checker(["It was completed in 1889.", "It was finished in 1889 in Paris."])
    disagree, b2 = checker(["It opened in 1925.", "It was built in 1750 by the Romans."])
    high = await agree.score(b1, request, answer)
    low = await disagree.score(b2, request, answer)
    assert high > low

    background, b3 = checker(["It was completed in 1889."], max_in_flight=1)
    b3.delay_s = 0.0
    background.background(b3, request, answer)
    background.background(b3, request, answer)  # over the bound: dropped and counted
    assert background.in_flight == 1
    await asyncio.gather(*background._tasks)
    assert counted.count("dropped") == 1
    assert counted.count("scored") == 1
    assert recorded[-1][0] == "background"


async def test_the_inline_inconsistent_flag_carries_the_answer_as_the_policy_left_it(
    scorer: GroundingScorer,
) -> None:
    """It carried the raw completion: the audit log, which keeps the text of the decision
    that set the action, would have stored what the output filters redacted."""

    async def get_scorer() -> GroundingScorer:
        return scorer

    checker = ConsistencyChecker(get_scorer, lambda mode, s: None, rate=1.0, threshold=0.9)
    backend = VaryingBackend(samples=["It opened in 1925.", "It was built in 1750 by Romans."])
    request = GenerationRequest("m", "req-1", messages=(Message("user", QUESTION),))
    answer = "The tower was completed in 1889. Mail jane@example.com for more."
    checked = Decision(
        stage=Stage.OUTPUT, action=Action.REDACT,
        text="The tower was completed in 1889. Mail <EMAIL_ADDRESS_1> for more.",
        findings=(), outcomes=(), policy_name="p", policy_version="1",
    )  # fmt: skip

    flagged = await checker.inline(backend, request, answer, checked)

    assert flagged is not None
    assert [f.category for f in flagged.findings] == ["inconsistent"]
    assert flagged.text == checked.text


@dataclass
class OneFailsBackend(FakeBackend):
    """The first sample fails once the others are generating; the others generate until
    they are cancelled."""

    calls: int = 0
    running: int = 0
    cancelled: int = 0
    others_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, request: GenerationRequest) -> Completion:
        self.calls += 1
        if self.calls == 1:
            await self.others_started.wait()
            raise BackendUnavailable("the backend is gone")
        self.running += 1
        if self.running == 2:
            self.others_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        raise AssertionError("unreachable")


async def test_when_one_consistency_sample_fails_then_no_other_generation_is_left_running(
    scorer: GroundingScorer,
) -> None:
    counted: list[str] = []

    async def get_scorer() -> GroundingScorer:
        return scorer

    checker = ConsistencyChecker(
        get_scorer, lambda mode, s: None, rate=1.0, samples=3, max_in_flight=1, count=counted.append
    )
    backend = OneFailsBackend()
    request = GenerationRequest("m", "req-1", messages=(Message("user", QUESTION),))
    checker.background(backend, request, "The tower was completed in 1889.")
    await asyncio.gather(*checker._tasks)
    assert counted == ["error"]
    assert checker.in_flight == 0
    assert (backend.running, backend.cancelled) == (0, 2)


ANSWER = "The Eiffel Tower was completed in 1889 for the World's Fair in Paris."
REFUSED = Completion("I'm sorry, but I can't help with that.", "stop", refusal=True)


@dataclass
class SampledBackend(FakeBackend):
    """Answers the request with ``answer`` and each extra sample with the next of ``samples``."""

    answer: Completion = field(default_factory=lambda: Completion(ANSWER, "stop"))
    samples: list[Completion] = field(default_factory=list)
    drawn: int = 0

    async def generate(self, request: GenerationRequest) -> Completion:
        if "-sc" not in request.request_id:
            return self.answer
        sample = self.samples[self.drawn % len(self.samples)]
        self.drawn += 1
        return sample


def _inline_check(
    backend: SampledBackend, write_policy: Callable[[str], Path], registry: CollectorRegistry
) -> dict[str, Any]:
    from guardrail.app import create_app
    from guardrail.settings import Settings

    settings = Settings(
        policy=str(write_policy(POLICY)), consistency_sample_rate=1.0, consistency_mode="inline"
    )
    with TestClient(app=create_app(settings, backend=backend, metrics_registry=registry)) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": QUESTION}]},
        )
    assert r.status_code == 200, r.text
    return dict(r.json())


def _checks(registry: CollectorRegistry, result: str) -> float | None:
    return registry.get_sample_value("guardrail_consistency_checks_total", {"result": result})


@pytest.mark.parametrize(
    "sample",
    [
        pytest.param(REFUSED, id="refusal"),
        pytest.param(Completion("I", "content_filter"), id="cut-by-upstream-filter"),
        pytest.param(Completion("The", "length"), id="cut-at-max-tokens"),
        pytest.param(Completion("  ", "stop"), id="empty"),
    ],
)
def test_when_no_sample_is_an_answer_then_the_check_is_skipped_and_flags_nothing(
    sample: Completion, write_policy: Callable[[str], Path], metrics_registry: CollectorRegistry
) -> None:
    """Refused, filtered and truncated samples were scored as real answers (0.06-0.14):
    a consistent answer was flagged inconsistent."""
    backend = SampledBackend(samples=[sample])

    body = _inline_check(backend, write_policy, metrics_registry)

    assert backend.drawn == 3
    assert body["guardrail"]["findings"] == []
    assert _checks(metrics_registry, "skipped") == 1
    assert _checks(metrics_registry, "scored") is None
    assert _checks(metrics_registry, "error") is None
    score_count = {"mode": "inline"}
    assert (
        metrics_registry.get_sample_value("guardrail_consistency_score_count", score_count) is None
    )


@pytest.mark.parametrize(
    "samples",
    [
        # One sample repeats the answer, two are refusals: scored on the one.
        pytest.param([Completion(ANSWER, "stop"), REFUSED, REFUSED], id="refusals-left-out"),
        # A model answers in a few tokens and rambles to max_tokens in its samples: those
        # samples had room for all the answer said, and are evidence.
        pytest.param(
            [Completion(ANSWER + " It is 330 metres tall and was designed by", "length")],
            id="cut-past-the-answer",
        ),
    ],
)
def test_the_usable_samples_are_scored_and_not_flagged(
    samples: list[Completion],
    write_policy: Callable[[str], Path],
    metrics_registry: CollectorRegistry,
) -> None:
    backend = SampledBackend(samples=samples)

    body = _inline_check(backend, write_policy, metrics_registry)

    assert body["guardrail"]["findings"] == []
    assert _checks(metrics_registry, "scored") == 1


def test_when_the_answer_was_cut_at_max_tokens_too_then_cut_samples_are_compared(
    write_policy: Callable[[str], Path], metrics_registry: CollectorRegistry
) -> None:
    backend = SampledBackend(
        answer=Completion(ANSWER, "length"),
        samples=[
            Completion("It opened in 1925.", "length"),
            Completion("Built by Romans.", "length"),
        ],
    )

    body = _inline_check(backend, write_policy, metrics_registry)

    assert [f["category"] for f in body["guardrail"]["findings"]] == ["inconsistent"]
    assert _checks(metrics_registry, "scored") == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(REFUSED, id="refusal"),
        pytest.param(Completion("The Eiffel Tower was", "content_filter"), id="cut-by-filter"),
    ],
)
def test_when_the_answer_is_not_an_answer_then_no_sample_is_drawn(
    answer: Completion, write_policy: Callable[[str], Path], metrics_registry: CollectorRegistry
) -> None:
    backend = SampledBackend(answer=answer, samples=[Completion("It opened in 1925.", "stop")])

    body = _inline_check(backend, write_policy, metrics_registry)

    assert backend.drawn == 0
    assert body["guardrail"]["findings"] == []
    assert _checks(metrics_registry, "scored") is None


class RecordingChecker(ConsistencyChecker):
    """Records the answer each check is given; draws and scores nothing."""

    def __init__(self) -> None:
        async def no_scorer() -> GroundingScorer:
            raise AssertionError("nothing is scored")

        super().__init__(no_scorer, lambda mode, score: None, rate=1.0, mode="inline")
        self.answers: list[str] = []

    async def score(
        self, backend: Any, request: GenerationRequest, answer: str, *, answer_cut: bool = False
    ) -> float | None:
        self.answers.append(answer)
        return 1.0

    def background(
        self, backend: Any, request: GenerationRequest, answer: str, *, answer_cut: bool = False
    ) -> None:
        self.answers.append(answer)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_check_scores_the_answer_as_released_streamed_or_not(
    stream: bool, test_policy: Path
) -> None:
    """A stream was checked on the released (redacted) text, a whole answer on the raw
    completion: the same answer scored differently, and raw secrets reached the scorer."""
    from guardrail.app import create_app
    from guardrail.settings import Settings

    backend = FakeBackend(reply="Your key is sk-abcdefgh. Keep it safe.")
    app = create_app(
        Settings(policy=str(test_policy)), backend=backend, metrics_registry=CollectorRegistry()
    )
    checker = RecordingChecker()
    app.state.gateway.consistency = checker
    with TestClient(app=app) as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "stream": stream,
                "messages": [{"role": "user", "content": "my key?"}],
            },
        )
    assert r.status_code == 200, r.text
    assert checker.answers == ["Your key is [SECRET]. Keep it safe."]


# A policy that hands the model a placeholder for a name and puts the name back in the
# answer; the model repeats the placeholder in its answer and in every sample.
NAME_POLICY = """
name: names
version: "1"
filters:
  - id: pii
    type: pii
    config:
      entities:
        PERSON: {threshold: 0.5, input: redact, output: allow}
"""
NAMED = "My name is Jane Doe. What do you know about me?"
SAID = "<PERSON_1> is a nurse who lives in Lyon and works nights."


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_answer_is_compared_with_its_samples_in_their_form(
    stream: bool, write_policy: Callable[[str], Path]
) -> None:
    """The samples hold the placeholders the model wrote; the answer was compared with the
    user's own values put back ("Jane Doe is a nurse ..."), unlike every sample."""
    from guardrail.app import create_app
    from guardrail.settings import Settings

    backend = FakeBackend(reply=SAID)
    settings = Settings(policy=str(write_policy(NAME_POLICY)))
    app = create_app(settings, backend=backend, metrics_registry=CollectorRegistry())
    checker = RecordingChecker()
    app.state.gateway.consistency = checker
    with TestClient(app=app) as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "stream": stream,
                "messages": [{"role": "user", "content": NAMED}],
            },
        )
    assert r.status_code == 200, r.text
    assert "Jane Doe is a nurse" in r.text  # the client got its name back
    assert checker.answers == [SAID]


def _consistency_score(question: str, policy: Path) -> float | None:
    """The inline consistency score of one chat request to a model that says ``SAID``
    every time."""
    from guardrail.app import create_app
    from guardrail.settings import Settings

    backend = SampledBackend(answer=Completion(SAID, "stop"), samples=[Completion(SAID, "stop")])
    settings = Settings(policy=str(policy), consistency_sample_rate=1.0, consistency_mode="inline")
    registry = CollectorRegistry()
    app = create_app(settings, backend=backend, metrics_registry=registry)
    with TestClient(app=app) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": question}]},
        )
    assert r.status_code == 200, r.text
    return registry.get_sample_value("guardrail_consistency_score_sum", {"mode": "inline"})


def test_an_answer_that_repeats_a_redacted_name_scores_as_one_without_it(
    write_policy: Callable[[str], Path],
) -> None:
    """A model that repeats itself word for word scored 0.82 with the name put back in
    its answer, 0.87 when there was no name to put back: the redacted name read as a
    disagreement."""
    named = _consistency_score(NAMED, write_policy(NAME_POLICY, "names.yaml"))
    # The same request as the backend saw it, with no name to put back.
    plain = _consistency_score(
        "My name is <PERSON_1>. What do you know about me?", write_policy(POLICY)
    )
    assert plain is not None
    assert named == pytest.approx(plain)


# -- evaluation -----------------------------------------------------------------------------


def test_auroc_counts_ties_as_half() -> None:
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5], [0.5]) == 0.5


async def test_eval_reports_the_auroc_of_groundedness(
    tmp_path: Path, write_policy: Callable[[str], Path], env: BuildContext
) -> None:
    rows = [
        {"text": "It was completed in 1889.", "label": "allow"},
        {"text": "It is 330 metres tall.", "label": "allow"},
        {"text": "It was built in 1925 on the Moon.", "label": "block"},
        {"text": "Penguins designed it in 1750.", "label": "block"},
    ]
    data = tmp_path / "g.jsonl"
    data.write_text(
        "\n".join(json.dumps({**r, "context": SOURCE, "prompt": QUESTION}) for r in rows)
    )
    guard = Guard.build(
        load_policy(write_policy(POLICY), filter_registry()), filter_registry(), env
    )
    report = await evaluate(guard, read_dataset(data), Stage.OUTPUT)
    assert report["auroc"]["groundedness"] == 1.0


def test_finding_to_dict_names_the_accuracy_concern() -> None:
    f = Finding("ungrounded", 0.7, Action.FLAG, concern="accuracy")
    assert f.to_dict()["concern"] == "accuracy"
    assert "concern" not in Finding("hate").to_dict()


async def test_a_judge_model_is_loaded_by_the_local_loader_and_blended_in(
    env: BuildContext, model_dir: Path
) -> None:
    """The real judge path on the embedded SmolLM2 (not a judge worth trusting: it checks
    loading, prompting and the yes/no reading, not the model's judgement)."""
    plain = make_filter(env, citations={"enabled": False}, cutoff={"enabled": False})
    judged = make_filter(
        env,
        citations={"enabled": False},
        cutoff={"enabled": False},
        groundedness={"judge": {"model": str(model_dir), "weight": 0.5, "device": "cpu"}},
    )
    ctx = out_ctx(Message("user", QUESTION), documents=(SOURCE,))
    answer = "It was completed in 1889."
    judge = judged.scorer._judge  # type: ignore[union-attr]
    assert judge is not None
    p_yes = judge.judge_sync(SOURCE, [answer])[0]
    assert 0.0 < p_yes < 1.0
    base = (await plain.scorer.score(answer, [SOURCE], QUESTION)).score  # type: ignore[union-attr]
    blended = {f.category: f.score for f in (await judged.check(answer, ctx)).findings}
    # The judge's forward pass runs on the filter's executor thread here and on this
    # thread above; CPU kernels under load may split the work differently (seen: 3e-4
    # apart in a full CI run), so the blend is read to 1e-3, well under its own size.
    assert abs(p_yes - base) > 0.01, (p_yes, base)
    assert blended["groundedness"] == pytest.approx(0.5 * base + 0.5 * p_yes, abs=1e-3)


def _strip_trailing_reference(raw: str) -> str:
    # The first, one-character-at-a-time version: the meaning _strip_trailing keeps.
    from guardrail.filters.hallucination import _CLOSING, _TRAILING

    while raw and raw[-1] in _TRAILING:
        opener = _CLOSING.get(raw[-1])
        if opener is not None and raw.count(opener) >= raw.count(raw[-1]):
            break
        raw = raw[:-1]
    return raw


@pytest.mark.parametrize(
    "raw",
    [
        "https://en.wikipedia.org/wiki/Mercury_(planet)",
        "https://en.wikipedia.org/wiki/Mercury_(planet)).",
        "https://x.example/a_(b_(c))]).,",
        "https://x.example/[a]}]>'\"",
        "https://x.example/a" + ")" * 3000,
        "https://x.example/(a" + ")." * 1500,
        "https://x.example/a" + "." * 3000,
        ")))",
        "",
    ],
)
def test_strip_trailing_counts_brackets_once(raw: str) -> None:
    # A URL ending in a long run of ")" was recounted and copied for each character
    # stripped (quadratic: a 160k-character run took seconds); the answer is unchanged.
    from guardrail.filters.hallucination import _strip_trailing

    assert _strip_trailing(raw) == _strip_trailing_reference(raw)


class CountingEmbedder:
    """Stands in for :class:`Embedder`: unit vectors, every text it was asked for counted."""

    def __init__(self) -> None:
        self.texts = 0
        self.scopes: list[str | None] = []

    async def encode(self, texts: list[str], scope: str | None = None) -> Any:
        import numpy as np

        self.texts += len(texts)
        self.scopes.append(scope)
        rows = np.ones((len(texts), 384), dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


async def test_when_an_answer_has_thousands_of_sentences_then_a_bounded_number_is_embedded() -> (
    None
):
    # A moderation request of the maximum body size holds about a million short sentences;
    # each claim is one embedding (and one judge forward pass, with a judge).
    embedder = CountingEmbedder()
    scorer = GroundingScorer(
        embedder,  # type: ignore[arg-type]
        SupportHead.load(DEFAULT_HEAD),
        max_units=8,
        max_claims=16,
    )
    answer = " ".join(f"Claim number {i} about towers." for i in range(2000))

    result = await scorer.score(answer, [SOURCE], QUESTION)

    assert len(result.claims) == 16
    assert embedder.texts <= 8 + 16 + 1  # source units, claims, the question
    # Spread over the answer, not its beginning only: the last sentence is scored.
    assert result.claims[-1].end == len(answer)


async def test_when_sources_are_huge_then_the_evidence_cache_holds_a_bounded_size() -> None:
    embedder = CountingEmbedder()
    scorer = GroundingScorer(
        embedder,  # type: ignore[arg-type]
        SupportHead.load(DEFAULT_HEAD),
        max_units=4,
        cache_chars=50_000,
    )
    for i in range(20):  # each set of sources is 40 000 characters in one sentence
        await scorer.evidence([f"doc {i} " + "word " * 8_000])

    assert scorer.cached_chars <= 50_000


async def test_when_sources_differ_only_in_where_they_split_then_each_gets_its_own_evidence() -> (
    None
):
    """["A", "B"] and ["A\x00B"] were keyed alike, and the second got the first's units."""
    scorer = GroundingScorer(CountingEmbedder(), SupportHead.load(DEFAULT_HEAD))  # type: ignore[arg-type]
    first = "The museum opened in 1975."
    second = "Its first director was Maria Lopez."
    apart = await scorer.evidence([first, second])
    joined = await scorer.evidence([first + "\x00" + second])

    assert (scorer.evidence_hits, scorer.evidence_misses) == (0, 2)
    assert apart.units != joined.units


class SlowEmbedder(CountingEmbedder):
    """Yields to the loop before it answers, as the batched encoder does; its first
    ``failures`` calls fail."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.calls = 0
        self.failures = failures

    async def encode(self, texts: list[str], scope: str | None = None) -> Any:
        self.calls += 1
        for _ in range(3):
            await asyncio.sleep(0)
        if self.calls <= self.failures:
            raise RuntimeError("encoder failed")
        return await super().encode(texts, scope)


async def test_when_inputs_share_sources_concurrently_then_their_evidence_is_computed_once() -> (
    None
):
    """A moderation request's inputs are checked together against one context: each
    missed the cache and embedded the sources again."""
    embedder = SlowEmbedder()
    scorer = GroundingScorer(embedder, SupportHead.load(DEFAULT_HEAD))  # type: ignore[arg-type]

    found = await asyncio.gather(*(scorer.evidence([SOURCE], "acme") for _ in range(8)))

    assert embedder.calls == 1
    assert all(e is found[0] for e in found)
    assert (scorer.evidence_hits, scorer.evidence_misses) == (7, 1)


async def test_when_one_waiting_caller_is_cancelled_then_the_others_still_get_the_evidence() -> (
    None
):
    embedder = SlowEmbedder()
    scorer = GroundingScorer(embedder, SupportHead.load(DEFAULT_HEAD))  # type: ignore[arg-type]
    first = asyncio.ensure_future(scorer.evidence([SOURCE]))
    second = asyncio.ensure_future(scorer.evidence([SOURCE]))
    await asyncio.sleep(0)
    first.cancel()

    evidence = await second

    assert first.cancelled()
    assert evidence.units
    assert embedder.calls == 1


async def test_when_working_out_evidence_fails_then_the_failure_is_not_kept() -> None:
    embedder = SlowEmbedder(failures=1)
    scorer = GroundingScorer(embedder, SupportHead.load(DEFAULT_HEAD))  # type: ignore[arg-type]
    failed = await asyncio.gather(
        scorer.evidence([SOURCE]), scorer.evidence([SOURCE]), return_exceptions=True
    )
    assert [type(e) for e in failed] == [RuntimeError, RuntimeError]

    evidence = await scorer.evidence([SOURCE])

    assert evidence.units
    assert embedder.calls == 2


async def test_a_tenants_sources_are_embedded_and_kept_for_it_alone() -> None:
    """The evidence cache is per tenant: another tenant's identical documents are
    embedded again (a hit answers faster, so a shared entry would tell one tenant what
    documents another sent), and the embedder is asked under the tenant's scope."""
    embedder = CountingEmbedder()
    scorer = GroundingScorer(embedder, SupportHead.load(DEFAULT_HEAD))  # type: ignore[arg-type]
    sources = [SOURCE]
    await scorer.evidence(sources, "acme")
    once = embedder.texts
    await scorer.evidence(sources, "acme")
    assert embedder.texts == once
    await scorer.evidence(sources, "beta")
    assert embedder.texts == 2 * once
    await scorer.score("It was finished in 1889.", sources, QUESTION, scope="beta")
    assert embedder.scopes == ["acme", "beta", "beta"]


async def test_the_filter_scores_under_the_requests_tenant(env: BuildContext) -> None:
    """Through the filter and the real encoder: the same answer and documents from a
    second tenant are embedded again; a repeat of either computes nothing."""
    from guardrail.filters.embedder import shared_embedder

    filt = make_filter(env, citations={"enabled": False}, cutoff={"enabled": False})
    cached = shared_embedder(env).model
    document = "The Leeds depot ships order 4471 within two working days of payment."

    async def computed_for(tenant: str) -> int:
        ctx = FilterContext(
            "r",
            stage=Stage.OUTPUT,
            messages=(Message("user", "When does order 4471 ship?"),),
            context_documents=(document,),
            tenant=tenant,
        )
        before = cached.computed
        await filt.check("Order 4471 ships within two working days.", ctx)
        return int(cached.computed - before)

    first = await computed_for("acme")
    assert first > 0
    assert await computed_for("beta") == first
    assert await computed_for("acme") == 0


def test_new_grounding_weights_written_over_the_old_file_reach_the_scorer(
    tmp_path: Path,
) -> None:
    """The scorer holds the head: keeping the scorer across a change of the head's file
    would go on scoring with the old weights."""
    from guardrail.filters.hallucination import shared_scorer
    from guardrail.guard.filter import SharedResources

    weights = tmp_path / "head.npz"
    weights.write_bytes(DEFAULT_HEAD.read_bytes())
    with ThreadPoolExecutor(1) as pool:
        env = BuildContext(pool, base_dir=tmp_path, resources=SharedResources())
        before = shared_scorer(env, "head.npz")
        assert shared_scorer(env, "head.npz") is before  # unchanged: shared
        import os

        stat = weights.stat()  # written again: a new modification time
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        after = shared_scorer(env, "head.npz")
    assert after is not before
    assert after._head is not before._head  # type: ignore[attr-defined]


def _unigram_tokenizer(pieces: list[str]) -> Any:
    """A SentencePiece-like (Metaspace, unigram) tokenizer over ``pieces``: a word not in
    it splits into the longest pieces it has, its leading "▁" on its own if need be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(p, -1.0) for p in pieces]
    raw = Tokenizer(models.Unigram(vocab, unk_id=0))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_a_judge_never_reads_a_bare_space_piece_as_yes() -> None:
    """Llama 2's tokenizer writes " Yes" as "▁", "Y", "es": the space piece starts " No"
    as well, so a judge whose next token is most likely that space is undecided, never
    sure the claim is supported."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from guardrail.filters.grounding import LocalJudge

    tokenizer = _unigram_tokenizer(
        ["▁", "Y", "es", "▁yes", "▁No", "n", "o", "s", "e", "y", "N", "▁the", "▁sky"]
    )
    assert tokenizer.tokenize(" Yes") == ["▁", "Y", "es"]
    model = tiny_decoder(LlamaConfig, LlamaForCausalLM, tokenizer)
    # About to write " No": the space piece most likely, then "▁No"; "▁yes" unlikely.
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tokenizer.convert_tokens_to_ids("▁")] = 5.0
        head.bias[tokenizer.convert_tokens_to_ids("▁No")] = 3.0
        head.bias[tokenizer.convert_tokens_to_ids("▁yes")] = -5.0
    model.lm_head = head
    with ThreadPoolExecutor(1) as executor:
        judge = LocalJudge(model, tokenizer, executor, 2000, source="tiny-llama")
        p_yes = judge.judge_sync("The sky is blue.", ["The sky is green."])[0]
    assert p_yes < 0.01, p_yes


def test_a_judge_whose_tokenizer_cannot_write_yes_or_no_apart_is_refused() -> None:
    """A vocabulary with neither word (both come out as <unk>) leaves nothing to read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from guardrail.filters.grounding import LocalJudge

    tokenizer = _unigram_tokenizer(["▁", "▁the", "▁sky"])
    model = tiny_decoder(LlamaConfig, LlamaForCausalLM, tokenizer)
    with (
        ThreadPoolExecutor(1) as executor,
        pytest.raises(ConfigError, match="judge model judges/tiny"),
    ):
        LocalJudge(model, tokenizer, executor, 2000, source="judges/tiny")
