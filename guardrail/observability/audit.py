"""The audit log: one database row per finished exchange, written off the request path.

Why it is built this way:

- Like metrics, the audit log reads only a finished :class:`~guardrail.exchange.Exchange`
  (through :func:`record_from_exchange`), never anything inside a filter, and imports
  only data types. It never reads text from the exchange: the only text it can store
  is the ``text`` a caller passes in, and only when ``AuditConfig.text`` is
  ``"redacted"`` (off by default).
- :meth:`AuditLog.record` runs on the request path, so it does no I/O: it builds the
  row and appends it to a bounded in-memory queue. One background task drains the
  queue in batches (``batch_size`` rows, or whatever arrived within
  ``flush_interval_s``) into an :class:`AuditStore`.
- A store is a small protocol (open, write a batch, close) with two implementations
  on existing servers, as DESIGN.md asks: :class:`SQLiteStore` (one file, WAL, the
  default) and :class:`PostgresStore` (a DSN; shared by every replica). Both create
  the same tables, ``audit_log`` and (version 2) ``audit_feedback`` and ``audit_review``
  (written by :mod:`guardrail.observability.oversight`; version 3 adds the ``groups``
  column of :mod:`guardrail.observability.monitoring`), and record their schema in
  ``audit_schema_version``. An older database is migrated on open, one version at a
  time (:data:`SQLITE_MIGRATIONS`, :data:`POSTGRES_MIGRATIONS`), in one transaction.
- Writes are idempotent: every row has a ``record_id`` (a UUID made when the row is
  built) and ``INSERT ... ON CONFLICT (record_id) DO NOTHING``. A batch retried after
  a write whose answer was lost therefore never doubles a row. ``request_id`` is
  indexed but not unique, on purpose: a client may send its own ``x-request-id``,
  and a reused id must not hide a second request from the audit.

Guarantees (what "nothing lost" means here):

1. A recorded row is written unless one of these happens, and then it is *counted*
   (``AuditStats.dropped``) and *logged by request id* (``audit_record_dropped`` /
   ``audit_records_lost``), never silently lost:
   a. more than ``queue_size`` rows wait at once, or their text and JSON columns take
      more than ``queue_bytes`` (the store is down or slower than the traffic for long
      enough): each row past either bound is dropped;
   b. :meth:`AuditLog.aclose` could not write the rest within ``close_timeout_s``
      (the store is down at shutdown);
   c. :meth:`AuditLog.record` is called after :meth:`AuditLog.aclose`.
   d. the database refuses one row :data:`REJECT_AFTER` times while it accepts the
      rows around it (a row it can never store must not block the log).
2. A failed write is retried with exponential backoff (``retry_initial_s`` doubling
   up to ``retry_max_s``) for as long as the process runs; the rows stay in memory
   meanwhile. A batch that keeps failing is split in halves until the rows the
   database accepts are written and a refused row is alone (then 1d applies).
3. :meth:`AuditLog.aclose` (the app's shutdown) writes every queued row, then closes
   the store.
4. What is *not* covered: a process killed without shutdown (SIGKILL, OOM) loses the
   rows still queued, at most ``queue_size`` plus one batch (and ``queue_bytes`` of
   text). With SQLite's ``synchronous=NORMAL`` a power loss may also undo the last
   committed batches (never corrupt the file); PostgreSQL keeps its own durability
   settings.

Errors::

    GuardrailError
    ├── ConfigError               a bad audit DSN or setting
    ├── MissingDependencyError    a postgresql:// DSN without the ``postgres`` extra
    └── AuditError                the audit database cannot be used (newer schema)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import unquote, urlsplit

import structlog

from guardrail.errors import ConfigError, GuardrailError, MissingDependencyError
from guardrail.exchange import Exchange
from guardrail.guard.types import Action, Redaction, Stage, apply_redactions

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CLOSE_TIMEOUT_S",
    "POSTGRES_MIGRATIONS",
    "REVIEW_OUTCOMES",
    "SCHEMA_VERSION",
    "SQLITE_MIGRATIONS",
    "AuditConfig",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditSettings",
    "AuditStats",
    "AuditStore",
    "AuditText",
    "PostgresStore",
    "SQLiteStore",
    "audit_from_settings",
    "check_store",
    "default_audit_path",
    "record_from_exchange",
    "store_from_dsn",
]

log = structlog.get_logger("guardrail.audit")

SCHEMA_VERSION: Final = 3
"""The version of the audit database this code writes (see :data:`SQLITE_MIGRATIONS`)."""

REJECT_AFTER: Final = 3
"""Failed attempts, alone, after which a row the database refuses (while it accepts
others) is dropped and reported, instead of blocking the log."""

CLOSE_TIMEOUT_S: Final = 10.0
"""The default :attr:`AuditConfig.close_timeout_s`: part of the gateway's shutdown budget
(:func:`guardrail.app.shutdown_budget_s`)."""

AuditText = Literal["none", "redacted"]
"""Whether rows carry text: ``none`` (default) or the redacted text the caller passes."""


class AuditError(GuardrailError):
    """The audit database cannot be used (for example, its schema is newer than this code)."""


# --- the row -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of the audit log: everything about one exchange except its text.

    ``findings_json`` and ``filters_json`` are JSON arrays (strings, so both stores
    write the same bytes). ``text`` is ``None`` unless the log is configured to keep
    redacted text and the caller passed it.
    """

    record_id: str
    request_id: str
    time: str
    """When the request arrived, UTC, ISO 8601 with microseconds and ``Z``."""
    epoch: float
    """The same instant in Unix seconds."""
    route: str
    tenant: str
    model: str | None
    stream: bool
    backend: str | None
    policy_name: str
    policy_version: str
    outcome: str
    status_code: int
    error_code: str | None
    action: str
    input_action: str | None
    """Strictest action over the input decisions; ``None`` when no input was checked."""
    output_action: str | None
    """Strictest action over the output decisions; ``None`` when no output was checked."""
    findings_json: str
    filters_json: str
    duration_ms: float | None
    backend_ms: float | None
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    text: str | None = None
    response_id: str | None = None
    """The ``id`` the client got in the response body (``chatcmpl-...``); feedback names it."""
    groups_json: str | None = None
    """JSON array of the demographic groups the exchange's texts name,
    ``[{"stage", "axis", "group"}]``; ``None`` when they were not looked for."""

    @property
    def findings(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = json.loads(self.findings_json)
        return result

    @property
    def filters(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = json.loads(self.filters_json)
        return result

    @property
    def groups(self) -> list[dict[str, Any]] | None:
        if self.groups_json is None:
            return None
        result: list[dict[str, Any]] = json.loads(self.groups_json)
        return result


# The column order of every INSERT; the AuditRecord fields of the same names.
COLUMNS: Final = (
    "record_id",
    "request_id",
    "time",
    "epoch",
    "route",
    "tenant",
    "model",
    "stream",
    "backend",
    "policy_name",
    "policy_version",
    "outcome",
    "status_code",
    "error_code",
    "action",
    "input_action",
    "output_action",
    "findings",
    "filters",
    "duration_ms",
    "backend_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "text",
    "response_id",
    "groups",
)


def _row(record: AuditRecord) -> tuple[Any, ...]:
    return (
        record.record_id,
        record.request_id,
        record.time,
        record.epoch,
        record.route,
        record.tenant,
        record.model,
        record.stream,
        record.backend,
        record.policy_name,
        record.policy_version,
        record.outcome,
        record.status_code,
        record.error_code,
        record.action,
        record.input_action,
        record.output_action,
        record.findings_json,
        record.filters_json,
        record.duration_ms,
        record.backend_ms,
        record.ttft_ms,
        record.prompt_tokens,
        record.completion_tokens,
        record.text,
        record.response_id,
        record.groups_json,
    )


def _clean(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and a client chooses some of these strings (the
    # model name): one such row would otherwise fail every retry.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _clean_opt(value: str | None) -> str | None:
    return None if value is None else _clean(value)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _stage_action(exchange: Exchange, stage: Stage) -> str | None:
    decisions = exchange.decisions_at(stage)
    if not decisions:
        return None
    return Action.strictest(d.action for d in decisions).value


UNCHECKED_TEXT: Final = "[not stored: a filter failed on this text]"


def redacted_text(exchange: Exchange) -> str | None:
    """The text an ``audit_text: redacted`` row keeps, or None when nothing was checked.

    It is the text of the decision that set the exchange's action (the later one among
    equals), as the policy left it: redacted where it redacted. A blocked text was never
    redacted, so it is kept with every redaction any filter proposed applied and every
    span a harm finding marked replaced by ``[CATEGORY]``: the personal data or the
    phrase that blocked it is not stored. Either way, every value any decision of the
    exchange restored for the client is replaced by ``[RESTORED]``.

    A text some filter failed on (an error, a timeout) is not stored: what that filter
    would have redacted is unknown (a pii filter that timed out left the whole prompt,
    its personal data included). :data:`UNCHECKED_TEXT` stands in its place, and it does
    so when any decision of the deciding one's stage failed, not only the deciding one:
    the texts of a stage overlap (a stream window repeats the end of the one before as
    its context), and a decision that ran no filter can outrank the one that failed (the
    inline consistency flag, on the completion an output filter failed on).
    """
    if not exchange.decisions:
        return None
    deciding = max(reversed(exchange.decisions), key=lambda d: d.action.rank)
    if any(d.failed for d in exchange.decisions_at(deciding.stage)):
        return UNCHECKED_TEXT
    # A completion's placeholders were restored to the user's values for the client:
    # those values are personal data the policy redacted on the way in. Every decision's
    # restores count: a stream window is checked after the released text before it, so
    # it holds the values earlier windows restored (and may itself be blocked).
    restored = {
        r.replacement
        for d in exchange.decisions
        for o in d.outcomes
        for r in o.verdict.redactions
        if r.restore and r.replacement
    }
    if deciding.action is not Action.BLOCK:
        return _hide_restored(deciding.text, restored)
    proposed = [r for o in deciding.outcomes for r in o.verdict.redactions if not r.restore]
    marked = [
        Redaction(f.span[0], f.span[1], f"[{f.category.upper()}]")
        for f in deciding.findings
        if f.span is not None and f.concern == "harm"
    ]
    # A filter's own replacement ("<EMAIL_ADDRESS_1>", "[SECRET]") wins where both cover.
    hide = proposed + [
        m for m in marked if all(m.end <= p.start or m.start >= p.end for p in proposed)
    ]
    return _hide_restored(apply_redactions(deciding.text, hide), restored)


def _hide_restored(text: str, restored: set[str]) -> str:
    for value in sorted(restored, key=len, reverse=True):
        text = text.replace(value, "[RESTORED]")
    # A stream window's text starts with the released text before it, cut wherever the
    # context ran out: maybe inside a value an earlier window restored ("ne.doe@...").
    cut = max(
        (k for v in restored for k in range(_FRAGMENT_CHARS, len(v)) if text.startswith(v[-k:])),
        default=0,
    )
    return "[RESTORED]" + text[cut:] if cut else text


# The shortest end of a restored value hidden at the start of a text: shorter ones
# ("om") identify no one, and hiding them would hide a word that merely starts alike.
_FRAGMENT_CHARS = 3


def record_from_exchange(
    exchange: Exchange,
    *,
    text: str | None = None,
    now: float | None = None,
    record_id: str | None = None,
) -> AuditRecord:
    """The audit row of a finished ``exchange``.

    Reads only the exchange's ids, verdicts, scores and timings, never a decision's
    text or a finding's message. ``text`` is stored as given: pass it only if it is
    already redacted (the :class:`AuditLog` drops it unless configured to keep it).
    ``now`` (Unix seconds, default the clock) is when the exchange finished, and
    ``record_id`` (default a random UUID) the row's idempotency key; tests pin both.

    Raises ``ValueError`` for an unfinished exchange, a caller bug.
    """
    if exchange.outcome is None or exchange.duration_s is None:
        raise ValueError(
            f"exchange {exchange.request_id} is not finished; call Exchange.finish() first"
        )
    finished = time.time() if now is None else now
    epoch = finished - exchange.duration_s
    findings = _merged(
        {
            "stage": d.stage.value,
            "filter": _clean(f.filter_id),
            "category": _clean(f.category),
            "score": round(f.score, 6),
            "action": f.action.value,
            "rule_id": _clean_opt(f.rule_id),
            "concern": f.concern,
            "count": 1,
        }
        for d in exchange.decisions
        for f in d.findings
    )
    filters = [
        {
            "stage": d.stage.value,
            "filter": _clean(o.filter_id),
            "type": _clean(o.filter_type),
            "status": o.status,
            "action": o.verdict.action.value,
            "duration_ms": round(o.duration_s * 1000, 3),
            "cache": o.cache,
            "error": _clean_opt(o.error),
        }
        for d in exchange.decisions
        for o in d.outcomes
    ]
    return AuditRecord(
        record_id=record_id or uuid.uuid4().hex,
        request_id=_clean(exchange.request_id),
        time=datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        epoch=round(epoch, 6),
        route=exchange.route,
        tenant=_clean(exchange.tenant),
        model=_clean_opt(exchange.model),
        stream=exchange.stream,
        backend=_clean_opt(exchange.backend),
        policy_name=_clean(exchange.policy_name),
        policy_version=_clean(exchange.policy_version),
        outcome=exchange.outcome,
        status_code=exchange.status_code,
        error_code=_clean_opt(exchange.error_code),
        action=exchange.action.value,
        input_action=_stage_action(exchange, Stage.INPUT),
        output_action=_stage_action(exchange, Stage.OUTPUT),
        findings_json=json.dumps(findings, separators=(",", ":")),
        filters_json=json.dumps(filters, separators=(",", ":")),
        duration_ms=_ms(exchange.duration_s),
        backend_ms=_ms(exchange.backend_duration_s),
        ttft_ms=_ms(exchange.time_to_first_token_s),
        prompt_tokens=exchange.prompt_tokens,
        completion_tokens=exchange.completion_tokens,
        text=_clean_opt(text),
        response_id=_clean_opt(exchange.response_id),
        groups_json=None
        if exchange.groups is None
        else json.dumps(
            [{"stage": g.stage.value, "axis": g.axis, "group": g.group} for g in exchange.groups],
            separators=(",", ":"),
        ),
    )


def _merged(findings: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (stage, filter, category, rule, action, concern), in order of first
    appearance, with how many findings it stands for and the highest score.

    A filter finds one entity per match (a pii filter, one per e-mail address), so a
    prompt of 30,000 addresses made a 3.7 MB row with ``audit_text: none``: the client,
    not the policy, chose the row's size. Merged, a row has at most one entry per rule of
    the policy per stage.
    """
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for f in findings:
        key = (f["stage"], f["filter"], f["category"], f["rule_id"], f["action"], f["concern"])
        seen = merged.get(key)
        if seen is None:
            merged[key] = f
        else:
            seen["count"] += f["count"]
            seen["score"] = max(seen["score"], f["score"])
    return list(merged.values())


# --- stores ----------------------------------------------------------------------


class AuditStore(Protocol):
    """Where audit rows go. ``write`` must be idempotent per ``record_id``.

    Example::

        store = SQLiteStore("/var/lib/guardrail/audit.db")
        await store.open()          # connect, create the table if needed
        await store.write(records)  # one transaction; raises on failure (retried)
        await store.close()
    """

    async def open(self) -> None: ...

    async def write(self, records: list[AuditRecord]) -> None: ...

    async def close(self) -> None: ...


_SQLITE_V1: Final = (
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY,
        record_id TEXT NOT NULL UNIQUE,
        request_id TEXT NOT NULL,
        time TEXT NOT NULL,
        epoch REAL NOT NULL,
        route TEXT NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT,
        stream INTEGER NOT NULL,
        backend TEXT,
        policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        status_code INTEGER NOT NULL,
        error_code TEXT,
        action TEXT NOT NULL,
        input_action TEXT,
        output_action TEXT,
        findings TEXT NOT NULL,
        filters TEXT NOT NULL,
        duration_ms REAL,
        backend_ms REAL,
        ttft_ms REAL,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        text TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_log_request_id ON audit_log (request_id)",
    "CREATE INDEX IF NOT EXISTS audit_log_epoch ON audit_log (epoch)",
    "CREATE INDEX IF NOT EXISTS audit_log_tenant_epoch ON audit_log (tenant, epoch)",
    "CREATE INDEX IF NOT EXISTS audit_log_outcome_epoch ON audit_log (outcome, epoch)",
    """
    CREATE TABLE IF NOT EXISTS audit_schema_version (
        version INTEGER PRIMARY KEY,
        applied_at TEXT NOT NULL
    )
    """,
)

_POSTGRES_V1: Final = (
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        record_id TEXT NOT NULL UNIQUE,
        request_id TEXT NOT NULL,
        time TIMESTAMPTZ NOT NULL,
        epoch DOUBLE PRECISION NOT NULL,
        route TEXT NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT,
        stream BOOLEAN NOT NULL,
        backend TEXT,
        policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        status_code INTEGER NOT NULL,
        error_code TEXT,
        action TEXT NOT NULL,
        input_action TEXT,
        output_action TEXT,
        findings JSONB NOT NULL,
        filters JSONB NOT NULL,
        duration_ms DOUBLE PRECISION,
        backend_ms DOUBLE PRECISION,
        ttft_ms DOUBLE PRECISION,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        text TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_log_request_id ON audit_log (request_id)",
    "CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (time)",
    "CREATE INDEX IF NOT EXISTS audit_log_tenant_time ON audit_log (tenant, time)",
    "CREATE INDEX IF NOT EXISTS audit_log_outcome_time ON audit_log (outcome, time)",
    """
    CREATE TABLE IF NOT EXISTS audit_schema_version (
        version INTEGER PRIMARY KEY,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
)

# Version 2 (feedback and human review; README "Audit log"): the response id on each row,
# a rating per response, a reviewer's verdict per exchange. The decision of the exchange
# is copied into both new tables, so they answer "what was rated / judged" on their own
# and outlive a retention DELETE on audit_log. Types: SQLite first, then PostgreSQL.
REVIEW_OUTCOMES: Final = ("flagged", "blocked_input", "blocked_output")
"""Outcomes whose exchanges enter the human review queue."""
_QUEUED = ", ".join(f"'{o}'" for o in REVIEW_OUTCOMES)


def _v2(sqlite: bool) -> tuple[str, ...]:
    ident = "INTEGER PRIMARY KEY" if sqlite else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    ts, real = ("TEXT", "REAL") if sqlite else ("TIMESTAMPTZ", "DOUBLE PRECISION")
    json_type = "TEXT" if sqlite else "JSONB"
    when = "epoch" if sqlite else "time"
    add_column = "ADD COLUMN" if sqlite else "ADD COLUMN IF NOT EXISTS"
    decision = """
        tenant TEXT NOT NULL,
        route TEXT NOT NULL,
        policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        action TEXT NOT NULL,
        input_action TEXT,
        output_action TEXT,"""
    return (
        f"ALTER TABLE audit_log {add_column} response_id TEXT",
        "CREATE INDEX IF NOT EXISTS audit_log_response_id ON audit_log (response_id)",
        # The review queue, newest first, without a scan of the allowed traffic.
        f"CREATE INDEX IF NOT EXISTS audit_log_review_queue ON audit_log (id) "
        f"WHERE outcome IN ({_QUEUED})",
        f"""
        CREATE TABLE IF NOT EXISTS audit_feedback (
            id {ident},
            record_id TEXT NOT NULL UNIQUE,
            response_id TEXT NOT NULL,
            request_id TEXT NOT NULL,{decision}
            rating INTEGER NOT NULL,
            comment TEXT,
            time {ts} NOT NULL,
            epoch {real} NOT NULL
        )
        """,
        f"CREATE INDEX IF NOT EXISTS audit_feedback_{when} ON audit_feedback ({when})",
        f"CREATE INDEX IF NOT EXISTS audit_feedback_tenant_{when} "
        f"ON audit_feedback (tenant, {when})",
        f"""
        CREATE TABLE IF NOT EXISTS audit_review (
            id {ident},
            record_id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL,
            exchange_time {ts} NOT NULL,
            exchange_epoch {real} NOT NULL,{decision}
            findings {json_type} NOT NULL,
            verdict TEXT NOT NULL,
            expected_action TEXT NOT NULL,
            reviewer TEXT NOT NULL,
            note TEXT,
            time {ts} NOT NULL,
            epoch {real} NOT NULL
        )
        """,
        f"CREATE INDEX IF NOT EXISTS audit_review_{when} ON audit_review ({when})",
    )


# Version 3 (monitoring; guardrail.observability.monitoring): the demographic groups each
# exchange's texts name (lexicon axis and group names, never the words), for the report's
# block rate per group. NULL on older rows and where group detection is off.
def _v3(sqlite: bool) -> tuple[str, ...]:
    add_column = "ADD COLUMN" if sqlite else "ADD COLUMN IF NOT EXISTS"
    return (f"ALTER TABLE audit_log {add_column} groups {'TEXT' if sqlite else 'JSONB'}",)


SQLITE_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: _SQLITE_V1,
    2: _v2(sqlite=True),
    3: _v3(sqlite=True),
}
"""Schema version -> the statements that bring a database of the version before to it.
A database is brought to :data:`SCHEMA_VERSION` one step at a time, in one transaction,
and each step is recorded in ``audit_schema_version``."""
POSTGRES_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: _POSTGRES_V1,
    2: _v2(sqlite=False),
    3: _v3(sqlite=False),
}
"""The same steps for PostgreSQL."""

_SQLITE_VERSION_TABLE: Final = _SQLITE_V1[-1]
_POSTGRES_VERSION_TABLE: Final = _POSTGRES_V1[-1]


def _pending_migrations(
    migrations: dict[int, tuple[str, ...]], found: int | None
) -> list[tuple[int, tuple[str, ...]]]:
    return [(v, migrations[v]) for v in range(1 + (found or 0), SCHEMA_VERSION + 1)]


_SQLITE_INSERT: Final = (
    f"INSERT INTO audit_log ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)}) ON CONFLICT (record_id) DO NOTHING"
)
_POSTGRES_CASTS: Final = {
    "time": "::timestamptz",
    "findings": "::jsonb",
    "filters": "::jsonb",
    "groups": "::jsonb",
}
_POSTGRES_INSERT: Final = (
    f"INSERT INTO audit_log ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('%s' + _POSTGRES_CASTS.get(c, '') for c in COLUMNS)}) "
    "ON CONFLICT (record_id) DO NOTHING"
)
# Serializes schema creation across replicas that start at the same moment.
_POSTGRES_LOCK_KEY: Final = 0x6775617264  # "guard"


def _check_version(found: int | None, where: str) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise AuditError(
            f"the audit database {where} has schema version {found}, newer than this "
            f"guardrail's {SCHEMA_VERSION}; upgrade guardrail or point audit_dsn elsewhere"
        )


class SQLiteStore:
    """Audit rows in one SQLite file (WAL mode, ``synchronous=NORMAL``).

    One connection, used only from the store's own single thread, so the event loop
    never blocks on disk and SQLite never sees two writers from this process. Other
    processes (a query, a backup) may read while it writes: that is what WAL is for.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise AuditError(f"{self!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="guardrail-audit")
        try:
            await self._call(self._open)
        except BaseException:
            await self.close()
            raise

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each write is BEGIN..COMMIT.
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn = conn
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AuditError(f"cannot switch {self.path} to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SQLITE_VERSION_TABLE)
            row = conn.execute("SELECT max(version) FROM audit_schema_version").fetchone()
            _check_version(row[0], str(self.path))
            for version, statements in _pending_migrations(SQLITE_MIGRATIONS, row[0]):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO audit_schema_version (version, applied_at) VALUES (?, ?)",
                    (version, datetime.now(UTC).isoformat()),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def write(self, records: list[AuditRecord]) -> None:
        await self._call(self._write, [_row(r) for r in records])

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        if conn is None:
            raise AuditError(f"{self!r} is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_SQLITE_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # The close runs on the store's thread, after any write still running there.
        await asyncio.get_running_loop().run_in_executor(executor, self._close)
        executor.shutdown(wait=True)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresStore:
    """Audit rows in PostgreSQL, through one psycopg 3 async connection.

    A batch is one transaction of ``executemany`` (psycopg pipelines it: one round
    trip per batch, not per row). A broken connection is replaced on the next write,
    so the writer's retries ride out a database restart. Schema creation takes an
    advisory lock, so replicas starting together do not race.
    """

    def __init__(self, dsn: str, *, connect_timeout_s: float = 5.0) -> None:
        try:  # at startup, not at the first write
            import psycopg  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError("psycopg", "postgres") from e
        self.dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def __repr__(self) -> str:
        parts = urlsplit(self.dsn)
        host = parts.hostname or "localhost"
        return f"PostgresStore({host}:{parts.port or 5432}{parts.path})"  # never the password

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg

        # autocommit: every write is its own explicit transaction() block, and the
        # connection never idles inside an open transaction between batches.
        return await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=max(1, round(self._connect_timeout_s))
        )

    async def open(self) -> None:
        conn = await self._connect()
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_POSTGRES_LOCK_KEY,))
                await conn.execute(_POSTGRES_VERSION_TABLE)
                cur = await conn.execute("SELECT max(version) FROM audit_schema_version")
                row = await cur.fetchone()
                found = None if row is None else row[0]
                _check_version(found, repr(self))
                for version, statements in _pending_migrations(POSTGRES_MIGRATIONS, found):
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO audit_schema_version (version) VALUES (%s)", (version,)
                    )
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def write(self, records: list[AuditRecord]) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await self._connect()
        try:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(_POSTGRES_INSERT, [_row(r) for r in records])
        except BaseException:
            if conn.broken:
                self._conn = None
                await conn.close()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


# --- the writer ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """How the audit log writes. Validated on construction."""

    dsn: str
    """``sqlite:////abs/path.db`` (or three slashes), ``sqlite://rel/path.db``, a plain path
    (SQLite), or ``postgresql://user@host:port/db`` (needs the ``postgres`` extra)."""
    queue_size: int = 100_000
    """Most rows waiting in memory for the store; past it a row is dropped (counted, logged)."""
    queue_bytes: int = 256 * 1024 * 1024
    """Most bytes the waiting rows' text and JSON columns may hold in memory; past it a row
    is dropped (counted, logged). Rows are bounded by count too, but not their size: with
    redacted text kept, each may carry a whole prompt."""
    batch_size: int = 500
    """Most rows per write (one transaction)."""
    flush_interval_s: float = 0.2
    """Longest a row waits for its batch to fill before it is written anyway."""
    text: AuditText = "none"
    """``none``: rows carry no text. ``redacted``: rows keep the redacted text callers pass."""
    retry_initial_s: float = 0.1
    """First delay after a failed write; doubles on each failure."""
    retry_max_s: float = 5.0
    """Longest delay between two attempts of a failing write."""
    close_timeout_s: float = CLOSE_TIMEOUT_S
    """How long shutdown keeps trying to write what is queued before reporting it lost."""

    def __post_init__(self) -> None:
        if not self.dsn:
            raise ConfigError("audit dsn is empty")
        for name in ("queue_size", "queue_bytes", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"audit {name} must be at least 1")
        for name in ("flush_interval_s", "retry_initial_s", "retry_max_s", "close_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"audit {name} must not be negative")
        if self.text not in ("none", "redacted"):
            raise ConfigError(f"audit text must be 'none' or 'redacted', not {self.text!r}")


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Counters since the log was built, for metrics. ``depth`` is a gauge."""

    recorded: int
    """Rows handed to :meth:`AuditLog.record`."""
    written: int
    """Rows the store accepted (a duplicate ``record_id`` counts, though not stored twice)."""
    dropped: int
    """Rows given up on (queue full, shutdown timeout, recorded after close), each logged."""
    write_errors: int
    """Failed write attempts (each is retried)."""
    depth: int
    """Rows recorded and not yet written or dropped."""


def _size(record: AuditRecord) -> int:
    """Bytes a queued row holds that a client can make large: its text and JSON columns.
    The rest of a row is a few hundred bytes of ids and numbers, which ``queue_size``
    bounds."""
    return sum(
        sys.getsizeof(value)
        for value in (record.text, record.findings_json, record.filters_json, record.groups_json)
        if value is not None
    )


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Rows of a batch written together, and how their writes have gone so far."""

    rows: list[AuditRecord]
    fails: int = 0
    """Failed attempts; a batch that failed twice is split."""
    refusals: int = 0
    """Failed attempts while the store was accepting other rows. Failures during an
    outage say nothing about the row, so they never count toward :data:`REJECT_AFTER`."""


@dataclass(eq=False)
class _Writer:
    """The background writer's task and the loop (and thread) it runs on."""

    loop: asyncio.AbstractEventLoop
    thread: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class AuditLog:
    """Records finished exchanges into an :class:`AuditStore`, off the request path.

    Example::

        audit = AuditLog(SQLiteStore("audit.db"), AuditConfig(dsn="audit.db"))
        await audit.start()      # app startup: open the store, start the writer
        audit.record(exchange)   # request path: enqueue only, never blocks
        await audit.aclose()     # app shutdown: write everything queued, close
    """

    def __init__(self, store: AuditStore, config: AuditConfig) -> None:
        self.store = store
        self.config = config
        self._pending: deque[AuditRecord] = deque()
        # The batch being written, as chunks; see _write_inflight.
        self._inflight: deque[_Chunk] = deque()
        self._writer: _Writer | None = None
        self._closing = False
        self._closed = False
        self._flushing = 0  # flush() calls waiting: write at once, without gathering
        self._bytes = 0  # _size() of the rows queued and in flight
        self._entered = 0  # rows ever appended to the queue ...
        # ... and rows that left it, written or rejected. Rows of one batch may leave out
        # of order, but progress is signalled only once the batch is done, so a flush that
        # wakes to find _left >= its target knows every row it waits for has left.
        self._left = 0
        self.recorded = 0
        self.written = 0
        self.dropped = 0
        self.write_errors = 0

    # --- request path ---------------------------------------------------------

    def record(self, exchange: Exchange, *, text: str | None = None) -> None:
        """Queue the row of a finished ``exchange``; returns at once, never blocks.

        ``text`` is kept only when the config says ``text="redacted"``, and must then
        already be redacted. Raises ``ValueError`` for an unfinished exchange.
        """
        keep = text if self.config.text == "redacted" else None
        self.enqueue(record_from_exchange(exchange, text=keep))

    def enqueue(self, record: AuditRecord) -> None:
        """Queue a row built elsewhere (the text rule of :meth:`record` is the caller's)."""
        self.recorded += 1
        if self._closed:
            self._drop([record], "closed")
            return
        if len(self._pending) >= self.config.queue_size:
            self._drop([record], "queue_full")
            return
        size = _size(record)
        if self._bytes + size > self.config.queue_bytes:
            self._drop([record], "queue_bytes")
            return
        self._pending.append(record)
        self._bytes += size
        self._entered += 1
        depth = len(self._pending)
        if depth == 1 or depth >= self.config.batch_size:
            self._wake()

    def _left_queue(self, records: Sequence[AuditRecord]) -> None:
        """Rows written or rejected: they no longer wait."""
        self._left += len(records)
        self._bytes -= sum(_size(r) for r in records)

    def _wake(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if threading.get_ident() == writer.thread:
            writer.wake.set()
        else:  # recorded from another thread: asyncio.Event is not thread-safe
            writer.loop.call_soon_threadsafe(writer.wake.set)

    def _drop(self, records: Sequence[AuditRecord], reason: str) -> None:
        self.dropped += len(records)
        if len(records) == 1:
            log.error(
                "audit_record_dropped",
                reason=reason,
                request_id=records[0].request_id,
                record_id=records[0].record_id,
            )
            return
        for start in range(0, len(records), 1000):  # bounded log lines
            chunk = records[start : start + 1000]
            log.error(
                "audit_records_lost",
                reason=reason,
                count=len(chunk),
                request_ids=[r.request_id for r in chunk],
            )

    # --- counters -------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows recorded and not yet written or dropped (queued plus the batch in flight)."""
        return len(self._pending) + sum(len(c.rows) for c in self._inflight)

    def holds(self, match: Callable[[AuditRecord], bool]) -> bool:
        """Whether a row not yet written or dropped (queued or in flight) satisfies
        ``match``: a row asked for that is not here is in the database or never will be."""
        # Call on the writer's loop, where the batch in flight changes. Rows recorded from
        # another thread only append to the queue, and copying a deque is one C call that
        # such an append cannot interleave with.
        queued = tuple(self._pending)
        return any(match(r) for chunk in self._inflight for r in chunk.rows) or any(
            match(r) for r in queued
        )

    def stats(self) -> AuditStats:
        return AuditStats(
            recorded=self.recorded,
            written=self.written,
            dropped=self.dropped,
            write_errors=self.write_errors,
            depth=self.depth,
        )

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start the background writer (call once, on the app's loop).

        A store that cannot be opened raises here, so a misconfigured audit log stops
        startup instead of dropping rows later.
        """
        if self._writer is not None or self._closed:
            raise RuntimeError("AuditLog.start() called twice")
        await self.store.open()
        writer = _Writer(loop=asyncio.get_running_loop(), thread=threading.get_ident())
        writer.task = asyncio.create_task(self._run(writer), name="guardrail-audit-writer")
        writer.task.add_done_callback(_report_crash)
        self._writer = writer
        log.info("audit_started", store=repr(self.store), audit_text=self.config.text)

    async def flush(self) -> None:
        """Wait until every row recorded so far is written or dropped."""
        writer = self._writer
        if writer is None or writer.task is None:
            raise RuntimeError("AuditLog.flush() before start()")
        target = self._entered
        self._flushing += 1
        try:
            writer.wake.set()
            while self._left < target and not writer.task.done():
                writer.progress.clear()
                await writer.progress.wait()
        finally:
            self._flushing -= 1

    async def aclose(self) -> None:
        """Write everything queued, then close the store (the app's shutdown).

        Keeps retrying a failing store for ``close_timeout_s``; what is still unwritten
        then is counted as dropped and logged by request id, including a batch whose write
        was cut short (the database may still have committed it). Safe to call twice.
        """
        if self._closed:
            return
        self._closing = True
        writer = self._writer
        try:
            if writer is not None and writer.task is not None:
                writer.wake.set()
                try:
                    async with asyncio.timeout(self.config.close_timeout_s):
                        await asyncio.shield(writer.task)
                except TimeoutError:
                    writer.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await writer.task
        finally:
            self._closed = True
            left = [r for chunk in self._inflight for r in chunk.rows] + list(self._pending)
            self._inflight.clear()
            self._pending.clear()
            self._bytes = 0
            if left:
                self._drop(left, "shutdown")
            if writer is not None:
                await self.store.close()
            log.info(
                "audit_closed",
                recorded=self.recorded,
                written=self.written,
                dropped=self.dropped,
                write_errors=self.write_errors,
            )

    # --- the writer -------------------------------------------------------------

    async def _run(self, writer: _Writer) -> None:
        batch_size = self.config.batch_size
        while True:
            while not self._pending and not self._closing:
                writer.wake.clear()
                await writer.wake.wait()
            if not self._pending:
                return  # closing, and nothing left
            if len(self._pending) < batch_size and not (self._closing or self._flushing):
                # Let a batch gather: one transaction of many rows costs about one of one.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.flush_interval_s):
                        while len(self._pending) < batch_size and not (
                            self._closing or self._flushing
                        ):
                            writer.wake.clear()
                            await writer.wake.wait()
            count = min(batch_size, len(self._pending))
            self._inflight.append(_Chunk([self._pending.popleft() for _ in range(count)]))
            await self._write_inflight()
            writer.progress.set()

    async def _write_inflight(self) -> None:
        """Write the batch in ``self._inflight``, retrying until every row is accounted for.

        A batch that fails twice is split in halves, and halves that fail are split
        again, so a row the database rejects ends up alone. A lone failing row is
        retried after the other rows of its batch: their success tells a bad row from
        a database outage. A lone row that fails :data:`REJECT_AFTER` times while the
        database otherwise works is dropped (counted, logged by id); during an outage
        nothing is dropped, and every attempt waits for the backoff delay. Failures
        during an outage do not count toward the rejection either: a row queued through
        one must still be refused three times once the database accepts other rows.
        """
        chunks = self._inflight
        delay = self.config.retry_initial_s
        # Whether the store wrote something since the last failure of another chunk.
        healthy = False
        last_failed: set[str] | None = None  # record ids of the last chunk that failed
        while chunks:
            # The chunk stays queued until its write returns: a write cut short at
            # shutdown is then reported by aclose(), and the depth counts it meanwhile.
            chunk = chunks[0]
            rows = chunk.rows
            try:
                await self.store.write(rows)
            except Exception as e:
                chunks.popleft()
                self.write_errors += 1
                ids = {r.record_id for r in rows}
                if last_failed is not None and last_failed.isdisjoint(ids):
                    healthy = False  # rows with nothing in common failed in a row: an outage
                last_failed = ids
                chunk = _Chunk(rows, chunk.fails + 1, chunk.refusals + (1 if healthy else 0))
                log.warning(
                    "audit_write_failed",
                    store=repr(self.store),
                    error=type(e).__name__,  # never str(e): messages may quote row values
                    sqlstate=getattr(e, "sqlstate", None),
                    records=len(rows),
                    retry_in_s=round(delay, 3),
                )
                if len(rows) > 1 and (chunk.fails >= 2 or healthy):
                    half = len(rows) // 2
                    chunks.appendleft(_Chunk(rows[half:]))
                    chunks.appendleft(_Chunk(rows[:half]))
                elif len(rows) == 1 and chunk.refusals >= REJECT_AFTER:
                    self._left_queue(rows)
                    self._drop(rows, "rejected")
                    continue
                elif len(rows) == 1 and not chunks and self._pending:
                    # A row that failed alone: write the rows queued behind it first, so
                    # their success tells a bad row from an outage (and they are not held).
                    count = min(self.config.batch_size, len(self._pending))
                    chunks.append(_Chunk([self._pending.popleft() for _ in range(count)]))
                    chunks.append(chunk)
                elif len(rows) == 1 and chunks:
                    chunks.append(chunk)
                else:
                    chunks.appendleft(chunk)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
                continue
            chunks.popleft()
            self.written += len(rows)
            self._left_queue(rows)
            delay = self.config.retry_initial_s
            healthy = True
            last_failed = None


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("audit_writer_crashed", error=type(exc).__name__)


# --- from settings -----------------------------------------------------------------


class AuditSettings(Protocol):
    """The settings fields the audit log reads (``guardrail.settings.Settings`` has them)."""

    @property
    def audit_dsn(self) -> str | None: ...
    @property
    def audit_queue_size(self) -> int: ...
    @property
    def audit_queue_bytes(self) -> int: ...
    @property
    def audit_batch_size(self) -> int: ...
    @property
    def audit_flush_interval_ms(self) -> int: ...
    @property
    def audit_text(self) -> AuditText: ...


def default_audit_path() -> Path:
    """``$XDG_DATA_HOME/guardrail/audit.db`` (``~/.local/share/...``): data, not cache."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "guardrail" / "audit.db"


_OFF: Final = frozenset({"off", "none", "false", "0", "disabled"})


def store_from_dsn(dsn: str) -> AuditStore:
    """The store a DSN names: ``postgresql://`` / ``postgres://`` or SQLite (URL or path)."""
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(dsn)
    if scheme == "sqlite":
        # sqlite:///abs/path or sqlite:////abs/path (absolute), sqlite://rel/path (relative)
        path = unquote(dsn.split("://", 1)[1])
        if not path.strip("/"):
            raise ConfigError(f"audit dsn {dsn!r} names no SQLite file")
        if path.startswith("//"):  # the same file as one slash; shown and logged as such
            path = "/" + path.lstrip("/")
        return SQLiteStore(path)
    if scheme:
        raise ConfigError(
            f"audit dsn scheme {scheme!r} is not supported; use sqlite:///PATH, a file "
            "path, or postgresql://..."
        )
    return SQLiteStore(Path(dsn).expanduser())


async def check_store(store: AuditStore) -> None:
    """Open ``store`` and close it again, as :meth:`AuditLog.start` opens it (tables
    created or migrated): ``guardrail serve`` calls it before its backend loads, so a
    database that cannot be opened is one line then, not an app startup failure after
    the model loaded. Raises :class:`AuditError` naming the store and the reason, never
    the DSN's password."""
    try:
        await store.open()
    except GuardrailError:
        raise
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # libpq's are several lines
        if isinstance(store, PostgresStore):
            password = urlsplit(store.dsn).password
            if password:
                for secret in (password, unquote(password)):
                    reason = reason.replace(secret, "***")
        raise AuditError(f"cannot open the audit log {store!r}: {reason}") from e
    await store.close()


def audit_from_settings(settings: AuditSettings) -> AuditLog | None:
    """The audit log the settings describe; ``None`` when ``audit_dsn`` is ``off``.

    No DSN means SQLite at :func:`default_audit_path`. Raises ``ConfigError`` for a DSN
    or value that cannot be used (checked at startup, not at the first write).
    """
    dsn = settings.audit_dsn
    if dsn is not None and dsn.strip().lower() in _OFF:
        return None
    config = AuditConfig(
        dsn=dsn or str(default_audit_path()),
        queue_size=settings.audit_queue_size,
        queue_bytes=settings.audit_queue_bytes,
        batch_size=settings.audit_batch_size,
        flush_interval_s=settings.audit_flush_interval_ms / 1000,
        text=settings.audit_text,
    )
    return AuditLog(store_from_dsn(config.dsn), config)
