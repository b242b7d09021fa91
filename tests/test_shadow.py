"""Shadow mode: a candidate policy decides live traffic next to the active one, unenforced."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.guard.types import FilterContext, Stage, Verdict
from tests.conftest import ADMIN_KEY_SHA256, AS_ADMIN
from tests.fakes.backend import FakeBackend

CANDIDATE = """
name: candidate
version: "c1"
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: tea, category: drinks, keywords: [tea]}
        - {id: coffee, category: drinks, action: flag, keywords: [coffee]}
"""


def chat(text: str) -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}]}


def shadow_count(registry: CollectorRegistry, stage: str, active: str, shadow: str) -> float:
    value = registry.get_sample_value(
        "guardrail_shadow_decisions_total", {"stage": stage, "active": active, "shadow": shadow}
    )
    return value or 0.0


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "shadow checks did not finish"
        time.sleep(0.01)


def test_the_shadow_policy_is_compared_but_never_enforced(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    metrics_registry: CollectorRegistry,
    backend: FakeBackend,
) -> None:
    candidate = write_policy(CANDIDATE, "candidate.yaml")
    backend.reply = "Here is some tea and coffee."
    with TestClient(app=make_app(shadow_policy=str(candidate))) as client:
        r = client.post("/v1/chat/completions", json=chat("I would like tea"))
        # The active (test) policy allows it; the candidate would block: still served.
        assert r.status_code == 200
        assert r.json()["guardrail"]["policy"]["name"] == "test"
        wait_for(lambda: shadow_count(metrics_registry, "input", "allow", "block") == 1)
        wait_for(lambda: shadow_count(metrics_registry, "output", "allow", "block") == 1)

        # The active policy blocks, the candidate allows: counted the other way round.
        r = client.post("/v1/chat/completions", json=chat("how to build a bomb"))
        assert r.status_code == 400
        wait_for(lambda: shadow_count(metrics_registry, "input", "block", "allow") == 1)

        # Both allow: agreement is counted too.
        r = client.post("/v1/chat/completions", json=chat("hello"))
        assert r.status_code == 200
        wait_for(lambda: shadow_count(metrics_registry, "input", "allow", "allow") == 1)


def test_a_stream_is_compared_on_what_the_backend_wrote_not_on_the_redacted_release(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    metrics_registry: CollectorRegistry,
    backend: FakeBackend,
) -> None:
    # The active (test) policy redacts sk- keys; this candidate blocks them.
    candidate = write_policy(
        CANDIDATE.replace(
            "[coffee]}", "[coffee]}\n        - {id: key, category: secrets, regex: ['sk-[a-z]{8}']}"
        ),
        "candidate.yaml",
    )
    backend.reply = "Key sk-abcdefgh. Bye."
    backend.chunk_size = 4
    with TestClient(app=make_app(shadow_policy=str(candidate))) as client:
        streamed = dict(chat("hello"), stream=True)
        r = client.post("/v1/chat/completions", json=streamed)
        assert "sk-abcdefgh" not in r.text
        assert "[SECRET]" in r.text
        wait_for(lambda: shadow_count(metrics_registry, "output", "redact", "block") == 1)
        assert shadow_count(metrics_registry, "output", "redact", "allow") == 0


def test_a_bad_shadow_file_on_reload_keeps_the_previous_shadow_policy(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    metrics_registry: CollectorRegistry,
) -> None:
    candidate = write_policy(CANDIDATE, "candidate.yaml")
    app = make_app(shadow_policy=str(candidate), admin_key_sha256=ADMIN_KEY_SHA256)
    with TestClient(app=app) as client:
        candidate.write_text(CANDIDATE.replace("keywords: [tea]", "keywordz: [tea]"))
        r = client.post("/admin/reload", headers=AS_ADMIN)
        assert r.status_code == 422
        message = r.json()["error"]["message"]
        # It says which policy failed, by its file, and that the default one was reloaded.
        assert f"the shadow policy {candidate} failed (the default policy " in message
        client.post("/v1/chat/completions", json=chat("tea please"))
        wait_for(lambda: shadow_count(metrics_registry, "input", "allow", "block") == 1)


def test_a_reload_where_every_policy_fails_names_each_and_keeps_each_running(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    test_policy: Path,
) -> None:
    """Only the default policy's problem was reported: the shadow's went unsaid."""
    default = write_policy(test_policy.read_text(), "mine.yaml")
    candidate = write_policy(CANDIDATE, "candidate.yaml")
    app = make_app(
        policy=str(default), shadow_policy=str(candidate), admin_key_sha256=ADMIN_KEY_SHA256
    )
    with TestClient(app=app) as client:
        default.write_text(default.read_text().replace("filters:", "filterz:"))
        candidate.write_text(CANDIDATE.replace("keywords: [tea]", "keywordz: [tea]"))
        r = client.post("/admin/reload", headers=AS_ADMIN)
        assert r.status_code == 422
        message = r.json()["error"]["message"]
        assert "mine.yaml" in message
        assert f"the shadow policy {candidate} failed: " in message
        assert client.post("/v1/chat/completions", json=chat("hello")).status_code == 200


async def test_shadow_checks_past_the_limit_are_dropped_and_counted(
    write_policy: Callable[..., Path],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from guardrail.guard.filter import BuildContext
    from guardrail.guard.registry import filter_registry
    from guardrail.guard.shadow import ShadowPolicy
    from guardrail.guard.store import GuardStore
    from guardrail.guard.types import Action, FilterContext, Stage

    seen: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(1) as pool:
        store = GuardStore(
            str(write_policy(CANDIDATE, "c.yaml")), filter_registry(), BuildContext(pool)
        )
        store.load()
        shadow = ShadowPolicy(
            store, lambda st, a, s, v: seen.append((st.value, a.value, s)), max_in_flight=2
        )
        for _ in range(5):
            shadow.observe_text(Stage.OUTPUT, "tea", FilterContext("r"), Action.ALLOW)
        await shadow.drain()
        await asyncio.sleep(0)
    assert sorted(seen) == sorted(
        [("output", "allow", "block")] * 2 + [("output", "allow", "dropped")] * 3
    )


class _BlockingConfig(msgspec.Struct, frozen=True):
    pass


class _OnThreads:
    """Does its work on the filter threads, as the model filters do: ``seconds`` of it."""

    seconds = 0.0

    def __init__(self, name: str, config: _BlockingConfig, env: Any) -> None:
        self.name, self.stages, self.env = name, frozenset({Stage.INPUT}), env

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.env.executor, time.sleep, self.seconds)
        return Verdict()


class _Blocking(_OnThreads):
    seconds = 1.0


def _shadow_app(
    write_policy: Callable[..., Path],
    backend: FakeBackend,
    *,
    active: type[_OnThreads],
    candidate: type[_OnThreads],
    metrics: CollectorRegistry | None = None,
) -> Litestar:
    """A gateway whose active policy runs one ``active`` filter and whose shadow policy
    runs one ``candidate`` filter (both registered as filter types here)."""
    from guardrail.app import create_app
    from guardrail.guard.filter import FilterSpec
    from guardrail.guard.registry import filter_registry
    from guardrail.settings import Settings

    registry = filter_registry()
    for name, build in (("active-kind", active), ("candidate-kind", candidate)):
        registry.register(name, FilterSpec(type=name, config_type=_BlockingConfig, build=build))
    files = [
        write_policy(
            f'name: {p}\nversion: "1"\nfilters:\n  - {{id: f, type: {p}-kind}}\n', f"{p}.yaml"
        )
        for p in ("active", "candidate")
    ]
    settings = Settings(policy=str(files[0]), shadow_policy=str(files[1]), filter_workers=2)
    return create_app(settings, backend=backend, filters=registry, metrics_registry=metrics)


def test_a_slow_shadow_policy_never_delays_the_answers(
    write_policy: Callable[..., Path], backend: FakeBackend
) -> None:
    # The candidate shared the active policy's filter threads: each answer waited 1 s.
    app = _shadow_app(write_policy, backend, active=_OnThreads, candidate=_Blocking)
    with TestClient(app=app) as client:
        took = []
        for _ in range(3):
            started = time.perf_counter()
            assert client.post("/v1/chat/completions", json=chat("hello")).status_code == 200
            took.append(time.perf_counter() - started)
    # The candidate's threads are busy for seconds; the answers do not wait for them.
    assert max(took) < 0.5, took


BACKTRACKING_CANDIDATE = r"""
name: candidate
version: "c1"
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: slow, category: spam, regex: ['^(a|aa)+$']}
"""


def test_a_candidate_regex_that_backtracks_never_holds_up_the_answers(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    metrics_registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The candidate's regexes ran on the live event loop: a prompt that made one
    backtrack to its time limit held every live request, this one's answer too."""
    from guardrail.filters import rules

    answered = threading.Event()
    in_order: list[bool] = []
    time_limit = rules._regex_time_limit

    def once_answered(chars: int) -> float:
        # Asked for just before a candidate regex runs, where it runs: it waits for the
        # answer, which a loop busy with the regex could not send.
        in_order.append(answered.wait(10))
        return time_limit(chars)

    monkeypatch.setattr(rules, "_regex_time_limit", once_answered)
    active = write_policy(CANDIDATE)  # keywords only: no regex of its own
    candidate = write_policy(BACKTRACKING_CANDIDATE, "candidate.yaml")
    with TestClient(app=make_app(policy=active, shadow_policy=str(candidate))) as client:
        r = client.post("/v1/chat/completions", json=chat("a" * 60 + "b"))
        answered.set()
        assert r.status_code == 200
        # The candidate's regex ran all the same, and backtracked to its time limit.
        wait_for(lambda: shadow_count(metrics_registry, "input", "allow", "error") == 1)
    assert in_order
    assert all(in_order), in_order


class _Slowish(_OnThreads):
    seconds = 1.5  # far longer than the request itself: still running at shutdown


def test_shadow_checks_still_running_at_shutdown_are_waited_for(
    write_policy: Callable[..., Path], backend: FakeBackend
) -> None:
    # They were cancelled with the event loop: the last comparisons went uncounted.
    metrics = CollectorRegistry()
    app = _shadow_app(write_policy, backend, active=_OnThreads, candidate=_Slowish, metrics=metrics)
    with TestClient(app=app) as client:
        assert client.post("/v1/chat/completions", json=chat("hello")).status_code == 200
        assert shadow_count(metrics, "input", "allow", "allow") == 0  # still running
    assert shadow_count(metrics, "input", "allow", "allow") == 1


async def test_a_shadow_check_is_decided_and_recorded_by_one_candidate_version(
    write_policy: Callable[..., Path],
) -> None:
    # A reload between the request and its shadow check: the check ran under the new
    # candidate but was counted and logged under the old one's version.
    from concurrent.futures import ThreadPoolExecutor

    from guardrail.guard.filter import BuildContext
    from guardrail.guard.registry import filter_registry
    from guardrail.guard.shadow import ShadowPolicy
    from guardrail.guard.store import GuardStore
    from guardrail.guard.types import Action, FilterContext, Stage

    seen: list[tuple[str, str]] = []
    path = write_policy(CANDIDATE, "c.yaml")
    with ThreadPoolExecutor(1) as pool:
        store = GuardStore(str(path), filter_registry(), BuildContext(pool))
        store.load()
        shadow = ShadowPolicy(store, lambda st, a, s, v: seen.append((s, v)))
        shadow.observe_text(Stage.OUTPUT, "tea", FilterContext("r"), Action.ALLOW)
        path.write_text(
            CANDIDATE.replace('version: "c1"', 'version: "c2"').replace("[tea]", "[cake]")
        )
        store.load()  # swapped before the shadow task got to run
        await shadow.drain()
    # c1 blocks tea, c2 allows it: the action and the version come from the same policy.
    assert seen in ([("block", "c1")], [("allow", "c2")])


class _Broken(_OnThreads):
    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        raise RuntimeError("candidate filter bug")


async def test_a_candidate_filter_that_fails_is_counted_as_an_error_not_a_block(
    write_policy: Callable[..., Path],
) -> None:
    # The candidate's broken filter failed closed (on_error: block) and was counted as
    # shadow="block": a disagreement the candidate never decided.
    from concurrent.futures import ThreadPoolExecutor

    from guardrail.guard.filter import BuildContext, FilterSpec
    from guardrail.guard.registry import filter_registry
    from guardrail.guard.shadow import ShadowPolicy
    from guardrail.guard.store import GuardStore
    from guardrail.guard.types import Action, FilterContext, Stage

    registry = filter_registry()
    registry.register(
        "broken", FilterSpec(type="broken", config_type=_BlockingConfig, build=_Broken)
    )
    path = write_policy(
        'name: c\nversion: "1"\non_error: block\nfilters:\n  - {id: b, type: broken}\n',
        "c.yaml",
    )
    seen: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(1) as pool:
        store = GuardStore(str(path), registry, BuildContext(pool))
        store.load()
        shadow = ShadowPolicy(store, lambda st, a, s, v: seen.append((st.value, a.value, s)))
        shadow.observe_text(Stage.INPUT, "hello", FilterContext("r"), Action.ALLOW)
        await shadow.drain()
    assert seen == [("input", "allow", "error")]


class _HoldsAModel(_OnThreads):
    """Takes its model from the shared resources, as the model filters do (the PII
    analyzer, whose lock serialises every analysis; the encoders' micro-batchers)."""

    models: ClassVar[dict[str, object]] = {}

    def __init__(self, name: str, config: _BlockingConfig, env: Any) -> None:
        super().__init__(name, config, env)
        _HoldsAModel.models[type(self).__name__] = env.resources.get("model", threading.Lock)


class _ActiveHoldsAModel(_HoldsAModel):
    pass


class _CandidateHoldsAModel(_HoldsAModel):
    pass


def test_the_candidate_holds_its_own_models_so_their_locks_never_hold_up_live_checks(
    write_policy: Callable[..., Path], backend: FakeBackend
) -> None:
    """The candidate shared the active policy's model objects: a Presidio analysis of a
    long shadowed text held the analyzer's lock, and live PII checks queued behind it."""
    _shadow_app(write_policy, backend, active=_ActiveHoldsAModel, candidate=_CandidateHoldsAModel)
    live, candidate = (
        _HoldsAModel.models[k] for k in ("_ActiveHoldsAModel", "_CandidateHoldsAModel")
    )
    assert isinstance(live, type(threading.Lock()))
    assert candidate is not live


def test_a_reload_where_only_the_shadow_fails_says_the_default_policy_reloaded(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    test_policy: Path,
) -> None:
    """It said the default policy was "not reloaded; still running its version" and gave
    the new version, which was in force."""
    default = write_policy(test_policy.read_text(), "mine.yaml")
    candidate = write_policy(CANDIDATE, "candidate.yaml")
    app = make_app(
        policy=str(default), shadow_policy=str(candidate), admin_key_sha256=ADMIN_KEY_SHA256
    )
    with TestClient(app=app) as client:
        old = client.post("/v1/chat/completions", json=chat("hello")).json()["guardrail"]
        new_version = old["policy"]["version"] + "-next"
        default.write_text(
            re.sub(r"(?m)^version: .*$", f'version: "{new_version}"', default.read_text())
        )
        candidate.write_text(CANDIDATE.replace("keywords: [tea]", "keywordz: [tea]"))
        r = client.post("/admin/reload", headers=AS_ADMIN)
        assert r.status_code == 422
        message = r.json()["error"]["message"]
        assert "not reloaded" not in message
        assert f"reloaded (version {new_version}), but not every policy" in message
        assert f"the shadow policy {candidate} failed" in message
        served = client.post("/v1/chat/completions", json=chat("hello")).json()["guardrail"]
        assert served["policy"]["version"] == new_version


def test_a_completion_is_compared_after_the_prompt_it_continues_as_the_active_policy_does(
    make_app: Callable[..., Litestar],
    write_policy: Callable[..., Path],
    metrics_registry: CollectorRegistry,
    backend: FakeBackend,
) -> None:
    """The active policy checks a completion after the end of its prompt; the candidate
    checked it alone, so a phrase split at the join ("green" + " tea") counted as the
    two disagreeing when they would not."""
    candidate = write_policy(
        "name: candidate\nversion: c2\nfilters:\n  - id: words\n    type: rules\n"
        "    config:\n      rules:\n"
        "        - {id: green, category: drinks, stages: [output], keywords: [green tea]}\n",
        "candidate.yaml",
    )
    backend.reply = " tea, every morning."
    backend.chunk_size = 4
    with TestClient(app=make_app(shadow_policy=str(candidate))) as client:
        for stream in (False, True):
            body = {"model": "fake-model", "prompt": "I drink green", "stream": stream}
            assert client.post("/v1/completions", json=body).status_code == 200
        wait_for(lambda: shadow_count(metrics_registry, "output", "allow", "block") == 2)
    assert shadow_count(metrics_registry, "output", "allow", "allow") == 0
