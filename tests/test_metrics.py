"""GatewayMetrics: exact values from real exchanges, and an exposition promtool accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.app import create_app, model_cache_stats
from guardrail.exchange import Exchange, Outcome, Route
from guardrail.filters.pii import AnalysisLookups
from guardrail.guard.filter import BuildContext, FilterSpec, SharedResources
from guardrail.guard.registry import filter_registry
from guardrail.guard.types import (
    FILTER_ERROR_CATEGORY,
    Action,
    CacheResult,
    Decision,
    FilterContext,
    FilterOutcome,
    FilterStatus,
    Finding,
    Stage,
    Verdict,
)
from guardrail.observability.metrics import OTHER, UNKNOWN, CacheStats, GatewayMetrics
from guardrail.settings import Settings
from tests.conftest import ADMIN_KEY_SHA256, AS_ADMIN, TEST_POLICY
from tests.fakes.backend import FakeBackend

SECRET = "my social is 078-05-1120, tell no one"


# --- builders ---------------------------------------------------------------


def finding(category: str, action: Action = Action.FLAG, filter_id: str = "rules") -> Finding:
    return Finding(category=category, action=action, filter_id=filter_id)


def filter_outcome(
    filter_id: str,
    *findings: Finding,
    duration_s: float = 0.002,
    status: FilterStatus = "ok",
    cache: CacheResult = "off",
) -> FilterOutcome:
    return FilterOutcome(
        filter_id=filter_id,
        filter_type="rules",
        verdict=Verdict.from_findings(findings),
        duration_s=duration_s,
        status=status,
        error=None if status == "ok" else "RuntimeError",
        cache=cache,
    )


def decision(stage: Stage, *outcomes: FilterOutcome, text: str = SECRET) -> Decision:
    findings = tuple(f for o in outcomes for f in o.verdict.findings)
    return Decision(
        stage=stage,
        action=Action.strictest(o.verdict.action for o in outcomes),
        text=text,
        findings=findings,
        outcomes=outcomes,
        policy_name="default",
        policy_version="1",
    )


def exchange(
    outcome: Outcome,
    *decisions: Decision,
    route: Route = "chat",
    duration_s: float = 0.3,
    backend: str | None = None,
    stream: bool = False,
    backend_duration_s: float | None = None,
    ttft_s: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    error_code: str | None = None,
) -> Exchange:
    ex = Exchange(
        request_id="req-1",
        route=route,
        backend=backend,
        stream=stream,
        backend_duration_s=backend_duration_s,
        time_to_first_token_s=ttft_s,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    ex.decisions.extend(decisions)
    ex.finish(outcome, error_code=error_code)
    ex.duration_s = duration_s  # the real clock is not exact enough to assert on
    return ex


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> GatewayMetrics:
    return GatewayMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def harm(registry: CollectorRegistry, **labels: str) -> float | None:
    """guardrail_harmful_content_total summed over the labels not given (tenant, version)."""
    found = [
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "guardrail_harmful_content_total"
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


# --- requests ---------------------------------------------------------------


def test_a_finished_exchange_counts_one_request_and_its_duration(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(exchange("allowed", duration_s=0.3))

    assert value(registry, "guardrail_requests_total", route="chat", outcome="allowed") == 1.0
    duration = "guardrail_request_duration_seconds"
    assert value(registry, f"{duration}_count", route="chat") == 1.0
    assert value(registry, f"{duration}_sum", route="chat") == 0.3
    assert value(registry, f"{duration}_bucket", route="chat", le="0.5") == 1.0
    assert value(registry, f"{duration}_bucket", route="chat", le="0.25") == 0.0


@pytest.mark.parametrize(
    ("route", "outcome"),
    [
        ("chat", "blocked_input"),
        ("completions", "blocked_output"),
        ("moderations", "flagged"),
        ("chat", "invalid_request"),
        ("completions", "cancelled"),
        ("chat", "error"),
    ],
)
def test_requests_are_counted_by_route_and_outcome(
    metrics: GatewayMetrics, registry: CollectorRegistry, route: Route, outcome: Outcome
) -> None:
    metrics.record(exchange(outcome, route=route))
    metrics.record(exchange(outcome, route=route))

    assert value(registry, "guardrail_requests_total", route=route, outcome=outcome) == 2.0


def test_when_exchange_is_not_finished_then_record_refuses_it(metrics: GatewayMetrics) -> None:
    with pytest.raises(ValueError, match="not finished"):
        metrics.record(Exchange(request_id="req-1", route="chat"))


def test_recording_twice_counts_twice_so_callers_record_once(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    ex = exchange("allowed")
    metrics.record(ex)
    metrics.record(ex)

    assert value(registry, "guardrail_requests_total", route="chat", outcome="allowed") == 2.0


# --- decisions and filters --------------------------------------------------


def test_every_decision_of_an_exchange_is_counted_by_stage_and_action(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(
        exchange(
            "blocked_output",
            decision(Stage.INPUT, filter_outcome("rules")),
            decision(Stage.INPUT, filter_outcome("rules", finding("pii", Action.REDACT))),
            decision(Stage.OUTPUT, filter_outcome("tox", finding("violence", Action.BLOCK))),
        )
    )

    assert value(registry, "guardrail_decisions_total", stage="input", action="allow") == 1.0
    assert value(registry, "guardrail_decisions_total", stage="input", action="redact") == 1.0
    assert value(registry, "guardrail_decisions_total", stage="output", action="block") == 1.0
    # Known stage/action pairs start at zero so ratios work before the first event.
    assert value(registry, "guardrail_decisions_total", stage="output", action="flag") == 0.0


def test_each_filter_outcome_counts_a_verdict_and_a_duration(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record_decision(
        decision(
            Stage.INPUT,
            filter_outcome("rules", finding("weapons", Action.BLOCK), duration_s=0.0003),
            filter_outcome("pii", duration_s=0.02),
        )
    )

    verdicts = "guardrail_filter_verdicts_total"
    assert value(registry, verdicts, filter="rules", stage="input", action="block") == 1.0
    assert value(registry, verdicts, filter="pii", stage="input", action="allow") == 1.0
    duration = "guardrail_filter_duration_seconds"
    assert value(registry, f"{duration}_sum", filter="rules", stage="input") == 0.0003
    assert value(registry, f"{duration}_bucket", filter="rules", stage="input", le="0.0005") == 1
    assert value(registry, f"{duration}_bucket", filter="rules", stage="input", le="0.00025") == 0
    assert value(registry, f"{duration}_bucket", filter="pii", stage="input", le="0.025") == 1
    assert value(registry, f"{duration}_bucket", filter="pii", stage="input", le="0.01") == 0


@pytest.mark.parametrize(
    ("status", "errors"),
    [("ok", None), ("error", 1.0), ("timeout", 1.0)],
)
def test_filter_errors_are_counted_by_kind_from_the_outcome_status(
    metrics: GatewayMetrics,
    registry: CollectorRegistry,
    status: FilterStatus,
    errors: float | None,
) -> None:
    metrics.record_decision(decision(Stage.OUTPUT, filter_outcome("tox", status=status)))

    kind = "error" if status == "ok" else status
    labels = {"filter": "tox", "stage": "output"}
    assert value(registry, "guardrail_filter_errors_total", **labels, kind=kind) == errors
    # A failed filter still returned a verdict (the guard's error mode), so it is counted.
    assert value(registry, "guardrail_filter_verdicts_total", **labels, action="allow") == 1.0


def test_when_filter_id_is_empty_then_it_is_labelled_unknown(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record_decision(decision(Stage.INPUT, filter_outcome("")))

    assert (
        value(
            registry,
            "guardrail_filter_verdicts_total",
            filter=UNKNOWN,
            stage="input",
            action="allow",
        )
        == 1.0
    )


def test_harmful_content_counts_each_category_once_per_exchange_and_stage(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(
        exchange(
            "blocked_output",
            decision(
                Stage.INPUT,
                filter_outcome(
                    "rules",
                    finding("hate", Action.FLAG),
                    finding("hate", Action.BLOCK),
                    finding("self_harm", Action.ALLOW),
                ),
            ),
            decision(Stage.OUTPUT, filter_outcome("rules", finding("hate", Action.REDACT))),
        )
    )

    # Two "hate" findings on the input of one exchange are one harmful exchange.
    assert harm(registry, stage="input", category="hate") == 1.0
    assert harm(registry, stage="output", category="hate") == 1.0
    assert harm(registry, stage="input", category="self_harm") is None


def test_harmful_exchanges_count_an_exchange_once_whatever_its_stages_and_categories(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    """The spike alert's numerator: summed over stage and category, harmful_content_total
    made one exchange three harmful requests."""
    both_stages = exchange(
        "blocked_output",
        decision(Stage.INPUT, filter_outcome("rules", finding("hate", Action.FLAG))),
        decision(
            Stage.OUTPUT,
            filter_outcome(
                "rules", finding("hate", Action.BLOCK), finding("violence", Action.FLAG)
            ),
        ),
    )
    clean = exchange("allowed", decision(Stage.INPUT, filter_outcome("rules")))
    moderation = exchange(
        "blocked_input",
        decision(Stage.INPUT, filter_outcome("rules", finding("hate", Action.BLOCK))),
        route="moderations",
    )
    for ex in (both_stages, clean, moderation):
        metrics.record(ex)

    assert harm(registry) == 3.0
    exchanges = "guardrail_harmful_exchanges_total"
    assert value(registry, exchanges, tenant="default", policy_version=UNKNOWN) == 1.0


def test_moderation_checks_are_not_harmful_content_of_the_traffic(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    """The harmful rate divides by chat and completions requests: only they count."""
    blocked = decision(Stage.INPUT, filter_outcome("rules", finding("hate", Action.BLOCK)))
    metrics.record(exchange("blocked_input", blocked, route="moderations"))
    assert harm(registry) is None
    metrics.record(exchange("blocked_input", blocked, route="completions"))
    assert harm(registry, stage="input", category="hate") == 1.0


def test_a_streamed_exchange_observes_each_held_window_size(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    ex = exchange(
        "allowed",
        decision(Stage.INPUT, filter_outcome("rules")),
        decision(Stage.OUTPUT, filter_outcome("rules")),
        decision(Stage.OUTPUT, filter_outcome("rules")),
        stream=True,
    )
    ex.stream_window_chars.extend([120, 40])
    metrics.record(ex)
    assert value(registry, "guardrail_stream_windows_total", action="allow") == 2.0
    assert value(registry, "guardrail_stream_held_characters_count") == 2.0
    assert value(registry, "guardrail_stream_held_characters_sum") == 160.0


def test_a_failed_filters_block_is_a_filter_error_not_harmful_content(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    failed = filter_outcome(
        "facts", finding(FILTER_ERROR_CATEGORY, Action.BLOCK, "facts"), status="error"
    )
    metrics.record(exchange("blocked_input", decision(Stage.INPUT, failed)))

    assert harm(registry) is None
    labels = {"filter": "facts", "stage": "input", "kind": "error"}
    assert value(registry, "guardrail_filter_errors_total", **labels) == 1.0


def test_verdict_cache_hits_and_misses_are_counted_and_hits_take_no_filter_time(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(
        exchange(
            "allowed",
            decision(Stage.INPUT, filter_outcome("rules", cache="hit", duration_s=0.0)),
            decision(Stage.INPUT, filter_outcome("rules", cache="hit", duration_s=0.0)),
            decision(Stage.INPUT, filter_outcome("rules", cache="miss")),
            decision(Stage.OUTPUT, filter_outcome("rules")),
        )
    )
    cache = "guardrail_verdict_cache_total"
    assert value(registry, cache, filter="rules", result="hit") == 2.0
    assert value(registry, cache, filter="rules", result="miss") == 1.0
    durations = "guardrail_filter_duration_seconds_count"
    assert value(registry, durations, filter="rules", stage="input") == 1.0
    assert value(registry, durations, filter="rules", stage="output") == 1.0


def test_every_finding_score_is_observed_by_filter_stage_and_category(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    tox = Finding("insult", 0.87, Action.FLAG, filter_id="tox")
    metrics.record(exchange("flagged", decision(Stage.OUTPUT, filter_outcome("tox", tox))))
    labels = {"filter": "tox", "stage": "output", "category": "insult"}
    assert value(registry, "guardrail_finding_score_count", **labels) == 1.0
    assert value(registry, "guardrail_finding_score_sum", **labels) == pytest.approx(0.87)
    assert value(registry, "guardrail_finding_score_bucket", le="0.8", **labels) == 0.0
    assert value(registry, "guardrail_finding_score_bucket", le="0.9", **labels) == 1.0


def test_a_finding_repeated_in_every_turn_of_a_history_counts_once_per_exchange(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    old_turn = decision(Stage.INPUT, filter_outcome("rules", finding("hate", Action.FLAG)))
    new_turn = decision(Stage.INPUT, filter_outcome("rules", finding("hate", Action.FLAG)))
    metrics.record(exchange("flagged", old_turn, new_turn))
    metrics.record(exchange("flagged", old_turn))
    assert harm(registry, stage="input", category="hate") == 2.0
    assert value(registry, "guardrail_decisions_total", stage="input", action="flag") == 3.0


def test_when_categories_pass_the_cap_then_new_ones_fold_into_other(
    registry: CollectorRegistry,
) -> None:
    metrics = GatewayMetrics(registry, max_label_values=3)
    for category in ["a", "b", "c", "d", "e", "a"]:
        metrics.record(
            exchange("flagged", decision(Stage.INPUT, filter_outcome("rules", finding(category))))
        )

    assert harm(registry, stage="input", category="a") == 2.0
    assert harm(registry, stage="input", category="b") == 1.0
    assert harm(registry, stage="input", category="c") == 1.0
    assert harm(registry, stage="input", category="d") is None
    assert harm(registry, stage="input", category=OTHER) == 2.0


def test_circuit_states_are_read_at_each_scrape_from_the_latest_backend(
    registry: CollectorRegistry,
) -> None:
    """URLs past the label cap share "other", which shows the worst of their states."""
    metrics = GatewayMetrics(registry, max_label_values=1)
    states = {"http://a/v1": 2, "http://b/v1": 0, "http://c/v1": 2}
    metrics.observe_circuits(states.items)

    def gauge(url: str) -> float | None:
        return value(registry, "guardrail_backend_circuit_state", url=url)

    assert (gauge("http://a/v1"), gauge(OTHER)) == (2.0, 2.0)
    states.update({"http://a/v1": 1, "http://c/v1": 1})  # their reset times have passed
    assert (gauge("http://a/v1"), gauge(OTHER)) == (1.0, 1.0)
    metrics.observe_circuits(lambda: [("http://a/v1", 0)])  # a new backend replaces the old
    assert (gauge("http://a/v1"), gauge(OTHER)) == (0.0, None)


def test_default_category_cap_is_200(metrics: GatewayMetrics, registry: CollectorRegistry) -> None:
    for i in range(250):
        metrics.record(
            exchange("flagged", decision(Stage.OUTPUT, filter_outcome("r", finding(f"cat{i}"))))
        )

    assert harm(registry, stage="output", category="cat199") == 1.0
    assert harm(registry, stage="output", category="cat200") is None
    assert harm(registry, stage="output", category=OTHER) == 50.0


@given(
    categories=st.lists(st.sampled_from([f"c{i}" for i in range(12)]), max_size=40),
    cap=st.integers(min_value=1, max_value=8),
)
def test_category_series_stay_bounded_and_no_finding_is_lost(
    categories: list[str], cap: int
) -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, max_label_values=cap)
    for category in categories:
        metrics.record(
            exchange("flagged", decision(Stage.INPUT, filter_outcome("r", finding(category))))
        )

    samples = [
        s
        for family in registry.collect()
        if family.name == "guardrail_harmful_content"
        for s in family.samples
        if s.name == "guardrail_harmful_content_total"
    ]
    assert len(samples) <= cap + 1
    assert sum(s.value for s in samples) == len(categories)


# --- backend ----------------------------------------------------------------


def test_a_stream_records_backend_duration_time_to_first_token_and_tokens(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(
        exchange(
            "allowed",
            backend="remote",
            stream=True,
            backend_duration_s=1.5,
            ttft_s=0.2,
            prompt_tokens=12,
            completion_tokens=30,
        )
    )

    duration = "guardrail_backend_duration_seconds"
    assert value(registry, f"{duration}_count", backend="remote", stream="true") == 1.0
    assert value(registry, f"{duration}_sum", backend="remote", stream="true") == 1.5
    assert value(registry, f"{duration}_count", backend="remote", stream="false") is None
    ttft = "guardrail_time_to_first_token_seconds"
    assert value(registry, f"{ttft}_sum", backend="remote") == 0.2
    assert value(registry, f"{ttft}_bucket", backend="remote", le="0.25") == 1.0
    assert value(registry, f"{ttft}_bucket", backend="remote", le="0.1") == 0.0
    assert value(registry, "guardrail_tokens_total", backend="remote", kind="prompt") == 12.0
    assert value(registry, "guardrail_tokens_total", backend="remote", kind="completion") == 30.0


def test_when_backend_reports_no_usage_then_no_tokens_are_counted(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(exchange("allowed", backend="local", backend_duration_s=0.8))

    assert value(registry, "guardrail_tokens_total", backend="local", kind="prompt") is None
    assert value(registry, "guardrail_time_to_first_token_seconds_count", backend="local") is None
    assert (
        value(registry, "guardrail_backend_duration_seconds_count", backend="local", stream="false")
        == 1.0
    )


def test_when_input_is_blocked_then_no_backend_series_appear(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(exchange("blocked_input"))

    names = {s.name for f in registry.collect() for s in f.samples}
    assert not any(n.startswith(("guardrail_backend_", "guardrail_tokens")) for n in names)


@pytest.mark.parametrize(
    ("backend", "error_code", "labels"),
    [
        ("remote", "backend_timeout", {"backend": "remote", "code": "backend_timeout"}),
        ("remote", None, {"backend": "remote", "code": UNKNOWN}),
        (None, "backend_unavailable", {"backend": UNKNOWN, "code": "backend_unavailable"}),
    ],
)
def test_backend_errors_are_counted_by_backend_and_error_code(
    metrics: GatewayMetrics,
    registry: CollectorRegistry,
    backend: str | None,
    error_code: str | None,
    labels: dict[str, str],
) -> None:
    metrics.record(exchange("backend_error", backend=backend, error_code=error_code))

    assert registry.get_sample_value("guardrail_backend_errors_total", labels) == 1.0


def test_a_request_shed_at_capacity_is_counted_as_overloaded_not_as_a_backend_error(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    """It fired the backend-errors alert ("backend unknown fails with overloaded") while
    the model was healthy and the gateway's own max_concurrency was the limit."""
    assert value(registry, "guardrail_overloaded_total", route="chat") == 0.0
    metrics.record(exchange("backend_error", error_code="overloaded"))

    assert value(registry, "guardrail_overloaded_total", route="chat") == 1.0
    assert value(registry, "guardrail_requests_total", route="chat", outcome="backend_error") == 1
    assert not [
        s
        for family in registry.collect()
        for s in family.samples
        if s.name == "guardrail_backend_errors_total"
    ]


def test_other_outcomes_count_no_backend_error(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(exchange("error", backend="remote", error_code="internal"))

    assert (
        value(registry, "guardrail_backend_errors_total", backend="remote", code="internal") is None
    )


# --- in flight, streams, policy ---------------------------------------------


def test_in_flight_counts_while_inside_and_after_an_exception(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    def in_flight() -> float | None:
        return value(registry, "guardrail_in_flight_requests", route="chat")

    assert in_flight() == 0.0
    with metrics.in_flight("chat"):
        assert in_flight() == 1.0
        metrics.request_started("chat")  # a stream outliving its handler
        assert in_flight() == 2.0
    assert in_flight() == 1.0
    metrics.request_ended("chat")
    with pytest.raises(RuntimeError), metrics.in_flight("chat"):
        raise RuntimeError
    assert in_flight() == 0.0


def test_stream_windows_count_actions_and_held_sizes(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.stream_window(Action.ALLOW, held_characters=100)
    metrics.stream_window(Action.ALLOW, held_characters=300)
    metrics.stream_window(Action.BLOCK)

    assert value(registry, "guardrail_stream_windows_total", action="allow") == 2.0
    assert value(registry, "guardrail_stream_windows_total", action="block") == 1.0
    assert value(registry, "guardrail_stream_windows_total", action="redact") == 0.0
    assert value(registry, "guardrail_stream_held_characters_count") == 2.0
    assert value(registry, "guardrail_stream_held_characters_sum") == 400.0
    assert value(registry, "guardrail_stream_held_characters_bucket", le="128.0") == 1.0


def test_set_policy_replaces_the_previous_policy_series(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    old = {"name": "default", "version": "1", "digest": "aaa"}
    new = {"name": "default", "version": "2", "digest": "bbb"}

    metrics.set_policy(**old)
    assert registry.get_sample_value("guardrail_policy_info", old) == 1.0
    metrics.set_policy(**new)

    assert registry.get_sample_value("guardrail_policy_info", old) is None
    assert registry.get_sample_value("guardrail_policy_info", new) == 1.0
    info = [s for f in registry.collect() for s in f.samples if s.name == "guardrail_policy_info"]
    assert len(info) == 1


def test_policy_reloads_count_results_and_stamp_only_successes(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    assert value(registry, "guardrail_policy_reloads_total", result="error") == 0.0
    assert value(registry, "guardrail_policy_last_reload_timestamp_seconds") == 0.0

    metrics.policy_reload(ok=True)
    stamped = value(registry, "guardrail_policy_last_reload_timestamp_seconds")
    assert stamped is not None
    assert stamped > 1.6e9
    assert value(registry, "guardrail_policy_last_reload_success") == 1.0

    metrics.policy_reload(ok=False)
    assert value(registry, "guardrail_policy_reloads_total", result="ok") == 1.0
    assert value(registry, "guardrail_policy_reloads_total", result="error") == 1.0
    assert value(registry, "guardrail_policy_last_reload_timestamp_seconds") == stamped
    assert value(registry, "guardrail_policy_last_reload_success") == 0.0


def test_a_fresh_gateway_reports_its_startup_load_as_a_successful_load(
    client: TestClient[Litestar], metrics_registry: CollectorRegistry
) -> None:
    # Before: 0 and 0 until the first /admin/reload, so the alerts fired on new replicas.
    assert value(metrics_registry, "guardrail_policy_last_reload_success") == 1.0
    stamp = value(metrics_registry, "guardrail_policy_last_reload_timestamp_seconds")
    assert stamp is not None
    assert stamp > 1.6e9
    assert value(metrics_registry, "guardrail_policy_reloads_total", result="ok") == 0.0


# --- exposition -------------------------------------------------------------


def _record_every_kind(metrics: GatewayMetrics) -> None:
    """Exchanges of every kind, so that every metric has at least one sample."""
    rules_flag = filter_outcome("rules", finding("hate", Action.FLAG))
    pii_redact = filter_outcome("pii", finding("email", Action.REDACT), duration_s=0.004)
    tox_block = filter_outcome("tox", finding("violence", Action.BLOCK), duration_s=0.2)
    metrics.record(exchange("allowed", decision(Stage.INPUT, filter_outcome("rules"))))
    metrics.record(
        exchange(
            "allowed",
            decision(Stage.INPUT, filter_outcome("rules", cache="hit")),
            decision(Stage.INPUT, filter_outcome("rules", cache="miss")),
        )
    )
    metrics.record(
        exchange(
            "flagged",
            decision(Stage.INPUT, rules_flag),
            decision(Stage.OUTPUT, filter_outcome("tox")),
            backend="remote",
            backend_duration_s=0.9,
            prompt_tokens=10,
            completion_tokens=20,
        )
    )
    metrics.record(
        exchange(
            "redacted",
            decision(Stage.INPUT, pii_redact),
            decision(Stage.OUTPUT, filter_outcome("tox", status="timeout")),
            route="completions",
            backend="local",
            stream=True,
            backend_duration_s=2.0,
            ttft_s=0.05,
        )
    )
    metrics.record(exchange("blocked_input", decision(Stage.INPUT, tox_block)))
    metrics.record(
        exchange(
            "blocked_output",
            decision(Stage.INPUT, filter_outcome("rules", status="error")),
            decision(Stage.OUTPUT, tox_block),
            backend="remote",
            stream=True,
            backend_duration_s=0.4,
            ttft_s=0.1,
        )
    )
    metrics.record(exchange("backend_error", backend="remote", error_code="backend_timeout"))
    metrics.record(exchange("invalid_request", route="moderations"))
    metrics.record_decision(decision(Stage.INPUT, rules_flag))
    metrics.stream_window(Action.ALLOW, held_characters=64)
    metrics.stream_window(Action.BLOCK, held_characters=200)
    metrics.set_policy("default", "3", "sha256:abc")
    metrics.policy_reload(ok=True)
    metrics.policy_reload(ok=False)
    metrics.request_started("chat")
    metrics.rate_limited("tokens")
    metrics.observe_circuits(lambda: [("http://vllm-a:8000/v1", 2)])
    metrics.engine_queue_depth(3)
    metrics.engine_step(8)
    metrics.engine_first_token(0.2)
    metrics.engine_finished(64, 1.5)
    metrics.engine_prefix_lookup(True, 600, 2**20)
    metrics.feedback_received("negative", "block")
    metrics.feedback_received("positive", "block", replaced="negative")
    metrics.review_verdict("false_positive", "block")
    metrics.set_review_queue_depth(3)
    metrics.shadow_decision(Stage.INPUT, Action.ALLOW, "block", "candidate-1")
    metrics.record(exchange("flagged", _hallucination_decision()))
    metrics.consistency("background", 0.4)
    metrics.consistency_check("scored")


def _hallucination_decision() -> Decision:
    grounded = Finding("groundedness", 0.35, Action.ALLOW, filter_id="facts", concern="accuracy")
    ungrounded = Finding("ungrounded", 0.8, Action.FLAG, filter_id="facts", concern="accuracy")
    return decision(Stage.OUTPUT, filter_outcome("facts", grounded, ungrounded))


def test_moderation_checks_are_not_accuracy_signals_of_the_traffic(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    """A /v1/moderations batch with context fed groundedness_score and the flags: one
    offline evaluation of 60 answers fired GuardrailGroundednessLow."""
    metrics.record(exchange("flagged", _hallucination_decision(), route="moderations"))
    assert registry.get_sample_value("guardrail_groundedness_score_count", {"stage": "output"}) in (
        None,
        0.0,
    )
    assert (
        registry.get_sample_value(
            "guardrail_hallucination_flags_total", {"stage": "output", "kind": "ungrounded"}
        )
        is None
    )
    metrics.record(exchange("flagged", _hallucination_decision(), route="chat"))
    assert (
        registry.get_sample_value("guardrail_groundedness_score_count", {"stage": "output"}) == 1.0
    )


def test_accuracy_findings_count_as_hallucination_flags_never_as_harmful_content(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.record(exchange("flagged", _hallucination_decision(), _hallucination_decision()))

    flags = registry.get_sample_value(
        "guardrail_hallucination_flags_total", {"stage": "output", "kind": "ungrounded"}
    )
    assert flags == 1.0  # once per exchange, however many texts
    harmful = [
        s
        for f in registry.collect()
        if f.name == "guardrail_harmful_content"
        for s in f.samples
        if s.name.endswith("_total")
    ]
    assert harmful == []
    # One answer, however many of its texts were scored.
    assert (
        registry.get_sample_value("guardrail_groundedness_score_count", {"stage": "output"}) == 1.0
    )
    assert (
        registry.get_sample_value(
            "guardrail_groundedness_score_bucket", {"stage": "output", "le": "0.4"}
        )
        == 1.0
    )


def test_a_streamed_answer_is_one_groundedness_score_its_windows_mean_by_length(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    """Each held-back window is scored; observing each one made 6 answers 51 for
    GuardrailGroundednessLow's "at least 50 answers"."""

    def window(score: float, text: str) -> Decision:
        grounded = Finding(
            "groundedness", score, Action.ALLOW, filter_id="facts", concern="accuracy"
        )
        return decision(Stage.OUTPUT, filter_outcome("facts", grounded), text=text)

    windows = [window(0.2, "a" * 10), window(0.8, "b" * 30), window(0.5, "c" * 60)]
    for _ in range(2):
        metrics.record(exchange("allowed", *windows, stream=True))

    assert value(registry, "guardrail_groundedness_score_count", stage="output") == 2.0
    # (0.2 * 10 + 0.8 * 30 + 0.5 * 60) / 100 = 0.56 per answer
    assert value(registry, "guardrail_groundedness_score_sum", stage="output") == pytest.approx(
        1.12
    )


def test_exposition_is_the_text_format_with_its_content_type(metrics: GatewayMetrics) -> None:
    _record_every_kind(metrics)

    body, content_type = metrics.exposition()

    assert content_type.startswith("text/plain")
    assert b'guardrail_requests_total{outcome="allowed",route="chat"} 2.0' in body


def test_every_metric_has_help_text_and_samples_after_every_kind_of_exchange(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    _record_every_kind(metrics)

    families = [f for f in registry.collect() if f.name.startswith("guardrail_")]
    assert len(families) == 40
    for family in families:
        assert family.documentation, family.name
        assert family.samples, family.name


def test_no_user_text_reaches_the_exposition(metrics: GatewayMetrics) -> None:
    _record_every_kind(metrics)

    body, _ = metrics.exposition()

    assert SECRET.encode() not in body
    assert b"078-05-1120" not in body


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail("promtool is not installed, and CI must run the metrics lint")
        pytest.skip("promtool is not installed (CI installs it and runs this check)")
    return path


def test_promtool_accepts_the_exposition_without_lint_problems(metrics: GatewayMetrics) -> None:
    promtool = _promtool()
    _record_every_kind(metrics)
    body, _ = metrics.exposition()

    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )

    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, problems
    assert problems.strip() == ""


def test_two_registries_never_share_counts() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    GatewayMetrics(first).record(exchange("allowed"))
    GatewayMetrics(second)

    labels = {"route": "chat", "outcome": "allowed"}
    assert first.get_sample_value("guardrail_requests_total", labels) == 1.0
    assert second.get_sample_value("guardrail_requests_total", labels) is None


STREAM_FLAG_POLICY = """
name: streamed
version: "1"
stream: {release: sentence, window_chars: 80, context_chars: 40}
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: rude, category: insult, action: flag, keywords: [dummy]}
"""


def test_a_streamed_finding_left_in_the_context_tail_counts_one_filter_verdict(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> None:
    # The windows after "You dummy. " are checked with it as released context; before,
    # the rules filter's verdict on each of them still said flag: 4 flags for 1 finding.
    backend.reply = "You dummy. Fine. Also fine. The end."
    with TestClient(app=make_app(policy=write_policy(STREAM_FLAG_POLICY))) as client:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        response = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert response.status_code == 200
    get = metrics_registry.get_sample_value
    verdicts = "guardrail_filter_verdicts_total"
    flags = {"filter": "words", "stage": "output", "action": "flag"}
    assert get("guardrail_decisions_total", {"stage": "output", "action": "flag"}) == 1.0
    assert get("guardrail_stream_windows_total", {"action": "flag"}) == 1.0
    assert get(verdicts, flags) == 1.0
    assert get(verdicts, {**flags, "action": "allow"}) == 3.0
    assert get("guardrail_requests_total", {"route": "chat", "outcome": "flagged"}) == 1.0


def test_model_caches_are_exported_by_name_summed_over_instances(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.observe_caches(
        lambda: [
            CacheStats("embeddings", hits=5, misses=3, bytes=1536),
            CacheStats("embeddings", hits=1, misses=1, bytes=1536),  # a second encoder
            CacheStats("grounding_evidence", hits=2, misses=4),  # size not measured
        ]
    )
    lookups = "guardrail_model_cache_lookups_total"
    assert value(registry, lookups, cache="embeddings", result="hit") == 6.0
    assert value(registry, lookups, cache="embeddings", result="miss") == 4.0
    assert value(registry, lookups, cache="grounding_evidence", result="miss") == 4.0
    assert value(registry, "guardrail_model_cache_bytes", cache="embeddings") == 3072.0
    assert value(registry, "guardrail_model_cache_bytes", cache="grounding_evidence") is None


def test_the_pii_filters_analysis_lookups_are_a_model_cache() -> None:
    """Counted once for the process in the shared resources, so a reload, which builds
    new filters, does not reset the counter."""
    resources = SharedResources()
    lookups = resources.get(("pii", "analysis-lookups"), AnalysisLookups)
    lookups.hits, lookups.misses = 7, 2
    assert model_cache_stats(resources) == [CacheStats("pii_analyses", 7, 2)]


class SlowModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class SlowModelFilter:
    """Loads its model at build, as toxicity's or PII's do, and the load lasts until
    ``release`` is set (at most 10 s); ``released`` says whether it was."""

    loading = threading.Event()
    release = threading.Event()
    released: ClassVar[list[bool]] = []

    def __init__(self, name: str, config: SlowModelConfig, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset(Stage)
        self.model = env.resources.get("slow-model", self.load)

    @classmethod
    def load(cls) -> object:
        cls.loading.set()
        cls.released.append(cls.release.wait(10))
        return object()

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()


def test_a_scrape_while_a_reload_loads_a_model_holds_up_no_request(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """The scrape read the model caches under the lock the model load held, on the event
    loop: every request, /healthz too, waited for the load to end."""
    registry = filter_registry()
    registry.register("slow", FilterSpec("slow", SlowModelConfig, SlowModelFilter))
    SlowModelFilter.loading.clear()
    SlowModelFilter.release.clear()
    SlowModelFilter.released.clear()
    settings = Settings(policy=str(test_policy), admin_key_sha256=ADMIN_KEY_SHA256)
    app = create_app(settings, backend=backend, filters=registry, metrics_registry=metrics_registry)
    reloaded: list[int] = []
    with TestClient(app=app) as client:
        test_policy.write_text(TEST_POLICY + "  - {id: slow, type: slow}\n")
        reload = threading.Thread(
            target=lambda: reloaded.append(
                client.post("/admin/reload", headers=AS_ADMIN).status_code
            )
        )
        reload.start()
        try:
            assert SlowModelFilter.loading.wait(10)
            assert client.get("/metrics").status_code == 200
            assert client.get("/healthz").status_code == 200
        finally:
            SlowModelFilter.release.set()  # only now may the model finish loading
            reload.join()
    assert SlowModelFilter.released == [True]  # both answered while it was loading
    assert reloaded == [200]


CACHED_POLICY = """
name: cached
version: "1"
filters:
  - {id: tox, type: toxicity, config: {}}
  - id: facts
    type: hallucination
    config: {citations: {enabled: false}, cutoff: {enabled: false}}
"""


def test_the_gateways_model_caches_show_their_hits_misses_and_size(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> None:
    """Read off the real caches at scrape time: the same answer to the same tenant twice
    embeds it once; the request's documents are embedded once for the two requests."""
    backend.reply = "The depot ships orders within two working days."
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "When do orders ship?"}],
        "documents": [{"text": "Orders leave the Leeds depot within two working days."}],
    }
    with TestClient(app=make_app(policy=write_policy(CACHED_POLICY))) as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        scraped = client.get("/metrics").text

    def lookups(cache: str, result: str) -> float:
        found = metrics_registry.get_sample_value(
            "guardrail_model_cache_lookups_total", {"cache": cache, "result": result}
        )
        assert found is not None, (cache, result)
        return found

    assert lookups("embeddings", "miss") >= 3  # question, answer, the document's sentence
    assert lookups("embeddings", "hit") >= 1  # the same answer, checked again
    assert lookups("grounding_evidence", "miss") == 1.0
    assert lookups("grounding_evidence", "hit") == 1.0
    held = metrics_registry.get_sample_value("guardrail_model_cache_bytes", {"cache": "embeddings"})
    assert held is not None
    assert held > 0
    assert 'guardrail_model_cache_lookups_total{cache="embeddings",result="hit"}' in scraped
