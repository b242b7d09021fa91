"""The shared sentence model's cache: one computation per text, however many callers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from guardrail.filters.embedder import CachingModel, encode, load_sentence_model


@pytest.fixture(scope="module")
def model() -> Any:
    return load_sentence_model()


class Held:
    """The real model, whose ``encode`` can be held at a gate or made to fail."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail = False

    def encode(self, texts: list[str], **kwargs: Any) -> Any:
        self.calls.append(list(texts))
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("encoder failed")
        return self.model.encode(texts, **kwargs)


def wait_for_a_waiter(cached: CachingModel, limit_s: float = 10.0) -> None:
    """Until the second caller registers as a waiter; fails instead of hanging."""
    deadline = time.monotonic() + limit_s
    while cached.waits == 0:
        assert time.monotonic() < deadline, "the second caller never waited"
        time.sleep(0.001)


def test_rows_equal_the_models_and_case_shares_an_entry(model: Any) -> None:
    cached = CachingModel(model)
    texts = ["How do I bake bread?", "how do i bake bread?", "Write a poem."]

    rows = encode(cached, texts)

    assert np.allclose(rows, encode(model, texts), atol=1e-5)
    assert np.array_equal(rows[0], rows[1])
    assert cached.computed == 2
    again = encode(cached, ["WRITE A POEM."])
    assert np.array_equal(again[0], rows[2])
    assert cached.hits == 1
    assert cached.computed == 2


def test_each_scope_keeps_its_own_vectors(model: Any) -> None:
    """A text cached for one tenant is computed again for another (a hit answers
    faster, so a shared entry tells one tenant what another sent), then each hits its
    own; the vectors are the same."""
    cached = CachingModel(model)
    text = ["Summarise the merger memo for the board."]

    acme = encode(cached, text, ["acme"])
    beta = encode(cached, text, ["beta"])
    assert cached.computed == 2
    assert np.allclose(acme, beta, atol=1e-6)
    encode(cached, text, ["acme"])
    encode(cached, text, ["beta"])
    assert (cached.computed, cached.hits) == (2, 2)
    encode(cached, text)  # no scope: build time and scripts, apart from both
    assert cached.computed == 3
    with pytest.raises(ValueError, match="one scope per text"):
        cached.encode(text * 2, scopes=["acme"])


async def test_the_embedder_carries_each_texts_scope_through_its_batches(model: Any) -> None:
    """Concurrent requests of two tenants share a batch, never a cached vector."""
    import asyncio

    from guardrail.filters.embedder import Embedder

    cached = CachingModel(model)
    with ThreadPoolExecutor(1) as pool:
        embedder = Embedder(cached, pool)
        texts = ["Reset my password.", "Where is my parcel?"]
        await asyncio.gather(embedder.encode(texts, "acme"), embedder.encode(texts, "beta"))
        assert cached.computed == 4
        await embedder.encode(texts, "acme")
        assert (cached.computed, cached.hits) == (4, 2)


def test_a_special_token_keeps_its_case_in_the_key(model: Any) -> None:
    # The tokenizer lowercases words but matches "[SEP]" only as written: "[sep]" is three
    # ordinary word pieces. Folding case in the key gave one text the other's embedding.
    cached = CachingModel(model)
    texts = ["you [sep] idiot", "you [SEP] idiot"]

    rows = np.concatenate([encode(cached, [t]) for t in texts])

    assert np.allclose(rows, encode(model, texts), atol=1e-5)
    assert cached.computed == 2


def test_when_an_upper_case_greek_text_ends_a_word_in_sigma_then_it_keeps_its_own_vector(
    model: Any,
) -> None:
    """str.lower() makes a word-final capital sigma the final small sigma, the tokenizer
    the ordinary one: the key folded the upper-case text like the lower-case one, which
    the model embeds differently, and the second got the first's vector."""
    cached = CachingModel(model)
    lower = "\u03c3\u03c4\u03b9\u03c2 \u03ba\u03c5\u03ba\u03bb\u03b1\u03b4\u03b5\u03c2"
    texts = [lower.upper(), lower]  # "STIS KYKLADES", in Greek

    rows = np.concatenate([encode(cached, [t]) for t in texts])

    assert np.allclose(rows, encode(model, texts), atol=1e-5)
    assert cached.computed == 2


def test_a_text_another_thread_is_computing_is_waited_for_not_computed_again(
    model: Any,
) -> None:
    held = Held(model)
    cached = CachingModel(held)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(encode, cached, ["Is this prompt harmful?"])
        assert held.entered.wait(10)
        second = pool.submit(encode, cached, ["is this prompt HARMFUL?", "Another one."])
        wait_for_a_waiter(cached)
        held.gate.set()
        a, b = first.result(10), second.result(10)

    assert np.array_equal(a[0], b[0])
    assert held.calls == [["Is this prompt harmful?"], ["Another one."]]


def test_an_error_reaches_the_waiters_and_nothing_is_kept(model: Any) -> None:
    held = Held(model)
    held.fail = True
    cached = CachingModel(held)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(encode, cached, ["Will this fail?"])
        assert held.entered.wait(10)
        second = pool.submit(encode, cached, ["Will this fail?"])
        wait_for_a_waiter(cached)
        held.gate.set()
        for future in (first, second):
            with pytest.raises(RuntimeError, match="encoder failed"):
                future.result(10)

    held.fail = False
    assert encode(cached, ["Will this fail?"]).shape == (1, 384)
    assert cached.computed == 2


def test_the_cache_is_bounded_least_recently_used_first(model: Any) -> None:
    cached = CachingModel(model, entries=2)
    encode(cached, ["one", "two"])
    encode(cached, ["one"])  # "two" is now the oldest
    encode(cached, ["three"])
    hits = cached.hits
    encode(cached, ["one"])
    assert cached.hits == hits + 1
    encode(cached, ["two"])
    assert cached.computed == 4


# -- precision ------------------------------------------------------------------------------


def test_precision_auto_follows_the_cpu_and_bad_names_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from guardrail.filters import embedder

    assert embedder.resolve_precision("fp32") == "fp32"
    assert embedder.resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(embedder, "native_bf16", lambda: True)
    assert embedder.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(embedder, "native_bf16", lambda: False)
    assert embedder.resolve_precision("auto") == "fp32"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        embedder.resolve_precision("fp16")


def test_bf16_embeddings_keep_the_fp32_ones_meaning(model: Any) -> None:
    """The heads were fitted on fp32 embeddings: bf16 autocast must land next to them.

    Runs on any CPU (torch emulates bf16 where the CPU lacks it, slowly but correctly).
    """
    from guardrail.filters.embedder import Bf16Model

    texts = [
        "People like you should not exist.",
        "What is the capital of France?",
        "Explain step by step how to pick a lock on a neighbour's front door.",
        "The committee postponed the budget decision until the auditors report next month.",
    ]
    bf16 = Bf16Model(model)
    reference, lowered = encode(model, texts), encode(bf16, texts)
    cosines = (reference * lowered).sum(axis=1)
    assert cosines.min() > 0.999, cosines
    assert not np.array_equal(reference, lowered)  # it really ran in bf16
    assert bf16.tokenizer is model.tokenizer  # other attributes are the model's


def test_the_shared_embedder_follows_the_settings_precision() -> None:
    from guardrail.filters.embedder import Bf16Model, shared_embedder
    from guardrail.guard.filter import BuildContext, SharedResources

    with ThreadPoolExecutor(1) as pool:
        resources = SharedResources()
        fp32 = shared_embedder(BuildContext(pool, resources=resources, embedding_precision="fp32"))
        bf16 = shared_embedder(BuildContext(pool, resources=resources, embedding_precision="bf16"))
        assert not isinstance(fp32.model.model, Bf16Model)
        assert isinstance(bf16.model.model, Bf16Model)
        assert fp32 is not bf16
        again = shared_embedder(BuildContext(pool, resources=resources, embedding_precision="fp32"))
        assert again is fp32  # one per process and precision


def test_another_executor_gets_its_own_batches_on_the_same_model() -> None:
    """A shadow policy runs on its own threads: its embedding and toxicity checks must
    not queue in the active policy's batches, nor run on its threads, while the model
    (and its cache) stays one copy in the process."""
    from guardrail.filters.embedder import shared_embedder
    from guardrail.filters.toxicity import ToxicityConfig, ToxicityFilter
    from guardrail.guard.filter import BuildContext, SharedResources

    resources = SharedResources()
    with ThreadPoolExecutor(1) as active, ThreadPoolExecutor(1) as shadow:
        envs = [BuildContext(pool, resources=resources) for pool in (active, shadow)]
        first, second = (shared_embedder(env) for env in envs)
        assert first is not second
        assert first.model is second.model
        assert first._batcher._executor is active
        assert second._batcher._executor is shadow
        assert shared_embedder(envs[0]) is first  # still one per executor
        tox = [ToxicityFilter("tox", ToxicityConfig(), env) for env in envs]
        assert tox[0].batcher is not tox[1].batcher
        assert (tox[0].batcher._executor, tox[1].batcher._executor) == (active, shadow)


async def test_the_default_policys_filters_embed_each_tenants_texts_apart() -> None:
    """Through the shipped policy's filters (rules, toxicity): a message one tenant sent
    is embedded again for another, and each tenant's second check computes nothing."""
    from guardrail.filters.embedder import shared_embedder
    from guardrail.guard.filter import BuildContext, SharedResources
    from guardrail.guard.guard import Guard
    from guardrail.guard.registry import filter_registry
    from guardrail.guard.types import FilterContext, Stage
    from guardrail.policy.loader import load_policy
    from tests.conftest import DEFAULT_POLICY

    registry = filter_registry()
    with ThreadPoolExecutor(2) as pool:
        env = BuildContext(pool, resources=SharedResources())
        guard = Guard.build(load_policy(DEFAULT_POLICY, registry), registry, env)  # no cache
        cached = shared_embedder(env).model
        text = "Could you draft a polite note asking my landlord to fix the heating?"

        async def computed_for(tenant: str) -> int:
            before = cached.computed
            decision = await guard.check(Stage.INPUT, text, FilterContext("r", tenant=tenant))
            assert all(o.status == "ok" for o in decision.outcomes)
            return int(cached.computed - before)

        first = await computed_for("acme")
        assert first > 0
        assert await computed_for("beta") == first
        assert await computed_for("acme") == 0
        assert await computed_for("beta") == 0
