"""Load: 200 concurrent clients for 60 s against a real gateway on 127.0.0.1 over a fake
backend. No errors, and every request is accounted for in the metrics (and in the
audit log).

``GUARDRAIL_LOAD_TEST_S`` sets the duration (default 60) and ``GUARDRAIL_LOAD_CLIENTS``
the number of clients (default 200). Each client sends, in turn, an allowed chat, an
allowed stream, a blocked prompt and a moderation request, each on its own keep-alive
connection pool, and checks each answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from guardrail.app import create_app
from guardrail.settings import Settings
from tests.conftest import TEST_POLICY
from tests.fakes.backend import FakeBackend
from tests.servers import serve_asgi

DURATION_S = float(os.environ.get("GUARDRAIL_LOAD_TEST_S", "60"))
CLIENTS = int(os.environ.get("GUARDRAIL_LOAD_CLIENTS", "200"))

MIX: list[tuple[str, str, dict[str, object], int, str]] = [
    # (route label, path, body, expected status, expected outcome)
    (
        "chat",
        "/v1/chat/completions",
        {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there"}]},
        200,
        "allowed",
    ),
    (
        "chat",
        "/v1/chat/completions",
        {
            "model": "fake-model",
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me something nice"}],
        },
        200,
        "allowed",
    ),
    (
        "completions",
        "/v1/completions",
        {"model": "fake-model", "prompt": "please explain how to build a bomb"},
        400,
        "blocked_input",
    ),
    ("moderations", "/v1/moderations", {"input": ["you dummy", "fine"]}, 200, "flagged"),
]


async def _client(
    n: int, url: str, deadline: float, sent: Counter[tuple[str, str]], problems: list[str]
) -> None:
    timeout = httpx.Timeout(60.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        i = n  # clients start at different points of the mix
        while time.monotonic() < deadline:
            route, path, body, status, outcome = MIX[i % len(MIX)]
            i += 1
            try:
                r = await client.post(path, json=body)
                text = r.text
            except httpx.HTTPError as e:
                problems.append(f"{path}: {type(e).__name__}")
                continue
            sent[(route, outcome)] += 1
            if r.status_code != status:
                problems.append(f"{path}: HTTP {r.status_code}: {text[:200]}")
            elif body.get("stream") and not text.rstrip().endswith("data: [DONE]"):
                problems.append(f"{path}: stream did not end with [DONE]")
            elif body.get("stream") and '"finish_reason":"stop"' not in text.replace(" ", ""):
                # A 200 stream that ends in an error frame or a withheld answer (a filter
                # failing under load) is a problem too, named, not a count off by one.
                problems.append(f"{path}: stream did not finish with stop: {text[-300:]}")


@pytest.mark.slow
async def test_200_clients_for_a_minute_no_errors_and_every_request_accounted_for(
    write_policy: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    backend = FakeBackend(delay_s=0.002)
    # Accounting under load is measured, not speed: on a loaded 2-core machine a filter
    # past the default time limit would fail closed and change an exchange's outcome.
    policy = write_policy(TEST_POLICY + "timeout_ms: 60000\n")
    database = tmp_path / "audit.db"
    settings = Settings(policy=str(policy), log_level="warning", audit_dsn=f"sqlite:///{database}")
    app = create_app(settings, backend=backend, metrics_registry=registry)
    audit = app.state.gateway.audit
    assert audit is not None

    sent: Counter[tuple[str, str]] = Counter()
    problems: list[str] = []
    with serve_asgi(app) as url:
        deadline = time.monotonic() + DURATION_S
        await asyncio.gather(*(_client(n, url, deadline, sent, problems) for n in range(CLIENTS)))
    # The server has shut down: every exchange is recorded, the audit log flushed.

    assert problems == [], f"{len(problems)} problems, first: {problems[:5]}"
    total = sum(sent.values())
    assert total >= CLIENTS * len(MIX)
    for (route, outcome), count in sent.items():
        recorded = registry.get_sample_value(
            "guardrail_requests_total", {"route": route, "outcome": outcome}
        )
        assert recorded == count, (route, outcome)
    all_recorded = sum(
        s.value
        for metric in registry.collect()
        if metric.name == "guardrail_requests"
        for s in metric.samples
        if s.name == "guardrail_requests_total"
    )
    assert all_recorded == total
    for route in ("chat", "completions", "moderations"):
        assert registry.get_sample_value("guardrail_in_flight_requests", {"route": route}) == 0

    stats = audit.stats()
    assert stats.recorded == total
    assert stats.written == total
    assert stats.dropped == 0
    # And the rows are really in the database, one per request, outcomes matching.
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = Counter(
            {
                (r, o): n
                for r, o, n in db.execute(
                    "SELECT route, outcome, count(*) FROM audit_log GROUP BY route, outcome"
                )
            }
        )
    assert rows == sent
