"""Prometheus metrics for the gateway, read from finished exchanges.

Why it is built this way:

- One :class:`GatewayMetrics` per :class:`~prometheus_client.CollectorRegistry`, which
  the app creates and passes in. There is no module-level registry, so two apps (or
  two tests) in one process never share a counter, and tests read exact values with
  ``registry.get_sample_value(...)``.
- Request-level numbers come from one place only: a finished
  :class:`~guardrail.exchange.Exchange`, handed to :meth:`GatewayMetrics.record`.
  Metrics, audit log and structured logs then agree, and nothing counts from inside
  a filter. The moderation endpoint, which has decisions but no backend call, uses
  :meth:`GatewayMetrics.record_decision`.
- Observability imports only data types (``guardrail.exchange``,
  ``guardrail.guard.types``), never the guard's or the API's machinery, so the
  arrows in DESIGN.md stay one way: the API calls metrics, never the reverse.
- Every label is a bounded set. Routes, outcomes, stages, actions and stream flags
  are enums. Filter ids, categories, backend names and error codes come from the
  policy, the settings and the gateway's own error codes, never from users; even so
  each of those open labels keeps at most ``max_label_values`` distinct values and
  folds later newcomers into ``"other"``, so a policy with thousands of categories
  (or many hot reloads) cannot blow up the series count. User text is never a label.

Idempotence is the caller's job: :meth:`GatewayMetrics.record` counts whatever it is
given, so the API records each exchange exactly once, after
:meth:`~guardrail.exchange.Exchange.finish` (which itself keeps the first outcome).

Metrics (all prefixed ``guardrail_``):

==============================================  =========  ===========================
name                                            type       labels
==============================================  =========  ===========================
requests_total                                  counter    route, outcome
request_duration_seconds                        histogram  route
in_flight_requests                              gauge      route
decisions_total                                 counter    stage, action
filter_verdicts_total                           counter    filter, stage, action
filter_errors_total                             counter    filter, stage, kind
filter_duration_seconds                         histogram  filter, stage
harmful_content_total                           counter    stage, category, tenant,
                                                           policy_version
harmful_exchanges_total                         counter    tenant, policy_version
finding_score                                   histogram  filter, stage, category
verdict_cache_total                             counter    filter, result
backend_duration_seconds                        histogram  backend, stream
backend_errors_total                            counter    backend, code
time_to_first_token_seconds                     histogram  backend
tokens_total                                    counter    backend, kind
stream_windows_total                            counter    action
stream_held_characters                          histogram  (none)
policy_info                                     gauge      name, version, digest
policy_reloads_total                            counter    result
policy_last_reload_timestamp_seconds            gauge      (none)
policy_last_reload_success                      gauge      (none)
rate_limited_total                              counter    limit
overloaded_total                                counter    route
backend_circuit_state                           gauge      url
feedback_total                                  counter    rating_class, decision
feedback_replaced_total                         counter    rating_class, decision
review_verdicts_total                           counter    verdict, action
review_queue_depth                              gauge      (none)
shadow_decisions_total                          counter    stage, active, shadow
hallucination_flags_total                       counter    stage, kind
groundedness_score                              histogram  stage
consistency_score                               histogram  mode
consistency_checks_total                        counter    result
model_cache_lookups_total                       counter    cache, result
model_cache_bytes                               gauge      cache
==============================================  =========  ===========================
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from guardrail.exchange import MONITORED_ROUTES, OVERLOADED, Exchange, Route
from guardrail.guard.types import FILTER_ERROR_CATEGORY, Action, Decision, Stage
from guardrail.observability.audit import AuditStats

__all__ = [
    "BACKEND_BUCKETS",
    "FILTER_BUCKETS",
    "HELD_CHARACTER_BUCKETS",
    "OTHER",
    "REQUEST_BUCKETS",
    "SCORE_BUCKETS",
    "TTFT_BUCKETS",
    "UNKNOWN",
    "CacheStats",
    "GatewayMetrics",
]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """One model cache's counts since start: ``cache`` is a fixed name (never user text),
    ``bytes`` what it holds now (None where it is not measured)."""

    cache: str
    hits: int
    misses: int
    bytes: int | None = None


OTHER: Final = "other"
"""Label value that stands for every value past the cap of an open label."""

GROUNDEDNESS: Final = "groundedness"
"""The category of the finding that carries a text's whole groundedness score."""

UNKNOWN: Final = "unknown"
"""Label value for a missing or empty name (no backend, no error code, no filter id)."""

# A whole request includes generation, which can take minutes on a long completion.
REQUEST_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
BACKEND_BUCKETS: Final = REQUEST_BUCKETS
# Filters range from a regex (well under a millisecond) to a model on a CPU (seconds).
SCORE_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
FILTER_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128)
TOKENS_PER_SECOND_BUCKETS: Final = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
HELD_CHARACTER_BUCKETS: Final = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

_STAGES: Final = tuple(s.value for s in Stage)
_ACTIONS: Final = tuple(a.value for a in Action)
_RATING_CLASSES: Final = ("positive", "negative")
_VERDICTS: Final = ("correct", "false_positive", "false_negative")


class _CappedLabel:
    """Passes through at most ``limit`` distinct values of one label, then answers ``other``.

    The first values seen keep their own series for the life of the process; the
    cap only stops growth. A lock keeps the count exact when threads record at once.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if not value:
            return UNKNOWN
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
            return value


class GatewayMetrics:
    """The gateway's Prometheus metrics, registered in ``registry``.

    Example::

        registry = CollectorRegistry()
        metrics = GatewayMetrics(registry)
        exchange.finish("allowed")
        metrics.record(exchange)
        body, content_type = metrics.exposition()

    ``max_label_values`` caps the distinct values of each open label (filter,
    category, backend, code); past the cap a new value is counted as ``"other"``.
    """

    def __init__(self, registry: CollectorRegistry, *, max_label_values: int = 200) -> None:
        if max_label_values < 1:
            raise ValueError("max_label_values must be at least 1")
        self.registry = registry
        self._filter = _CappedLabel(max_label_values)
        self._category = _CappedLabel(max_label_values)
        self._backend = _CappedLabel(max_label_values)
        self._code = _CappedLabel(max_label_values)
        self._tenant = _CappedLabel(max_label_values)
        self._version = _CappedLabel(max_label_values)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace="guardrail", registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, namespace="guardrail", registry=registry)

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(
                name, doc, labels, namespace="guardrail", registry=registry, buckets=buckets
            )

        self.requests = counter(
            "requests_total", "Finished requests, by route and outcome.", ("route", "outcome")
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "Whole-request latency in seconds, from arrival to the last byte.",
            ("route",),
            REQUEST_BUCKETS,
        )
        self.in_flight_requests = gauge(
            "in_flight_requests", "Requests being served right now.", ("route",)
        )
        self.decisions = counter(
            "decisions_total",
            "Guard decisions (one per checked text), by stage and resulting action.",
            ("stage", "action"),
        )
        self.filter_verdicts = counter(
            "filter_verdicts_total",
            "Filter verdicts, by policy filter id, stage and action.",
            ("filter", "stage", "action"),
        )
        self.filter_errors = counter(
            "filter_errors_total",
            "Filter runs that failed (kind=error) or ran out of time (kind=timeout); a "
            "stream's failed hold-back counts once (kind=error).",
            ("filter", "stage", "kind"),
        )
        self.filter_duration = histogram(
            "filter_duration_seconds",
            "Time one filter took on one text, in seconds.",
            ("filter", "stage"),
            FILTER_BUCKETS,
        )
        self.harmful_content = counter(
            "harmful_content_total",
            "Exchanges with a finding whose action is not allow, by stage, policy category, "
            "tenant and policy version.",
            ("stage", "category", "tenant", "policy_version"),
        )
        self.harmful_exchanges = counter(
            "harmful_exchanges_total",
            "Exchanges with a harmful finding at any stage, of any category, once each: the "
            "numerator of the share of requests that carry one.",
            ("tenant", "policy_version"),
        )
        self.hallucination_flags = counter(
            "hallucination_flags_total",
            "Exchanges with an accuracy finding that acted (ungrounded, unverified_citation, "
            "knowledge_cutoff, inconsistent), by stage and kind; never counted as harmful.",
            ("stage", "kind"),
        )
        self.groundedness_score = histogram(
            "groundedness_score",
            "Groundedness (0-1, higher is better supported) of answers checked against the "
            "request's sources, one per exchange and stage (a stream's windows averaged), "
            "by stage.",
            ("stage",),
            SCORE_BUCKETS,
        )
        self.consistency_score = histogram(
            "consistency_score",
            "Self-consistency (0-1) of sampled answers with the answer sent, by mode "
            "(background or inline).",
            ("mode",),
            SCORE_BUCKETS,
        )
        self.consistency_checks = counter(
            "consistency_checks_total",
            "Self-consistency checks by result (scored, skipped: no sample usable, "
            "dropped: too many running, error).",
            ("result",),
        )
        self.verdict_cache = counter(
            "verdict_cache_total",
            "Verdict cache lookups by filter and result (hit: reused, miss: checked).",
            ("filter", "result"),
        )
        self.finding_score = histogram(
            "finding_score",
            "Scores of findings (for example toxicity per category), by filter, stage, category.",
            ("filter", "stage", "category"),
            SCORE_BUCKETS,
        )
        self.backend_duration = histogram(
            "backend_duration_seconds",
            "Time the model backend took for a whole generation, in seconds.",
            ("backend", "stream"),
            BACKEND_BUCKETS,
        )
        self.backend_errors = counter(
            "backend_errors_total",
            "Requests that failed in the model backend, by gateway error code.",
            ("backend", "code"),
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Streams: seconds from the request to the first checked text sent.",
            ("backend",),
            TTFT_BUCKETS,
        )
        self.tokens = counter(
            "tokens_total",
            "Tokens reported by the backend, by kind (prompt or completion).",
            ("backend", "kind"),
        )
        self.stream_windows = counter(
            "stream_windows_total",
            "Held-back stream windows checked by the output filters, by action.",
            ("action",),
        )
        self.stream_held_characters = histogram(
            "stream_held_characters",
            "Characters held back in one stream window before it was checked.",
            (),
            HELD_CHARACTER_BUCKETS,
        )
        self.policy_info = gauge(
            "policy_info",
            "The policy in force (value is always 1).",
            ("name", "version", "digest"),
        )
        self.policy_reloads = counter(
            "policy_reloads_total", "Policy reload attempts, by result (ok or error).", ("result",)
        )
        self.policy_last_reload_timestamp = gauge(
            "policy_last_reload_timestamp_seconds",
            "Unix time of the last successful policy load (startup) or reload.",
        )
        self.policy_last_reload_success = gauge(
            "policy_last_reload_success",
            "1 if the last policy load or reload attempt succeeded, else 0.",
        )
        self.rate_limited_requests = counter(
            "rate_limited_total",
            "Requests refused with 429 by the per-key rate limits, by limit (requests, tokens).",
            ("limit",),
        )
        self.overloaded = counter(
            "overloaded_total",
            "Requests refused with 503 overloaded: the gateway's own capacity (max_concurrency, "
            "max_queue, queue_timeout_s) was the limit, not the backend.",
            ("route",),
        )
        self.shadow_decisions = counter(
            "shadow_decisions_total",
            "Decisions of the shadow (candidate) policy next to the active policy's, by stage; "
            "shadow is an action, or dropped (too many in flight) or error.",
            ("stage", "active", "shadow"),
        )
        self._url = _CappedLabel(max_label_values)
        self._circuits = _CircuitCollector(self._url)
        registry.register(self._circuits)
        self._policy_lock = threading.Lock()

        # User satisfaction and human review (guardrail.api.oversight).
        self.feedback = counter(
            "feedback_total",
            "User ratings of chat and completion responses, by rating class (positive, "
            "negative) and the rated exchange's decision (its strictest action): a "
            "response's first rating, and a changed rating's new class (less "
            "feedback_replaced_total, the ratings stored).",
            ("rating_class", "decision"),
        )
        self.feedback_replaced = counter(
            "feedback_replaced_total",
            "Ratings counted in feedback_total that a changed rating of the same response "
            "replaced, by their rating class and the exchange's decision.",
            ("rating_class", "decision"),
        )
        self.review_verdicts = counter(
            "review_verdicts_total",
            "Reviewer verdicts recorded (correct, false_positive, false_negative), by the "
            "gateway's action on the judged exchange.",
            ("verdict", "action"),
        )
        self.review_queue_depth = gauge(
            "review_queue_depth",
            "Flagged, blocked and rated-down exchanges waiting for a reviewer "
            "(read from the audit database every few seconds).",
        )
        # The local engine (backend local): batching, queue and KV-cache reuse.
        self.engine_queue_depth_gauge = gauge(
            "engine_queue_depth", "Local engine: requests waiting for a place in the batch."
        )
        self.engine_batch_size = histogram(
            "engine_batch_size",
            "Local engine: sequences decoded together, one observation per decoding step.",
            (),
            BATCH_BUCKETS,
        )
        self.engine_first_token_seconds = histogram(
            "engine_time_to_first_token_seconds",
            "Local engine: seconds from a request's arrival at the engine (queue wait "
            "included) to its first generated token, streamed or not.",
            (),
            TTFT_BUCKETS,
        )
        self.engine_tokens_per_second = histogram(
            "engine_tokens_per_second",
            "Local engine: one request's decoding speed after its first token "
            "(completion tokens per second).",
            (),
            TOKENS_PER_SECOND_BUCKETS,
        )
        self.engine_prefix_cache = counter(
            "engine_prefix_cache_total",
            "Local engine: prompts looked up in the KV prefix cache, by result (hit or miss).",
            ("result",),
        )
        self.engine_reused_tokens = counter(
            "engine_prefix_cache_reused_tokens_total",
            "Local engine: prompt tokens not recomputed thanks to the KV prefix cache.",
        )
        self.engine_cache_bytes = gauge(
            "engine_prefix_cache_bytes", "Local engine: memory held by the KV prefix cache."
        )

        # Series of known, small label sets start at zero, so rate() and ratios work
        # from the first scrape instead of showing "no data" until the first event.
        for stage in _STAGES:
            for action in _ACTIONS:
                self.decisions.labels(stage=stage, action=action)
        for action in _ACTIONS:
            self.stream_windows.labels(action=action)
        for result in ("ok", "error"):
            self.policy_reloads.labels(result=result)
        for limit in ("requests", "tokens"):
            self.rate_limited_requests.labels(limit=limit)
        for route in get_args(Route):
            self.in_flight_requests.labels(route=route)
            self.overloaded.labels(route=route)
        for action in _ACTIONS:
            for rating_class in _RATING_CLASSES:
                self.feedback.labels(rating_class=rating_class, decision=action)
                self.feedback_replaced.labels(rating_class=rating_class, decision=action)
            for verdict in _VERDICTS:
                self.review_verdicts.labels(verdict=verdict, action=action)
        for result in ("hit", "miss"):
            self.engine_prefix_cache.labels(result=result)

    # --- request level -------------------------------------------------------

    def record(self, exchange: Exchange) -> None:
        """Record everything request-level from a finished ``exchange``.

        Call once per exchange, after ``exchange.finish(...)``: calling twice counts
        twice. Raises ``ValueError`` for an unfinished exchange, a caller bug.
        """
        if exchange.outcome is None or exchange.duration_s is None:
            raise ValueError(
                f"exchange {exchange.request_id} is not finished; call Exchange.finish() first"
            )
        self.requests.labels(route=exchange.route, outcome=exchange.outcome).inc()
        self.request_duration.labels(route=exchange.route).observe(exchange.duration_s)
        window_chars = iter(exchange.stream_window_chars)
        counted = exchange.route in MONITORED_ROUTES
        for decision in exchange.decisions:
            self.record_decision(decision)
            if exchange.stream and decision.stage is Stage.OUTPUT:
                self.stream_window(decision.action, next(window_chars, None))
        # A failed hold-back decides no window, so no check's outcome holds it: counted
        # here, once per stream and filter (it fails again at every chunk that follows).
        for filter_id in exchange.stream_holdback_failures:
            self.filter_errors.labels(
                filter=self._filter(filter_id), stage=Stage.OUTPUT.value, kind="error"
            ).inc()
        if counted:
            self._record_groundedness(exchange)
        # Harmful content counts once per exchange, stage and category: a chat client
        # resends its whole history every turn, and an old finding is not new harm. Only
        # chat and completions exchanges count (as in the drift windows and the report):
        # the rate's denominator is their requests, and a batch of /v1/moderations
        # checks is not traffic that reached users. Hallucination flags likewise.
        acted = {
            (d.stage.value, f.category, f.concern)
            for d in exchange.decisions
            for f in d.findings
            if f.action is not Action.ALLOW
        }
        # A failed filter's block is not harmful content (it has its own counter), as in
        # the harmful-rate drift windows.
        harmful = {
            (stage, category)
            for stage, category, concern in acted
            if counted and concern == "harm" and category != FILTER_ERROR_CATEGORY
        }
        for stage, kind, concern in sorted(acted):
            if counted and concern == "accuracy":
                self.hallucination_flags.labels(stage=stage, kind=self._category(kind)).inc()
        if harmful:
            tenant = self._tenant(exchange.tenant)
            version = self._version(exchange.policy_version)
            for stage, category in sorted(harmful):
                self.harmful_content.labels(
                    stage=stage,
                    category=self._category(category),
                    tenant=tenant,
                    policy_version=version,
                ).inc()
            # harmful_content_total counts an exchange once per stage and category, so its
            # sum is no count of exchanges (a harmful prompt and its harmful answer are
            # two): the share of requests with a harmful finding needs this one.
            self.harmful_exchanges.labels(tenant=tenant, policy_version=version).inc()

        if exchange.error_code == OVERLOADED:
            # The gateway shed the load: no backend failed, and none was called.
            self.overloaded.labels(route=exchange.route).inc()
        elif exchange.outcome == "backend_error":
            self.backend_errors.labels(
                backend=self._backend(exchange.backend), code=self._code(exchange.error_code)
            ).inc()
        if exchange.backend is None:
            return
        backend = self._backend(exchange.backend)
        if exchange.backend_duration_s is not None:
            self.backend_duration.labels(
                backend=backend, stream="true" if exchange.stream else "false"
            ).observe(exchange.backend_duration_s)
        if exchange.time_to_first_token_s is not None:
            self.time_to_first_token.labels(backend=backend).observe(exchange.time_to_first_token_s)
        # A backend that reports no usage leaves these None; nothing is guessed.
        for kind, count in (
            ("prompt", exchange.prompt_tokens),
            ("completion", exchange.completion_tokens),
        ):
            if count is not None and count > 0:
                self.tokens.labels(backend=backend, kind=kind).inc(count)

    def _record_groundedness(self, exchange: Exchange) -> None:
        """Observe one groundedness score per answer: per exchange and stage, the mean of
        its texts' scores weighted by their length. A stream is checked (and scored) in
        windows, and one observation per window made 6 answers 51 for the alert's volume
        guard, and a long streamed answer outweigh a short one in the median. Only chat
        and completions exchanges (the caller's job): an offline batch of /v1/moderations
        checks with ``context`` is not traffic that reached users (60 fired the alert).
        A stream window weighs its own length: its decision's text holds the released
        text it was checked after too."""
        windows = iter(exchange.stream_window_chars)
        sizes = [
            next(windows, None) if exchange.stream and d.stage is Stage.OUTPUT else None
            for d in exchange.decisions
        ]
        for stage in Stage:
            scored = [
                (finding.score, max(1, len(decision.text) if size is None else size))
                for decision, size in zip(exchange.decisions, sizes, strict=True)
                if decision.stage is stage
                for finding in decision.findings
                if finding.category == GROUNDEDNESS and finding.concern == "accuracy"
            ]
            if scored:
                mean = sum(s * w for s, w in scored) / sum(w for _, w in scored)
                self.groundedness_score.labels(stage=stage.value).observe(mean)

    def record_decision(self, decision: Decision) -> None:
        """Record one guard decision: the decision and each filter's outcome.

        :meth:`record` calls this for every decision of an exchange and counts harmful
        findings, and groundedness, once per exchange. Like :meth:`record`, it counts
        every call.
        """
        stage = decision.stage.value
        self.decisions.labels(stage=stage, action=decision.action.value).inc()
        for outcome in decision.outcomes:
            filter_id = self._filter(outcome.filter_id)
            self.filter_verdicts.labels(
                filter=filter_id, stage=stage, action=outcome.verdict.action.value
            ).inc()
            if outcome.cache != "off":
                self.verdict_cache.labels(filter=filter_id, result=outcome.cache).inc()
            if outcome.cache != "hit":  # a reused verdict took no filter time
                self.filter_duration.labels(filter=filter_id, stage=stage).observe(
                    outcome.duration_s
                )
            if outcome.status != "ok":
                self.filter_errors.labels(filter=filter_id, stage=stage, kind=outcome.status).inc()
        for finding in decision.findings:
            self.finding_score.labels(
                filter=self._filter(finding.filter_id),
                stage=stage,
                category=self._category(finding.category),
            ).observe(finding.score)

    # --- audit log ---------------------------------------------------------------

    def observe_audit(self, stats: Callable[[], AuditStats]) -> None:
        """Export the audit log's counters, read at each scrape."""
        self.registry.register(_AuditCollector(stats))

    def observe_caches(self, stats: Callable[[], Iterable[CacheStats]]) -> None:
        """Export the model caches' lookups and sizes, read at each scrape (caches of
        one name are summed: two policies' encoders, say)."""
        self.registry.register(_CacheCollector(stats))

    def observe_rate_limit_store(self, failures: Callable[[], int]) -> None:
        """Export how many rate-limit checks could not reach the shared store (Redis) and
        were let through, read at each scrape: the limiter fails open, so this is the
        number an alert watches."""
        self.registry.register(_StoreFailuresCollector(failures))

    # --- in-flight requests --------------------------------------------------

    def request_started(self, route: Route) -> None:
        """Count a request in flight; pair with :meth:`request_ended`.

        For streamed responses, which outlive the handler that starts them, call
        :meth:`request_ended` when the stream closes.
        """
        self.in_flight_requests.labels(route=route).inc()

    def request_ended(self, route: Route) -> None:
        """Stop counting a request started with :meth:`request_started`."""
        self.in_flight_requests.labels(route=route).dec()

    @contextmanager
    def in_flight(self, route: Route) -> Iterator[None]:
        """Count a request in flight for the duration of a ``with`` block."""
        self.request_started(route)
        try:
            yield
        finally:
            self.request_ended(route)

    # --- streams -------------------------------------------------------------

    def stream_window(self, action: Action, held_characters: int | None = None) -> None:
        """Record one held-back stream window checked by the output filters.

        ``held_characters`` is the window's size (a length, never the text).
        """
        self.stream_windows.labels(action=action.value).inc()
        if held_characters is not None:
            self.stream_held_characters.observe(max(0, held_characters))

    # --- limits and backends ------------------------------------------------

    def rate_limited(self, limit: str) -> None:
        """Count a request refused by a rate limit (``requests`` or ``tokens``)."""
        self.rate_limited_requests.labels(limit=limit).inc()

    # --- the local engine (guardrail.backends.engine.EngineObserver) -----------

    def engine_queue_depth(self, depth: int) -> None:
        self.engine_queue_depth_gauge.set(depth)

    def engine_step(self, batch_size: int) -> None:
        self.engine_batch_size.observe(batch_size)

    def engine_first_token(self, seconds: float) -> None:
        self.engine_first_token_seconds.observe(seconds)

    def engine_finished(self, completion_tokens: int, decode_seconds: float) -> None:
        # The first token came with the prompt; the rest took decode_seconds.
        if completion_tokens > 1 and decode_seconds > 0:
            self.engine_tokens_per_second.observe((completion_tokens - 1) / decode_seconds)

    def engine_prefix_lookup(self, hit: bool, reused_tokens: int, cached_bytes: int) -> None:
        self.engine_prefix_cache.labels(result="hit" if hit else "miss").inc()
        if reused_tokens:
            self.engine_reused_tokens.inc(reused_tokens)
        self.engine_cache_bytes.set(cached_bytes)

    def engine_prefix_bytes(self, cached_bytes: int) -> None:
        """The prefix cache's size after a finished generation stored its keys and values."""
        self.engine_cache_bytes.set(cached_bytes)

    def consistency(self, mode: str, score: float) -> None:
        """One self-consistency score (``mode``: background or inline)."""
        self.consistency_score.labels(mode=mode).observe(score)

    def consistency_check(self, result: str) -> None:
        self.consistency_checks.labels(result=result).inc()

    def shadow_decision(self, stage: Stage, active: Action, shadow: str, version: str) -> None:
        """Count one shadow comparison (``version`` is the shadow policy's, for logs only)."""
        self.shadow_decisions.labels(stage=stage.value, active=active.value, shadow=shadow).inc()

    def observe_circuits(self, states: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Export each backend URL's circuit state (0 closed, 1 half-open, 2 open), read
        at each scrape: an open circuit turns half-open when its reset time has passed,
        whether or not a request asks it, and the gauge must show that (an alert on 2
        would never clear). A later call replaces the earlier source (a new backend).

        The URLs come from the settings (without credentials), never from users.
        """
        self._circuits.states = states

    # --- policy --------------------------------------------------------------

    def set_policy(self, name: str, version: str, digest: str) -> None:
        """Mark the policy in force; the previous policy's series disappears. Loading it
        (at startup too) is a successful load: an alert on the success gauge or on the
        load's age must not fire on every new replica."""
        with self._policy_lock:
            self.policy_info.clear()
            self.policy_info.labels(name=name, version=version, digest=digest).set(1)
        self.policy_last_reload_success.set(1)
        self.policy_last_reload_timestamp.set(time.time())

    def policy_reload(self, ok: bool) -> None:
        """Record a reload attempt; a success also stamps the reload time."""
        self.policy_reloads.labels(result="ok" if ok else "error").inc()
        self.policy_last_reload_success.set(1 if ok else 0)
        if ok:
            self.policy_last_reload_timestamp.set(time.time())

    # --- feedback and review ------------------------------------------------

    def feedback_received(
        self, rating_class: str, decision: str, *, replaced: str | None = None
    ) -> None:
        """Count a user's rating (``positive``/``negative``) of a response whose exchange
        ended in ``decision`` (an action); never the comment or any id. ``replaced``: the
        class of the rating of the same response it replaces, counted in
        ``feedback_replaced_total`` so that the two counters' difference is the ratings
        stored (a rating that replaces one of its own class changes nothing: not counted).
        """
        if replaced == rating_class:
            return
        decision = decision if decision in _ACTIONS else UNKNOWN
        self.feedback.labels(
            rating_class=rating_class if rating_class in _RATING_CLASSES else OTHER,
            decision=decision,
        ).inc()
        if replaced is not None:
            self.feedback_replaced.labels(
                rating_class=replaced if replaced in _RATING_CLASSES else OTHER,
                decision=decision,
            ).inc()

    def review_verdict(self, verdict: str, action: str) -> None:
        """Count a reviewer's verdict on an exchange whose action was ``action``."""
        self.review_verdicts.labels(
            verdict=verdict if verdict in _VERDICTS else OTHER,
            action=action if action in _ACTIONS else UNKNOWN,
        ).inc()

    def set_review_queue_depth(self, depth: int) -> None:
        """Set the number of exchanges waiting for a reviewer."""
        self.review_queue_depth.set(depth)

    # --- exposition ----------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CacheCollector(Collector):
    """Hits, misses and bytes of the process's model caches, read when Prometheus
    scrapes: tenants' separate entries make hit rates the number to watch."""

    def __init__(self, stats: Callable[[], Iterable[CacheStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "guardrail_model_cache_lookups",
            "Lookups in the model caches (embeddings, groundedness evidence, probe "
            "prefixes, PII analyses) by result: hit or miss.",
            labels=["cache", "result"],
        )
        held = GaugeMetricFamily(
            "guardrail_model_cache_bytes", "What the model caches hold now.", labels=["cache"]
        )
        hits: collections.Counter[str] = collections.Counter()
        misses: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for s in self._stats():
            hits[s.cache] += s.hits
            misses[s.cache] += s.misses
            if s.bytes is not None:
                sizes[s.cache] += s.bytes
        for name in sorted(hits.keys() | misses.keys()):
            lookups.add_metric([name, "hit"], hits[name])
            lookups.add_metric([name, "miss"], misses[name])
        for name, size in sorted(sizes.items()):
            held.add_metric([name], size)
        yield lookups
        yield held


class _StoreFailuresCollector(Collector):
    def __init__(self, failures: Callable[[], int]) -> None:
        self._failures = failures

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "guardrail_rate_limit_store_failures",
            "Rate-limit checks that could not reach the shared store (Redis) and were let "
            "through unlimited.",
            value=self._failures(),
        )


class _CircuitCollector(Collector):
    """The backend circuits' states, read when Prometheus scrapes: only a scrape sees an
    open circuit's reset time pass on a URL no request reaches (failover stops at the
    first URL that serves)."""

    def __init__(self, url: _CappedLabel) -> None:
        self._url = url
        self.states: Callable[[], Iterable[tuple[str, int]]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "guardrail_backend_circuit_state",
            "Circuit of each remote backend URL: 0 closed, 1 half-open (trial), 2 open.",
            labels=["url"],
        )
        worst: dict[str, int] = {}
        for url, state in self.states():
            # URLs past the label cap share "other": it shows the worst of them.
            label = self._url(url)
            worst[label] = max(state, worst.get(label, state))
        for label, state in worst.items():
            family.add_metric([label], state)
        yield family


class _AuditCollector(Collector):
    """The audit log's counters, read when Prometheus scrapes (no copy to keep in sync)."""

    def __init__(self, stats: Callable[[], AuditStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        rows = CounterMetricFamily(
            "guardrail_audit_records",
            "Audit rows by result: written, or dropped (each dropped row is logged by id).",
            labels=["result"],
        )
        rows.add_metric(["written"], s.written)
        rows.add_metric(["dropped"], s.dropped)
        yield rows
        yield CounterMetricFamily(
            "guardrail_audit_write_errors",
            "Failed audit writes; their rows are kept and retried.",
            value=s.write_errors,
        )
        yield GaugeMetricFamily(
            "guardrail_audit_queue_depth", "Audit rows waiting for the database.", value=s.depth
        )
