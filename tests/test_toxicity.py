"""The toxicity filter: real models, real batching, offline detoxify loading, fail closed."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from guardrail.errors import ConfigError, PolicyError
from guardrail.filters.batching import MicroBatcher
from guardrail.filters.toxicity import (
    DEFAULT_WEIGHTS,
    DetoxifyEngine,
    Scores,
    ToxicityConfig,
    ToxicityFilter,
    chunks,
    split_of,
)
from guardrail.filters.weights import file_stamp
from guardrail.guard.filter import BuildContext, SharedResources
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.types import Action, FilterContext, Stage
from guardrail.policy.loader import load_policy_text

CTX = FilterContext("test")


async def assert_acted_on(toxicity: ToxicityFilter, text: str) -> None:
    """The filter acts on ``text`` with a toxicity score over the default policy's 0.8."""
    verdict = await toxicity.check(text, CTX)
    assert verdict.action is not Action.ALLOW
    assert max(f.score for f in verdict.findings if f.category == "toxicity") >= 0.8


# -- the micro-batcher --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


async def test_concurrent_submits_share_batches_and_keep_their_own_results(
    pool: ThreadPoolExecutor,
) -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * i for i in items]

    batcher = MicroBatcher(square, pool, max_batch=8, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(16)))
    assert results == [i * i for i in range(16)]
    assert len(calls) < 16
    assert max(len(c) for c in calls) <= 8
    assert batcher.stats.items == 16


async def test_a_lone_item_is_scored_after_max_wait(pool: ThreadPoolExecutor) -> None:
    batcher = MicroBatcher(lambda xs: [x + 1 for x in xs], pool, max_batch=32, max_wait_s=0.001)
    assert await batcher.submit(1) == 2


async def test_the_batch_function_runs_off_the_event_loop(pool: ThreadPoolExecutor) -> None:
    loop_thread = threading.get_ident()
    batcher = MicroBatcher(lambda xs: [threading.get_ident() for _ in xs], pool)
    assert await batcher.submit(0) != loop_thread


async def test_when_the_batch_function_raises_every_caller_gets_the_error(
    pool: ThreadPoolExecutor,
) -> None:
    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("model crashed")

    batcher = MicroBatcher(broken, pool, max_batch=4, max_wait_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


class _Abort(BaseException):
    """An exception outside ``Exception``, as KeyboardInterrupt and SystemExit are."""


@pytest.mark.parametrize("raised", [StopIteration, _Abort])
async def test_when_the_batch_function_raises_stopiteration_then_callers_get_an_error(
    pool: ThreadPoolExecutor, raised: type[BaseException]
) -> None:
    # asyncio cannot put StopIteration into a future: the batch never ended, and every
    # later caller on the loop waited behind it for ever.
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise raised()
        return [i * 10 for i in items]

    batcher = MicroBatcher(fn, pool, max_batch=4, max_wait_s=0.001)
    # The wait_for only turns a hang into a failure; nothing here is timed.
    with pytest.raises(RuntimeError, match=raised.__name__):
        await asyncio.wait_for(batcher.submit(1), 30)
    assert await asyncio.wait_for(batcher.submit(2), 30) == 20


async def test_a_wrong_number_of_results_is_an_error_for_the_batch(
    pool: ThreadPoolExecutor,
) -> None:
    batcher = MicroBatcher(lambda xs: [0], pool, max_batch=4, max_wait_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def _identity(items: list[int]) -> list[int]:
    return list(items)


async def test_a_caller_that_gives_up_does_not_disturb_the_others(
    pool: ThreadPoolExecutor,
) -> None:
    batcher = MicroBatcher(_identity, pool, max_batch=4, max_wait_s=0.05)
    quitter = asyncio.ensure_future(batcher.submit(-1))
    stayers = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    quitter.cancel()
    assert await asyncio.gather(*stayers) == [0, 1, 2]


def test_the_split_is_stable_and_roughly_80_10_10() -> None:
    splits = [split_of(f"davidson:{i}") for i in range(10_000)]
    assert split_of("davidson:0") == split_of("davidson:0")
    assert 0.08 < splits.count("test") / len(splits) < 0.12
    assert 0.08 < splits.count("dev") / len(splits) < 0.12


def test_long_texts_are_cut_at_whitespace_without_losing_words() -> None:
    text = " ".join(f"word{i}" for i in range(500))
    pieces = chunks(text, 200)
    assert all(len(p) <= 200 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_texts_with_line_breaks_only_are_cut_at_whitespace_not_inside_words() -> None:
    # Only spaces counted as cut points, so text split by line breaks was cut mid-word.
    text = "\n".join(f"word{i:03}" for i in range(400))
    pieces = chunks(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert "\n".join(pieces).split() == text.split()


def test_sentences_end_after_a_run_of_punctuation_or_at_a_line_break() -> None:
    # The end pattern starts only where a run of "." or of whitespace starts (searched
    # from every character of the run, 80,000 dots took a minute on the event loop).
    from guardrail.filters.toxicity import sentences

    assert sentences("Wait... what?! No.  \n\n Yes") == ["Wait...", "what?!", "No.", "Yes"]
    assert sentences("a...b. c") == ["a...b.", "c"]
    assert sentences('He said "go." Then   \t left') == ['He said "go."', "Then   \t left"]
    assert sentences("." * 5_000 + "x") == ["." * 5_000 + "x"]
    assert sentences("a" + " " * 5_000 + "b") == ["a" + " " * 5_000 + "b"]


# -- config validation --------------------------------------------------------------------


def _policy(config: str) -> str:
    return (
        f"name: t\nversion: '1'\nfilters:\n  - id: tox\n    type: toxicity\n    config:\n{config}"
    )


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        (
            "      categories:\n        hate: {threshold: 0.5}\n",
            "filters[0].config.categories.hate",
            "unknown category 'hate'",
        ),
        (
            "      categories:\n        threat: {threshold: 0.5}\n",
            "filters[0].config.categories.threat",
            "the embedding engine does not score 'threat'",
        ),
        (
            "      engine: detoxify\n      detoxify: {checkpoint: x.ckpt}\n",
            "filters[0].config.detoxify.config_dir",
            "a checkpoint needs config_dir",
        ),
        (
            "      categories:\n        toxicity: {threshold: 1.5}\n",
            "filters[0].config.categories.toxicity.threshold",
            "",
        ),
        ("      max_batch: 0\n", "filters[0].config.max_batch", ""),
    ],
)
def test_a_bad_config_is_reported_at_its_path(config: str, key: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(_policy(config), "p.yaml", filter_registry())
    problems = raised.value.problems
    assert any(p.key == key and message in p.message for p in problems), problems


def test_detoxify_without_files_is_refused_offline(pool: ThreadPoolExecutor) -> None:
    config = ToxicityConfig(engine="detoxify")
    with pytest.raises(ConfigError, match="allow_downloads"):
        ToxicityFilter("tox", config, BuildContext(pool))


# -- the embedding engine on the real model -----------------------------------------------


@pytest.fixture(scope="session")
def shared() -> Iterator[tuple[ThreadPoolExecutor, SharedResources]]:
    """One executor and one resource store, so the model loads once per test session."""
    with ThreadPoolExecutor(2) as executor:
        yield executor, SharedResources()


@pytest.fixture
def toxicity(shared: tuple[ThreadPoolExecutor, SharedResources]) -> ToxicityFilter:
    executor, resources = shared
    config = ToxicityConfig(max_wait_ms=20)
    return ToxicityFilter("tox", config, BuildContext(executor, resources=resources))


@pytest.mark.slow
@pytest.mark.parametrize(
    "text", ["People like you should not exist.", "People like you have no place on this earth."]
)
async def test_implicit_hate_without_swear_words_is_acted_on(
    toxicity: ToxicityFilter, text: str
) -> None:
    # Missed (0.39) until the heads were retrained with hand-written implicit hate; the
    # default policy's threshold is 0.8, so check that margin too.
    await assert_acted_on(toxicity, text)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "What is the boiling point of water at sea level?",
        "Write a short story about a dragon who learns to bake bread.",
        "Insulting people for their religion is wrong, and I will always say so.",
        "I would never wish anything bad on you.",
    ],
)
async def test_neutral_counter_speech_and_negated_texts_are_allowed(
    toxicity: ToxicityFilter, text: str
) -> None:
    assert (await toxicity.check(text, CTX)).action is Action.ALLOW


_FILLER = "The weather report said it would be mild and sunny for most of the week ahead. "


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        _FILLER + "People like you should not exist.",
        _FILLER * 8 + "People like you should not exist.",
        _FILLER * 20 + "People like you should not exist. " + _FILLER * 20,
        "People like you should not exist.\n" + _FILLER * 30,
        # 129 sentences: past 128, runs of sentences were scored (0.21, allowed).
        _FILLER * 64 + "People like you should not exist. " + _FILLER * 64,
        _FILLER * 300 + "People like you should not exist. " + _FILLER * 300,
    ],
)
async def test_a_hateful_sentence_among_neutral_ones_is_still_acted_on(
    toxicity: ToxicityFilter, text: str
) -> None:
    # Mean-pooled embeddings dilute one sentence: 0.89 alone, 0.22 after one neutral
    # sentence and 0.04 at the end of a 900-character piece, so it went unseen.
    await assert_acted_on(toxicity, text)


@pytest.mark.slow
async def test_every_category_score_is_reported_and_allow_findings_keep_it_allowed(
    toxicity: ToxicityFilter,
) -> None:
    verdict = await toxicity.check("Have a lovely day.", CTX)
    assert verdict.action is Action.ALLOW
    assert {f.category for f in verdict.findings} == {"toxicity", "identity_attack", "obscene"}
    assert all(f.action is Action.ALLOW and 0.0 <= f.score < 0.5 for f in verdict.findings)


EVALS = Path(__file__).resolve().parent.parent / "evals"


@pytest.fixture
def default_toxicity(shared: tuple[ThreadPoolExecutor, SharedResources]) -> ToxicityFilter:
    """The toxicity filter as the default policy configures it (thresholds, actions)."""
    executor, resources = shared
    policy = yaml.safe_load((EVALS.parent / "policies" / "default.yaml").read_text())
    (config,) = (f["config"] for f in policy["filters"] if f["type"] == "toxicity")
    return ToxicityFilter(
        "tox",
        msgspec.convert(config, ToxicityConfig),
        BuildContext(executor, resources=resources),
    )


async def _actions(toxicity: ToxicityFilter, name: str) -> dict[str, list[str]]:
    """The texts of ``evals/<name>`` by the action the filter takes on each."""
    texts = [json.loads(line)["text"] for line in (EVALS / name).read_text().splitlines()]
    verdicts = await asyncio.gather(*(toxicity.check(t, CTX) for t in texts))
    out: dict[str, list[str]] = {}
    for text, verdict in zip(texts, verdicts, strict=True):
        out.setdefault(verdict.action.value, []).append(text)
    return out


@pytest.mark.slow
async def test_ordinary_sentences_about_any_group_are_not_blocked_and_rarely_flagged(
    default_toxicity: ToxicityFilter,
) -> None:
    # 1,926 held-out frames ("I was born Jewish.", "Do Mexicans pay taxes?") filled with
    # every term of the group lexicon (scripts/make_toxicity_identity.py; never trained
    # on). The heads trained without identity sentences blocked 83 of them as identity
    # attacks and flagged 119 more ("I am gay." scored 1.00); retrained: none, 13.
    acted = await _actions(default_toxicity, "toxicity-identity-benign.jsonl")
    assert acted.get("block", []) == []
    assert len(acted.get("flag", [])) <= 25, acted.get("flag")


@pytest.mark.slow
async def test_attacks_on_any_group_in_held_out_frames_are_still_blocked(
    default_toxicity: ToxicityFilter,
) -> None:
    # 1,581 held-out hateful frames x groups: 1,098 blocked (563 by the heads trained
    # without identity sentences); the bound leaves a margin for library versions.
    acted = await _actions(default_toxicity, "toxicity-identity-hateful.jsonl")
    assert len(acted.get("block", [])) >= 1000, acted.get("allow")


@pytest.mark.slow
async def test_concurrent_checks_are_batched_and_equal_one_by_one(
    toxicity: ToxicityFilter,
) -> None:
    texts = [f"Sentence number {i}: you are {'awful' if i % 2 else 'kind'}." for i in range(16)]
    one_by_one = [await toxicity.scores(t) for t in texts]
    before = toxicity.batcher.stats.batches
    together = await asyncio.gather(*(toxicity.scores(t) for t in texts))
    assert toxicity.batcher.stats.batches - before < 16
    for a, b in zip(one_by_one, together, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow
def test_filters_of_a_reloaded_policy_share_the_model(
    shared: tuple[ThreadPoolExecutor, SharedResources], toxicity: ToxicityFilter
) -> None:
    executor, resources = shared
    again = ToxicityFilter(
        "tox2", ToxicityConfig(max_wait_ms=20), BuildContext(executor, resources=resources)
    )
    assert again.batcher is toxicity.batcher


class _BrokenEngine:
    categories = ("toxicity", "identity_attack", "obscene")

    def score(self, texts: list[str], scopes: object = None) -> list[Scores]:
        raise RuntimeError("out of memory")


async def test_when_the_model_fails_the_guard_blocks(pool: ThreadPoolExecutor) -> None:
    from guardrail.filters.embedder import resolve_precision

    resources = SharedResources()
    precision = resolve_precision(BuildContext(pool).embedding_precision)
    resources.get(
        ("toxicity-embedding", str(DEFAULT_WEIGHTS.resolve()), precision),
        _BrokenEngine,
        version=file_stamp(DEFAULT_WEIGHTS),
    )
    policy = load_policy_text(_policy("      max_wait_ms: 1\n"), "p.yaml", filter_registry())
    guard = Guard.build(policy, filter_registry(), BuildContext(pool, resources=resources))
    decisions = await asyncio.gather(
        *(guard.check(Stage.INPUT, f"text {i}", FilterContext(str(i))) for i in range(4))
    )
    assert all(d.action is Action.BLOCK for d in decisions)
    assert all(d.outcomes[0].status == "error" for d in decisions)


class _NanOnSomePiecesEngine:
    """Scores a piece NaN when it says 'garbled', else a harmless 0.1."""

    categories = ("toxicity", "identity_attack", "obscene")

    def score(self, texts: list[str], scopes: object = None) -> list[Scores]:
        return [
            {c: float("nan") if "garbled" in t else 0.1 for c in self.categories} for t in texts
        ]


async def test_a_nan_score_in_any_piece_of_a_long_text_fails_closed(
    pool: ThreadPoolExecutor,
) -> None:
    # max() over the pieces skipped a NaN that came after a number, so a long text whose
    # later piece scored NaN was allowed, while the same NaN in a short text blocked.
    from guardrail.filters.embedder import resolve_precision

    resources = SharedResources()
    precision = resolve_precision(BuildContext(pool).embedding_precision)
    resources.get(
        ("toxicity-embedding", str(DEFAULT_WEIGHTS.resolve()), precision),
        _NanOnSomePiecesEngine,
        version=file_stamp(DEFAULT_WEIGHTS),
    )
    policy = load_policy_text(
        _policy("      max_wait_ms: 1\n      chunk_chars: 100\n"), "p.yaml", filter_registry()
    )
    guard = Guard.build(policy, filter_registry(), BuildContext(pool, resources=resources))
    short = await guard.check(Stage.INPUT, "garbled", FilterContext("a"))
    long = await guard.check(Stage.INPUT, "fine words " * 20 + "garbled", FilterContext("b"))
    assert short.action is Action.BLOCK
    assert short.outcomes[0].status == "error"
    assert long.action is Action.BLOCK
    assert long.outcomes[0].status == "error"
    fine = await guard.check(Stage.INPUT, "fine words", FilterContext("c"))
    assert fine.outcomes[0].status == "ok"  # the engine itself ran: the NaN failed closed


# -- detoxify, offline, on a tiny checkpoint built here --------------------------------------

CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """A BERT with 2 layers of width 32, random weights, saved like a detoxify release."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("detoxify")
    config_dir = folder / "bert-config"
    config_dir.mkdir()
    words = [
        *[
            "you",
            "are",
            "a",
            "kind",
            "nice",
            "awful",
            "person",
            "people",
            "like",
            "should",
            "not",
            "exist",
            "the",
        ]
    ]
    vocab = config_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.save_pretrained(config_dir)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(CLASSES),
    )
    config.save_pretrained(config_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    checkpoint = folder / "tiny.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": "bert-base-uncased",  # what detoxify asks the hub for
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": len(CLASSES),
                    }
                },
                "dataset": {"args": {"classes": CLASSES}},
            },
            "state_dict": model.state_dict(),
        },
        checkpoint,
    )
    return checkpoint, config_dir, (model, tokenizer)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_a_detoxify_checkpoint_loads_offline_and_scores_like_the_model(
    tiny_detoxify: tuple[Path, Path, Any],
) -> None:
    import torch

    checkpoint, config_dir, (model, tokenizer) = tiny_detoxify
    engine = DetoxifyEngine.from_files(checkpoint, config_dir)
    assert engine.categories == (
        "toxicity",
        "severe_toxicity",
        "obscene",
        "threat",
        "insult",
        "identity_attack",
    )
    texts = ["you are a kind person", "people like you should not exist"]
    scores = engine.score(texts)
    with torch.inference_mode():
        expected = torch.sigmoid(model(**tokenizer(texts, return_tensors="pt", padding=True))[0])
    for row, want in zip(scores, expected.tolist(), strict=True):
        assert list(row.values()) == pytest.approx(want, abs=1e-5)


@pytest.mark.usefixtures("no_network")
async def test_a_policy_with_the_detoxify_engine_builds_and_checks_offline(
    tiny_detoxify: tuple[Path, Path, Any], pool: ThreadPoolExecutor
) -> None:
    checkpoint, config_dir, _ = tiny_detoxify
    config = (
        "      engine: detoxify\n"
        f"      detoxify: {{checkpoint: {checkpoint.name}, config_dir: {config_dir.name}}}\n"
        "      categories:\n        threat: {threshold: 0.0, action: block}\n"
    )
    registry = filter_registry()
    policy = load_policy_text(_policy(config), "p.yaml", registry)
    guard = Guard.build(policy, registry, BuildContext(pool, base_dir=checkpoint.parent))
    decision = await guard.check(Stage.INPUT, "you are awful", CTX)
    assert decision.action is Action.BLOCK
    assert {f.category for f in decision.findings} == {
        "toxicity",
        "severe_toxicity",
        "obscene",
        "threat",
        "insult",
        "identity_attack",
    }


class _NotATensor:
    pass


def test_a_checkpoint_with_arbitrary_objects_needs_trust(
    tiny_detoxify: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    import torch

    checkpoint, config_dir, _ = tiny_detoxify
    loaded = torch.load(checkpoint, weights_only=True)
    loaded["extra"] = _NotATensor()
    risky = tmp_path / "risky.ckpt"
    torch.save(loaded, risky)
    with pytest.raises(ConfigError, match="trust_checkpoint"):
        DetoxifyEngine.from_files(risky, config_dir)
    assert DetoxifyEngine.from_files(risky, config_dir, trust=True).categories


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_a_detoxify_device_this_machine_lacks_is_named_and_never_blamed_on_the_file(
    tiny_detoxify: tuple[Path, Path, Any], device: str
) -> None:
    """torch.load's RuntimeError for the device read as an untrusted pickle, and
    trust_checkpoint: true, the fix it suggested, would load arbitrary objects."""
    checkpoint, config_dir, _ = tiny_detoxify
    with pytest.raises(ConfigError, match=f"device {device!r}") as raised:
        DetoxifyEngine.from_files(checkpoint, config_dir, device=device)
    assert "trust_checkpoint" not in str(raised.value)


def test_a_truncated_detoxify_checkpoint_cannot_be_read_and_trust_is_no_answer(
    tiny_detoxify: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    checkpoint, config_dir, _ = tiny_detoxify
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot read detoxify checkpoint") as raised:
        DetoxifyEngine.from_files(truncated, config_dir)
    assert "trust_checkpoint" not in str(raised.value)


@pytest.mark.usefixtures("no_network")
def test_detoxify_scores_every_window_of_a_text_longer_than_it_reads(
    tiny_detoxify: tuple[Path, Path, Any],
) -> None:
    """The tokenizer's truncation dropped whatever came after the model's positions
    (512 tokens for detoxify's BERT): the tail of a long piece never counted."""
    import torch

    from guardrail.filters.toxicity import token_counter, token_windows

    checkpoint, config_dir, (model, tokenizer) = tiny_detoxify
    engine = DetoxifyEngine.from_files(checkpoint, config_dir)
    # The tiny BERT has 64 positions and its tokenizer names no model_max_length.
    assert engine._limit == 62
    count = token_counter(tokenizer)
    text = "the " * 150 + "people like you should not exist"
    windows = token_windows(text, count, 62)
    assert len(windows) == 3
    assert all(n <= 62 for n in count(windows))
    assert windows[-1].endswith("people like you should not exist")
    with torch.inference_mode():
        each = torch.sigmoid(model(**tokenizer(windows, return_tensors="pt", padding=True))[0])
    [scores] = engine.score([text])
    assert list(scores.values()) == pytest.approx(each.max(dim=0).values.tolist(), abs=1e-5)
    # Texts that fit are scored as before, beside the long one, in one call.
    short = engine.score(["you are a kind person", text])
    assert short[1] == pytest.approx(scores, abs=1e-5)


def test_a_roberta_detoxify_model_reads_its_positions_less_the_padding_offset(
    tiny_detoxify: tuple[Path, Path, Any],
) -> None:
    # RoBERTa's position ids start after its padding id: 66 positions read 64 tokens
    # with <s> and </s>, and a window of 64 tokens besides would index past them.
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    _, _, (_, tokenizer) = tiny_detoxify
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
        num_labels=len(CLASSES),
    )
    torch.manual_seed(0)
    engine = DetoxifyEngine(RobertaForSequenceClassification(config), tokenizer, CLASSES, "cpu")
    assert engine._limit == 62
    [scores] = engine.score(["the " * 200 + "people like you should not exist"])
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_the_tokens_a_model_reads() -> None:
    from guardrail.filters.toxicity import token_limit

    class Tokenizer:
        def __init__(self, most: int) -> None:
            self.model_max_length = most

        def num_special_tokens_to_add(self, pair: bool = False) -> int:
            return 2

    assert token_limit(Tokenizer(512), 512) == 510  # bert-base-uncased
    assert token_limit(Tokenizer(512), None) == 510
    assert token_limit(Tokenizer(int(1e30)), 64) == 62  # no model_max_length: the positions
    assert token_limit(Tokenizer(256), 512) == 254


def test_every_sentence_is_a_piece_of_its_own_however_many() -> None:
    """Past 128 sentences, runs of consecutive sentences were scored instead of each
    sentence, and one hateful sentence among 128 neutral ones was diluted (0.21) again."""
    from guardrail.filters.toxicity import pieces, sentences

    many = " ".join(f"Sentence number {i} is here." for i in range(5_000))
    scored = pieces(many, 1000)
    assert set(sentences(many)) <= set(scored)
    # The work: the chunks and the sentences, nothing more (duplicates once).
    assert len(scored) == len(chunks(many, 1000)) + 5_000
    few = "Fine weather today. People like you should not exist. See you tomorrow."
    assert "People like you should not exist." in pieces(few, 1000)


class _SlowCountingEngine:
    """Scores every text 0.1, a millisecond each, and counts them."""

    categories = ("toxicity", "identity_attack", "obscene")

    def __init__(self) -> None:
        self.scored = 0

    def score(self, texts: list[str], scopes: object = None) -> list[Scores]:
        import time

        time.sleep(0.001 * len(texts))
        self.scored += len(texts)
        return [dict.fromkeys(self.categories, 0.1) for _ in texts]


async def test_a_text_of_many_sentences_is_handed_over_a_few_batches_at_a_time(
    pool: ThreadPoolExecutor,
) -> None:
    # Every sentence is its own piece now: all handed to the micro-batcher at once, a
    # body of 100,000 sentences held as many waiting tasks, queued ahead of everyone.
    from guardrail.filters.embedder import resolve_precision

    resources = SharedResources()
    precision = resolve_precision(BuildContext(pool).embedding_precision)
    engine = resources.get(
        ("toxicity-embedding", str(DEFAULT_WEIGHTS.resolve()), precision),
        _SlowCountingEngine,
        version=file_stamp(DEFAULT_WEIGHTS),
    )
    filt = ToxicityFilter(
        "tox", ToxicityConfig(max_wait_ms=1, max_batch=8), BuildContext(pool, resources=resources)
    )
    text = " ".join(f"Sentence {i}." for i in range(5_000))
    task = asyncio.ensure_future(filt.scores(text))
    # Until the pieces reach the batcher (splitting 5,000 sentences takes longer on a
    # loaded machine than a fixed sleep allowed), then never more than a few batches.
    pending = 0
    for _ in range(2_000):
        await asyncio.sleep(0.005)
        pending = sum(len(state.pending) for state in filt.batcher._loops.values())
        if pending or task.done():
            break
    assert 0 < pending <= 4 * 8
    task.cancel()  # what a filter timeout does
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    given_up = engine.scored
    await asyncio.sleep(0.1)
    assert engine.scored == given_up < 1_000  # nothing more is scored for it


# -- URLs -----------------------------------------------------------------------------------


def test_a_urls_words_are_a_piece_of_their_own_and_the_text_keeps_its_url_folded() -> None:
    """clean_text folds a URL into the word URL (as in training); the URL's words were
    scored nowhere, so abuse written as a URL was erased."""
    from guardrail.filters.toxicity import clean_text, pieces, url_words

    assert url_words("https://You.are.a.worthless.piece.of.shit") == [
        "You are a worthless piece of shit"
    ]
    assert url_words("http://People-like-you-should-not-exist.") == [
        "People like you should not exist"
    ]
    assert url_words("https://example.com/a_b/c%20d?q=1#top") == [
        "example com a b c d q 1 top",
        "a b c d q 1 top",
    ]
    text = "Read https://example.com/weather/forecast today"
    assert clean_text(text) == "Read URL today"  # what the trained heads read, unchanged
    assert pieces(text, 1000) == [text, "example com weather forecast", "weather forecast"]
    assert pieces("no link here", 1000) == ["no link here"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "https://You.are.a.worthless.fucking.piece.of.shit",
        "http://People-like-you-should-not-exist.",
        "Look at this: https://example.com/people-like-you-should-not-exist today.",
    ],
)
async def test_abuse_written_as_a_url_is_acted_on(toxicity: ToxicityFilter, text: str) -> None:
    await assert_acted_on(toxicity, text)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "See https://docs.python.org/3/library/re.html for the details.",
        "The recipe is at https://www.example.com/recipes/banana-bread?servings=4 if you want it.",
        "Watch https://www.youtube.com/watch?v=dQw4w9WgXcQ and tell me what you think.",
        "Our docs moved to http://blog.example.net/posts/42. Update your bookmarks.",
    ],
)
async def test_ordinary_urls_stay_allowed(toxicity: ToxicityFilter, text: str) -> None:
    assert (await toxicity.check(text, CTX)).action is Action.ALLOW


# -- texts longer than the model reads --------------------------------------------------------


def _words(texts: list[str]) -> list[int]:
    """A token counter for tests: a token per "-" and per other run of letters."""
    return [len(re.findall(r"-|[^\s-]+", t)) for t in texts]


def test_token_windows_fit_the_limit_and_keep_every_word_in_order() -> None:
    from guardrail.filters.toxicity import token_windows

    text = " ".join(f"w{i}" for i in range(1_000))
    windows = token_windows(text, _words, 64)
    assert all(n <= 64 for n in _words(windows))
    assert " ".join(windows).split() == text.split()
    assert token_windows("short text", _words, 64) == ["short text"]
    # A word longer than the limit alone (a run of dashes) is cut inside.
    long = "-" * 300 + " people like you should not exist"
    windows = token_windows(long, _words, 64)
    assert all(n <= 64 for n in _words(windows))
    assert "".join(windows).replace(" ", "") == long.replace(" ", "")
    assert windows[-1].endswith("people like you should not exist")


def test_windows_are_packed_again_when_words_count_more_together() -> None:
    # Byte-level BPE counts a word differently after a space: the windows are counted
    # whole and packed tighter until each fits.
    from guardrail.filters.toxicity import token_windows

    def bpe_like(texts: list[str]) -> list[int]:
        return [2 * len(t.split()) - 1 if " " in t else len(t.split()) for t in texts]

    text = " ".join(f"w{i}" for i in range(500))
    windows = token_windows(text, bpe_like, 50)
    assert all(n <= 50 for n in bpe_like(windows))
    assert " ".join(windows).split() == text.split()


@pytest.mark.slow
async def test_a_hateful_sentence_past_the_encoders_token_limit_is_acted_on(
    toxicity: ToxicityFilter,
) -> None:
    """all-MiniLM-L6-v2 reads 256 tokens: after 300 tokens of padding in one piece, the
    sentence had no effect on the embedding at all (0.27, allowed; alone 0.89)."""
    from guardrail.filters.toxicity import pieces

    text = "- " * 300 + "people like you should not exist"
    assert len(pieces(text, 1000)) == 1  # one piece by characters, 308 tokens
    await assert_acted_on(toxicity, text)
    benign = await toxicity.check("- " * 300 + "people like you should enjoy lunch", CTX)
    assert benign.action is Action.ALLOW


@pytest.mark.slow
def test_the_embedding_engines_windows_fit_the_encoder() -> None:
    from guardrail.filters.embedder import load_sentence_model
    from guardrail.filters.toxicity import FeatureExtractor, token_windows

    extractor = FeatureExtractor.load(load_sentence_model("fp32"))
    assert extractor.token_limit == 254  # max_seq_length 256, less [CLS] and [SEP]
    text = "Cette phrase est en français, n'est-ce pas? " * 40 + "中文字符" * 100
    windows = token_windows(text, extractor.count_tokens, extractor.token_limit)
    assert len(windows) > 1
    assert all(n <= 254 for n in extractor.count_tokens(windows))
    assert "".join(windows).replace(" ", "") == text.replace(" ", "")


# -- mentions -------------------------------------------------------------------------------


def test_a_handle_of_several_words_is_a_piece_of_its_own() -> None:
    """clean_text folds every @mention into @user (as in training): abuse written as a
    handle was erased as a URL's was."""
    from guardrail.filters.toxicity import clean_text, mention_words, pieces

    assert mention_words("@YouWorthlessPieceOfShit") == "You Worthless Piece Of Shit"
    assert mention_words("@you_are_trash99") == "you are trash"
    assert mention_words("@alice") is None  # one word is a name: not scored as a word
    text = "thanks @john_smith, mail jane@big_corp.com"
    assert clean_text(text) == "thanks @user, mail jane@user.com"
    assert pieces(text, 1000) == [text, "john smith"]  # not the address's host


@pytest.mark.slow
async def test_abuse_written_as_a_handle_is_acted_on(toxicity: ToxicityFilter) -> None:
    verdict = await toxicity.check("@YouWorthlessFuckingPieceOfShit", CTX)
    assert verdict.action is not Action.ALLOW
    assert (await toxicity.check("Thanks @JaneDoe_42 for the review!", CTX)).action is (
        Action.ALLOW
    )
