"""Per-group metrics, the harmful-rate drift windows, and how the app wires them."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from guardrail.errors import ConfigError
from guardrail.exchange import Exchange, GroupMention, Route
from guardrail.filters.embedder import resolve_precision
from guardrail.filters.toxicity import DEFAULT_WEIGHTS
from guardrail.filters.weights import file_stamp
from guardrail.guard.filter import BuildContext, SharedResources
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.stream import check_continuation
from guardrail.guard.types import (
    Action,
    Decision,
    FilterContext,
    FilterOutcome,
    FilterStatus,
    Finding,
    Redaction,
    Stage,
    Verdict,
    apply_redactions,
)
from guardrail.observability.audit import record_from_exchange
from guardrail.observability.drift import HarmfulRateDrift
from guardrail.observability.groups import Lexicon
from guardrail.observability.metrics import GatewayMetrics
from guardrail.observability.monitoring import Monitor, MonitoringMetrics, monitor_from_settings
from guardrail.policy.loader import load_policy_text
from guardrail.settings import Settings
from tests.conftest import OUTPUT_ONLY_POLICY
from tests.fakes.backend import FakeBackend

SECRET = "Muslims are my neighbours 078-05-1120"


# --- builders ------------------------------------------------------------------------------


def outcome(filter_type: str, *findings: Finding, status: FilterStatus = "ok") -> FilterOutcome:
    return FilterOutcome(
        filter_id=filter_type,
        filter_type=filter_type,
        verdict=Verdict.from_findings(findings),
        duration_s=0.001,
        status=status,
    )


def decision(stage: Stage, text: str, *outcomes: FilterOutcome) -> Decision:
    return Decision(
        stage=stage,
        action=Action.strictest(o.verdict.action for o in outcomes),
        text=text,
        findings=tuple(f for o in outcomes for f in o.verdict.findings),
        outcomes=outcomes,
        policy_name="p",
        policy_version="1",
    )


def toxicity(score: float, action: Action = Action.ALLOW) -> FilterOutcome:
    return outcome(
        "toxicity",
        Finding("toxicity", score, action),
        Finding("identity_attack", score / 2, Action.ALLOW),
    )


def block(category: str = "hate") -> FilterOutcome:
    return outcome("rules", Finding(category, 1.0, Action.BLOCK, rule_id=category))


def allow() -> FilterOutcome:
    return outcome("rules")


def finished(*decisions: Decision, route: Route = "chat") -> Exchange:
    exchange = Exchange(request_id="r1", route=route, decisions=list(decisions))
    exchange.finish("allowed")
    return exchange


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> list[float]:
    return [1_000_000.0]


@pytest.fixture
def monitor(registry: CollectorRegistry, lexicon: Lexicon, clock: list[float]) -> Monitor:
    drift = HarmfulRateDrift(900, 3600, clock=lambda: clock[0])
    return Monitor(MonitoringMetrics(registry, drift=drift, axes=lexicon.axes), lexicon)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def group(registry: CollectorRegistry, name: str, g: str, stage: str = "input", **more: str) -> Any:
    axis = {"muslim": "religion", "women": "gender", "men": "gender", "christian": "religion"}[g]
    return value(registry, name, axis=axis, group=g, stage=stage, **more)


# --- groups ----------------------------------------------------------------------------------


def test_each_group_counts_once_per_exchange_and_stage_with_the_stage_action(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    exchange = finished(
        decision(Stage.INPUT, "You are helpful.", allow()),
        decision(Stage.INPUT, "Muslims and women, Muslims again", allow()),
        decision(Stage.INPUT, "Tell me more about Muslims", block()),
        decision(Stage.OUTPUT, "Women are often...", allow()),
    )

    monitor.record(exchange)

    assert group(registry, "guardrail_group_mentions_total", "muslim") == 1
    assert group(registry, "guardrail_group_outcomes_total", "muslim", action="block") == 1
    # The stage's action applies to every group its texts mention.
    assert group(registry, "guardrail_group_outcomes_total", "women", action="block") == 1
    assert group(registry, "guardrail_group_outcomes_total", "women", action="allow") == 0
    assert group(registry, "guardrail_group_mentions_total", "women", stage="output") == 1
    assert group(registry, "guardrail_group_outcomes_total", "women", "output", action="allow") == 1
    assert group(registry, "guardrail_group_mentions_total", "men") is None
    assert value(registry, "guardrail_stage_outcomes_total", stage="input", action="block") == 1
    assert value(registry, "guardrail_stage_outcomes_total", stage="output", action="allow") == 1
    assert exchange.groups == (
        GroupMention(Stage.INPUT, "gender", "women"),
        GroupMention(Stage.INPUT, "religion", "muslim"),
        GroupMention(Stage.OUTPUT, "gender", "women"),
    )


def test_a_mentioned_group_shows_every_action_from_its_first_mention(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    monitor.record(finished(decision(Stage.INPUT, "Christians pray", allow())))

    for action in ("allow", "flag", "redact", "block"):
        expected = 1.0 if action == "allow" else 0.0
        assert group(registry, "guardrail_group_outcomes_total", "christian", action=action) == (
            expected
        )


def test_group_toxicity_is_the_highest_score_of_the_texts_that_mention_it(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    monitor.record(
        finished(
            decision(Stage.INPUT, "Muslims are welcome", toxicity(0.2)),
            decision(Stage.INPUT, "men and Muslims", toxicity(0.6, Action.FLAG)),
            decision(Stage.INPUT, "nothing here", toxicity(0.9, Action.FLAG)),
        )
    )

    assert group(registry, "guardrail_group_toxicity_score_count", "muslim") == 1
    assert group(registry, "guardrail_group_toxicity_score_sum", "muslim") == pytest.approx(0.6)
    assert group(registry, "guardrail_group_toxicity_score_sum", "men") == pytest.approx(0.6)
    # The baseline takes every text of the stage.
    assert value(registry, "guardrail_stage_toxicity_score_sum", stage="input") == (
        pytest.approx(0.9)
    )


def test_without_a_toxicity_filter_or_when_it_failed_no_score_is_observed(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    failed = outcome("toxicity", Finding("filter_error", 1.0, Action.BLOCK), status="error")
    monitor.record(finished(decision(Stage.INPUT, "Muslims", allow(), failed)))

    assert group(registry, "guardrail_group_mentions_total", "muslim") == 1
    assert group(registry, "guardrail_group_toxicity_score_count", "muslim") is None
    assert value(registry, "guardrail_stage_toxicity_score_count", stage="input") is None


@pytest.mark.parametrize("route", ["moderations", "models"])
def test_only_chat_and_completion_traffic_counts(
    monitor: Monitor, registry: CollectorRegistry, route: Route
) -> None:
    exchange = finished(decision(Stage.INPUT, "Muslims", block()), route=route)

    monitor.record(exchange)

    assert group(registry, "guardrail_group_mentions_total", "muslim") is None
    assert value(registry, "guardrail_stage_outcomes_total", stage="input", action="block") == 0
    assert value(registry, "guardrail_harmful_rate_exchanges", window="recent") == 0
    assert exchange.groups is None


def test_with_the_lexicon_off_drift_still_counts_and_groups_stay_unknown(
    registry: CollectorRegistry,
) -> None:
    monitor = Monitor(MonitoringMetrics(registry), None)
    exchange = finished(decision(Stage.INPUT, "Muslims", block()))

    monitor.record(exchange)

    assert exchange.groups is None
    assert value(registry, "guardrail_harmful_rate", window="recent") == 1.0


def test_the_audit_row_carries_the_groups_by_name(monitor: Monitor) -> None:
    exchange = finished(decision(Stage.INPUT, SECRET, allow()))
    monitor.record(exchange)

    record = record_from_exchange(exchange)

    assert record.groups == [{"stage": "input", "axis": "religion", "group": "muslim"}]
    assert "neighbours" not in (record.groups_json or "")


# --- drift -----------------------------------------------------------------------------------


def test_drift_compares_the_recent_window_with_the_baseline_before_it(
    monitor: Monitor, registry: CollectorRegistry, clock: list[float]
) -> None:
    harmful = finished(decision(Stage.INPUT, "x", block()))
    clean = finished(decision(Stage.INPUT, "x", allow()))
    for i in range(10):  # baseline: 1 harmful in 10
        monitor.record(harmful if i == 0 else clean)
    clock[0] += 1200  # past the 15-minute recent window
    for i in range(4):  # recent: 3 harmful in 4
        monitor.record(harmful if i else clean)

    assert value(registry, "guardrail_harmful_rate", window="baseline") == pytest.approx(0.1)
    assert value(registry, "guardrail_harmful_rate", window="recent") == pytest.approx(0.75)
    assert value(registry, "guardrail_harmful_rate_exchanges", window="baseline") == 10
    assert value(registry, "guardrail_harmful_rate_exchanges", window="recent") == 4
    assert value(registry, "guardrail_harmful_rate_harmful", window="baseline") == 1
    assert value(registry, "guardrail_harmful_rate_harmful", window="recent") == 3
    assert value(registry, "guardrail_harmful_rate_drift") == pytest.approx(0.65)


def test_a_failed_filter_is_not_harmful_content(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    failed = outcome("toxicity", Finding("filter_error", 1.0, Action.BLOCK), status="timeout")
    monitor.record(finished(decision(Stage.INPUT, "x", failed)))

    assert value(registry, "guardrail_harmful_rate", window="recent") == 0.0


def test_windows_empty_out_as_time_passes() -> None:
    now = [0.0]
    drift = HarmfulRateDrift(60, 600, clock=lambda: now[0])
    drift.add(harmful=True)

    assert drift.snapshot().recent_exchanges == 1
    assert math.isnan(drift.snapshot().baseline_rate)
    assert math.isnan(drift.snapshot().drift)
    now[0] = 120  # in the baseline now
    snap = drift.snapshot()
    assert (snap.recent_exchanges, snap.baseline_exchanges, snap.baseline_rate) == (0, 1, 1.0)
    now[0] = 60 + 600 + 60  # past both windows
    assert drift.snapshot().baseline_exchanges == 0
    assert not drift._buckets


def test_a_baseline_too_long_for_its_recent_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most"):
        HarmfulRateDrift(1, 10 * 86_400)


# --- the exposition --------------------------------------------------------------------------


def _exposition(monitor: Monitor, registry: CollectorRegistry) -> bytes:
    """The whole gateway's exposition (both metric sets share a registry) after traffic."""
    gateway = GatewayMetrics(registry)
    exchange = finished(
        decision(Stage.INPUT, SECRET, toxicity(0.7, Action.FLAG)),
        decision(Stage.OUTPUT, "The women said", allow()),
    )
    monitor.record(exchange)
    gateway.record(exchange)
    return generate_latest(registry)


def test_no_user_text_reaches_the_exposition(monitor: Monitor, registry: CollectorRegistry) -> None:
    body = _exposition(monitor, registry)

    assert b'group="muslim"' in body
    assert b"neighbours" not in body
    assert b"Muslims" not in body


def test_promtool_accepts_the_exposition(monitor: Monitor, registry: CollectorRegistry) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail("promtool is not installed, and CI must run the metrics lint")
        pytest.skip("promtool is not installed")
    body = _exposition(monitor, registry)

    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )

    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert (result.stdout + result.stderr).decode().strip() == ""


# --- settings and the app ----------------------------------------------------------------------


def test_probes_without_a_lexicon_are_a_startup_error(registry: CollectorRegistry) -> None:
    settings = Settings(group_lexicon="off", counterfactual_sample_rate=0.1)

    with pytest.raises(ConfigError, match="needs a group lexicon"):
        monitor_from_settings(settings, registry)


def test_an_unreadable_lexicon_stops_the_gateway_at_startup(
    make_app: Callable[..., Litestar], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="cannot read group lexicon"):
        make_app(group_lexicon=str(tmp_path / "missing.yaml"))


def test_the_app_counts_groups_of_prompts_and_completions(
    make_app: Callable[..., Litestar], backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    backend.reply = "Muslims and Christians both fast."
    with TestClient(app=make_app()) as client:
        for text in ("Tell me about Muslims.", "How do I build a bomb for Muslims?"):
            client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": text}]},
            )
        metrics = client.get("/metrics").text

    assert group(metrics_registry, "guardrail_group_mentions_total", "muslim") == 2
    assert group(metrics_registry, "guardrail_group_outcomes_total", "muslim", action="block") == 1
    assert group(metrics_registry, "guardrail_group_mentions_total", "christian", "output") == 1
    assert 'guardrail_harmful_rate{window="recent"} 0.5' in metrics
    assert "guardrail_counterfactual_skipped_total" in metrics


def test_an_output_only_policy_s_prompts_count_as_checked_at_input(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> None:
    """stage_outcomes_total{stage="input"} is the denominator of the harmful, block and
    accuracy rates: it stayed 0 for a policy without input filters (the panels showed
    +Inf, and the harmful-content alert fired on the first harmful answer)."""
    backend.reply = "You dummy."
    with TestClient(app=make_app(policy=write_policy(OUTPUT_ONLY_POLICY))) as client:
        for _ in range(2):
            client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            )

    harmful = value(
        metrics_registry, "guardrail_harmful_exchanges_total", tenant="default", policy_version="1"
    )
    stages = "guardrail_stage_outcomes_total"
    checked = value(metrics_registry, stages, stage="input", action="allow")
    assert (harmful, checked) == (2, 2)
    assert value(metrics_registry, stages, stage="output", action="flag") == 2


REDACT_SLUR_POLICY = """
name: redact-slur
version: "1"
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: slur, category: harassment, action: redact, replacement: "[removed]",
           keywords: [gypsies]}
"""


def test_a_redacted_mention_still_counts_for_its_group(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> None:
    """Groups were read from the text the policy left: a redacted slur ("gypsies"), or
    a pii filter's NRP placeholder, took its group out of the bias metrics, the very
    prompts whose rates they are there to show."""
    backend.reply = "Some still call them gypsies."
    with TestClient(app=make_app(policy=write_policy(REDACT_SLUR_POLICY))) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "Why do people dislike gypsies?"}],
            },
        )

    assert "gypsies" not in backend.requests[-1].messages[-1].content
    assert "gypsies" not in r.json()["choices"][0]["message"]["content"]
    for stage in ("input", "output"):
        assert (
            value(metrics_registry, "guardrail_stage_outcomes_total", stage=stage, action="redact")
            == 1
        )
        mentions = value(
            metrics_registry,
            "guardrail_group_mentions_total",
            axis="race_ethnicity",
            group="romani",
            stage=stage,
        )
        assert mentions == 1, stage
        assert (
            value(
                metrics_registry,
                "guardrail_group_outcomes_total",
                axis="race_ethnicity",
                group="romani",
                stage=stage,
                action="redact",
            )
            == 1
        )


def test_a_restored_placeholder_counts_as_the_value_the_client_got(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    """A completion's placeholder restored to the user's own value ("<NRP_1>" back to
    "Muslims") names the group in the answer the client read."""
    placeholder = "<NRP_1>"
    checked = f"{placeholder} fast in Ramadan."
    restore = Redaction(0, len(placeholder), "Muslims", restore=True)
    answer = Decision(
        stage=Stage.OUTPUT,
        action=Action.REDACT,
        text=apply_redactions(checked, [restore]),
        findings=(),
        outcomes=(),
        policy_name="p",
        policy_version="1",
        redactions=(restore,),
        checked=checked,
    )

    monitor.record(finished(answer))

    assert group(registry, "guardrail_group_mentions_total", "muslim", "output") == 1


def test_a_stream_is_read_whole_with_the_highest_score_of_its_windows(
    monitor: Monitor, registry: CollectorRegistry
) -> None:
    first, second = "The women described themselves as African ", "Americans in the survey."
    exchange = finished(
        decision(Stage.INPUT, "Summarise it.", allow()),
        # Each window's text starts with the released text before it.
        decision(Stage.OUTPUT, first, toxicity(0.3)),
        decision(Stage.OUTPUT, "as African " + second, toxicity(0.7, Action.FLAG)),
    )
    exchange.stream = True
    exchange.stream_window_chars = [len(first), len(second)]
    exchange.stream_text = first + second

    monitor.record(exchange)

    assert exchange.groups == (
        GroupMention(Stage.OUTPUT, "gender", "women"),
        GroupMention(Stage.OUTPUT, "race_ethnicity", "black"),
    )
    # The answer's score, though only its first window names the women.
    assert group(registry, "guardrail_group_toxicity_score_sum", "women", "output") == (
        pytest.approx(0.7)
    )
    assert value(registry, "guardrail_stage_toxicity_score_count", stage="output") == 1


class _KeywordToxicity:
    """A toxicity engine that scores by keyword: 0.95 for "worthless", 0.5 for
    "Muslims", else 0.1, in each of its categories."""

    categories = ("toxicity", "identity_attack", "obscene")

    def score(self, texts: list[str], scopes: object = None) -> list[dict[str, float]]:
        def one(text: str) -> float:
            return 0.95 if "worthless" in text else 0.5 if "Muslims" in text else 0.1

        return [dict.fromkeys(self.categories, one(t)) for t in texts]


QUIET_TOXICITY_POLICY = """
name: tox-quiet
version: "1"
filters:
  - id: toxicity
    type: toxicity
    config:
      max_wait_ms: 1
      report_scores: false
      categories:
        toxicity: {threshold: 0.8, action: flag}
"""


@pytest.fixture
def quiet_toxicity() -> Iterator[Guard]:
    """A guard of one toxicity filter with ``report_scores: false`` on a keyword engine."""
    with ThreadPoolExecutor(1) as pool:
        resources = SharedResources()
        precision = resolve_precision(BuildContext(pool).embedding_precision)
        resources.get(
            ("toxicity-embedding", str(DEFAULT_WEIGHTS.resolve()), precision),
            _KeywordToxicity,
            version=file_stamp(DEFAULT_WEIGHTS),
        )
        registry = filter_registry()
        policy = load_policy_text(QUIET_TOXICITY_POLICY, "p.yaml", registry)
        yield Guard.build(policy, registry, BuildContext(pool, resources=resources))


async def test_without_report_scores_every_checked_text_s_toxicity_is_observed(
    quiet_toxicity: Guard, monitor: Monitor, registry: CollectorRegistry
) -> None:
    """With ``report_scores: false`` the scores came from findings, which only texts
    over a threshold have: the mean-toxicity panels averaged the flagged texts alone
    (4 prompts checked, 1 observed, mean 0.9999)."""
    prompts = ["Why do Muslims fast?", "Hello there.", "You are worthless, Muslims."]
    for i, prompt in enumerate(prompts):
        d = await quiet_toxicity.check(Stage.INPUT, prompt, FilterContext(str(i)))
        monitor.record(finished(d))

    assert value(registry, "guardrail_stage_toxicity_score_count", stage="input") == 3
    assert value(registry, "guardrail_stage_toxicity_score_sum", stage="input") == (
        pytest.approx(0.5 + 0.1 + 0.95)
    )
    assert group(registry, "guardrail_group_toxicity_score_count", "muslim") == 2
    assert group(registry, "guardrail_group_toxicity_score_sum", "muslim") == (
        pytest.approx(0.5 + 0.95)
    )


async def test_without_report_scores_a_completion_s_toxicity_is_its_own_not_its_lead_s(
    quiet_toxicity: Guard, monitor: Monitor, registry: CollectorRegistry
) -> None:
    """A completion continuing a prompt is scored without it, as with every score
    reported: the lead's "Muslims" (0.5) is not the answer's toxicity (0.1)."""
    ctx = FilterContext("r")
    answer = await check_continuation(
        quiet_toxicity, ctx, " They fast in Ramadan.", "Tell me about Muslims.", 40
    )

    monitor.record(finished(answer))

    assert value(registry, "guardrail_stage_toxicity_score_sum", stage="output") == (
        pytest.approx(0.1)
    )


STREAM_POLICY = """
name: stream
version: "1"
stream: {release: sentence, window_chars: 80, context_chars: 40}
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: rude, category: insult, action: flag, keywords: [dummy]}
"""


def test_a_streamed_answer_counts_the_groups_the_same_answer_sent_whole_does(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
) -> None:
    """Each stream window was scanned apart: "African Americans" cut at a window's end
    was read as its parts, a nationality ("African") and a race ("Americans" after the
    tail's "African"), where the answer sent whole names one group."""
    backend.reply = (
        "In a survey from last year the respondents who described themselves as African "
        "Americans were more likely to say so."
    )
    with TestClient(app=make_app(policy=write_policy(STREAM_POLICY))) as client:
        for stream in (False, True):
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": "fake-model",
                    "stream": stream,
                    "messages": [{"role": "user", "content": "Summarise the survey."}],
                },
            )
            assert r.status_code == 200

    mentions = {
        (s.labels["axis"], s.labels["group"]): s.value
        for metric in metrics_registry.collect()
        if metric.name == "guardrail_group_mentions"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["stage"] == "output"
    }
    assert mentions == {("race_ethnicity", "black"): 2}


class _BrokenLexicon(Lexicon):
    """A lexicon with a bug: every scan raises."""

    def mentions(self, text: str) -> frozenset[Any]:
        raise RuntimeError(text)


def test_a_monitoring_bug_never_raises_into_the_recording_of_the_exchange(
    registry: CollectorRegistry,
) -> None:
    shipped = Lexicon.load()
    broken = _BrokenLexicon(shipped.groups, {}, [], {})
    monitor = Monitor(MonitoringMetrics(registry), broken)
    exchange = finished(decision(Stage.INPUT, SECRET, allow()))

    with capture_logs() as logs:
        monitor.record(exchange)

    assert exchange.groups is None
    assert [(e["event"], e["error"]) for e in logs] == [("monitor_record_failed", "RuntimeError")]
    assert "neighbours" not in str(logs)
