"""Counterfactual probes: the input stage re-run with a group swapped, off the request path."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from guardrail.app import create_app
from guardrail.chat import Message
from guardrail.guard.filter import FilterSpec
from guardrail.guard.registry import filter_registry
from guardrail.guard.types import (
    Action,
    Decision,
    FilterContext,
    FilterOutcome,
    FilterStatus,
    Finding,
    Stage,
    Verdict,
)
from guardrail.observability.counterfactual import CounterfactualProber, ProbeResult, SkipReason
from guardrail.observability.groups import GroupRef, Lexicon
from guardrail.settings import Settings
from tests.fakes.backend import FakeBackend

# Blocks a phrase about one group only: the policy treats Muslims and Christians unequally.
UNEQUAL = """
name: unequal
version: "1"
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: against-muslims, category: hate, action: block, keywords: [muslims are dangerous]}
"""
# Blocks the phrase whoever it is about.
EQUAL = """
name: equal
version: "1"
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: dangerous, category: hate, action: block, keywords: [are dangerous]}
"""
CHAT = "/v1/chat/completions"


def chat(text: str, *history: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": t} for t in (*history, text)]
    return {"model": "fake-model", "messages": messages}


@pytest.fixture
def gateway(
    write_policy: Callable[[str], Path], backend: FakeBackend, metrics_registry: CollectorRegistry
) -> Callable[..., Iterator[TestClient[Litestar]]]:
    def make(
        policy: str,
        filters: Any = None,
        registry: CollectorRegistry | None = None,
        **overrides: Any,
    ) -> Iterator[TestClient[Litestar]]:
        settings = Settings(
            policy=str(write_policy(policy)),
            audit_dsn="off",
            **{"counterfactual_sample_rate": 1.0, **overrides},
        )
        app = create_app(
            settings,
            backend=backend,
            metrics_registry=registry or metrics_registry,
            filters=filters,
        )
        with TestClient(app=app) as client:
            yield client

    return make


def drain(client: TestClient[Litestar]) -> None:
    prober = client.app.state.gateway.monitor.prober
    client.blocking_portal.call(prober.drain)


def probes(registry: CollectorRegistry, axis: str, result: str) -> float:
    return (
        registry.get_sample_value(
            "guardrail_counterfactual_probes_total", {"axis": axis, "result": result}
        )
        or 0.0
    )


def skipped(registry: CollectorRegistry, reason: str) -> float:
    return (
        registry.get_sample_value("guardrail_counterfactual_skipped_total", {"reason": reason})
        or 0.0
    )


# --- through the gateway ---------------------------------------------------------------------


def test_a_policy_that_blocks_a_phrase_about_one_group_flips_under_the_probe(
    gateway: Callable[..., Iterator[TestClient[Litestar]]],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> None:
    with capture_logs() as logs:
        for client in gateway(UNEQUAL):
            response = client.post(CHAT, json=chat("Muslims are dangerous."))
            drain(client)

    assert response.status_code == 400
    assert probes(metrics_registry, "religion", "flip") == 1
    assert probes(metrics_registry, "religion", "same") == 0
    assert backend.requests == []  # the probe never reaches the model
    flips = [e for e in logs if e["event"] == "counterfactual_flip"]
    assert len(flips) == 1
    assert {k: flips[0][k] for k in ("axis", "group", "counterpart", "original", "probe")} == {
        "axis": "religion",
        "group": "muslim",
        "counterpart": "christian",
        "original": "block",
        "probe": "allow",
    }
    assert flips[0]["original_rules"] == ["against-muslims"]
    assert not any("Christians" in str(e) or "dangerous" in str(e) for e in logs)


def test_a_policy_that_treats_groups_alike_keeps_its_decision(
    gateway: Callable[..., Iterator[TestClient[Litestar]]], metrics_registry: CollectorRegistry
) -> None:
    for client in gateway(EQUAL):
        assert client.post(CHAT, json=chat("Muslims are dangerous.")).status_code == 400
        assert client.post(CHAT, json=chat("Tell me about women in science.")).status_code == 200
        drain(client)

    assert probes(metrics_registry, "religion", "same") == 1
    assert probes(metrics_registry, "gender", "same") == 1
    assert probes(metrics_registry, "religion", "flip") == 0


def test_a_probe_never_changes_the_response_or_what_the_backend_receives(
    gateway: Callable[..., Iterator[TestClient[Litestar]]], backend: FakeBackend
) -> None:
    bodies = []
    for rate in (0.0, 1.0):
        registry = CollectorRegistry()
        for client in gateway(EQUAL, registry=registry, counterfactual_sample_rate=rate):
            response = client.post(
                CHAT,
                json=chat("Are men kinder than women?", "I like Muslims."),
                headers={"x-request-id": "same-id"},
            )
            if rate:
                drain(client)
        body = response.json()
        body.pop("created")
        bodies.append(body)

    assert bodies[0] == bodies[1]
    assert [[m.content for m in r.messages] for r in backend.requests] == [
        ["I like Muslims.", "Are men kinder than women?"]
    ] * 2


def test_prompts_that_mention_no_group_are_not_probed(
    gateway: Callable[..., Iterator[TestClient[Litestar]]], metrics_registry: CollectorRegistry
) -> None:
    for client in gateway(EQUAL):
        client.post(CHAT, json=chat("What is the capital of France?"))
        assert client.app.state.gateway.monitor.prober.in_flight == 0

    samples = [
        s
        for f in metrics_registry.collect()
        if f.name.startswith("guardrail_counterfactual")
        for s in f.samples
        if s.name.endswith("_total")
    ]
    assert samples
    assert all(s.value == 0 for s in samples)


class _SlowConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class _SlowOnChristians:
    """Takes a while on the swapped text, so a probe stays in flight."""

    def __init__(self, name: str, config: _SlowConfig, env: Any) -> None:
        self.name, self.stages = name, frozenset({Stage.INPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        if "Christians" in text:
            await asyncio.sleep(0.3)
        return Verdict()


def test_past_the_in_flight_bound_a_sampled_probe_is_dropped_and_counted(
    gateway: Callable[..., Iterator[TestClient[Litestar]]],
    metrics_registry: CollectorRegistry,
) -> None:
    registry = filter_registry()
    spec = FilterSpec(type="slow", config_type=_SlowConfig, build=_SlowOnChristians)
    registry.register("slow", spec)
    policy = 'name: slow\nversion: "1"\nfilters:\n  - {id: slow, type: slow}\n'

    for client in gateway(policy, counterfactual_max_in_flight=1, filters=registry):
        first = client.post(CHAT, json=chat("Muslims pray five times a day."))
        second = client.post(CHAT, json=chat("Do Muslims eat pork?"))
        drain(client)

    assert (first.status_code, second.status_code) == (200, 200)
    assert skipped(metrics_registry, "busy") == 1
    assert probes(metrics_registry, "religion", "same") == 1


# --- the prober itself, with a fake guard ----------------------------------------------------


def _decision(action: Action, status: FilterStatus = "ok") -> Decision:
    finding = Finding("hate", 1.0, action, rule_id="r") if action is not Action.ALLOW else None
    verdict = Verdict.from_findings([finding] if finding else [])
    return Decision(
        stage=Stage.INPUT,
        action=action,
        text="",
        findings=verdict.findings,
        outcomes=(FilterOutcome("f", "rules", verdict, 0.001, status),),
        policy_name="p",
        policy_version="1",
    )


class FakeGuard:
    """Answers the input stage from a rule on the text; records what it was asked."""

    def __init__(self, decide: Callable[[str], Decision]) -> None:
        self.decide = decide
        self.seen: list[tuple[str, ...]] = []
        self.documents: list[tuple[str, ...]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def check_messages(
        self, stage: Stage, messages: Sequence[Message], ctx: FilterContext
    ) -> list[tuple[int | None, Decision]]:
        self.seen.append(tuple(m.content for m in messages))
        self.documents.append(ctx.context_documents)
        await self.release.wait()
        return [(i, self.decide(m.content)) for i, m in enumerate(messages)]


class Counts:
    def __init__(self) -> None:
        self.results: list[ProbeResult] = []
        self.skips: list[SkipReason] = []


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


def prober(lexicon: Lexicon, counts: Counts, **kwargs: Any) -> CounterfactualProber:
    options: dict[str, Any] = {"sample_rate": 1.0, "max_in_flight": 2, **kwargs}
    return CounterfactualProber(
        lexicon, on_result=counts.results.append, on_skip=counts.skips.append, **options
    )


CTX = FilterContext("req-1", route="chat")
ALLOWED = [(0, _decision(Action.ALLOW))]


async def test_the_newest_message_picks_the_group_and_every_message_is_swapped(
    lexicon: Lexicon,
) -> None:
    counts = Counts()
    guard = FakeGuard(lambda text: _decision(Action.ALLOW))
    messages = [Message("system", "Be fair to women."), Message("user", "Are Muslims and women...")]

    probe = prober(lexicon, counts)
    assert probe.maybe_probe(guard, CTX, messages, ALLOWED)
    await probe.drain()

    assert guard.seen == [("Be fair to women.", "Are Christians and women...")]
    assert [(r.group, r.counterpart, r.result) for r in counts.results] == [
        (GroupRef("religion", "muslim"), GroupRef("religion", "christian"), "same")
    ]


async def test_the_probe_sees_the_requests_context_documents(lexicon: Lexicon) -> None:
    """A filter reading the request's sources on input must see them in the probe too,
    or a difference the missing sources make is counted as the group's."""
    counts = Counts()
    guard = FakeGuard(lambda text: _decision(Action.ALLOW))
    ctx = FilterContext("req-2", route="chat", context_documents=("Refunds take 30 days.",))

    probe = prober(lexicon, counts)
    assert probe.maybe_probe(guard, ctx, [Message("user", "Are Muslims refunded?")], ALLOWED)
    await probe.drain()

    assert guard.documents == [("Refunds take 30 days.",)]
    assert len(counts.results) == 1


@pytest.mark.parametrize(("draw", "started"), [(0.29, True), (0.3, False), (0.9, False)])
async def test_a_share_of_group_prompts_is_sampled(
    lexicon: Lexicon, draw: float, started: bool
) -> None:
    counts = Counts()
    guard = FakeGuard(lambda text: _decision(Action.ALLOW))
    probe = prober(lexicon, counts, sample_rate=0.3, random=lambda: draw)

    assert probe.maybe_probe(guard, CTX, [Message("user", "Gay people")], ALLOWED) is started
    await probe.drain()

    assert len(counts.results) == int(started)


async def test_a_filter_failure_on_either_side_is_skipped_not_compared(lexicon: Lexicon) -> None:
    counts = Counts()
    guard = FakeGuard(lambda text: _decision(Action.BLOCK, status="timeout"))
    probe = prober(lexicon, counts)

    probe.maybe_probe(guard, CTX, [Message("user", "Muslims")], ALLOWED)
    await probe.drain()

    assert counts.results == []
    assert counts.skips == ["filter_error"]


async def test_a_guard_that_raises_is_counted_and_never_reaches_the_request(
    lexicon: Lexicon,
) -> None:
    counts = Counts()

    def broken(text: str) -> Decision:
        raise RuntimeError(text)

    probe = prober(lexicon, counts)
    with capture_logs() as logs:
        assert probe.maybe_probe(FakeGuard(broken), CTX, [Message("user", "Muslims")], ALLOWED)
        await probe.drain()

    assert counts.skips == ["error"]
    assert [e["event"] for e in logs] == ["counterfactual_failed"]
    assert "Christians" not in str(logs)


async def test_shutdown_cancels_running_probes_without_counting_them(lexicon: Lexicon) -> None:
    counts = Counts()
    guard = FakeGuard(lambda text: _decision(Action.ALLOW))
    guard.release.clear()  # the probe waits forever
    probe = prober(lexicon, counts, max_in_flight=1)

    probe.maybe_probe(guard, CTX, [Message("user", "Muslims")], ALLOWED)
    probe.maybe_probe(guard, CTX, [Message("user", "Muslims")], ALLOWED)
    await asyncio.sleep(0)
    assert probe.in_flight == 1
    await probe.aclose()

    assert probe.in_flight == 0
    assert counts.results == []
    assert counts.skips == ["busy"]
