"""The groundedness probe: a logistic head on the embedded model's hidden states, read
over each claim after its sources and question, blended into the claim's support.

Everything here runs the real embedded SmolLM2 and the real sentence encoder, never a
stand-in: the features are checked against the model's own hidden states, and the
shipped probe through a whole hallucination filter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from guardrail.errors import ConfigError
from guardrail.filters.grounding import probe_pair
from guardrail.filters.hallucination import HallucinationConfig, HallucinationFilter
from guardrail.filters.probe import (
    CALIBRATED_KNEE,
    DEFAULT_AUP_PROBE,
    DEFAULT_GROUNDING_PROBE,
    PREFIX_TOKENS,
    KeptPrefixes,
    Probe,
    decoder_of,
    features_after,
    features_in_batches,
    hidden_features,
    signature,
    token_row,
)
from guardrail.guard.filter import BuildContext, SharedResources
from guardrail.guard.types import FilterContext, Message, Stage

SOURCE = "The Eiffel Tower in Paris was completed in 1889 as the entrance to the World's Fair."
QUESTION = "When was the Eiffel Tower finished?"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildContext]:
    with ThreadPoolExecutor(2) as pool:
        yield BuildContext(
            pool,
            cache_dir=tmp_path_factory.mktemp("cache"),
            base_dir=tmp_path_factory.mktemp("policy"),
            resources=SharedResources(),
        )


@pytest.fixture(scope="module")
def cut(loaded: tuple[Any, Any]) -> Any:
    """A copy of the embedded model cut after layer 18 (``decoder_of`` cuts what it is
    given, so never the session's shared model)."""
    model, _ = loaded
    return decoder_of(copy.deepcopy(model), [18])


def make_filter(env: BuildContext, probe: dict[str, Any] | None) -> HallucinationFilter:
    groundedness: dict[str, Any] = {"threshold": 0.4}
    if probe is not None:
        groundedness["probe"] = probe
    config = {"groundedness": groundedness, "citations": {"enabled": False}}
    config["cutoff"] = {"enabled": False}
    return HallucinationFilter("facts", msgspec.convert(config, HallucinationConfig), env)


def ctx(*messages: Message) -> FilterContext:
    return FilterContext("r1", stage=Stage.OUTPUT, messages=messages, context_documents=(SOURCE,))


async def support(flt: HallucinationFilter, answer: str, *messages: Message) -> float:
    found = {f.category: f.score for f in (await flt.check(answer, ctx(*messages))).findings}
    return float(found["groundedness"])


# -- the features ---------------------------------------------------------------------------


def test_the_prefix_is_read_but_only_the_claims_tokens_are_averaged(
    loaded: tuple[Any, Any], cut: Any
) -> None:
    """Layer 18's output as the whole model computes it, averaged over the claim's tokens
    alone; the prefix's tokens shape them (causal attention) but are not averaged, and a
    batch's padding changes nothing."""
    import torch

    model, tokenizer = loaded
    pairs = [
        probe_pair([SOURCE], QUESTION, "It was completed in 1889.", 2000),
        probe_pair(["Short."], "Why?", "A much longer claim that pads the other row.", 2000),
    ]
    batched = hidden_features(cut, tokenizer, [t for _, t in pairs], [18], [p for p, _ in pairs])
    for row, (prefix, text) in enumerate(pairs):
        start = len(tokenizer(prefix)["input_ids"])
        ids = tokenizer(prefix + text)["input_ids"]
        with torch.inference_mode():
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[18]
        expected = states[0, start:].mean(0).numpy()
        assert np.allclose(batched[row], expected, atol=1e-4)
        whole = states[0].mean(0).numpy()
        assert not np.allclose(batched[row], whole, atol=1e-2)  # the prefix is not averaged
    # A claim reads differently after another source: the prefix is really read.
    other = hidden_features(cut, tokenizer, [pairs[0][1]], [18], ["Source: Rome.\nAnswer:"])
    assert not np.allclose(other[0], batched[0], atol=1e-2)


def test_training_features_come_back_in_the_texts_order(loaded: tuple[Any, Any], cut: Any) -> None:
    """The training scripts batch texts by length; each row is still its own text's."""
    _, tokenizer = loaded
    claims = ["A long claim about the tower and the fair in Paris.", "Short.", "It was 1889."]
    prefixes = ["Source: x\nAnswer:", "Source: a longer source text\nAnswer:", "Answer:"]
    batched = features_in_batches(cut, tokenizer, claims, [18], prefixes=prefixes, batch=2)
    for i, claim in enumerate(claims):
        alone = hidden_features(cut, tokenizer, [claim], [18], [prefixes[i]])
        assert np.allclose(batched[i], alone[0], atol=1e-4)


def test_claims_after_one_prefix_reuse_its_run_and_get_the_same_features(
    loaded: tuple[Any, Any], cut: Any
) -> None:
    """The prefix run once and its keys and values reused (in batches of 8) gives each
    claim what reading prefix and claim whole gives; so does the fallback, taken when a
    claim's tokens merge with the prefix's last one."""
    _, tokenizer = loaded
    prefix, _ = probe_pair([SOURCE], QUESTION, "", 2000)
    claims = [f" Claim number {i} says the tower was finished in {1880 + i}." for i in range(9)]
    claims.append(" Short.")
    shared = features_after(cut, tokenizer, prefix, claims, [18])
    whole = hidden_features(cut, tokenizer, claims, [18], [prefix] * len(claims))
    assert shared.shape == whole.shape == (10, 576)
    assert np.allclose(shared, whole, atol=1e-4)
    merged = ["s are unclear.", " It was 1889."]  # "Answer" + "s" is one token
    shared = features_after(cut, tokenizer, "Source: x\nAnswer", merged, [18])
    whole = hidden_features(cut, tokenizer, merged, [18], ["Source: x\nAnswer"] * 2)
    assert np.allclose(shared, whole, atol=1e-4)


def test_a_kept_prefix_is_run_once_and_gives_the_same_features(
    loaded: tuple[Any, Any], cut: Any
) -> None:
    """A stream's windows: the first reads sources and claim in one pass and keeps the
    sources' keys and values; the next runs its claims' tokens only, and every claim gets
    what reading prefix and claim whole gives. Another tenant's text keeps its own."""
    _, tokenizer = loaded
    prefix, _ = probe_pair([SOURCE], QUESTION, "", 2000)
    claims = [" It was completed in 1889.", " It is blue.", " It stands in Paris."]
    head = token_row(tokenizer, claims[0], prefix)[1]
    widths: list[int] = []

    def count(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        widths.append(int(kwargs["input_ids"].shape[1]))

    kept = KeptPrefixes(64 << 20)
    handle = cut.register_forward_pre_hook(count, with_kwargs=True)
    try:
        first = features_after(cut, tokenizer, prefix, claims[:1], [18], kept=kept, scope="a")
        later = features_after(cut, tokenizer, prefix, claims[1:], [18], kept=kept, scope="a")
        again = features_after(cut, tokenizer, prefix, claims[:1], [18], kept=kept, scope="a")
    finally:
        handle.remove()
    whole = hidden_features(cut, tokenizer, claims, [18], [prefix] * 3)
    assert np.allclose(np.concatenate([first, later]), whole, atol=1e-4)
    assert np.allclose(again, first, atol=1e-4)  # the kept entry was not extended
    # Tokens per pass: prefix and claim, then the two claims (padded), then the claim.
    tails = [len(token_row(tokenizer, c, prefix)[0]) - head for c in claims]
    assert widths == [head + tails[0], max(tails[1:]), tails[0]]
    assert (kept.hits, kept.misses, len(kept)) == (2, 1, 1)
    assert 0 < kept.bytes <= 64 << 20
    other = features_after(cut, tokenizer, prefix, claims[:1], [18], kept=kept, scope="b")
    assert np.allclose(other, first, atol=1e-4)
    assert (kept.hits, kept.misses, len(kept)) == (2, 2, 2)


def test_kept_prefixes_stay_within_their_bytes(loaded: tuple[Any, Any], cut: Any) -> None:
    """The least recently used prefix goes when the next would pass the bound; a prefix
    larger than the bound alone is not kept, and its claims are scored all the same."""
    _, tokenizer = loaded
    prefixes = [probe_pair([SOURCE], f"{QUESTION} ({n})", "", 2000)[0] for n in range(3)]
    claim = [" It was completed in 1889."]
    sizing = KeptPrefixes(1 << 30)
    features_after(cut, tokenizer, prefixes[0], claim, [18], kept=sizing)
    one = sizing.bytes
    kept = KeptPrefixes(2 * one + one // 2)
    for prefix in prefixes:
        features_after(cut, tokenizer, prefix, claim, [18], kept=kept)
    assert len(kept) == 2
    assert kept.bytes <= kept.max_bytes
    features_after(cut, tokenizer, prefixes[0], claim, [18], kept=kept)
    assert kept.misses == 4  # the first prefix had gone
    small = KeptPrefixes(one - 1)
    scored = features_after(cut, tokenizer, prefixes[1], claim, [18], kept=small)
    assert len(small) == 0
    assert small.bytes == 0
    plain = hidden_features(cut, tokenizer, claim, [18], [prefixes[1]])
    assert np.allclose(scored, plain, atol=1e-4)


def test_a_prefix_too_long_loses_its_middle_never_the_claim(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    prefix = "Source: " + "many words of a long document " * 600 + "\nQuestion: Why?\nAnswer:"
    ids, start = token_row(tokenizer, " It was completed in 1889.", prefix)
    assert len(ids) == PREFIX_TOKENS + len(tokenizer(" It was completed in 1889.")["input_ids"])
    assert tokenizer.decode(ids[start:]) == " It was completed in 1889."
    assert tokenizer.decode(ids[:start]).startswith("Source: many words")
    assert tokenizer.decode(ids[:start]).endswith("\nQuestion: Why?\nAnswer:")
    short, at = token_row(tokenizer, " It was 1889.", "Source: x\nAnswer:")
    assert tokenizer.decode(short) == "Source: x\nAnswer: It was 1889."
    assert tokenizer.decode(short[at:]) == " It was 1889."


def test_the_probe_reads_at_most_max_chars_of_the_sources() -> None:
    prefix, text = probe_pair(["a" * 5000, "b" * 10], "q" * 3000, "claim", 2000)
    assert prefix == f"Source: {'a' * 2000}\nQuestion: {'q' * 1000}\nAnswer:"
    assert text == " claim"


# -- the files ------------------------------------------------------------------------------


def test_the_shipped_grounding_probe_fits_the_embedded_model_and_the_threshold(cut: Any) -> None:
    probe = Probe.load(DEFAULT_GROUNDING_PROBE)
    probe.check_model(cut, "the embedded model")
    assert probe.layers == (18,)
    assert probe.target == pytest.approx(0.4)  # the groundedness threshold, not the AUP 0.9
    assert 0.0 < probe.mix < 1.0
    # A probe file from before targets (the shipped AUP one) keeps the AUP threshold.
    assert Probe.load(DEFAULT_AUP_PROBE).target == CALIBRATED_KNEE


def test_a_target_outside_0_and_1_is_refused(tmp_path: Path, cut: Any) -> None:
    probe = Probe.load(DEFAULT_GROUNDING_PROBE)
    Probe(**{**probe.__dict__, "target": 1.0}).save(tmp_path / "bad.npz")
    with pytest.raises(ConfigError, match="knee and target in"):
        Probe.load(tmp_path / "bad.npz")


# -- through the hallucination filter ---------------------------------------------------------


async def test_the_shipped_probe_is_blended_into_each_claims_support(
    env: BuildContext, loaded: tuple[Any, Any], model_dir: Path
) -> None:
    """The filter's score is the calibrated blend of the head's support and the probe's,
    each computed on its own; the probe ranks the contradicted claim below the true one."""
    plain = make_filter(env, None)
    probed = make_filter(env, {"model": str(model_dir), "device": "cpu", "dtype": "fp32"})
    scorer = probed.scorer._probe  # type: ignore[union-attr]
    assert scorer is not None
    question = Message("user", QUESTION)
    scores = {}
    for answer in ("It was completed in 1889.", "It was completed in 1925."):
        head = await support(plain, answer, question)
        own = scorer.scores_sync([probe_pair([SOURCE], QUESTION, answer, 2000)])
        blended = await support(probed, answer, question)
        expected = float(scorer.probe.blend(np.array([head], np.float32), own)[0])
        assert blended == pytest.approx(expected, abs=1e-5)
        scores[answer] = (head, float(own[0]), blended)
    right, wrong = scores["It was completed in 1889."], scores["It was completed in 1925."]
    assert right[1] > wrong[1]  # the probe alone
    assert right[2] > 0.4 > wrong[2]  # the blend, across the threshold


async def test_the_sentences_of_one_answer_share_their_sources_run(
    env: BuildContext, model_dir: Path
) -> None:
    """A longer answer's sentences are probed together after one run of the sources
    (``scores_after``); each sentence's support is still its own blend."""
    plain = make_filter(env, None).scorer
    probed = make_filter(env, {"model": str(model_dir), "device": "cpu", "dtype": "fp32"}).scorer
    assert plain is not None
    assert probed is not None
    assert probed._probe is not None
    answer = "It was completed in 1889. It was the entrance to the World's Fair. It is blue."
    heads = await plain.score(answer, [SOURCE], QUESTION)
    blended = await probed.score(answer, [SOURCE], QUESTION)
    assert len(blended.claims) == 3
    claims = [answer[c.start : c.end] for c in heads.claims]
    own = probed._probe.scores_sync([probe_pair([SOURCE], QUESTION, c, 2000) for c in claims])
    expected = probed._probe.probe.blend(np.array([c.support for c in heads.claims]), own)
    assert [c.support for c in blended.claims] == pytest.approx(list(expected), abs=1e-5)


async def test_a_streams_later_windows_reuse_the_sources_kept_for_their_tenant(
    env: BuildContext, model_dir: Path
) -> None:
    """Through the filter: each window of a stream is a check of its own against the same
    sources and question; after the first, the kept prefix is reused (per tenant), and
    each window scores what a filter keeping nothing scores. ``prefix_cache_mb: 0``
    keeps nothing."""
    settings = {"model": str(model_dir), "device": "cpu", "dtype": "fp32"}
    keeping = make_filter(env, {**settings, "prefix_cache_mb": 96})
    plain = make_filter(env, {**settings, "prefix_cache_mb": 0})
    assert plain.scorer is not None
    assert plain.scorer.kept_prefixes is None
    assert keeping.scorer is not None
    kept = keeping.scorer.kept_prefixes
    assert kept is not None
    assert kept.max_bytes == 96 << 20
    question = Message("user", QUESTION)
    windows = ["It was completed in 1889.", "It was the entrance to the fair.", "It is blue."]

    def window_ctx(tenant: str) -> FilterContext:
        return FilterContext(
            "r1",
            stage=Stage.OUTPUT,
            messages=(question,),
            context_documents=(SOURCE,),
            tenant=tenant,
        )

    async def score(flt: HallucinationFilter, text: str, tenant: str) -> float:
        verdict = await flt.check(text, window_ctx(tenant))
        return float({f.category: f.score for f in verdict.findings}["groundedness"])

    hits, misses = kept.hits, kept.misses
    for window in windows:
        assert await score(keeping, window, "t1") == pytest.approx(
            await score(plain, window, "t1"), abs=1e-4
        )
    assert (kept.hits - hits, kept.misses - misses) == (2, 1)
    await score(keeping, windows[0], "t2")
    assert kept.misses - misses == 2


async def test_without_a_question_the_head_decides_alone(
    env: BuildContext, model_dir: Path
) -> None:
    """The probe was trained with the question known; a moderation request without a
    prompt (no user message) gets the head's score unchanged."""
    plain = make_filter(env, None)
    probed = make_filter(env, {"model": str(model_dir), "device": "cpu", "dtype": "fp32"})
    answer = "It was completed in 1925."
    assert await support(probed, answer) == pytest.approx(await support(plain, answer))


async def test_a_probe_file_of_its_own_decides_through_its_share(
    env: BuildContext, cut: Any, model_dir: Path
) -> None:
    """A probe sure that every claim is unsupported (intercept -40), with the whole share
    (mix 1), fails a claim copied from the source; a sure 'supported' one passes a
    contradiction. The filter reads the file the policy names, relative to the policy."""
    base = Probe.load(DEFAULT_GROUNDING_PROBE)
    width = base.coef.shape[0]
    for name, intercept in (("never.npz", -40.0), ("always.npz", 40.0)):
        fields = {**base.__dict__, "coef": np.zeros(width, np.float32), "mix": 1.0}
        Probe(**{**fields, "intercept": intercept}).save(env.base_dir / name)
    question = Message("user", QUESTION)
    settings = {"model": str(model_dir), "device": "cpu", "dtype": "fp32"}
    never = make_filter(env, {**settings, "weights": "never.npz"})
    always = make_filter(env, {**settings, "weights": "always.npz"})
    assert await support(never, SOURCE, question) < 0.01
    assert await support(always, "It was completed in 1925.", question) > 0.99


def test_a_probe_on_an_unprepared_embedded_model_says_how_to_prepare_it(
    env: BuildContext,
) -> None:
    with pytest.raises(ConfigError, match="not prepared: run 'guardrail model prepare'"):
        make_filter(env, {})


def test_a_probe_of_another_model_is_refused(env: BuildContext, cut: Any, model_dir: Path) -> None:
    base = Probe.load(DEFAULT_GROUNDING_PROBE)
    Probe(**{**base.__dict__, "signature": signature(cut) + 0.5}).save(env.base_dir / "x.npz")
    with pytest.raises(ConfigError, match="trained on another model"):
        make_filter(env, {"model": str(model_dir), "device": "cpu", "weights": "x.npz"})
