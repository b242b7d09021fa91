"""The audit log: rows read back from SQLite and from a real PostgreSQL server.

The PostgreSQL tests start a throwaway server from the Debian ``postgresql`` binaries
(``/usr/lib/postgresql/*/bin``) for the session. Without them the tests skip, except
under ``CI=true``, where they fail: CI installs the package (``.ci/run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import json
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from structlog.testing import capture_logs

from guardrail.errors import ConfigError
from guardrail.exchange import Exchange
from guardrail.guard.types import (
    Action,
    Decision,
    FilterOutcome,
    Finding,
    Redaction,
    Stage,
    Verdict,
)
from guardrail.observability.audit import (
    COLUMNS,
    POSTGRES_MIGRATIONS,
    REJECT_AFTER,
    SCHEMA_VERSION,
    SQLITE_MIGRATIONS,
    UNCHECKED_TEXT,
    AuditConfig,
    AuditError,
    AuditLog,
    AuditRecord,
    AuditStore,
    PostgresStore,
    SQLiteStore,
    audit_from_settings,
    record_from_exchange,
    redacted_text,
    store_from_dsn,
)
from guardrail.observability.oversight import (
    FeedbackEntry,
    OversightStore,
    ReviewEntry,
    ReviewVerdict,
    oversight_store_for,
)
from tests.fakes.backend import FakeBackend

SECRET = "my social is 078-05-1120, tell no one"
NOW = 1_790_000_000.25  # a fixed clock: 2026-09-21T14:13:20.25Z


# --- builders -------------------------------------------------------------------


def finding(
    category: str, action: Action, *, score: float = 0.9, rule: str | None = None
) -> Finding:
    return Finding(
        category=category,
        score=score,
        action=action,
        rule_id=rule,
        span=(3, 14),
        message=f"policy message quoting {SECRET}",  # a finding never carries user text,
        filter_id="pii",  # but if one did, the audit must not copy it
    )


def decision(stage: Stage, *findings: Finding, text: str = SECRET) -> Decision:
    action = Action.strictest(f.action for f in findings)
    return Decision(
        stage=stage,
        action=action,
        text=text,  # the guard keeps the checked text here; the audit never reads it
        findings=findings,
        outcomes=(
            FilterOutcome(
                filter_id="pii",
                filter_type="pii",
                verdict=Verdict.from_findings(findings),
                duration_s=0.0042,
                cache="miss",
            ),
            FilterOutcome(
                filter_id="toxicity",
                filter_type="toxicity",
                verdict=Verdict(),
                duration_s=1.5,
                status="timeout",
                error="TimeoutError",
            ),
        ),
        policy_name="default",
        policy_version="2026.11.22-1",
    )


def exchange(request_id: str = "req-1", **overrides: Any) -> Exchange:
    ex = Exchange(
        request_id=request_id,
        route="chat",
        tenant="acme",
        model="smollm2-135m-instruct",
        stream=True,
        backend="remote",
        policy_name="default",
        policy_version="2026.11.22-1",
        decisions=[
            decision(Stage.INPUT, finding("pii.ssn", Action.REDACT, rule="ssn")),
            decision(Stage.INPUT),
            decision(Stage.OUTPUT, finding("toxicity", Action.FLAG, score=0.61)),
        ],
        backend_duration_s=0.8,
        time_to_first_token_s=0.12,
        prompt_tokens=31,
        completion_tokens=7,
    )
    for name, value in overrides.items():
        setattr(ex, name, value)
    ex.finish("redacted", 200)
    ex.duration_s = 1.25  # pinned, so the row's times are exact
    return ex


def finished(n: int, prefix: str = "burst") -> list[Exchange]:
    return [exchange(f"{prefix}-{i}") for i in range(n)]


def config(**overrides: Any) -> AuditConfig:
    values: dict[str, Any] = {
        "dsn": "unused",
        "flush_interval_s": 0.01,
        "retry_initial_s": 0.001,
        "retry_max_s": 0.01,
        "close_timeout_s": 5.0,
    }
    values.update(overrides)
    return AuditConfig(**values)


# --- a real PostgreSQL server -----------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    port: int

    def dsn(self, database: str) -> str:
        return f"postgresql://guardrail@127.0.0.1:{self.port}/{database}"


def _postgres_bindir() -> Path | None:
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    newest = max(found, key=lambda p: int(Path(p).parent.parent.name.split(".")[0]))
    return Path(newest).parent


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CI", "").lower() in {"true", "1"}:
        pytest.fail(f"{why}, and CI must test the PostgreSQL audit store")
    pytest.skip(f"{why} (CI installs the Debian package postgresql and runs these tests)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for this test run, stopped and deleted after."""
    bindir = _postgres_bindir()
    if bindir is None:
        _skip_or_fail("the PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are missing")
        raise AssertionError("unreachable")
    base = Path(tempfile.mkdtemp(prefix="guardrail-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            _skip_or_fail("running as root and there is no 'postgres' user to run the server")
            raise AssertionError("unreachable") from None
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, logfile, port = base / "data", base / "server.log", _free_port()

    def run(*args: str) -> None:
        result = subprocess.run(
            [*as_user, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            server_log = logfile.read_text() if logfile.exists() else ""
            raise RuntimeError(f"{args[0]} failed:\n{result.stdout.decode()}\n{server_log}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "guardrail", "--auth=trust",
        "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
    options = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", options,
        "-w", "-t", "60", "start")  # fmt: skip
    try:
        yield PostgresServer(port)
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    import psycopg

    name = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.dsn(name)


# --- both stores, read back the same way -------------------------------------------


@dataclass
class Database:
    """One store kind: how to build a store on a fresh database and read its rows."""

    kind: str
    make_store: Callable[[], AuditStore]
    rows: Callable[[], Awaitable[list[dict[str, Any]]]]
    schema_version: Callable[[], Awaitable[int]]


def _sqlite_database(path: Path) -> Database:
    def query(sql: str) -> list[sqlite3.Row]:
        conn = sqlite3.connect(path)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    async def rows() -> list[dict[str, Any]]:
        out = []
        for row in query("SELECT * FROM audit_log ORDER BY id"):
            item = dict(row)
            item["stream"] = bool(item["stream"])
            item["findings"] = json.loads(item["findings"])
            item["filters"] = json.loads(item["filters"])
            out.append(item)
        return out

    async def version() -> int:
        return int(query("SELECT max(version) FROM audit_schema_version")[0][0])

    return Database("sqlite", lambda: SQLiteStore(path), rows, version)


def _postgres_database(dsn: str) -> Database:
    import psycopg
    from psycopg.rows import dict_row

    async def rows() -> list[dict[str, Any]]:
        async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
            cur = await conn.execute("SELECT * FROM audit_log ORDER BY id")
            out = await cur.fetchall()
        for item in out:
            item["time"] = item["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return out

    async def version() -> int:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SELECT max(version) FROM audit_schema_version")
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    return Database("postgres", lambda: PostgresStore(dsn), rows, version)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return _sqlite_database(tmp_path / "audit.db")
    return _postgres_database(request.getfixturevalue("postgres_dsn"))


def expected_row(record: AuditRecord) -> dict[str, Any]:
    values = dict(zip(COLUMNS, _values(record), strict=True))
    values["findings"] = record.findings
    values["filters"] = record.filters
    return values


def _values(record: AuditRecord) -> list[Any]:
    renamed = {"findings": "findings_json", "filters": "filters_json", "groups": "groups_json"}
    return [getattr(record, renamed.get(c, c)) for c in COLUMNS]


def without_id(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "id"}


@contextlib.asynccontextmanager
async def running(store: AuditStore, cfg: AuditConfig | None = None) -> AsyncIterator[AuditLog]:
    audit = AuditLog(store, cfg or config())
    await audit.start()
    try:
        yield audit
    finally:
        await audit.aclose()


# --- the row ------------------------------------------------------------------------


def test_a_record_holds_ids_verdicts_scores_and_latency_but_no_text() -> None:
    record = record_from_exchange(exchange(), now=NOW, record_id="r1")

    assert record.request_id == "req-1"
    assert record.time == "2026-09-21T14:13:19.000000Z"  # arrival: finish minus duration
    assert record.epoch == NOW - 1.25
    assert (record.route, record.tenant, record.model, record.stream, record.backend) == (
        "chat",
        "acme",
        "smollm2-135m-instruct",
        True,
        "remote",
    )
    assert (record.policy_name, record.policy_version) == ("default", "2026.11.22-1")
    assert (record.outcome, record.status_code, record.error_code) == ("redacted", 200, None)
    assert (record.action, record.input_action, record.output_action) == (
        "redact",
        "redact",
        "flag",
    )
    assert record.findings == [
        {"stage": "input", "filter": "pii", "category": "pii.ssn", "score": 0.9,
         "action": "redact", "rule_id": "ssn", "concern": "harm", "count": 1},
        {"stage": "output", "filter": "pii", "category": "toxicity", "score": 0.61,
         "action": "flag", "rule_id": None, "concern": "harm", "count": 1},
    ]  # fmt: skip
    assert record.filters[:2] == [
        {"stage": "input", "filter": "pii", "type": "pii", "status": "ok", "action": "redact",
         "duration_ms": 4.2, "cache": "miss", "error": None},
        {"stage": "input", "filter": "toxicity", "type": "toxicity", "status": "timeout",
         "action": "allow", "duration_ms": 1500.0, "cache": "off", "error": "TimeoutError"},
    ]  # fmt: skip
    assert len(record.filters) == 6
    assert (record.duration_ms, record.backend_ms, record.ttft_ms) == (1250.0, 800.0, 120.0)
    assert (record.prompt_tokens, record.completion_tokens) == (31, 7)
    assert record.text is None
    assert "078-05-1120" not in repr(record)


def test_an_exchange_without_output_checks_has_no_output_action() -> None:
    ex = Exchange(request_id="bad", route="completions")
    ex.finish("invalid_request", 400, "invalid_request_error")

    record = record_from_exchange(ex)

    assert (record.input_action, record.output_action, record.action) == (None, None, "allow")
    assert (record.status_code, record.error_code) == (400, "invalid_request_error")
    assert record.findings == []
    assert record.filters == []


def test_alike_findings_are_one_entry_with_their_count_and_top_score() -> None:
    """A pii filter finds one entity per address: 30,000 addresses made a 3.7 MB row."""
    addresses = [
        finding("pii.email", Action.REDACT, score=0.5 + i / 10_000, rule="email")
        for i in range(3000)
    ]
    prompt = decision(Stage.INPUT, *addresses, finding("pii.ssn", Action.REDACT, rule="ssn"))
    reply = decision(Stage.OUTPUT, *addresses[:2])
    ex = exchange(decisions=[prompt, decision(Stage.INPUT, *addresses[:10]), reply])

    record = record_from_exchange(ex)

    assert [(f["stage"], f["category"], f["count"], f["score"]) for f in record.findings] == [
        ("input", "pii.email", 3010, 0.7999),
        ("input", "pii.ssn", 1, 0.9),
        ("output", "pii.email", 2, 0.5001),
    ]
    assert len(record.findings_json) < 500


def test_recording_an_unfinished_exchange_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="not finished"):
        record_from_exchange(Exchange(request_id="x", route="chat"))


def test_nul_characters_from_clients_are_replaced_so_no_row_is_poison() -> None:
    record = record_from_exchange(exchange(model="evil\x00model"), text="a\x00b")

    assert record.model == "evil\ufffdmodel"
    assert record.text == "a\ufffdb"


# --- both stores -----------------------------------------------------------------------


async def test_a_recorded_exchange_reads_back_with_every_field(database: Database) -> None:
    record = record_from_exchange(exchange(), now=NOW, record_id="r1")

    async with running(database.make_store()) as audit:
        audit.enqueue(record)

    rows = await database.rows()
    assert [without_id(r) for r in rows] == [expected_row(record)]
    assert audit.stats().written == 1
    assert await database.schema_version() == SCHEMA_VERSION


async def test_writing_the_same_record_twice_stores_one_row(database: Database) -> None:
    record = record_from_exchange(exchange(), record_id="same")
    store = database.make_store()
    await store.open()
    try:
        await store.write([record])
        await store.write([record, record])  # a retried batch whose answer was lost
    finally:
        await store.close()

    assert [r["record_id"] for r in await database.rows()] == ["same"]


async def test_a_reused_client_request_id_does_not_hide_a_second_request(
    database: Database,
) -> None:
    async with running(database.make_store()) as audit:
        audit.record(exchange("client-chosen-id"))
        audit.record(exchange("client-chosen-id", tenant="other"))

    rows = await database.rows()
    assert [(r["request_id"], r["tenant"]) for r in rows] == [
        ("client-chosen-id", "acme"),
        ("client-chosen-id", "other"),
    ]


async def test_aclose_writes_every_record_of_a_burst(database: Database) -> None:
    exchanges = finished(5000)

    async with running(database.make_store(), config(batch_size=500)) as audit:
        for ex in exchanges:
            audit.record(ex)
        assert audit.depth > 0  # record() only queued them

    rows = await database.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(e.request_id for e in exchanges)
    stats = audit.stats()
    assert (stats.recorded, stats.written, stats.dropped, stats.depth) == (5000, 5000, 0, 0)


async def test_text_is_not_stored_unless_redacted_text_is_configured(
    database: Database,
) -> None:
    async with running(database.make_store()) as audit:
        audit.record(exchange("plain"), text="[REDACTED] asked about [SSN]")
    async with running(database.make_store(), config(text="redacted")) as audit:
        audit.record(exchange("kept"), text="[REDACTED] asked about [SSN]")
        audit.record(exchange("none-given"))

    texts = {r["request_id"]: r["text"] for r in await database.rows()}
    assert texts == {"plain": None, "kept": "[REDACTED] asked about [SSN]", "none-given": None}


async def test_no_text_held_in_the_exchange_reaches_the_database(database: Database) -> None:
    async with running(database.make_store(), config(text="redacted")) as audit:
        audit.record(exchange())

    dumped = json.dumps(await database.rows(), default=str)
    assert "078-05-1120" not in dumped
    assert "tell no one" not in dumped


async def test_a_row_with_a_nul_from_the_client_is_written(database: Database) -> None:
    async with running(database.make_store()) as audit:
        audit.record(exchange(model="evil\x00model"))

    assert [r["model"] for r in await database.rows()] == ["evil\ufffdmodel"]
    assert audit.stats().dropped == 0


async def test_reopening_an_existing_audit_database_keeps_its_rows(database: Database) -> None:
    async with running(database.make_store()) as audit:
        audit.record(exchange("first"))
    async with running(database.make_store()) as audit:
        audit.record(exchange("second"))

    assert [r["request_id"] for r in await database.rows()] == ["first", "second"]
    assert await database.schema_version() == SCHEMA_VERSION


async def test_a_database_with_a_newer_schema_is_refused(database: Database) -> None:
    async with running(database.make_store()):
        pass
    store = database.make_store()
    await store.open()
    await _bump_schema_version(database, store)
    await store.close()

    with pytest.raises(AuditError, match="newer"):
        await database.make_store().open()


async def _bump_schema_version(database: Database, store: AuditStore) -> None:
    sql = f"INSERT INTO audit_schema_version (version, applied_at) VALUES ({SCHEMA_VERSION + 1}, "
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            conn.execute(sql + "'later')")
            conn.commit()
        finally:
            conn.close()
    else:
        assert isinstance(store, PostgresStore)
        import psycopg

        async with await psycopg.AsyncConnection.connect(store.dsn, autocommit=True) as conn:
            await conn.execute(sql + "now())")


async def test_postgres_writes_go_on_after_the_server_drops_the_connection(
    postgres_dsn: str,
) -> None:
    import psycopg

    async with running(PostgresStore(postgres_dsn)) as audit:
        audit.record(exchange("before"))
        await audit.flush()
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        audit.record(exchange("after"))

    rows = await _postgres_database(postgres_dsn).rows()
    assert [r["request_id"] for r in rows] == ["before", "after"]
    stats = audit.stats()
    assert (stats.written, stats.dropped) == (2, 0)
    assert stats.write_errors >= 1


# --- schema version 2: migration, feedback and review rows ---------------------------------


async def _create_version_1(store: AuditStore, record: AuditRecord) -> None:
    """A database as guardrail's schema version 1 left it, holding ``record``."""
    later = ("response_id", "groups")  # columns of schema versions 2 and 3
    old = [(c, v) for c, v in zip(COLUMNS, _values(record), strict=True) if c not in later]
    names = ", ".join(c for c, _ in old)
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            for statement in SQLITE_MIGRATIONS[1]:
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO audit_log ({names}) VALUES ({', '.join('?' for _ in old)})",
                [v for _, v in old],
            )
            conn.execute("INSERT INTO audit_schema_version VALUES (1, 'then')")
            conn.commit()
        finally:
            conn.close()
        return
    assert isinstance(store, PostgresStore)
    import psycopg

    casts = {"time": "::timestamptz", "findings": "::jsonb", "filters": "::jsonb"}
    marks = ", ".join("%s" + casts.get(c, "") for c, _ in old)
    async with await psycopg.AsyncConnection.connect(store.dsn, autocommit=True) as conn:
        for statement in POSTGRES_MIGRATIONS[1]:
            await conn.execute(statement)
        await conn.execute(f"INSERT INTO audit_log ({names}) VALUES ({marks})", [v for _, v in old])
        await conn.execute("INSERT INTO audit_schema_version (version) VALUES (1)")


@contextlib.asynccontextmanager
async def oversight(store: AuditStore) -> AsyncIterator[OversightStore]:
    found = oversight_store_for(store)
    assert found is not None
    await found.open()
    try:
        yield found
    finally:
        await found.close()


async def test_a_version_1_database_is_migrated_and_keeps_its_rows(database: Database) -> None:
    old = record_from_exchange(exchange("before-v2"), now=NOW, record_id="old")
    await _create_version_1(database.make_store(), old)

    async with running(database.make_store()) as audit:
        audit.record(exchange("after-v2"))

    rows = await database.rows()
    assert [(r["request_id"], r["response_id"]) for r in rows] == [
        ("before-v2", None),  # not known then
        ("after-v2", "chatcmpl-after-v2"),
    ]
    assert without_id(rows[0]) == {**expected_row(old), "response_id": None}
    assert await database.schema_version() == SCHEMA_VERSION >= 2
    async with oversight(database.make_store()) as store:
        # A response id from before the migration is found through its request id.
        found = await store.find_response("acme", "chatcmpl-before-v2")
        assert found is not None
        assert found.record_id == "old"
        assert await store.pending_count() == 0


async def test_findings_of_rows_written_before_counts_read_as_one_each(
    database: Database,
) -> None:
    new = record_from_exchange(exchange("new"), now=NOW)
    entries = [{k: v for k, v in f.items() if k != "count"} for f in new.findings]
    old = dataclasses.replace(
        record_from_exchange(exchange("old"), now=NOW),
        findings_json=json.dumps([*entries, entries[0]]),  # one entry per finding then
    )
    async with running(database.make_store()) as audit:
        audit.enqueue(old)
        audit.enqueue(new)

    async with oversight(database.make_store()) as store:
        found_old = await store.find_response("acme", "chatcmpl-old")
        found_new = await store.find_response("acme", "chatcmpl-new")
    assert found_old is not None
    assert found_new is not None
    assert [(f["category"], f["count"]) for f in found_old.findings] == [
        ("pii.ssn", 1),
        ("toxicity", 1),
        ("pii.ssn", 1),
    ]
    assert list(found_new.findings) == new.findings


async def test_ratings_and_verdicts_round_trip_with_the_decision_they_judged(
    database: Database,
) -> None:
    block = decision(Stage.INPUT, finding("weapons", Action.BLOCK, score=0.97, rule="bomb"))
    allow = decision(Stage.INPUT)
    async with running(database.make_store()) as audit:
        audit.record(exchange("flagged-1", outcome="flagged"))
        audit.record(exchange("blocked-1", outcome="blocked_input", decisions=[block]))
        audit.record(exchange("fine-1", outcome="allowed", decisions=[allow]))
        audit.record(exchange("other-tenant", tenant="beta", outcome="allowed", decisions=[allow]))
        # Refused before the filters (a bad body): no decision to rate, found by no id.
        audit.record(exchange("refused-1", outcome="invalid_request", decisions=[]))

    async with oversight(database.make_store()) as store:
        assert await store.pending_count() == 2
        assert await store.find_response("acme", "chatcmpl-other-tenant") is None
        assert await store.find_response("beta", "chatcmpl-other-tenant") is not None
        fine = await store.find_response("acme", "fine-1")  # a request id works too
        assert await store.find_response("acme", "refused-1") is None
        blocked = await store.find_response("acme", "chatcmpl-blocked-1")
        assert fine is not None
        assert blocked is not None
        assert (blocked.action, blocked.outcome, blocked.stage) == (
            "block",
            "blocked_input",
            "input",
        )

        assert (
            await store.save_feedback(FeedbackEntry(fine, rating=1, comment=None, epoch=NOW))
            is None
        )
        assert (
            await store.save_feedback(FeedbackEntry(fine, rating=-1, comment="x\x00", epoch=NOW))
            == 1
        )
        assert (
            await store.save_feedback(FeedbackEntry(blocked, rating=-1, comment=None, epoch=NOW))
            is None
        )

        assert await store.pending_count() == 3  # the rated-down allowed exchange joins
        pending, more = await store.review_items("pending", limit=2)
        assert [(i.request_id, i.queued_because, i.feedback_rating) for i in pending] == [
            ("fine-1", "negative_feedback", -1),
            ("blocked-1", "blocked", -1),
        ]
        assert more
        rest, more = await store.review_items("pending", limit=2, before=pending[-1].seq)
        assert [i.request_id for i in rest] == ["flagged-1"]
        assert not more
        assert [f["category"] for f in pending[1].findings] == ["weapons"]

        verdict = ReviewVerdict("false_positive", "allow", "alice", "a chemistry class", NOW + 5)
        assert await store.save_review(ReviewEntry(blocked.record_id, verdict)) is False
        again = ReviewVerdict("false_positive", "flag", "bob", None, NOW + 6)
        assert await store.save_review(ReviewEntry(blocked.record_id, again)) is True
        assert await store.save_review(ReviewEntry("no-such-record", verdict)) is None

        assert await store.pending_count() == 2
        reviewed, _ = await store.review_items("reviewed")
        assert [(i.request_id, i.review) for i in reviewed] == [("blocked-1", again)]
        everything, _ = await store.review_items("all", tenant="acme")
        assert [i.request_id for i in everything] == ["fine-1", "blocked-1", "flagged-1"]
        assert await store.review_items("all", tenant="beta") == ([], False)

        exported = await store.verdicts()
        assert [(v.request_id, v.action, v.outcome, v.review) for v in exported] == [
            ("blocked-1", "block", "blocked_input", again)
        ]
        assert exported[0].findings == (
            {"stage": "input", "filter": "pii", "category": "weapons", "score": 0.97,
             "action": "block", "rule_id": "bomb", "concern": "harm", "count": 1},
        )  # fmt: skip
        assert await store.verdicts(after=exported[0].seq) == []
        assert await store.verdicts(since=NOW + 7) == []

    feedback = await _table(
        database, "SELECT record_id, rating, comment, action FROM audit_feedback"
    )
    assert sorted(tuple(r) for r in feedback) == sorted(
        [(fine.record_id, -1, "x\ufffd", "allow"), (blocked.record_id, -1, None, "block")]
    )


async def test_an_id_or_tenant_with_a_nul_is_simply_not_found(database: Database) -> None:
    # A client chooses these strings (a feedback's response_id, a review item id in the
    # path, the tenant filter): PostgreSQL refuses NUL even as a query parameter, which
    # answered 503 "the audit database is not answering" instead of not found.
    async with running(database.make_store()) as audit:
        audit.record(exchange("flagged-1", outcome="flagged"))

    async with oversight(database.make_store()) as store:
        assert await store.find_response("acme", "chatcmpl-flagged-1\x00") is None
        assert await store.find_response("acme\x00", "flagged-1") is None
        assert await store.exchange("no-such\x00record") is None
        assert await store.review_items("all", tenant="acme\x00") == ([], False)
        verdict = ReviewVerdict("correct", "flag", "alice", None, NOW)
        assert await store.save_review(ReviewEntry("no-such\x00record", verdict)) is None
        listed, _ = await store.review_items("all", tenant="acme")
        assert [i.request_id for i in listed] == ["flagged-1"]


POSTGRES_FEEDBACK_QUERIES = [
    """SELECT policy_version, count(*) AS rated_blocks,
    count(*) FILTER (WHERE rating < 0) AS rated_bad
    FROM audit_feedback WHERE action = 'block' GROUP BY policy_version""",
    """SELECT f ->> 'category' AS category, r.verdict, count(*), avg((f ->> 'score')::float)
    FROM audit_review r, jsonb_array_elements(r.findings) AS f GROUP BY category, r.verdict""",
]


async def test_concurrent_first_ratings_from_several_gateways_count_one_first_each(
    database: Database,
) -> None:
    """Replicas share one database. Two first ratings of the same response at once each
    read "no rating yet" before either wrote, so both counted as the response's first
    rating and the satisfaction counters (rated minus replaced) held two ratings for one
    stored row. Exactly one save of each response finds no earlier rating."""
    allow = decision(Stage.INPUT)
    names = [f"race-{n}" for n in range(40)]
    async with running(database.make_store()) as audit:
        for name in names:
            audit.record(exchange(name, outcome="allowed", decisions=[allow]))
    replicas = [oversight(database.make_store()) for _ in range(4)]
    async with contextlib.AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(r) for r in replicas]
        found = [await stores[0].find_response("acme", name) for name in names]
        rated = [ex for ex in found if ex is not None]
        assert len(rated) == len(names)

        async def rate_all(store: OversightStore, rating: int) -> list[int | None]:
            return [
                await store.save_feedback(FeedbackEntry(ex, rating, comment=None, epoch=NOW))
                for ex in rated
            ]

        results = await asyncio.gather(
            *(rate_all(store, 1 if n % 2 else -1) for n, store in enumerate(stores))
        )
    firsts = [sum(r[i] is None for r in results) for i in range(len(rated))]
    assert firsts == [1] * len(rated)


async def test_the_documented_postgres_feedback_queries_run(postgres_dsn: str) -> None:
    block = decision(Stage.INPUT, finding("weapons", Action.BLOCK, score=0.97, rule="bomb"))
    async with running(PostgresStore(postgres_dsn)) as audit:
        audit.record(exchange("blocked-1", outcome="blocked_input", decisions=[block]))
    async with oversight(PostgresStore(postgres_dsn)) as store:
        blocked = await store.find_response("acme", "blocked-1")
        assert blocked is not None
        await store.save_feedback(FeedbackEntry(blocked, rating=-1, comment=None, epoch=NOW))
        verdict = ReviewVerdict("correct", "block", "alice", None, NOW)
        await store.save_review(ReviewEntry(blocked.record_id, verdict))

    database = _postgres_database(postgres_dsn)
    results = [await _table(database, sql) for sql in POSTGRES_FEEDBACK_QUERIES]
    assert [[tuple(r) for r in rows] for rows in results] == [
        [("2026.11.22-1", 1, 1)],
        [("weapons", "correct", 1, 0.97)],
    ]


async def _table(database: Database, sql: str) -> list[Any]:
    store = database.make_store()
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    assert isinstance(store, PostgresStore)
    import psycopg

    async with await psycopg.AsyncConnection.connect(store.dsn) as conn:
        cur = await conn.execute(sql)
        return await cur.fetchall()


# --- SQLite specifics -----------------------------------------------------------------------


async def test_sqlite_runs_in_wal_mode_and_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "audit.db"

    async with running(SQLiteStore(path)) as audit:
        audit.record(exchange())

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        conn.close()
    assert {"audit_log_request_id", "audit_log_epoch", "audit_log_tenant_epoch"} <= indexes


async def test_sqlite_rows_can_be_read_while_the_writer_runs(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with running(SQLiteStore(path)) as audit:
        audit.record(exchange("a"))
        await audit.flush()
        reader = sqlite3.connect(path)
        try:
            assert reader.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 1
        finally:
            reader.close()
        audit.record(exchange("b"))


# --- the writer, against fake stores --------------------------------------------------------


class MemoryStore:
    """A store that keeps rows in memory, by record id, and notes every batch it got."""

    def __init__(self) -> None:
        self.rows: dict[str, AuditRecord] = {}
        self.batches: list[int] = []
        self.opened = self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def write(self, records: list[AuditRecord]) -> None:
        self.batches.append(len(records))
        for r in records:
            self.rows.setdefault(r.record_id, r)

    async def close(self) -> None:
        self.closed = True


class FlakyStore(MemoryStore):
    """Fails its first ``failures`` writes (a database restart), then works."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    async def write(self, records: list[AuditRecord]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError(f"database is restarting; row says {SECRET}")
        await super().write(records)


class PickyStore(MemoryStore):
    """Rejects every batch that holds a row for request id ``poison``."""

    async def write(self, records: list[AuditRecord]) -> None:
        if any(r.request_id == "poison" for r in records):
            raise ValueError("invalid byte sequence")
        await super().write(records)


class OutageStore(MemoryStore):
    """Fails exactly the write attempts numbered in ``down`` (1-based)."""

    def __init__(self, down: set[int]) -> None:
        super().__init__()
        self.down = down
        self.attempts = 0

    async def write(self, records: list[AuditRecord]) -> None:
        self.attempts += 1
        if self.attempts in self.down:
            raise ConnectionResetError
        await super().write(records)


class DownStore(MemoryStore):
    """A database that is down for good."""

    async def write(self, records: list[AuditRecord]) -> None:
        raise ConnectionRefusedError


class RecoveringStore(MemoryStore):
    """Down until ``up`` is set; then its second write fails once (a blip), the rest work."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        self.writes_since_up = 0
        self.failed: list[list[str]] = []  # the request ids of each failed write
        self.failure = asyncio.Event()

    async def write(self, records: list[AuditRecord]) -> None:
        if self.up:
            self.writes_since_up += 1
        if not self.up or self.writes_since_up == 2:
            self.failed.append([r.request_id for r in records])
            self.failure.set()
            raise ConnectionRefusedError
        await super().write(records)

    async def failures_of(self, request_id: str, count: int) -> None:
        """Wait until writes holding ``request_id`` have failed ``count`` times."""
        while sum(request_id in ids for ids in self.failed) < count:
            self.failure.clear()
            await self.failure.wait()


class GatedStore(MemoryStore):
    """Holds every write until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()

    async def write(self, records: list[AuditRecord]) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().write(records)


async def test_record_only_queues_and_the_writer_gathers_batches() -> None:
    store = GatedStore()
    async with running(store, config(batch_size=100, flush_interval_s=0.05)) as audit:
        for ex in finished(250):
            audit.record(ex)  # the store is stuck, yet record() returns at once
        assert audit.depth == 250
        store.gate.set()
        await audit.flush()
        assert audit.depth == 0

    assert store.batches == [100, 100, 50]
    assert store.opened
    assert store.closed


async def test_a_lone_record_is_written_within_the_flush_interval() -> None:
    store = MemoryStore()
    async with running(store, config(batch_size=500, flush_interval_s=0.02)) as audit:
        audit.record(exchange())
        await asyncio.sleep(0.3)
        assert len(store.rows) == 1


async def test_when_the_queue_is_full_each_extra_record_is_counted_and_logged_by_id() -> None:
    store = GatedStore()
    audit = AuditLog(store, config(queue_size=10, batch_size=10))
    with capture_logs() as logs:
        for ex in finished(13, prefix="full"):  # not started yet: nothing drains
            audit.record(ex)
        await audit.start()
        store.gate.set()
        await audit.aclose()

    dropped = [e for e in logs if e["event"] == "audit_record_dropped"]
    assert [(e["request_id"], e["reason"]) for e in dropped] == [
        ("full-10", "queue_full"),
        ("full-11", "queue_full"),
        ("full-12", "queue_full"),
    ]
    assert all(e["log_level"] == "error" for e in dropped)
    assert sorted(r.request_id for r in store.rows.values()) == sorted(
        f"full-{i}" for i in range(10)
    )
    stats = audit.stats()
    assert (stats.recorded, stats.written, stats.dropped) == (13, 10, 3)


async def test_when_queued_rows_hold_too_many_bytes_each_extra_record_is_dropped_by_id() -> None:
    """The row bound alone lets kept prompts of a few MB each fill the memory."""
    store = GatedStore()
    prompt = "x" * 100_000
    audit = AuditLog(store, config(text="redacted", queue_bytes=350_000, batch_size=10))
    with capture_logs() as logs:
        for ex in finished(5, prefix="big"):  # not started yet: nothing drains
            audit.record(ex, text=prompt)
        await audit.start()
        store.gate.set()
        await audit.flush()
        audit.record(exchange("after"), text=prompt)  # written rows free their bytes
        await audit.aclose()

    dropped = [e for e in logs if e["event"] == "audit_record_dropped"]
    assert [(e["request_id"], e["reason"]) for e in dropped] == [
        ("big-3", "queue_bytes"),
        ("big-4", "queue_bytes"),
    ]
    assert sorted(r.request_id for r in store.rows.values()) == [
        "after",
        "big-0",
        "big-1",
        "big-2",
    ]
    stats = audit.stats()
    assert (stats.recorded, stats.written, stats.dropped, stats.depth) == (6, 4, 2, 0)


async def test_a_failing_store_is_retried_and_nothing_is_lost_once_it_recovers() -> None:
    store = FlakyStore(failures=4)
    exchanges = finished(40)

    with capture_logs() as logs:
        async with running(store, config(batch_size=40)) as audit:
            for ex in exchanges:
                audit.record(ex)

    assert sorted(r.request_id for r in store.rows.values()) == sorted(
        e.request_id for e in exchanges
    )
    stats = audit.stats()
    assert (stats.written, stats.dropped, stats.write_errors) == (40, 0, 4)
    failures = [e for e in logs if e["event"] == "audit_write_failed"]
    assert [e["error"] for e in failures] == ["ConnectionError"] * 4
    assert SECRET not in repr(logs)  # the exception's message is never logged


async def test_one_row_the_database_rejects_does_not_hold_back_the_others() -> None:
    store = PickyStore()
    exchanges = [*finished(20, "ok-a"), exchange("poison"), *finished(20, "ok-b")]

    with capture_logs() as logs:
        async with running(store, config(batch_size=64)) as audit:
            for ex in exchanges:
                audit.record(ex)
            await audit.flush()  # returns without waiting for shutdown: nothing is stuck

    assert len(store.rows) == 40
    assert "poison" not in {r.request_id for r in store.rows.values()}
    lost = [e for e in logs if e["event"] == "audit_records_lost"]
    dropped = [e for e in logs if e["event"] == "audit_record_dropped"]
    assert [(e["request_id"], e["reason"]) for e in dropped] == [("poison", "rejected")]
    assert not lost
    stats = audit.stats()
    assert (stats.written, stats.dropped) == (40, 1)


async def test_a_rejected_row_written_alone_does_not_hold_back_the_rows_after_it() -> None:
    # Light traffic: the bad row is a batch of its own, the good rows arrive behind it.
    store = PickyStore()

    with capture_logs() as logs:
        async with running(store, config(batch_size=64)) as audit:
            audit.record(exchange("poison"))
            await asyncio.sleep(0.05)  # its write is failing and being retried
            for ex in finished(5, "ok"):
                audit.record(ex)
            async with asyncio.timeout(5):
                await audit.flush()
            assert len(store.rows) == 5

    dropped = [e for e in logs if e["event"] == "audit_record_dropped"]
    assert [(e["request_id"], e["reason"]) for e in dropped] == [("poison", "rejected")]
    assert not [e for e in logs if e["event"] == "audit_records_lost"]
    stats = audit.stats()
    assert (stats.written, stats.dropped) == (5, 1)


@pytest.mark.parametrize("down_from", [3, 4])
async def test_an_outage_while_a_split_batch_is_written_drops_nothing(down_from: int) -> None:
    # Attempts 1-2 fail (the batch is split), 3 writes a half: the store looked healthy
    # when the outage began, so only backoff, not dropping, must follow.
    store = OutageStore({1, 2, *range(down_from, down_from + 12)})
    exchanges = finished(64)

    async with running(store, config(batch_size=64)) as audit:
        for ex in exchanges:
            audit.record(ex)
        await audit.flush()

    assert sorted(r.request_id for r in store.rows.values()) == sorted(
        e.request_id for e in exchanges
    )
    stats = audit.stats()
    assert (stats.written, stats.dropped, stats.write_errors) == (64, 0, 14)


async def test_failures_during_an_outage_do_not_count_toward_rejecting_a_row() -> None:
    # Both rows fail again and again while the database is down; once it is back, one is
    # written and the other fails once. That is one refusal while the database accepts
    # rows, not three: it is retried, not dropped.
    store = RecoveringStore()

    with capture_logs() as logs:
        async with running(store) as audit:
            audit.record(exchange("early"))
            await store.failures_of("early", REJECT_AFTER)
            audit.record(exchange("later"))
            await store.failures_of("later", REJECT_AFTER)
            store.up = True
            await audit.flush()

    assert sorted(r.request_id for r in store.rows.values()) == ["early", "later"]
    assert not [e for e in logs if e["event"] in {"audit_record_dropped", "audit_records_lost"}]
    stats = audit.stats()
    assert (stats.written, stats.dropped) == (2, 0)


async def test_rows_a_dead_store_never_took_are_reported_by_id_at_shutdown() -> None:
    store = DownStore()

    with capture_logs() as logs:
        async with running(store, config(batch_size=2, close_timeout_s=0.2)) as audit:
            for ex in finished(5, "down"):
                audit.record(ex)

    reported = [
        rid
        for e in logs
        if e["event"] in {"audit_records_lost", "audit_record_dropped"}
        for rid in e.get("request_ids", [e.get("request_id")])
    ]
    assert sorted(reported) == [f"down-{i}" for i in range(5)]
    stats = audit.stats()
    assert (stats.written, stats.dropped, stats.depth) == (0, 5, 0)
    assert stats.write_errors >= 1
    assert store.closed


async def test_a_batch_still_being_written_counts_in_the_depth() -> None:
    """flush_audit() skips the flush when the depth is 0: a row being written is not done."""
    store = GatedStore()
    async with running(store, config(batch_size=2)) as audit:
        for ex in finished(3, "slow"):
            audit.record(ex)
        await store.writing.wait()

        assert audit.depth == 3
        store.gate.set()
        await audit.flush()
        assert audit.depth == 0


async def test_a_write_cut_short_at_shutdown_is_counted_and_reported_by_id() -> None:
    store = GatedStore()  # the gate never opens: a write that hangs past close_timeout_s

    with capture_logs() as logs:
        async with running(store, config(batch_size=2, close_timeout_s=0.05)) as audit:
            for ex in finished(3, "hung"):
                audit.record(ex)
            await store.writing.wait()

    reported = [
        rid
        for e in logs
        if e["event"] in {"audit_records_lost", "audit_record_dropped"}
        for rid in e.get("request_ids", [e.get("request_id")])
    ]
    assert sorted(reported) == [f"hung-{i}" for i in range(3)]
    stats = audit.stats()
    assert (stats.recorded, stats.written, stats.dropped, stats.depth) == (3, 0, 3, 0)


async def test_a_record_after_aclose_is_counted_and_logged_not_silently_lost() -> None:
    audit = AuditLog(MemoryStore(), config())
    await audit.start()
    await audit.aclose()
    await audit.aclose()  # twice is harmless

    with capture_logs() as logs:
        audit.record(exchange("late"))

    assert [(e["event"], e["request_id"], e["reason"]) for e in logs] == [
        ("audit_record_dropped", "late", "closed")
    ]
    assert audit.stats().dropped == 1


async def test_records_from_another_thread_wake_the_writer() -> None:
    store = MemoryStore()
    async with running(store, config(batch_size=500, flush_interval_s=0.02)) as audit:
        worker = threading.Thread(target=audit.record, args=(exchange("threaded"),))
        worker.start()
        worker.join()
        for _ in range(100):
            if store.rows:
                break
            await asyncio.sleep(0.01)
        assert [r.request_id for r in store.rows.values()] == ["threaded"]


async def test_a_store_that_cannot_open_stops_startup(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    audit = AuditLog(SQLiteStore(tmp_path / "file" / "audit.db"), config())

    with pytest.raises(FileExistsError):
        await audit.start()


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeSettings:
    audit_dsn: str | None = None
    audit_queue_size: int = 1000
    audit_queue_bytes: int = 4096
    audit_batch_size: int = 50
    audit_flush_interval_ms: int = 100
    audit_text: Any = "none"


@pytest.mark.parametrize(
    ("dsn", "kind", "where"),
    [
        ("sqlite:////var/lib/guardrail/audit.db", SQLiteStore, "/var/lib/guardrail/audit.db"),
        ("sqlite:///var/lib/guardrail/audit.db", SQLiteStore, "/var/lib/guardrail/audit.db"),
        ("sqlite://data/audit.db", SQLiteStore, "data/audit.db"),
        ("/srv/audit.db", SQLiteStore, "/srv/audit.db"),
        ("audit.db", SQLiteStore, "audit.db"),
        ("postgresql://guardrail:pw@db:5432/audit", PostgresStore, "db:5432/audit"),
        ("postgres://db/audit", PostgresStore, "db:5432/audit"),
    ],
)
def test_the_dsn_picks_the_store(dsn: str, kind: type, where: str) -> None:
    store = store_from_dsn(dsn)

    assert isinstance(store, kind)
    if isinstance(store, SQLiteStore):  # shown as written, one leading slash at most
        assert (str(store.path), repr(store)) == (where, f"SQLiteStore({where!r})")
    else:
        assert where in repr(store)
    assert "pw" not in repr(store)


@pytest.mark.parametrize("dsn", ["mysql://db/audit", "sqlite://", "sqlite:///", "sqlite:////"])
def test_an_unusable_dsn_stops_startup(dsn: str) -> None:
    with pytest.raises(ConfigError, match="audit dsn"):
        store_from_dsn(dsn)


def test_settings_map_onto_the_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))

    audit = audit_from_settings(FakeSettings(audit_text="redacted"))

    assert audit is not None
    assert isinstance(audit.store, SQLiteStore)
    assert audit.store.path == tmp_path / "guardrail" / "audit.db"
    assert (audit.config.queue_size, audit.config.batch_size) == (1000, 50)
    assert audit.config.queue_bytes == 4096
    assert (audit.config.flush_interval_s, audit.config.text) == (0.1, "redacted")
    assert audit_from_settings(FakeSettings(audit_dsn="off")) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queue_size", 0),
        ("queue_bytes", 0),
        ("batch_size", 0),
        ("flush_interval_s", -1.0),
        ("text", "raw"),
    ],
)
def test_a_bad_audit_config_is_refused(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field.removesuffix("_s")):
        config(**{field: value})


def test_the_insert_names_every_column_of_the_record() -> None:
    record = record_from_exchange(exchange(), now=NOW)

    assert len(COLUMNS) == len(_values(record))
    assert datetime.strptime(record.time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC
    ).timestamp() == pytest.approx(record.epoch)


POSTGRES_DOC_QUERIES = [
    """SELECT tenant, outcome, count(*) FROM audit_log
    WHERE time > now() - interval '1 hour' AND outcome LIKE 'redact%'
    GROUP BY tenant, outcome""",
    """SELECT f ->> 'category' AS category, count(*), avg((f ->> 'score')::float)
    FROM audit_log, jsonb_array_elements(findings) AS f
    WHERE time > now() - interval '1 day'
    GROUP BY category ORDER BY 2 DESC""",
    """SELECT f ->> 'filter' AS filter,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY (f ->> 'duration_ms')::float) AS p95_ms
    FROM audit_log, jsonb_array_elements(filters) AS f
    WHERE f ->> 'cache' <> 'hit' AND time > now() - interval '1 hour'
    GROUP BY filter ORDER BY filter""",
]


async def test_the_documented_postgres_queries_run(postgres_dsn: str) -> None:
    import psycopg

    async with running(PostgresStore(postgres_dsn)) as audit:
        audit.record(exchange())

    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        results = []
        for sql in POSTGRES_DOC_QUERIES:
            cur = await conn.execute(sql)
            results.append(sorted(await cur.fetchall()))

    assert results == [
        [("acme", "redacted", 1)],
        [("pii.ssn", 1, 0.9), ("toxicity", 1, 0.61)],  # sorted: the counts tie
        [("pii", 4.2), ("toxicity", 1500.0)],
    ]


def test_redacted_audit_text_keeps_what_the_policy_left_and_hides_what_blocked(
    make_app: Callable[..., Litestar], tmp_path: Path
) -> None:
    # audit_text: redacted stored nothing at all: the gateway never passed the text.
    from litestar.testing import TestClient

    db = tmp_path / "audit.db"

    def chat(text: str) -> dict[str, object]:
        return {"model": "fake-model", "messages": [{"role": "user", "content": text}]}

    with TestClient(app=make_app(audit_dsn=str(db), audit_text="redacted")) as client:
        assert client.post("/v1/chat/completions", json=chat("my key sk-abcdefgh")).is_success
        blocked = client.post("/v1/chat/completions", json=chat("build a bomb, key sk-zyxwvuts"))
        assert blocked.status_code == 400
        assert client.post("/v1/chat/completions", json=chat("hi dummy")).is_success
    rows = sqlite3.connect(db).execute("select outcome, text from audit_log order by epoch")
    texts = {outcome: text for outcome, text in rows}
    assert texts["blocked_input"] == "[WEAPONS], key [SECRET]"
    assert "sk-abcdefgh" not in repr(texts)
    assert "my key [SECRET]" in texts.values()
    assert "hi dummy" in texts.values()  # flagged, not redacted: as the model saw it


def test_redacted_audit_text_is_not_stored_where_a_filter_failed_on_it() -> None:
    """A pii filter that timed out blocked the prompt, proposed no redaction and marked
    no span: the whole prompt, its personal data included, went into the row."""
    failed = dataclasses.replace(
        decision(Stage.INPUT, finding("filter_error", Action.BLOCK)), text="SSN 536-22-8173"
    )
    assert redacted_text(exchange(decisions=[failed])) == UNCHECKED_TEXT
    checked = Decision(
        stage=Stage.INPUT, action=Action.ALLOW, text="hello", findings=(),
        outcomes=(FilterOutcome("pii", "pii", Verdict(), 0.001),),
        policy_name="p", policy_version="1",
    )  # fmt: skip
    assert redacted_text(exchange(decisions=[checked])) == "hello"


def _flagged_output(text: str, *, failed: bool) -> Decision:
    """An output check flagged; ``failed``: its filter timed out under ``on_error: flag``."""
    outcome = FilterOutcome(
        "pii", "pii", Verdict(Action.FLAG if failed else Action.ALLOW), 0.05,
        status="timeout" if failed else "ok",
    )  # fmt: skip
    return Decision(
        stage=Stage.OUTPUT, action=Action.FLAG, text=text, findings=(), outcomes=(outcome,),
        policy_name="p", policy_version="1",
    )  # fmt: skip


def _ran_no_filter(text: str) -> Decision:
    """As :meth:`ConsistencyChecker.inline` adds it: a flag on the completion, no outcomes."""
    return Decision(
        stage=Stage.OUTPUT, action=Action.FLAG, text=text,
        findings=(Finding("inconsistent", 0.9, Action.FLAG, concern="accuracy"),),
        outcomes=(), policy_name="p", policy_version="1",
    )  # fmt: skip


@pytest.mark.parametrize(
    "later",
    [
        pytest.param(_ran_no_filter(SECRET), id="inline-consistency-flag"),
        pytest.param(_flagged_output(SECRET[-12:] + " More text.", failed=False), id="next-window"),
    ],
)
def test_redacted_audit_text_is_not_stored_when_a_later_decision_outranks_the_failed_one(
    later: Decision,
) -> None:
    """The later decision of the stage set the action, so the failed check was skipped:
    the completion an output filter failed on (or the window that repeats its end as
    context) was stored as the model wrote it."""
    failed = _flagged_output(SECRET, failed=True)
    prompt = decision(Stage.INPUT, text="hello")

    assert redacted_text(exchange(decisions=[prompt, failed, later])) == UNCHECKED_TEXT
    # A failure at the other stage leaves this one's text checked.
    failed_prompt = dataclasses.replace(_flagged_output("hello", failed=True), stage=Stage.INPUT)
    checked = _flagged_output("fine", failed=False)
    assert redacted_text(exchange(decisions=[failed_prompt, checked])) == "fine"


@pytest.mark.parametrize(
    ("window", "stored"),
    [
        # The context tail began inside the value restored by the window before.
        ("e.marie@example.com. Then I call.", "[RESTORED]. Then I call."),
        ("com. Then I call.", "[RESTORED]. Then I call."),
        # Two characters identify no one; a word that merely starts alike stays.
        ("om. Then I call.", "om. Then I call."),
        ("Then I call.", "Then I call."),
    ],
)
def test_redacted_audit_text_hides_the_end_of_a_value_an_earlier_window_restored(
    window: str, stored: str
) -> None:
    def window_decision(text: str, action: Action, *redactions: Redaction) -> Decision:
        verdict = Verdict(action, (), redactions)
        return Decision(
            stage=Stage.OUTPUT, action=verdict.action, text=text, findings=(),
            outcomes=(FilterOutcome("pii", "pii", verdict, 0.001),),
            policy_name="p", policy_version="1",
        )  # fmt: skip

    value = "jane.marie@example.com"
    restored = Redaction(5, 22, value, restore=True)
    earlier = window_decision(f"Mail {value}.", Action.FLAG, restored)
    later = window_decision(window, Action.REDACT)  # it decides the row's text
    assert redacted_text(exchange(decisions=[earlier, later])) == stored


def test_redacted_audit_text_never_keeps_values_restored_for_the_client(
    make_app: Callable[..., Litestar], write_policy: Callable[..., Path], backend: FakeBackend
) -> None:
    # The completion came back with the user's email restored; the row kept it.
    from litestar.testing import TestClient

    policy = write_policy(
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      entities:\n        EMAIL_ADDRESS: {input: redact, output: flag}\n"
        "        CREDIT_CARD: {input: redact, output: block}\n",
        "pii.yaml",
    )
    db = Path(str(policy) + ".db")
    backend.reply = "Done, I wrote to <EMAIL_ADDRESS_1> about your order."
    with TestClient(app=make_app(policy=policy, audit_dsn=str(db), audit_text="redacted")) as c:
        chat = {"role": "user", "content": "Email jane.doe@example.com about my order."}
        r = c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [chat]})
        assert "jane.doe@example.com" in r.json()["choices"][0]["message"]["content"]
        backend.reply = "Your card <CREDIT_CARD_1> and jane.doe@example.com are on file."
        chat = {"role": "user", "content": "Is my card 4111 1111 1111 1111 on file?"}
        c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [chat]})
    texts = [t for (t,) in sqlite3.connect(db).execute("select text from audit_log")]
    assert texts == [
        "Done, I wrote to [RESTORED] about your order.",
        # The card was restored; the email the model wrote itself is only flagged by this
        # policy, so it stays as the client saw it (redact it to keep it out).
        "Your card [RESTORED] and jane.doe@example.com are on file.",
    ]


def test_a_streamed_rows_text_never_keeps_a_value_restored_in_an_earlier_window(
    make_app: Callable[..., Litestar], write_policy: Callable[..., Path], backend: FakeBackend
) -> None:
    """A window is checked with the released text before it, restored values included."""
    from litestar.testing import TestClient

    policy = write_policy(
        'name: p\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      entities:\n        EMAIL_ADDRESS: {input: redact, output: flag}\n",
        "pii.yaml",
    )
    db = Path(str(policy) + ".db")
    backend.reply = "I wrote to <EMAIL_ADDRESS_1>. Then I wrote to <EMAIL_ADDRESS_2> as well."
    chat = {"role": "user", "content": "Email jane.doe@example.com and bob.smith@example.org."}
    with TestClient(app=make_app(policy=policy, audit_dsn=str(db), audit_text="redacted")) as c:
        body = {"model": "fake-model", "messages": [chat], "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            streamed = "".join(r.iter_text())
        assert "jane.doe@example.com" in streamed
        assert "bob.smith@example.org" in streamed
    (text,) = [t for (t,) in sqlite3.connect(db).execute("select text from audit_log")]
    assert "jane.doe" not in text
    assert "bob.smith" not in text
    assert "[RESTORED]" in text
