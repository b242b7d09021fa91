"""Feedback and human review, kept in the audit database beside ``audit_log``.

Why it is built this way:

- The audit log already holds every exchange's decision, so both features read it
  instead of keeping a second record of traffic: a user's rating names a response id
  and is joined with that exchange's row; the review queue *is* the audit rows whose
  outcome is flagged or blocked (plus those a user rated down), less those a reviewer
  has judged. Nothing is copied on the request path.
- The tables (``audit_feedback``, ``audit_review``; schema version 2) are created and
  migrated by the audit store (:mod:`guardrail.observability.audit`); this module
  only reads and writes rows, through its own connection, so a slow review query never
  holds up the audit writer. Both tables copy the exchange's decision when a row is
  written, so a rating or a verdict says what it judged even after a retention
  ``DELETE`` on ``audit_log``.
- One class serves SQLite and PostgreSQL: a DB-API connection used from one worker
  thread (``sqlite3``, or psycopg's blocking connection), so the event loop never
  waits on the database and the SQL is written once (``?`` placeholders, turned into
  ``%s`` for psycopg).
- Like the audit log, it never logs row values (comments, notes), only ids, counts and
  exception type names.

Example::

    store = oversight_store_for(audit.store)      # the audit log's database
    await store.open()
    found = await store.find_response("acme", "chatcmpl-5f0c...")
    await store.save_feedback(FeedbackEntry(found, rating=-1, comment=None, epoch=time.time()))
    items, more = await store.review_items("pending", limit=50)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from guardrail.observability.audit import (
    REVIEW_OUTCOMES,
    AuditRecord,
    AuditStore,
    PostgresStore,
    SQLiteStore,
)

__all__ = [
    "REVIEW_VERDICTS",
    "AuditedExchange",
    "ExportedVerdict",
    "FeedbackEntry",
    "OversightStore",
    "ReviewEntry",
    "ReviewStatus",
    "ReviewVerdict",
    "answers",
    "iso_time",
    "oversight_store_for",
]

ReviewStatus = Literal["pending", "reviewed", "all"]
"""Which review items to list: not yet judged, judged, or both."""

REVIEW_VERDICTS: Final = ("correct", "false_positive", "false_negative")
"""What a reviewer may say about the gateway's action (see :class:`ReviewVerdict`)."""


def iso_time(epoch: float) -> str:
    """Unix seconds as UTC ISO 8601 with milliseconds and ``Z`` (the API's time format)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _json_list(value: Any) -> list[dict[str, Any]]:
    # SQLite keeps JSON as text; psycopg decodes jsonb itself.
    loaded = json.loads(value) if isinstance(value, str | bytes) else value
    return list(loaded or [])


def _findings(value: Any) -> tuple[dict[str, Any], ...]:
    # Rows written before identical findings were merged have one entry per finding.
    return tuple({"count": 1, **f} if isinstance(f, dict) else f for f in _json_list(value))


# --- rows ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReviewVerdict:
    """A reviewer's judgement of one exchange.

    ``verdict``: ``correct`` (the gateway's action was right), ``false_positive`` (it
    was stricter than it should have been), ``false_negative`` (more lenient).
    ``expected_action`` is the action the reviewer says was right.
    """

    verdict: str
    expected_action: str
    reviewer: str
    note: str | None
    epoch: float


@dataclass(frozen=True, slots=True)
class AuditedExchange:
    """One exchange as the audit log recorded it, with its rating and verdict if any."""

    seq: int
    """The audit row's ``id``: insertion order, the listing's cursor."""
    record_id: str
    request_id: str
    response_id: str | None
    epoch: float
    tenant: str
    route: str
    model: str | None
    policy_name: str
    policy_version: str
    outcome: str
    action: str
    input_action: str | None
    output_action: str | None
    findings: tuple[dict[str, Any], ...]
    text: str | None
    feedback_rating: int | None
    review: ReviewVerdict | None

    @property
    def queued_because(self) -> str | None:
        """Why the exchange is in the review queue: ``flagged``, ``blocked``,
        ``negative_feedback``, or ``None`` (not queued; it may still be judged)."""
        if self.outcome == "flagged":
            return "flagged"
        if self.outcome in REVIEW_OUTCOMES:
            return "blocked"
        if self.feedback_rating is not None and self.feedback_rating < 0:
            return "negative_feedback"
        return None

    @property
    def stage(self) -> str | None:
        """The stage whose decision set the exchange's action (input wins a tie)."""
        if self.input_action is not None and self.input_action == self.action:
            return "input"
        if self.output_action is not None and self.output_action == self.action:
            return "output"
        return None


@dataclass(frozen=True, slots=True)
class FeedbackEntry:
    """A user's rating of one exchange's response. ``comment`` is already what may be
    stored (``None`` unless the gateway keeps comments)."""

    exchange: AuditedExchange
    rating: int
    comment: str | None
    epoch: float
    response_id: str | None = None
    """The id the client named; defaults to the exchange's own response id."""


@dataclass(frozen=True, slots=True)
class ReviewEntry:
    """A verdict to record for the exchange whose audit row is ``record_id``."""

    record_id: str
    verdict: ReviewVerdict


@dataclass(frozen=True, slots=True)
class ExportedVerdict:
    """One recorded verdict with the decision and scores it judged (for threshold tuning)."""

    seq: int
    record_id: str
    request_id: str
    exchange_epoch: float
    tenant: str
    route: str
    policy_name: str
    policy_version: str
    outcome: str
    action: str
    input_action: str | None
    output_action: str | None
    findings: tuple[dict[str, Any], ...]
    review: ReviewVerdict


# --- SQL (``?`` placeholders; ``{ts}`` marks a parameter that is a timestamp; ``{queue}``
# names the review-queue index to SQLite, whose planner has no statistics to find it) ----

_QUEUED: Final = ", ".join(f"'{o}'" for o in REVIEW_OUTCOMES)

_ITEM: Final = """
SELECT a.id, a.record_id, a.request_id, a.response_id, a.epoch, a.tenant, a.route, a.model,
       a.policy_name, a.policy_version, a.outcome, a.action, a.input_action, a.output_action,
       a.findings, a.text, f.rating, r.verdict, r.expected_action, r.reviewer, r.note, r.epoch
FROM audit_log a
LEFT JOIN audit_feedback f ON f.record_id = a.record_id
LEFT JOIN audit_review r ON r.record_id = a.record_id
"""
# The same, read through the review-queue index: newest first without sorting the queue.
_QUEUE_ITEM: Final = _ITEM.replace("FROM audit_log a\n", "FROM audit_log a{queue}\n")

# The listing's branches; each is index-friendly on its own, so they run apart and merge.
_FLAGGED: Final = f"a.outcome IN ({_QUEUED})"
_RATED_DOWN: Final = f"f.rating < 0 AND a.outcome NOT IN ({_QUEUED})"
_BRANCHES: Final[dict[ReviewStatus, tuple[str, ...]]] = {
    "pending": (f"{_FLAGGED} AND r.id IS NULL", f"{_RATED_DOWN} AND r.id IS NULL"),
    "reviewed": ("r.id IS NOT NULL",),
    "all": (_FLAGGED, _RATED_DOWN, "r.id IS NOT NULL"),
}

_COUNT_PENDING: Final = (
    f"""SELECT count(*) FROM audit_log a{{queue}}
    LEFT JOIN audit_review r ON r.record_id = a.record_id
    WHERE {_FLAGGED} AND r.id IS NULL""",
    f"""SELECT count(*) FROM audit_feedback f
    JOIN audit_log a ON a.record_id = f.record_id
    LEFT JOIN audit_review r ON r.record_id = f.record_id
    WHERE {_RATED_DOWN} AND r.id IS NULL""",
)

# The id a client names is the response's id (chatcmpl-...), or, for a refused request
# that got no response body, its request id (guardrail.request_id / x-request-id). Rows
# written before schema version 2 have no response_id: the prefix is taken off instead.
# Only an exchange the filters checked (it has an input or an output action; a stage
# "output" moderation has the output one alone) is rated: a request refused before them
# (a bad body, a 429) has no decision to judge, and is not found.
# A response id the gateway made wins over a request id a client chose to be the same
# text; among equals, the latest. "tenant || ''" keeps SQLite off the tenant index (all
# of a tenant's rows): the ids are the selective terms.
_FIND_RESPONSE: Final = (
    _ITEM
    + """WHERE (a.response_id = ? OR a.request_id = ? OR (a.request_id = ? AND a.route = ?))
  AND a.tenant || '' = ? AND (a.input_action IS NOT NULL OR a.output_action IS NOT NULL)
ORDER BY CASE WHEN a.response_id = ? THEN 0 ELSE 1 END, a.id DESC LIMIT 1"""
)
_PREFIX_ROUTES: Final = {"chatcmpl-": "chat", "cmpl-": "completions", "modr-": "moderations"}


def _bare_id(response_id: str) -> tuple[str, str]:
    """The request id a response id was made from and the route it names (the id itself
    and "" for an id without a known prefix): how rows of schema version 1 are found."""
    for prefix, route in _PREFIX_ROUTES.items():
        if response_id.startswith(prefix):
            return response_id.removeprefix(prefix), route
    return response_id, ""


def answers(record: AuditRecord, tenant: str, response_id: str) -> bool:
    """Whether ``find_response(tenant, response_id)`` finds ``record`` once it is written:
    the terms of ``_FIND_RESPONSE``, asked of a row still in the audit queue."""
    response_id = _clean(response_id) or ""
    bare, route = _bare_id(response_id)
    return (
        (record.input_action is not None or record.output_action is not None)
        and _clean(record.tenant) == _clean(tenant)
        and (
            _clean(record.response_id) == response_id
            or _clean(record.request_id) == response_id
            or (_clean(record.request_id) == bare and record.route == route)
        )
    )


_UPSERT_FEEDBACK: Final = """
INSERT INTO audit_feedback (record_id, response_id, request_id, tenant, route, policy_name,
    policy_version, outcome, action, input_action, output_action, rating, comment, time, epoch)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{ts}, ?)
ON CONFLICT (record_id) DO UPDATE SET rating = excluded.rating, comment = excluded.comment,
    time = excluded.time, epoch = excluded.epoch
"""

_UPSERT_REVIEW: Final = """
INSERT INTO audit_review (record_id, request_id, exchange_time, exchange_epoch, tenant, route,
    policy_name, policy_version, outcome, action, input_action, output_action, findings,
    verdict, expected_action, reviewer, note, time, epoch)
SELECT a.record_id, a.request_id, a.time, a.epoch, a.tenant, a.route, a.policy_name,
    a.policy_version, a.outcome, a.action, a.input_action, a.output_action, a.findings,
    ?, ?, ?, ?, ?{ts}, ?
FROM audit_log a WHERE a.record_id = ?
ON CONFLICT (record_id) DO UPDATE SET verdict = excluded.verdict,
    expected_action = excluded.expected_action, reviewer = excluded.reviewer,
    note = excluded.note, time = excluded.time, epoch = excluded.epoch
"""

_VERDICTS: Final = """
SELECT r.id, r.record_id, r.request_id, r.exchange_epoch, r.tenant, r.route, r.policy_name,
       r.policy_version, r.outcome, r.action, r.input_action, r.output_action, r.findings,
       r.verdict, r.expected_action, r.reviewer, r.note, r.epoch
FROM audit_review r WHERE r.id > ? AND r.epoch >= ? ORDER BY r.id LIMIT ?
"""


def _exchange(row: Sequence[Any]) -> AuditedExchange:
    review = None
    if row[17] is not None:
        review = ReviewVerdict(row[17], row[18], row[19], row[20], float(row[21]))
    return AuditedExchange(
        seq=int(row[0]),
        record_id=row[1],
        request_id=row[2],
        response_id=row[3],
        epoch=float(row[4]),
        tenant=row[5],
        route=row[6],
        model=row[7],
        policy_name=row[8],
        policy_version=row[9],
        outcome=row[10],
        action=row[11],
        input_action=row[12],
        output_action=row[13],
        findings=_findings(row[14]),
        text=row[15],
        feedback_rating=None if row[16] is None else int(row[16]),
        review=review,
    )


def _exported(row: Sequence[Any]) -> ExportedVerdict:
    return ExportedVerdict(
        seq=int(row[0]),
        record_id=row[1],
        request_id=row[2],
        exchange_epoch=float(row[3]),
        tenant=row[4],
        route=row[5],
        policy_name=row[6],
        policy_version=row[7],
        outcome=row[8],
        action=row[9],
        input_action=row[10],
        output_action=row[11],
        findings=_findings(row[12]),
        review=ReviewVerdict(row[13], row[14], row[15], row[16], float(row[17])),
    )


def _clean(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL (the audit log does the same for its rows).
    return None if value is None else value.replace("\x00", "\ufffd")


# --- the store ---------------------------------------------------------------------------


class OversightStore:
    """Ratings and verdicts in the audit database (SQLite file or PostgreSQL DSN).

    Open it after the audit store has opened (which creates and migrates the tables).
    Every call runs on the store's one worker thread; a PostgreSQL connection that
    broke is replaced on the next call.
    """

    def __init__(
        self,
        *,
        sqlite_path: str | Path | None = None,
        postgres_dsn: str | None = None,
        busy_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if (sqlite_path is None) == (postgres_dsn is None):
            raise ValueError("give exactly one of sqlite_path or postgres_dsn")
        self.sqlite_path = None if sqlite_path is None else Path(sqlite_path)
        self.postgres_dsn = postgres_dsn
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._connect_timeout_s = max(1, round(connect_timeout_s))
        self._executor: ThreadPoolExecutor | None = None
        self._conn: Any = None

    def __repr__(self) -> str:
        if self.sqlite_path is not None:
            return f"OversightStore(sqlite={str(self.sqlite_path)!r})"
        parts = urlsplit(self.postgres_dsn or "")  # never the password
        host = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
        return f"OversightStore(postgres={host}{parts.path})"

    # --- plumbing ------------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise RuntimeError(f"{self!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _sql(self, text: str) -> str:
        if self.sqlite_path is not None:
            return text.replace("{ts}", "").replace("{queue}", " INDEXED BY audit_log_review_queue")
        return text.replace("?", "%s").replace("{ts}", "::timestamptz").replace("{queue}", "")

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and (self.sqlite_path is not None or not conn.broken):
            return conn
        if conn is not None:
            conn.close()
            self._conn = None
        if self.sqlite_path is not None:
            # isolation_level=None: no implicit transactions; writes are BEGIN..COMMIT.
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        else:
            import psycopg

            conn = psycopg.connect(
                self.postgres_dsn or "", autocommit=True, connect_timeout=self._connect_timeout_s
            )
        self._conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._connection()
        if self.sqlite_path is None:
            with conn.transaction():
                yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        rows: list[Any] = self._connection().execute(self._sql(sql), tuple(params)).fetchall()
        return rows

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check that the tables exist (raises if the audit store never ran)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="guardrail-oversight")
        try:
            await self._call(self._rows, "SELECT count(*) FROM audit_review WHERE id < 0")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close)
        executor.shutdown(wait=True)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --- feedback ------------------------------------------------------------------------

    async def find_response(self, tenant: str, response_id: str) -> AuditedExchange | None:
        """The exchange of ``tenant`` whose response id (or else request id) this is, the
        latest if several; only exchanges the filters checked (see ``_FIND_RESPONSE``)."""
        # Stored ids never hold NUL (the audit log writes it as U+FFFD, and PostgreSQL
        # refuses a NUL even as a query parameter): ask for what would have been stored.
        response_id = _clean(response_id) or ""
        bare, route = _bare_id(response_id)
        params = (response_id, response_id, bare, route, _clean(tenant), response_id)
        rows = await self._call(self._rows, _FIND_RESPONSE, params)
        return _exchange(rows[0]) if rows else None

    async def save_feedback(self, entry: FeedbackEntry) -> int | None:
        """Store a rating; a later rating of the same response replaces it. Returns the
        rating it replaced (``None`` for the response's first), read in the same
        transaction: what the ratings metrics count must follow the stored rows."""
        previous: int | None = await self._call(self._save_feedback, entry)
        return previous

    def _save_feedback(self, entry: FeedbackEntry) -> int | None:
        ex = entry.exchange
        response_id = _clean(ex.response_id or entry.response_id or ex.request_id)
        with self._transaction() as conn:
            if self.postgres_dsn is not None:
                # Replicas share the table: two first ratings at once both read no row
                # (a missing row takes no lock) and both counted as first. The lock ends
                # with the transaction. SQLite's BEGIN IMMEDIATE already serialises.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (ex.record_id,)
                )
            found = conn.execute(
                self._sql("SELECT rating FROM audit_feedback WHERE record_id = ?"),
                (ex.record_id,),
            ).fetchone()
            conn.execute(
                self._sql(_UPSERT_FEEDBACK),
                (
                    ex.record_id,
                    response_id,
                    ex.request_id,
                    ex.tenant,
                    ex.route,
                    ex.policy_name,
                    ex.policy_version,
                    ex.outcome,
                    ex.action,
                    ex.input_action,
                    ex.output_action,
                    entry.rating,
                    _clean(entry.comment),
                    iso_time(entry.epoch),
                    entry.epoch,
                ),
            )
        return None if found is None else int(found[0])

    # --- review ------------------------------------------------------------------------

    async def exchange(self, record_id: str) -> AuditedExchange | None:
        """One exchange by its audit record id, with its rating and verdict."""
        rows = await self._call(self._rows, _ITEM + "WHERE a.record_id = ?", (_clean(record_id),))
        return _exchange(rows[0]) if rows else None

    async def review_items(
        self,
        status: ReviewStatus = "pending",
        *,
        limit: int = 50,
        before: int | None = None,
        tenant: str | None = None,
    ) -> tuple[list[AuditedExchange], bool]:
        """Review items, newest first, and whether more follow (``before`` the last seq)."""
        result: tuple[list[AuditedExchange], bool] = await self._call(
            self._review_items, status, limit, before, tenant
        )
        return result

    def _review_items(
        self, status: ReviewStatus, limit: int, before: int | None, tenant: str | None
    ) -> tuple[list[AuditedExchange], bool]:
        extra = ""
        params: list[Any] = []
        if before is not None:
            extra += " AND a.id < ?"
            params.append(before)
        if tenant is not None:
            extra += " AND a.tenant = ?"
            params.append(_clean(tenant))
        found: dict[int, AuditedExchange] = {}
        for condition in _BRANCHES[status]:
            select = _QUEUE_ITEM if condition.startswith(_FLAGGED) else _ITEM
            sql = f"{select}WHERE {condition}{extra} ORDER BY a.id DESC LIMIT ?"
            for row in self._rows(sql, [*params, limit + 1]):
                item = _exchange(row)
                found[item.seq] = item
        merged = [found[seq] for seq in sorted(found, reverse=True)]
        return merged[:limit], len(merged) > limit

    async def pending_count(self) -> int:
        """Items waiting for a reviewer (the queue depth)."""
        return int(await self._call(self._pending_count))

    def _pending_count(self) -> int:
        return sum(int(self._rows(sql)[0][0]) for sql in _COUNT_PENDING)

    async def save_review(self, entry: ReviewEntry) -> bool | None:
        """Record a verdict: ``None`` if no such exchange, else whether it replaced one."""
        result: bool | None = await self._call(self._save_review, entry)
        return result

    def _save_review(self, entry: ReviewEntry) -> bool | None:
        v = entry.verdict
        record_id = _clean(entry.record_id)
        with self._transaction() as conn:
            found = conn.execute(
                self._sql("SELECT 1 FROM audit_review WHERE record_id = ?"), (record_id,)
            ).fetchone()
            cursor = conn.execute(
                self._sql(_UPSERT_REVIEW),
                (
                    v.verdict,
                    v.expected_action,
                    _clean(v.reviewer),
                    _clean(v.note),
                    iso_time(v.epoch),
                    v.epoch,
                    record_id,
                ),
            )
            if cursor.rowcount == 0:
                return None
        return found is not None

    async def verdicts(
        self, *, after: int = 0, since: float | None = None, limit: int = 500
    ) -> list[ExportedVerdict]:
        """Recorded verdicts in the order they were first made, ``after`` a seq."""
        rows = await self._call(self._rows, _VERDICTS, (after, since or 0.0, limit))
        return [_exported(r) for r in rows]


def oversight_store_for(store: AuditStore) -> OversightStore | None:
    """The oversight store on the same database as an audit store, if it is one we know."""
    if isinstance(store, SQLiteStore):
        return OversightStore(sqlite_path=store.path)
    if isinstance(store, PostgresStore):
        return OversightStore(postgres_dsn=store.dsn)
    return None
