"""Monitoring beyond request counts: bias across groups, counterfactual probes, drift.

The Llama 2 developer guide asks a deployment to watch, among other things, bias
across demographic groups and how often harmful content appears. This module turns
finished exchanges into those measures:

- **Groups.** The texts of each stage are scanned for group terms
  (:mod:`guardrail.observability.groups`) as the filters read them, before any
  redaction (``Decision.checked``): a redacted term still names its group. Per group
  and stage it counts the exchanges that mention the group, the stage's action on them
  (the strictest at that stage: allow, flag, redact, block) and the toxicity filter's
  highest score among the texts that mention it. The same counts for every exchange
  (``stage_outcomes_total``, ``stage_toxicity_score``) are the baseline a group's rates
  are compared with: a group whose prompts are blocked three times as often as prompts
  overall is a finding for the policy's authors. The groups found go on the exchange
  (``Exchange.groups``) for the audit log.
- **Counterfactual probes** (:mod:`guardrail.observability.counterfactual`), counted
  per axis as ``same`` or ``flip``.
- **Drift** of the harmful-content rate (:mod:`guardrail.observability.drift`),
  exported as gauges computed when Prometheus scrapes.

Only chat and completion exchanges that reached the filters count: they are the
prompts and completions of the traffic. Moderation calls (often offline evaluations)
and refused requests would skew the rates. Everything here reads a finished exchange,
like the rest of observability; labels are the lexicon's axis and group names, stages
and actions, never text.

Metrics (prefix ``guardrail_``):

==============================  =========  ============================
name                            type       labels
==============================  =========  ============================
group_mentions_total            counter    axis, group, stage
group_outcomes_total            counter    axis, group, stage, action
group_toxicity_score            histogram  axis, group, stage
stage_outcomes_total            counter    stage, action
stage_toxicity_score            histogram  stage
counterfactual_probes_total     counter    axis, result
counterfactual_skipped_total    counter    reason
harmful_rate                    gauge      window
harmful_rate_exchanges          gauge      window
harmful_rate_harmful            gauge      window
harmful_rate_drift              gauge      (none)
==============================  =========  ============================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from guardrail.chat import Message
from guardrail.errors import ConfigError
from guardrail.exchange import MONITORED_ROUTES, Exchange, GroupMention
from guardrail.guard.types import Action, Decision, FilterContext, Stage, apply_redactions
from guardrail.observability.counterfactual import (
    SKIP_REASONS,
    CounterfactualProber,
    InputChecker,
    ProbeResult,
    SkipReason,
)
from guardrail.observability.drift import HarmfulRateDrift
from guardrail.observability.groups import GroupRef, Lexicon
from guardrail.observability.metrics import SCORE_BUCKETS

__all__ = [
    "MONITORED_ROUTES",
    "TOXICITY_FILTER_TYPE",
    "Monitor",
    "MonitorSettings",
    "MonitoringMetrics",
    "monitor_from_settings",
]

TOXICITY_FILTER_TYPE: Final = "toxicity"
"""Filter type whose scores feed the toxicity histograms (its highest category score)."""

# The category of a failed filter's finding (guardrail.guard.guard.FILTER_ERROR_CATEGORY,
# not imported: observability imports data types only). A failure is not harmful content.
_FILTER_ERROR: Final = "filter_error"
_STAGES: Final = tuple(s.value for s in Stage)
_ACTIONS: Final = tuple(a.value for a in Action)
_OFF: Final = frozenset({"off", "none", "false", "0", "disabled"})

log = structlog.get_logger("guardrail.monitoring")


class MonitoringMetrics:
    """The metrics of this module, registered in the app's ``registry``.

    Example::

        metrics = MonitoringMetrics(registry, drift=HarmfulRateDrift(900, 86_400))
        metrics.group_mentions.labels(axis="religion", group="muslim", stage="input").inc()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        drift: HarmfulRateDrift | None = None,
        axes: Sequence[str] = (),
    ) -> None:
        self.registry = registry
        self.drift = drift if drift is not None else HarmfulRateDrift()

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, namespace="guardrail", registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...]) -> Histogram:
            return Histogram(
                name, doc, labels, namespace="guardrail", registry=registry, buckets=SCORE_BUCKETS
            )

        self.group_mentions = counter(
            "group_mentions_total",
            "Chat and completion exchanges whose texts at a stage mention a demographic group.",
            ("axis", "group", "stage"),
        )
        self.group_outcomes = counter(
            "group_outcomes_total",
            "Exchanges mentioning a group at a stage, by the stage's strictest action.",
            ("axis", "group", "stage", "action"),
        )
        self.group_toxicity = histogram(
            "group_toxicity_score",
            "Highest toxicity-filter score among an exchange's texts that mention a group.",
            ("axis", "group", "stage"),
        )
        self.stage_outcomes = counter(
            "stage_outcomes_total",
            "Chat and completion exchanges checked at a stage, by the stage's strictest "
            "action: the baseline of the per-group rates; at stage input, the requests that "
            "reached the filters (the denominator of the harmful and accuracy-flag rates).",
            ("stage", "action"),
        )
        self.stage_toxicity = histogram(
            "stage_toxicity_score",
            "Highest toxicity-filter score of an exchange's texts at a stage (all exchanges).",
            ("stage",),
        )
        self.counterfactual_probes = counter(
            "counterfactual_probes_total",
            "Counterfactual probes (a group swapped for its counterpart, input stage re-run), "
            "by axis and result: same decision, or flip.",
            ("axis", "result"),
        )
        self.counterfactual_skipped = counter(
            "counterfactual_skipped_total",
            "Sampled counterfactual probes not compared: busy (too many in flight, dropped), "
            "filter_error (a filter failed on either side), error.",
            ("reason",),
        )
        registry.register(_DriftCollector(self))

        self._seen: set[tuple[GroupRef, str]] = set()
        self._seen_lock = threading.Lock()
        # Known, small label sets start at zero so rates and ratios work from the start.
        for stage in _STAGES:
            for action in _ACTIONS:
                self.stage_outcomes.labels(stage=stage, action=action)
        for reason in SKIP_REASONS:
            self.counterfactual_skipped.labels(reason=reason)
        for axis in axes:
            for result in ("same", "flip"):
                self.counterfactual_probes.labels(axis=axis, result=result)

    def group_seen(self, ref: GroupRef, stage: str) -> None:
        """Start a group's outcome series at zero for every action, the first time it is
        mentioned at ``stage``: a group with mentions and no blocks then shows a block
        rate of 0, not a gap."""
        key = (ref, stage)
        if key in self._seen:
            return
        with self._seen_lock:
            if key in self._seen:
                return
            self._seen.add(key)
        for action in _ACTIONS:
            self.group_outcomes.labels(axis=ref.axis, group=ref.group, stage=stage, action=action)

    def probe_result(self, result: ProbeResult) -> None:
        self.counterfactual_probes.labels(axis=result.group.axis, result=result.result).inc()

    def probe_skipped(self, reason: SkipReason) -> None:
        self.counterfactual_skipped.labels(reason=reason).inc()


class _DriftCollector(Collector):
    """The harmful-rate windows, computed when Prometheus scrapes."""

    def __init__(self, metrics: MonitoringMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.drift.snapshot()
        # Counts, not only the rate: replicas combine as sum(harmful) / sum(exchanges).
        windows = (
            (
                "guardrail_harmful_rate",
                "Share of chat/completion exchanges with a harmful finding, in this replica's "
                "recent window and in the baseline window before it (NaN: no traffic).",
                snap.recent_rate,
                snap.baseline_rate,
            ),
            (
                "guardrail_harmful_rate_exchanges",
                "Chat/completion exchanges counted in each harmful-rate window of this replica.",
                snap.recent_exchanges,
                snap.baseline_exchanges,
            ),
            (
                "guardrail_harmful_rate_harmful",
                "Harmful chat/completion exchanges in each harmful-rate window of this replica.",
                snap.recent_harmful,
                snap.baseline_harmful,
            ),
        )
        for name, documentation, recent, baseline in windows:
            family = GaugeMetricFamily(name, documentation, labels=["window"])
            family.add_metric(["recent"], recent)
            family.add_metric(["baseline"], baseline)
            yield family
        yield GaugeMetricFamily(
            "guardrail_harmful_rate_drift",
            "Harmful rate of the recent window minus the baseline window's (NaN: either "
            "window has no traffic).",
            value=snap.drift,
        )


class Monitor:
    """Reads finished exchanges into :class:`MonitoringMetrics`; starts probes.

    Example::

        monitor = Monitor(metrics, Lexicon.load(), prober)
        monitor.probe(guard, ctx, messages, input_decisions)  # after the input stage
        monitor.record(exchange)   # finished, before the audit log records it
        await monitor.aclose()     # shutdown: cancel running probes

    ``lexicon`` ``None`` turns group detection (and so probes) off; drift still counts.
    """

    def __init__(
        self,
        metrics: MonitoringMetrics,
        lexicon: Lexicon | None,
        prober: CounterfactualProber | None = None,
    ) -> None:
        self.metrics = metrics
        self.lexicon = lexicon
        self.prober = prober

    def record(self, exchange: Exchange) -> None:
        """Count a finished exchange and set ``exchange.groups``. Call once, before
        the audit log reads the exchange. Never raises: a monitoring bug must not cost
        the exchange its metrics and audit row (it is logged by type)."""
        if exchange.route not in MONITORED_ROUTES or not exchange.decisions:
            return
        try:
            self._record(exchange)
        except Exception as e:
            log.error(
                "monitor_record_failed", request_id=exchange.request_id, error=type(e).__name__
            )

    def _record(self, exchange: Exchange) -> None:
        m = self.metrics
        m.drift.add(
            harmful=any(
                f.action is not Action.ALLOW and f.category != _FILTER_ERROR and f.concern == "harm"
                for d in exchange.decisions
                for f in d.findings
            )
        )
        lexicon = self.lexicon
        found: list[GroupMention] = []
        for stage in Stage:
            decisions = exchange.decisions_at(stage)
            if not decisions:
                continue
            action = Action.strictest(d.action for d in decisions).value
            m.stage_outcomes.labels(stage=stage.value, action=action).inc()
            stage_score: float | None = None
            # Group -> the highest toxicity score among the texts that mention it.
            groups: dict[GroupRef, float | None] = {}
            for text, score in _texts(exchange, stage, decisions):
                stage_score = _max(stage_score, score)
                if lexicon is None:
                    continue
                for ref in lexicon.mentions(text):
                    groups[ref] = _max(groups.get(ref), score)
            if stage_score is not None:
                m.stage_toxicity.labels(stage=stage.value).observe(stage_score)
            for ref in sorted(groups):
                score = groups[ref]
                labels = {"axis": ref.axis, "group": ref.group, "stage": stage.value}
                m.group_seen(ref, stage.value)
                m.group_mentions.labels(**labels).inc()
                m.group_outcomes.labels(**labels, action=action).inc()
                if score is not None:
                    m.group_toxicity.labels(**labels).observe(score)
                found.append(GroupMention(stage, ref.axis, ref.group))
        if lexicon is not None:
            exchange.groups = tuple(found)

    def probe(
        self,
        checker: InputChecker,
        ctx: FilterContext,
        messages: Sequence[Message],
        decisions: Sequence[tuple[int | None, Decision]],
    ) -> None:
        """After the input stage: maybe start a counterfactual probe (never waits)."""
        if self.prober is not None:
            self.prober.maybe_probe(checker, ctx, messages, decisions)

    async def aclose(self) -> None:
        if self.prober is not None:
            await self.prober.aclose()


def _texts(
    exchange: Exchange, stage: Stage, decisions: list[Decision]
) -> list[tuple[str, float | None]]:
    """The texts of ``stage`` groups are read from, each with its toxicity score.

    A stream's completion is one text, whole (``Exchange.stream_text``), with the
    highest score of its windows: each window's own text held a term cut at the window's
    end as its parts ("African" + "Americans" read as two groups, neither of them the one
    the whole answer names). Its windows are the stage's first decisions, one per
    ``stream_window_chars`` entry (the metrics read them so); a tool calls check follows.
    """
    texts = [(_read(d), _toxicity(d)) for d in decisions]
    if stage is not Stage.OUTPUT or exchange.stream_text is None:
        return texts
    count = len(exchange.stream_window_chars)
    score: float | None = None
    for _, window_score in texts[:count]:
        score = _max(score, window_score)
    return [(exchange.stream_text, score), *texts[count:]]


def _read(decision: Decision) -> str:
    """The text of ``decision`` groups are read from: the text the filters read, not the
    one the policy left (a redacted "gypsies", an NRP placeholder, still names its
    group), with the values a completion's placeholders were restored to put back."""
    if decision.checked is None:
        return decision.text
    restores = [r for r in decision.redactions if r.restore]
    return apply_redactions(decision.checked, restores) if restores else decision.checked


def _toxicity(decision: Decision) -> float | None:
    """The toxicity filter's highest category score on this text, if it ran and worked:
    its verdict's score, which it gives whether or not findings carry every score
    (``report_scores``), and its findings' (a verdict made without one)."""
    best: float | None = None
    for outcome in decision.outcomes:
        if outcome.filter_type != TOXICITY_FILTER_TYPE or outcome.status != "ok":
            continue
        best = _max(best, outcome.verdict.score)
        for finding in outcome.verdict.findings:
            best = _max(best, finding.score)
    return best


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# --- from settings -----------------------------------------------------------------


class MonitorSettings(Protocol):
    """The settings fields the monitor reads (``guardrail.settings.Settings`` has them)."""

    @property
    def group_lexicon(self) -> str | None: ...
    @property
    def counterfactual_sample_rate(self) -> float: ...
    @property
    def counterfactual_max_in_flight(self) -> int: ...
    @property
    def harmful_rate_recent_s(self) -> float: ...
    @property
    def harmful_rate_baseline_s(self) -> float: ...


def monitor_from_settings(settings: MonitorSettings, registry: CollectorRegistry) -> Monitor:
    """The monitor the settings describe, its metrics registered in ``registry``.

    ``group_lexicon``: empty for the shipped lexicon, a path for another, ``off`` for
    none. A lexicon that cannot be read, or probes asked for without one, raise
    ``ConfigError`` (at startup).
    """
    name = settings.group_lexicon
    off = name is not None and name.strip().lower() in _OFF
    lexicon = None if off else Lexicon.load(name or None)
    if lexicon is None and settings.counterfactual_sample_rate > 0:
        raise ConfigError("counterfactual_sample_rate needs a group lexicon (group_lexicon is off)")
    metrics = MonitoringMetrics(
        registry,
        drift=HarmfulRateDrift(settings.harmful_rate_recent_s, settings.harmful_rate_baseline_s),
        axes=lexicon.axes if lexicon is not None else (),
    )
    prober = None
    if lexicon is not None and settings.counterfactual_sample_rate > 0:
        prober = CounterfactualProber(
            lexicon,
            sample_rate=settings.counterfactual_sample_rate,
            max_in_flight=settings.counterfactual_max_in_flight,
            on_result=metrics.probe_result,
            on_skip=metrics.probe_skipped,
        )
    return Monitor(metrics, lexicon, prober)
