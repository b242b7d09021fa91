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
