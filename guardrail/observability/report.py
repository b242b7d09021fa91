"""``guardrail report``: one self-contained HTML page about the audit log's traffic.

It reads the audit database (the ``audit_log`` rows of a time window, and the
``audit_feedback`` ratings if that table exists) and writes a page with: the
harmful-content rate over time per category, the block rate per demographic group
against the overall rate, user satisfaction, latency percentiles (and p50/p99 over
time), and the rules that fired most. The page has no external assets: styles and
charts (SVG drawn here) are inline, so it can be mailed or attached to a ticket.

Why it is built this way:

- **The audit log is the source**, not Prometheus: it covers every replica, survives
  restarts, and holds per-exchange detail (findings, groups) that metrics aggregate
  away. The report reads it once, streaming, in time order; memory grows with the
  number of exchanges only through the latency samples kept for exact percentiles
  (eight bytes each).
- **One population**: chat and completion exchanges that reached the input filters
  (the rows with an ``input_action``), as in the live metrics, for every section: the
  ratings and latencies too. Moderation calls and refused requests are counted in the
  summary's rows per route only.
- **Definitions match the metrics.** An exchange is harmful in a category when a
  finding of that category acted (flag, redact, block) at either stage, once per
  exchange; failed filters (``filter_error``) and hallucination flags (``concern``
  ``accuracy``) are not harm. A group's block rate at a
  stage is the share of exchanges mentioning it (the row's ``groups``) whose action at
  that stage was ``block``; its *disparity* is that rate over the rate of every
  exchange checked at the stage. Percentiles are nearest-rank.
- Works on SQLite (read-only) and PostgreSQL (``postgres`` extra), on a database of any
  schema version this gateway writes: without a ``groups`` column or a feedback table
  the sections say so instead of failing.

Everything from the database that reaches the page (category, filter and rule names)
is HTML-escaped. No text of any exchange is read.
"""

from __future__ import annotations

import html
import json
import math
import re
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

from guardrail.errors import ConfigError, MissingDependencyError
from guardrail.observability.audit import PostgresStore, SQLiteStore, store_from_dsn

__all__ = [
    "AuditRow",
    "GroupRate",
    "Percentiles",
    "Report",
    "ReportBuilder",
    "RuleCount",
    "Satisfaction",
    "load_report",
    "parse_duration",
    "parse_since",
    "percentile",
    "render_html",
]

REPORT_ROUTES: Final = frozenset({"chat", "completions"})
_FILTER_ERROR: Final = "filter_error"
_ACCURACY_RULES: Final = "hallucination."
_STAGES: Final = ("input", "output")
_TOP_CATEGORIES: Final = 8
_TOP_RULES: Final = 20
_FEW_MENTIONS: Final = 30
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# The last second a page's dates can name: 9999-12-30, a day short of the calendar's
# end, so that a step added past it or a local time zone cannot leave the calendar.
_LATEST: Final = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


# --- inputs ------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` as seconds; ``ValueError`` otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30m, 12h, 7d or 2w")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} is not longer than zero")
    if not math.isfinite(seconds):  # a count of hundreds of digits
        raise ValueError(f"{_shown(text)!r} is too long a duration")
    return seconds


def _shown(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}...{text[-4:]}"


def parse_since(text: str, now: float) -> float:
    """A window start: a duration before ``now`` (``7d``) or an ISO 8601 date or time
    (UTC unless it says otherwise), never before 1970 (no audit row is older, and the
    page's dates would not exist). ``ValueError`` for anything else."""
    if _DURATION.match(text):  # its own problem ("0d" is not longer than zero), not "neither"
        return max(0.0, now - parse_duration(text))
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (7d, 12h) nor an ISO date (2025-01-31)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    moment = when.timestamp()
    if moment > _LATEST:
        raise ValueError(f"{text!r} is after the year 9999, which a page cannot show")
    return max(0.0, moment)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """The columns of one ``audit_log`` row that the report reads."""

    epoch: float
    route: str
    outcome: str
    input_action: str | None
    output_action: str | None
    findings: Sequence[dict[str, Any]]
    duration_ms: float | None
    backend_ms: float | None
    ttft_ms: float | None
    groups: Sequence[dict[str, Any]] | None = None
    """``[{"stage", "axis", "group"}]``; ``None`` when the row (or database) has none."""


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Percentiles:
    n: int
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class GroupRate:
    """One group at one stage: how often its exchanges were blocked and flagged."""

    axis: str
    group: str
    stage: str
    mentions: int
    blocked: int
    flagged: int
    """Flagged or redacted: passed, with a finding that acted."""
    overall_block_rate: float | None

    @property
    def block_rate(self) -> float:
        return self.blocked / self.mentions if self.mentions else 0.0

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.mentions if self.mentions else 0.0

    @property
    def disparity(self) -> float | None:
        """Block rate over the stage's overall block rate (1: the same; 2: twice)."""
        if not self.overall_block_rate:
            return None
        return self.block_rate / self.overall_block_rate


@dataclass(frozen=True, slots=True)
class RuleCount:
    """A rule (or, for filters without rules, a category) that acted, and how often."""

    filter: str
    rule: str | None
    category: str
    action: str
    exchanges: int


@dataclass(frozen=True, slots=True)
class Satisfaction:
    """User ratings (``audit_feedback``: +1 good, -1 bad) given within the window."""

    ratings: int
    positive: int
    by_action: dict[str, tuple[int, int]]
    """Action of the rated exchange -> (positive, ratings)."""
    per_bucket: list[tuple[int, int]]
    """(positive, ratings) per time bucket."""

    @property
    def positive_share(self) -> float | None:
        return self.positive / self.ratings if self.ratings else None


@dataclass
class Report:
    """Everything the page shows; :func:`render_html` draws it."""

    since: float
    until: float
    bucket_s: float
    rows: int
    rows_by_route: dict[str, int]
    exchanges: int
    buckets: list[float]
    exchanges_per_bucket: list[int]
    harmful_exchanges: int
    harmful_totals: dict[str, int]
    harmful_per_bucket: dict[str, list[int]]
    stage_totals: dict[str, tuple[int, int, int]]
    """Stage -> (exchanges checked, blocked, flagged or redacted)."""
    groups: list[GroupRate] | None
    latency: dict[str, dict[str, Percentiles]]
    """Route -> measure (duration, backend, ttft) -> percentiles, in milliseconds."""
    latency_over_time: dict[str, list[float | None]]
    """p50 and p99 of whole-request time per bucket, for exchanges that reached the model."""
    rules: list[RuleCount]
    satisfaction: Satisfaction | None
    notes: list[str] = field(default_factory=list)

    @property
    def harmful_rate(self) -> float | None:
        return self.harmful_exchanges / self.exchanges if self.exchanges else None

    def stage_block_rate(self, stage: str) -> float | None:
        checked, blocked, _ = self.stage_totals.get(stage, (0, 0, 0))
        return blocked / checked if checked else None


def _reached_filters(route: str, input_action: str | None) -> bool:
    """Whether an exchange is of the report's population: a chat or completion exchange
    whose prompt the input filters checked (a refused request's row has no input action)."""
    return route in REPORT_ROUTES and input_action is not None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _percentiles(values: list[float]) -> Percentiles:
    values.sort()
    return Percentiles(
        len(values), percentile(values, 0.5), percentile(values, 0.9), percentile(values, 0.99)
    )


MAX_BUCKETS = 10_000
"""The most time steps a report's charts hold (a year in hours is 8,760)."""


def default_bucket(span_s: float) -> float:
    """Chart step for a window: an hour up to two days, six hours up to two weeks,
    a day up to ninety days, then a week."""
    for limit, step in ((2 * 86_400, 3600), (14 * 86_400, 6 * 3600), (90 * 86_400, 86_400)):
        if span_s <= limit:
            return float(step)
    return 7 * 86_400.0


class ReportBuilder:
    """Aggregates rows (in any order) into a :class:`Report`.

    Example::

        builder = ReportBuilder(since, until, bucket_s=3600, groups_known=True)
        for row in rows:
            builder.add(row)
        builder.add_rating(epoch, 1, "allow", route="chat", input_action="allow")
        report = builder.build()
    """

    def __init__(
        self,
        since: float,
        until: float,
        *,
        bucket_s: float | None = None,
        groups_known: bool = True,
        feedback_known: bool = False,
    ) -> None:
        if until <= since:
            raise ValueError("the report window ends before it starts")
        self.since, self.until = since, until
        self.bucket_s = bucket_s or default_bucket(until - since)
        self.n_buckets = max(1, math.ceil((until - since) / self.bucket_s))
        if self.n_buckets > MAX_BUCKETS:
            # Each step holds counters per category: a year in seconds exhausted memory.
            raise ValueError(
                f"the window holds {self.n_buckets:,} time steps, and a report draws at most "
                f"{MAX_BUCKETS:,}; choose a larger --step or a shorter window"
            )
        self.groups_known = groups_known
        self.feedback_known = feedback_known
        self.rows = 0
        self.rows_by_route: Counter[str] = Counter()
        self.exchanges = 0
        self.per_bucket = [0] * self.n_buckets
        self.harmful_exchanges = 0
        self.harmful: dict[str, list[int]] = defaultdict(lambda: [0] * self.n_buckets)
        self.stage: dict[str, list[int]] = {s: [0, 0, 0] for s in _STAGES}
        # (axis, group, stage) -> [mentions, blocked, flagged]
        self.group_counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.latency: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.served: list[list[float]] = [[] for _ in range(self.n_buckets)]
        self.rules: Counter[tuple[str, str | None, str, str]] = Counter()
        self.ratings = 0
        self.positive = 0
        self.rating_actions: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.rating_buckets = [[0, 0] for _ in range(self.n_buckets)]

    def _bucket(self, epoch: float) -> int | None:
        if not self.since <= epoch < self.until:
            return None
        return min(self.n_buckets - 1, int((epoch - self.since) // self.bucket_s))

    def add(self, row: AuditRow) -> None:
        bucket = self._bucket(row.epoch)
        if bucket is None:
            return
        self.rows += 1
        self.rows_by_route[row.route] += 1
        if not _reached_filters(row.route, row.input_action):
            return
        for name, value in (
            ("duration", row.duration_ms),
            ("backend", row.backend_ms),
            ("ttft", row.ttft_ms),
        ):
            if value is not None:
                self.latency[row.route][name].append(float(value))
        self.exchanges += 1
        self.per_bucket[bucket] += 1
        if row.backend_ms is not None and row.duration_ms is not None:
            self.served[bucket].append(float(row.duration_ms))

        acting = [f for f in row.findings if f.get("action", "allow") != "allow"]
        categories = {str(f.get("category")) for f in acting if _is_harm(f)} - {_FILTER_ERROR}
        if categories:
            self.harmful_exchanges += 1
        for category in categories:
            self.harmful[category][bucket] += 1
        for key in {
            (
                str(f.get("filter") or ""),
                f.get("rule_id"),
                str(f.get("category")),
                str(f.get("action")),
            )
            for f in acting
        }:
            self.rules[key] += 1

        actions = {"input": row.input_action, "output": row.output_action}
        for stage, action in actions.items():
            if action is None:
                continue
            totals = self.stage[stage]
            totals[0] += 1
            totals[1] += action == "block"
            totals[2] += action in ("flag", "redact")
        for mention in row.groups or ():
            stage = str(mention.get("stage"))
            action = actions.get(stage)
            if action is None:
                continue
            counts = self.group_counts[(str(mention.get("axis")), str(mention.get("group")), stage)]
            counts[0] += 1
            counts[1] += action == "block"
            counts[2] += action in ("flag", "redact")

    def add_rating(
        self,
        epoch: float,
        rating: int,
        action: str | None,
        *,
        route: str,
        input_action: str | None,
    ) -> None:
        """Count a rating given at ``epoch`` of an exchange of ``route``; ``input_action``
        is None for a refused request (one that never reached the filters)."""
        bucket = self._bucket(epoch)
        if bucket is None or not _reached_filters(route, input_action):
            return
        good = rating > 0
        self.ratings += 1
        self.positive += good
        by_action = self.rating_actions[action or "unknown"]
        by_action[0] += good
        by_action[1] += 1
        self.rating_buckets[bucket][0] += good
        self.rating_buckets[bucket][1] += 1

    def build(self) -> Report:
        overall = {
            stage: (blocked / checked if checked else None)
            for stage, (checked, blocked, _) in self.stage.items()
        }
        groups = None
        if self.groups_known:
            groups = [
                GroupRate(axis, group, stage, n, blocked, flagged, overall.get(stage))
                for (axis, group, stage), (n, blocked, flagged) in self.group_counts.items()
            ]
            groups.sort(key=lambda g: (g.stage != "input", -g.block_rate, -g.mentions, g.group))
        latency = {
            route: {name: _percentiles(values) for name, values in measures.items()}
            for route, measures in sorted(self.latency.items())
        }
        over_time: dict[str, list[float | None]] = {"p50": [], "p99": []}
        for values in self.served:
            values.sort()
            over_time["p50"].append(percentile(values, 0.5))
            over_time["p99"].append(percentile(values, 0.99))
        rules = [
            RuleCount(filter_id, rule, category, action, count)
            for (filter_id, rule, category, action), count in sorted(
                self.rules.items(), key=lambda kv: (-kv[1], kv[0][0], str(kv[0][1]), kv[0][2])
            )[:_TOP_RULES]
        ]
        satisfaction = None
        if self.feedback_known:
            satisfaction = Satisfaction(
                ratings=self.ratings,
                positive=self.positive,
                by_action={a: (p, n) for a, (p, n) in sorted(self.rating_actions.items())},
                per_bucket=[(p, n) for p, n in self.rating_buckets],
            )
        notes = []
        if not self.groups_known:
            notes.append(
                "The audit database has no groups column (it predates group detection): "
                "no block rates per group."
            )
        if not self.feedback_known:
            notes.append(
                "The audit database has no feedback table: no satisfaction data. Ratings "
                "arrive through POST /v1/feedback."
            )
        return Report(
            since=self.since,
            until=self.until,
            bucket_s=self.bucket_s,
            rows=self.rows,
            rows_by_route=dict(sorted(self.rows_by_route.items())),
            exchanges=self.exchanges,
            buckets=[self.since + i * self.bucket_s for i in range(self.n_buckets)],
            exchanges_per_bucket=list(self.per_bucket),
            harmful_exchanges=self.harmful_exchanges,
            harmful_totals=dict(
                sorted(
                    ((c, sum(v)) for c, v in self.harmful.items()), key=lambda kv: (-kv[1], kv[0])
                )
            ),
            harmful_per_bucket=dict(self.harmful),
            stage_totals={s: (t[0], t[1], t[2]) for s, t in self.stage.items()},
            groups=groups,
            latency=latency,
            latency_over_time=over_time,
            rules=rules,
            satisfaction=satisfaction,
            notes=notes,
        )


# --- reading the database --------------------------------------------------------------------

_ROW_COLUMNS: Final = (
    "id, epoch, route, outcome, input_action, output_action, findings, duration_ms, "
    "backend_ms, ttft_ms"
)


def _is_harm(finding: dict[str, Any]) -> bool:
    """Whether a finding is about harm, not accuracy (hallucination flags are apart, as in
    the metrics). Rows written before findings carried ``concern`` tell accuracy flags by
    their rule ids, which are all ``hallucination.*``."""
    concern = finding.get("concern")
    if concern is not None:
        return bool(concern == "harm")
    return not str(finding.get("rule_id") or "").startswith(_ACCURACY_RULES)


def _json(value: Any) -> Any:
    # SQLite keeps JSON as text; psycopg decodes jsonb itself.
    if value is None:
        return None
    return json.loads(value) if isinstance(value, str | bytes) else value


T = TypeVar("T")


class _Unreadable(ValueError):
    """What is wrong with a column's value (said without the value)."""


def _objects(value: Any) -> list[dict[str, Any]] | None:
    try:
        loaded = _json(value)
    except json.JSONDecodeError as e:
        raise _Unreadable(f"is not valid JSON ({e.msg}, at character {e.pos})") from e
    if loaded is not None and not (
        isinstance(loaded, list) and all(isinstance(item, dict) for item in loaded)
    ):
        raise _Unreadable("is not a JSON list of objects")
    return loaded


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Unreadable("is not a number")  # SQLite keeps whatever was written, text too
    return float(value)


def _opt_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _column(row_id: Any, name: str, read: Callable[[Any], T], value: Any) -> T:
    """``read(value)``, or a ConfigError naming the row and column it failed on (never the
    value: a hand-edited or damaged row may hold anything)."""
    try:
        return read(value)
    except _Unreadable as e:
        raise _bad_row(row_id, name, str(e)) from e
    except (ValueError, TypeError, RecursionError) as e:  # undecodable bytes, absurd nesting
        raise _bad_row(row_id, name, "cannot be read") from e


def _bad_row(row_id: Any, name: str, why: str) -> ConfigError:
    return ConfigError(f"audit_log row id {row_id}: column {name} {why}; fix or delete that row")


def _row(values: Sequence[Any], with_groups: bool) -> AuditRow:
    row_id = values[0]
    findings = _column(row_id, "findings", _objects, values[6])
    return AuditRow(
        epoch=_column(row_id, "epoch", _number, values[1]),
        route=values[2],
        outcome=values[3],
        input_action=values[4],
        output_action=values[5],
        findings=findings or [],
        duration_ms=_column(row_id, "duration_ms", _opt_number, values[7]),
        backend_ms=_column(row_id, "backend_ms", _opt_number, values[8]),
        ttft_ms=_column(row_id, "ttft_ms", _opt_number, values[9]),
        groups=_column(row_id, "groups", _objects, values[10]) if with_groups else None,
    )


def _read_sqlite(path: Path, builder: ReportBuilder) -> None:
    if not path.is_file():
        raise ConfigError(f"no audit database at {path} (is audit_dsn right?)")
    # Read-only: a report must never create, migrate or lock the gateway's database.
    conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "audit_log" not in tables:
            raise ConfigError(f"{path} has no audit_log table; is it a guardrail audit database?")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(audit_log)")}
        with_groups = "groups" in columns
        builder.groups_known = with_groups
        select = _ROW_COLUMNS + (', "groups"' if with_groups else "")
        for values in conn.execute(
            f"SELECT {select} FROM audit_log WHERE epoch >= ? AND epoch < ? ORDER BY epoch",
            (builder.since, builder.until),
        ):
            builder.add(_row(values, with_groups))
        builder.feedback_known = "audit_feedback" in tables
        if builder.feedback_known:
            for epoch, rating, action, route, input_action in conn.execute(
                "SELECT epoch, rating, action, route, input_action FROM audit_feedback "
                "WHERE epoch >= ? AND epoch < ?",
                (builder.since, builder.until),
            ):
                builder.add_rating(
                    float(epoch), int(rating), action, route=route, input_action=input_action
                )
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"cannot read the audit database {path}: {e}") from e
    finally:
        conn.close()


def _read_postgres(dsn: str, builder: ReportBuilder) -> None:
    try:
        import psycopg
    except ImportError as e:
        raise MissingDependencyError("psycopg", "postgres") from e
    since = datetime.fromtimestamp(builder.since, UTC)
    until = datetime.fromtimestamp(builder.until, UTC)
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            columns = {
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'audit_log' AND table_schema = current_schema()"
                )
            }
            if not columns:
                raise ConfigError("the database has no audit_log table; is audit_dsn right?")
            with_groups = "groups" in columns
            builder.groups_known = with_groups
            select = _ROW_COLUMNS + (', "groups"' if with_groups else "")
            # A server-side cursor: rows stream in batches instead of arriving all at once.
            with conn.cursor(name="guardrail_report") as cur:
                cur.execute(
                    f"SELECT {select} FROM audit_log WHERE time >= %s AND time < %s ORDER BY time",
                    (since, until),
                )
                for values in cur:
                    builder.add(_row(values, with_groups))
            feedback = conn.execute(
                "SELECT 1 FROM information_schema.tables "
                "WHERE table_name = 'audit_feedback' AND table_schema = current_schema()"
            ).fetchone()
            builder.feedback_known = feedback is not None
            if feedback is not None:
                for epoch, rating, action, route, input_action in conn.execute(
                    "SELECT epoch, rating, action, route, input_action FROM audit_feedback "
                    "WHERE time >= %s AND time < %s",
                    (since, until),
                ):
                    builder.add_rating(
                        float(epoch), int(rating), action, route=route, input_action=input_action
                    )
    except psycopg.Error as e:
        # The type only: a server message can quote values.
        raise ConfigError(f"cannot read the audit database: {type(e).__name__}") from e


def load_report(
    dsn: str,
    since: float,
    until: float | None = None,
    *,
    bucket_s: float | None = None,
) -> Report:
    """Read the audit database ``dsn`` (as ``audit_dsn`` spells it) for ``[since, until)``."""
    until = time.time() if until is None else until
    builder = ReportBuilder(since, until, bucket_s=bucket_s)
    store = store_from_dsn(dsn)
    if isinstance(store, SQLiteStore):
        _read_sqlite(store.path, builder)
    elif isinstance(store, PostgresStore):
        _read_postgres(store.dsn, builder)
    else:  # pragma: no cover - store_from_dsn knows only these two
        raise ConfigError(f"cannot report on {store!r}")
    return builder.build()


# --- HTML ----------------------------------------------------------------------------------

_PALETTE: Final = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
)  # fmt: skip
_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}table{border-collapse:collapse;margin:.6rem 0}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child,td.text{text-align:left}th{background:#f5f5f5}
.muted{color:#777}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4rem .8rem}
svg{display:block;margin:.6rem 0}.legend span{margin-right:1rem;white-space:nowrap}
.swatch{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:middle}
td.high{background:#fde2e1}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def _num_cell(value: float | int | None, text: str, css: str = "") -> str:
    data = "" if value is None else f' data-value="{value!r}"'
    klass = f' class="{css}"' if css else ""
    return f"<td{data}{klass}>{_e(text)}</td>"


def _time(epoch: float, bucket_s: float) -> str:
    fmt = "%Y-%m-%d %H:%M" if bucket_s < 86_400 else "%Y-%m-%d"
    return datetime.fromtimestamp(epoch, UTC).strftime(fmt)


def _legend(names: Sequence[str]) -> str:
    items = "".join(
        f'<span><i class="swatch" style="background:{_PALETTE[i % len(_PALETTE)]}"></i>'
        f"{_e(name)}</span>"
        for i, name in enumerate(names)
    )
    return f'<div class="legend">{items}</div>'


def line_chart(
    series: dict[str, list[float | None]],
    x_labels: Sequence[str],
    *,
    y_label: str,
    percent: bool = False,
    width: int = 960,
    height: int = 260,
) -> str:
    """An inline SVG line chart; ``None`` values leave gaps."""
    left, right, top, bottom = 64, 16, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for points in series.values() for v in points if v is not None]
    y_max = max(values, default=0.0)
    y_max = _nice(y_max if y_max > 0 else (1.0 if not percent else 0.01))
    n = max(len(x_labels), 1)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / y_max

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(y_label)}">'
    ]
    for k in range(5):
        v = y_max * k / 4
        label = f"{100 * v:.1f}%" if percent else f"{v:,.0f}"
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#555">{label}</text>'
        )
    step = max(1, math.ceil(n / 8))
    for i in range(0, n, step):
        parts.append(
            f'<text x="{x(i):.1f}" y="{height - 14}" font-size="11" text-anchor="middle" '
            f'fill="#555">{_e(x_labels[i])}</text>'
        )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" fill="#555" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})" text-anchor="middle">'
        f"{_e(y_label)}</text>"
    )
    for index, (name, points) in enumerate(series.items()):
        color = _PALETTE[index % len(_PALETTE)]
        run: list[str] = []
        runs: list[list[str]] = [run]
        for i, point in enumerate(points):
            if point is None:
                run = []
                runs.append(run)
                continue
            run.append(f"{x(i):.1f},{y(point):.1f}")
        for r in runs:
            if len(r) == 1:
                cx, cy = r[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            elif r:
                parts.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{" ".join(r)}"><title>{_e(name)}</title></polyline>'
                )
    parts.append("</svg>")
    return "".join(parts) + _legend(list(series))


def bar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    reference: float | None,
    reference_label: str,
    width: int = 960,
) -> str:
    """An inline SVG of horizontal bars (rates in [0, 1]) with a reference line."""
    row_h, left, right, top = 20, 260, 70, 8
    height = top * 2 + row_h * max(1, len(bars)) + 18
    top_value = max([v for _, v in bars] + [reference or 0.0, 0.0])
    scale = _nice(top_value if top_value > 0 else 0.01)
    plot_w = width - left - right
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="block rate per group">'
    ]
    for i, (label, value) in enumerate(bars):
        y = top + i * row_h
        w = plot_w * value / scale
        parts.append(
            f'<text x="{left - 8}" y="{y + 14}" font-size="12" text-anchor="end">{_e(label)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="#1f77b4">'
            f"<title>{_e(label)}: {_pct(value)}</title></rect>"
            f'<text x="{left + w + 6:.1f}" y="{y + 14}" font-size="11" fill="#333">'
            f"{_pct(value)}</text>"
        )
    if reference is not None:
        rx = left + plot_w * reference / scale
        bottom = top + row_h * max(1, len(bars))
        parts.append(
            f'<line x1="{rx:.1f}" x2="{rx:.1f}" y1="{top}" y2="{bottom}" stroke="#d62728" '
            f'stroke-dasharray="4 3" stroke-width="2"/>'
            f'<text x="{rx + 4:.1f}" y="{bottom + 14}" font-size="11" fill="#d62728">'
            f"{_e(reference_label)} {_pct(reference)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _nice(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``."""
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        nice = step * 10.0**exponent
        if nice >= value:
            return nice
    return 10.0 ** (exponent + 1)


def render_html(report: Report, *, title: str = "Guardrail report") -> str:
    """The whole page, self-contained (inline CSS and SVG, no scripts, no links out)."""
    since, until = _time(report.since, 60), _time(report.until, 60)
    labels = [_time(b, report.bucket_s) for b in report.buckets]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">From {since} to {until} UTC; charts in steps of '
        f"{_e(_step(report.bucket_s))}. Generated {_time(time.time(), 60)} UTC from the audit "
        "log. Rates are over chat and completion exchanges that reached the filters.</p>",
    ]
    out += [f'<p class="note">{_e(note)}</p>' for note in report.notes]
    out += _summary(report)
    out += _harmful(report, labels)
    out += _groups(report)
    out += _satisfaction(report, labels)
    out += _latency(report, labels)
    out += _rules(report)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _step(seconds: float) -> str:
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _summary(r: Report) -> list[str]:
    routes = "".join(
        f'<tr><td class="text">{_e(route)}</td>{_num_cell(n, f"{n:,}")}</tr>'
        for route, n in r.rows_by_route.items()
    )
    stages = "".join(
        f'<tr><td class="text">{_e(stage)}</td>{_num_cell(checked, f"{checked:,}")}'
        f"{_num_cell(blocked, f'{blocked:,}')}"
        f"{_num_cell(r.stage_block_rate(stage), _pct(r.stage_block_rate(stage)))}"
        f"{_num_cell(flagged, f'{flagged:,}')}</tr>"
        for stage, (checked, blocked, flagged) in r.stage_totals.items()
    )
    return [
        '<section id="summary"><h2>Summary</h2>',
        '<table class="totals"><tr><th>measure</th><th>value</th></tr>',
        f'<tr><td class="text">audit rows</td>{_num_cell(r.rows, f"{r.rows:,}")}</tr>',
        f'<tr><td class="text">chat and completion exchanges</td>'
        f"{_num_cell(r.exchanges, f'{r.exchanges:,}')}</tr>",
        f'<tr><td class="text">harmful exchanges</td>'
        f"{_num_cell(r.harmful_exchanges, f'{r.harmful_exchanges:,}')}</tr>",
        f'<tr><td class="text">harmful rate</td>{_num_cell(r.harmful_rate, _pct(r.harmful_rate))}'
        "</tr></table>",
        '<table class="stages"><tr><th>stage</th><th>checked</th><th>blocked</th>'
        f"<th>block rate</th><th>flagged or redacted</th></tr>{stages}</table>",
        f'<table class="routes"><tr><th>route</th><th>rows</th></tr>{routes}</table>',
        "</section>",
    ]


def _harmful(r: Report, labels: list[str]) -> list[str]:
    out = ['<section id="harmful"><h2>Harmful content over time</h2>']
    if not r.harmful_totals:
        out.append("<p>No harmful findings in this window.</p></section>")
        return out
    top = list(r.harmful_totals)[:_TOP_CATEGORIES]
    series: dict[str, list[float | None]] = {
        category: [
            (h / n if n else None)
            for h, n in zip(r.harmful_per_bucket[category], r.exchanges_per_bucket, strict=True)
        ]
        for category in top
    }
    out.append(
        "<p>Share of exchanges with an acting finding of each category (the "
        f"{len(top)} most frequent), per step.</p>"
    )
    out.append(line_chart(series, labels, y_label="share of exchanges", percent=True))
    rows = "".join(
        f'<tr><td class="text">{_e(c)}</td>{_num_cell(n, f"{n:,}")}'
        f"{_num_cell(n / r.exchanges if r.exchanges else None, _pct(n / r.exchanges if r.exchanges else None))}</tr>"  # noqa: E501
        for c, n in r.harmful_totals.items()
    )
    out.append(
        '<table class="categories"><tr><th>category</th><th>exchanges</th><th>rate</th></tr>'
        f"{rows}</table></section>"
    )
    return out


def _groups(r: Report) -> list[str]:
    out = ['<section id="groups"><h2>Block rate per demographic group</h2>']
    if r.groups is None:
        out.append("<p>No group data: the audit database has no groups column.</p></section>")
        return out
    if not r.groups:
        out.append("<p>No exchange in this window mentioned a group of the lexicon.</p></section>")
        return out
    out.append(
        "<p>Exchanges that mention a group, and the share the stage blocked, against every "
        "exchange checked at that stage. <em>Disparity</em> is the group's block rate over "
        f"the overall one. Groups with fewer than {_FEW_MENTIONS} mentions are marked: "
        "their rates move a lot by chance.</p>"
    )
    inputs = [g for g in r.groups if g.stage == "input"][:40]
    if inputs:
        out.append(
            bar_chart(
                [(f"{g.axis} / {g.group}", g.block_rate) for g in inputs],
                reference=r.stage_block_rate("input"),
                reference_label="all prompts",
            )
        )
    rows = []
    for g in r.groups:
        disparity = g.disparity
        high = "high" if disparity is not None and disparity >= 1.5 else ""
        few = " (few)" if g.mentions < _FEW_MENTIONS else ""
        rows.append(
            f'<tr><td class="text">{_e(g.axis)}</td><td class="text">{_e(g.group)}</td>'
            f'<td class="text">{_e(g.stage)}</td>{_num_cell(g.mentions, f"{g.mentions:,}{few}")}'
            f"{_num_cell(g.blocked, f'{g.blocked:,}')}"
            f"{_num_cell(g.block_rate, _pct(g.block_rate))}"
            f"{_num_cell(g.flag_rate, _pct(g.flag_rate))}"
            f"{_num_cell(disparity, '—' if disparity is None else f'{disparity:.2f}x', high)}</tr>"
        )
    out.append(
        '<table class="groups"><tr><th>axis</th><th>group</th><th>stage</th><th>mentions</th>'
        "<th>blocked</th><th>block rate</th><th>flag rate</th><th>disparity</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )
    return out


def _satisfaction(r: Report, labels: list[str]) -> list[str]:
    out = ['<section id="satisfaction"><h2>User satisfaction</h2>']
    s = r.satisfaction
    if s is None or not s.ratings:
        out.append(
            "<p>No feedback data in this window. Ratings come from POST /v1/feedback "
            "(thumbs up: 1, down: -1).</p></section>"
        )
        return out
    out.append(
        f"<p>{s.ratings:,} ratings, {_pct(s.positive_share)} positive. Share of positive "
        "ratings per step:</p>"
    )
    series: dict[str, list[float | None]] = {
        "positive share": [(p / n if n else None) for p, n in s.per_bucket]
    }
    out.append(line_chart(series, labels, y_label="positive share", percent=True))
    rows = "".join(
        f'<tr><td class="text">{_e(action)}</td>{_num_cell(n, f"{n:,}")}'
        f"{_num_cell(p, f'{p:,}')}{_num_cell(p / n if n else None, _pct(p / n if n else None))}"
        "</tr>"
        for action, (p, n) in s.by_action.items()
    )
    out.append(
        '<table class="satisfaction"><tr><th>rated exchange\'s action</th><th>ratings</th>'
        f"<th>positive</th><th>positive share</th></tr>"
        f'<tr><td class="text">all</td>{_num_cell(s.ratings, f"{s.ratings:,}")}'
        f"{_num_cell(s.positive, f'{s.positive:,}')}"
        f"{_num_cell(s.positive_share, _pct(s.positive_share))}</tr>{rows}</table></section>"
    )
    return out


def _latency(r: Report, labels: list[str]) -> list[str]:
    out = ['<section id="latency"><h2>Latency</h2>']
    rows = []
    for route, measures in r.latency.items():
        for name in ("duration", "backend", "ttft"):
            p = measures.get(name)
            if p is None:
                continue
            rows.append(
                f'<tr><td class="text">{_e(route)}</td><td class="text">{_e(name)}</td>'
                f"{_num_cell(p.n, f'{p.n:,}')}{_num_cell(p.p50, _ms(p.p50))}"
                f"{_num_cell(p.p90, _ms(p.p90))}{_num_cell(p.p99, _ms(p.p99))}</tr>"
            )
    if not rows:
        out.append("<p>No requests in this window.</p></section>")
        return out
    out.append(
        "<p>Milliseconds, nearest-rank percentiles. <em>duration</em>: the whole request "
        "(stream included); <em>backend</em>: the model call; <em>ttft</em>: time to the "
        "first token of a stream.</p>"
    )
    out.append(
        '<table class="latency"><tr><th>route</th><th>measure</th><th>requests</th>'
        "<th>p50</th><th>p90</th><th>p99</th></tr>" + "".join(rows) + "</table>"
    )
    if any(v is not None for v in r.latency_over_time["p99"]):
        out.append(
            "<p>Whole-request p50 and p99 over time, for exchanges that reached the model:</p>"
        )
        out.append(line_chart(dict(r.latency_over_time), labels, y_label="milliseconds"))
    out.append("</section>")
    return out


def _rules(r: Report) -> list[str]:
    out = ['<section id="rules"><h2>Top rules fired</h2>']
    if not r.rules:
        out.append("<p>No finding acted in this window.</p></section>")
        return out
    rows = "".join(
        f'<tr><td class="text">{_e(x.filter)}</td><td class="text">{_e(x.rule or "—")}</td>'
        f'<td class="text">{_e(x.category)}</td><td class="text">{_e(x.action)}</td>'
        f"{_num_cell(x.exchanges, f'{x.exchanges:,}')}</tr>"
        for x in r.rules
    )
    out.append(
        f"<p>The {len(r.rules)} rules (or categories, for filters without rules) that acted "
        "in the most exchanges, each counted once per exchange.</p>"
        '<table class="rules"><tr><th>filter</th><th>rule</th><th>category</th><th>action</th>'
        f"<th>exchanges</th></tr>{rows}</table></section>"
    )
    return out
