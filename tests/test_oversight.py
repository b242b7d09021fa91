"""User feedback (POST /v1/feedback) and the human review queue (/admin/review...),
through the real app and a real SQLite audit database.

The same queries on PostgreSQL, and the schema migration, are in tests/test_audit.py;
the review page in a browser is tests/test_review_page.py.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from guardrail.api import oversight as oversight_api
from guardrail.api.errors import APIError
from guardrail.api.review import expected_action
from guardrail.app import create_app
from guardrail.guard.registry import filter_registry
from guardrail.settings import ApiKeyEntry, Settings, TenantConfig, key_digest
from tests.conftest import OUTPUT_ONLY_POLICY, TEST_POLICY
from tests.fakes.backend import FakeBackend
from tests.fakes.filters import FAULT

Client = TestClient[Litestar]
ACME, BETA, ADMIN = "sk-acme-1", "sk-beta-1", "sk-admin-1"
KEYS = {
    "api_keys": [
        ApiKeyEntry(tenant="acme", key_sha256=key_digest(ACME)),
        ApiKeyEntry(tenant="beta", key_sha256=key_digest(BETA)),
    ],
    "admin_key_sha256": key_digest(ADMIN),
}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def gateway(make_app: Callable[..., Litestar], database: Path) -> Callable[..., Iterator[Client]]:
    """A client of a gateway with tenant keys, an admin key and its own audit database."""

    def make(**overrides: Any) -> Iterator[Client]:
        with TestClient(app=make_app(audit_dsn=str(database), **KEYS, **overrides)) as client:
            yield client

    return make


@pytest.fixture
def client(gateway: Callable[..., Iterator[Client]]) -> Iterator[Client]:
    yield from gateway()


def chat(client: Client, text: str, key: str = ACME) -> dict[str, Any]:
    response = client.post(
        "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": text}]},
        headers=auth(key),
    )
    body: dict[str, Any] = response.json()
    return body


def rate(client: Client, response_id: str, rating: int, key: str = ACME, **more: Any) -> Any:
    return client.post(
        "/v1/feedback",
        json={"response_id": response_id, "rating": rating, **more},
        headers=auth(key),
    )


def admin_get(client: Client, path: str) -> Any:
    response = client.get(path, headers=auth(ADMIN))
    assert response.status_code == 200, response.text
    return response


def judge(client: Client, item_id: str, **body: Any) -> Any:
    return client.post(f"/admin/review/{item_id}", json=body, headers=auth(ADMIN))


def rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(database)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# --- feedback ---------------------------------------------------------------------------


def test_a_rating_is_stored_with_the_decision_of_the_response_it_rates(
    client: Client, backend: FakeBackend, database: Path, metrics_registry: CollectorRegistry
) -> None:
    backend.reply = "You dummy."  # the test policy flags it
    answer = chat(client, "Tell me a joke.")

    response = rate(client, answer["id"], 1)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["response_id"], body["rating"], body["replaced"]) == (answer["id"], 1, False)
    assert body["decision"] == {
        "action": "flag",
        "input_action": "allow",
        "output_action": "flag",
        "outcome": "flagged",
        "policy": {"name": "test", "version": "7"},
    }
    assert rows(
        database, "SELECT response_id, tenant, rating, action, outcome FROM audit_feedback"
    ) == [(answer["id"], "acme", 1, "flag", "flagged")]
    feedback = "guardrail_feedback_total"
    assert counter(metrics_registry, feedback, rating_class="positive", decision="flag") == 1
    assert counter(metrics_registry, feedback, rating_class="negative", decision="flag") == 0


def test_a_blocked_prompt_is_rated_by_its_request_id_and_counts_toward_over_blocking(
    client: Client, metrics_registry: CollectorRegistry
) -> None:
    refused = chat(client, "How do I build a bomb?")
    assert refused["error"]["code"] == "content_filter"  # a 400: there is no response id

    response = rate(client, refused["guardrail"]["request_id"], -1)

    assert response.status_code == 200, response.text
    assert response.json()["decision"]["action"] == "block"
    assert response.json()["response_id"].startswith("chatcmpl-")
    assert (
        counter(
            metrics_registry, "guardrail_feedback_total", rating_class="negative", decision="block"
        )
        == 1
    )


@pytest.mark.parametrize(
    ("route", "body", "prefix"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "chatcmpl-"),
        ("/v1/completions", {"prompt": "hi"}, "cmpl-"),
        ("/v1/moderations", {"input": "hi"}, "modr-"),
        # Checked by the output filters alone: no input action, rated all the same.
        ("/v1/moderations", {"input": "hi", "stage": "output"}, "modr-"),
    ],
)
def test_the_audit_row_keeps_the_id_the_response_carried(
    client: Client, database: Path, route: str, body: dict[str, Any], prefix: str
) -> None:
    answer = client.post(route, json={"model": "fake-model", **body}, headers=auth(ACME)).json()

    assert answer["id"].startswith(prefix)
    assert rate(client, answer["id"], 1).status_code == 200
    assert rows(database, "SELECT response_id FROM audit_log") == [(answer["id"],)]


@pytest.mark.parametrize(
    ("input_action", "output_action", "found"),
    [("allow", None, True), (None, "flag", True), ("block", "allow", True), (None, None, False)],
)
def test_a_queued_row_is_rated_if_the_filters_checked_either_stage(
    input_action: str | None, output_action: str | None, found: bool
) -> None:
    """A stage "output" moderation, still in the audit queue, has an output action alone."""
    from guardrail.observability.audit import AuditRecord
    from guardrail.observability.oversight import answers

    record = AuditRecord(
        record_id="r1", request_id="q1", time="2026-01-01T00:00:00.000000Z", epoch=0.0,
        route="moderations", tenant="acme", model=None, stream=False, backend=None,
        policy_name="p", policy_version="1", outcome="allowed", status_code=200,
        error_code=None, action=output_action or input_action or "allow",
        input_action=input_action, output_action=output_action, findings_json="[]",
        filters_json="[]", duration_ms=None, backend_ms=None, ttft_ms=None,
        prompt_tokens=None, completion_tokens=None, response_id="modr-q1",
    )  # fmt: skip
    assert answers(record, "acme", "modr-q1") is found


def test_a_request_refused_before_the_filters_cannot_be_rated_nor_queued(
    gateway: Callable[..., Iterator[Client]], database: Path
) -> None:
    """A bad body's 400 or a 429, rated down by its request id, had joined the review
    queue as negative feedback on a decision nobody made."""
    for client in gateway(tenants={"acme": TenantConfig(requests_per_minute=1)}):
        bad_json = client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={**auth(ACME), "content-type": "application/json"},
        )
        served = chat(client, "hello")
        limited = client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(ACME),
        )
        assert (bad_json.status_code, limited.status_code) == (400, 429)

        for refused in (bad_json, limited):
            response = rate(client, refused.headers["x-request-id"], -1)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "response_not_found"
        assert rate(client, served["id"], -1).status_code == 200
        queue = admin_get(client, "/admin/review").json()["data"]

    assert [i["request_id"] for i in queue] == [served["guardrail"]["request_id"]]
    assert rows(database, "SELECT response_id FROM audit_feedback") == [(served["id"],)]


def test_a_request_id_a_client_set_to_a_response_id_does_not_take_its_ratings(
    client: Client,
) -> None:
    answer = chat(client, "hello")
    later = client.post(
        "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={**auth(ACME), "x-request-id": answer["id"]},
    )
    assert later.headers["x-request-id"] == answer["id"]  # the client's id was kept

    response = rate(client, answer["id"], 1)

    assert response.status_code == 200, response.text
    assert response.json()["request_id"] == answer["guardrail"]["request_id"]


def test_a_second_rating_of_a_response_replaces_the_first(client: Client, database: Path) -> None:
    answer = chat(client, "hello")

    assert rate(client, answer["id"], 1).json()["replaced"] is False
    assert rate(client, answer["id"], -1).json()["replaced"] is True
    assert rows(database, "SELECT rating FROM audit_feedback") == [(-1,)]


def test_a_response_of_an_output_only_policy_can_be_rated(
    gateway: Callable[..., Iterator[Client]],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    database: Path,
) -> None:
    """With no input filter its audit row had no input_action, and every rating of it
    was a 404 response_not_found."""
    backend.reply = "You dummy."
    for client in gateway(policy=write_policy(OUTPUT_ONLY_POLICY)):
        answer = chat(client, "hello")

        response = rate(client, answer["id"], -1)

        assert response.status_code == 200, response.text
        assert response.json()["decision"]["input_action"] == "allow"
    assert rows(database, "SELECT input_action, output_action FROM audit_log") == [
        ("allow", "flag")
    ]


@pytest.mark.parametrize(
    ("ratings", "counted", "replaced"),
    [
        ([1, -1], {"positive": 1, "negative": 1}, {"positive": 1, "negative": 0}),
        ([-1, -1, -1], {"positive": 0, "negative": 1}, {"positive": 0, "negative": 0}),
        ([1, -1, 1], {"positive": 2, "negative": 1}, {"positive": 1, "negative": 1}),
    ],
    ids=["changed", "retried", "changed-back"],
)
def test_the_ratings_metrics_net_out_to_the_stored_rating(
    client: Client,
    database: Path,
    metrics_registry: CollectorRegistry,
    ratings: list[int],
    counted: dict[str, float],
    replaced: dict[str, float],
) -> None:
    """feedback_total counted every POST: a changed rating was one good and one bad (50%
    satisfaction where the stored rating is bad), a retried one three bad."""
    answer = chat(client, "hello")
    for rating in ratings:
        assert rate(client, answer["id"], rating).status_code == 200

    def count(name: str) -> dict[str, float]:
        return {
            c: counter(metrics_registry, name, rating_class=c, decision="allow")
            for c in ("positive", "negative")
        }

    assert count("guardrail_feedback_total") == counted
    assert count("guardrail_feedback_replaced_total") == replaced
    stored = {"positive": 1 if ratings[-1] > 0 else 0, "negative": 1 if ratings[-1] < 0 else 0}
    assert {c: counted[c] - replaced[c] for c in counted} == stored
    assert rows(database, "SELECT rating FROM audit_feedback") == [(ratings[-1],)]


def test_ratings_of_moderation_checks_are_stored_but_not_counted(
    client: Client, database: Path, metrics_registry: CollectorRegistry
) -> None:
    """The report leaves them out of satisfaction; feedback_total counted them."""
    check = client.post("/v1/moderations", json={"input": "build a bomb"}, headers=auth(ACME))

    assert rate(client, check.json()["id"], -1).status_code == 200

    negative = counter(
        metrics_registry, "guardrail_feedback_total", rating_class="negative", decision="block"
    )
    assert negative == 0
    assert rows(database, "SELECT route, rating FROM audit_feedback") == [("moderations", -1)]


def test_a_tenant_cannot_rate_another_tenants_response(client: Client) -> None:
    answer = chat(client, "hello", key=BETA)

    response = rate(client, answer["id"], -1, key=ACME)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "response_not_found"
    assert rate(client, answer["id"], -1, key=BETA).status_code == 200


def test_an_unknown_response_id_is_404_in_the_openai_error_shape(client: Client) -> None:
    response = rate(client, "chatcmpl-never-served", 1)

    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": "response_id",
            "code": "response_not_found",
        }
    }


def test_a_response_whose_audit_row_cannot_be_written_yet_is_503_not_404(
    client: Client, database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its row waits in the queue: the id may well exist, so the client is told to retry."""
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # a backup or a long DELETE holds the write lock
    try:
        answer = chat(client, "Hello there.")
        monkeypatch.setattr(oversight_api, "FLUSH_WAIT_S", 0.2)

        response = rate(client, answer["id"], -1)
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "audit_unavailable"
    assert response.headers["retry-after"] == "5"
    monkeypatch.undo()  # the writer gets the lock back: the retry finds the response
    assert rate(client, answer["id"], -1).status_code == 200


def test_when_the_audit_database_is_locked_an_id_not_in_the_queue_is_still_404(
    client: Client, database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an id among the rows waiting to be written is 503: an id that never existed,
    or another tenant's, was 503 with Retry-After on every retry for the whole outage."""
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        answer = chat(client, "Hello there.")  # its row waits in the queue
        monkeypatch.setattr(oversight_api, "FLUSH_WAIT_S", 0.2)

        unknown = [rate(client, "chatcmpl-does-not-exist", -1) for _ in range(2)]
        other_tenant = rate(client, answer["id"], -1, key=BETA)
        queued = rate(client, answer["id"], -1)
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    for response in [*unknown, other_tenant]:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "response_not_found"
        assert "retry-after" not in response.headers
    assert queued.status_code == 503, queued.text
    assert queued.json()["error"]["code"] == "audit_unavailable"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_id": "x", "rating": 0}, "rating"),
        ({"response_id": "x", "rating": 5}, "rating"),
        ({"response_id": "x", "rating": True}, "rating"),
        ({"response_id": "x"}, None),
        ({"rating": 1}, None),
        ({"response_id": "", "rating": 1}, "response_id"),
        ({"response_id": "x" * 257, "rating": 1}, "response_id"),
        ({"response_id": "x", "rating": 1, "comment": 7}, "comment"),
        ({"response_id": "x", "rating": 1, "stars": 4}, None),
        ({"response_id": "x", "rating": 1, "comment": "y" * 2001}, "comment"),
    ],
)
def test_a_bad_feedback_body_is_400(
    client: Client, body: dict[str, Any], param: str | None
) -> None:
    response = client.post("/v1/feedback", json=body, headers=auth(ACME))

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("rating", "message"),
    [
        ('"rating": -1, "rating": 1', "'rating' is given twice"),
        ('"rating": "1"', "Expected `int`, got `str`"),
    ],
)
def test_a_feedback_body_only_the_lenient_parser_takes_is_a_400_and_nothing_is_stored(
    client: Client, database: Path, rating: str, message: str
) -> None:
    """As on every other JSON route: a repeated key or a coerced value is refused."""
    answer = chat(client, "hello")
    body = f'{{"response_id": "{answer["id"]}", {rating}}}'

    response = client.post(
        "/v1/feedback",
        content=body,
        headers={**auth(ACME), "content-type": "application/json"},
    )

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "rating")
    assert message in error["message"]
    assert rows(database, "SELECT rating FROM audit_feedback") == []


def test_feedback_needs_a_tenant_key(client: Client) -> None:
    body = {"response_id": "x", "rating": 1}

    assert client.post("/v1/feedback", json=body).status_code == 401
    assert client.post("/v1/feedback", json=body, headers=auth(ADMIN)).status_code == 403


def test_comments_are_neither_stored_nor_logged_by_default(client: Client, database: Path) -> None:
    answer = chat(client, "hello")

    with capture_logs() as logs:
        response = rate(client, answer["id"], -1, comment="my ssn is 078-05-1120, sk-abcdefgh")

    assert response.json()["comment_stored"] is False
    assert rows(database, "SELECT comment FROM audit_feedback") == [(None,)]
    assert "078-05-1120" not in repr(logs)
    assert [e["comment_chars"] for e in logs if e["event"] == "feedback"] == [34]


def test_kept_comments_pass_the_tenant_policy_first(
    gateway: Callable[..., Iterator[Client]], database: Path
) -> None:
    for client in gateway(feedback_comments="redacted"):
        first, second = chat(client, "hello"), chat(client, "hi")
        with capture_logs() as logs:
            kept = rate(client, first["id"], -1, comment="it leaked sk-abcdefgh, you dummy")
            withheld = rate(client, second["id"], -1, comment="now tell me how to build a bomb")

    assert kept.json()["comment_stored"] is True
    assert withheld.json()["comment_stored"] is False  # the policy blocks it: not stored
    assert sorted(rows(database, "SELECT comment FROM audit_feedback"), key=str) == [
        ("it leaked [SECRET], you dummy",),
        (None,),
    ]
    assert "sk-abcdefgh" not in repr(logs)


def test_a_comment_a_filter_failed_on_is_not_stored(
    test_policy: Path, backend: FakeBackend, database: Path
) -> None:
    """Under on_error: flag the comment passed the failed filter unredacted, and was
    stored with the personal data that filter was there to find."""
    registry = filter_registry()
    registry.register("fault", FAULT)
    policy = test_policy.with_name("crashing.yaml")
    policy.write_text(
        TEST_POLICY + "  - {id: pii, type: fault, on_error: flag}\n", encoding="utf-8"
    )
    settings = Settings(
        policy=str(policy), audit_dsn=str(database), feedback_comments="redacted", **KEYS
    )
    app = create_app(
        settings, backend=backend, filters=registry, metrics_registry=CollectorRegistry()
    )
    with TestClient(app=app) as client:
        answer = chat(client, "hello")
        response = rate(client, answer["id"], -1, comment="my ssn is 078-05-1120, sk-abcdefgh")

    assert response.status_code == 200, response.text
    assert response.json()["comment_stored"] is False
    assert rows(database, "SELECT comment FROM audit_feedback") == [(None,)]


def test_a_comment_the_filters_check_is_charged_to_the_key_like_a_prompt(
    gateway: Callable[..., Iterator[Client]],
) -> None:
    """Feedback took no part in the rate limits: every comment ran the tenant's input
    filters, as many as a client cared to send."""
    limited = {"acme": TenantConfig(requests_per_minute=3)}
    for client in gateway(feedback_comments="redacted", tenants=limited):
        answer = chat(client, "hello")  # 1 of 3
        assert rate(client, answer["id"], 1).status_code == 200  # no comment: not charged
        assert rate(client, answer["id"], -1, comment="too slow").status_code == 200  # 2
        assert rate(client, answer["id"], -1, comment="still slow").status_code == 200  # 3
        refused = rate(client, answer["id"], -1, comment="and again")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert rate(client, answer["id"], 1).status_code == 200


def test_with_the_audit_log_off_feedback_and_review_say_so(
    make_app: Callable[..., Litestar],
) -> None:
    with TestClient(app=make_app(audit_dsn="off", **KEYS)) as client:
        answer = chat(client, "hello")
        responses = [
            client.post(
                "/v1/feedback", json={"response_id": answer["id"], "rating": 1}, headers=auth(ACME)
            ),
            client.get("/admin/review", headers=auth(ADMIN)),
            client.get("/admin/review/export", headers=auth(ADMIN)),
        ]

    assert [(r.status_code, r.json()["error"]["code"]) for r in responses] == [
        (404, "audit_disabled")
    ] * 3


# --- the review queue -----------------------------------------------------------------


def traffic(client: Client, backend: FakeBackend) -> dict[str, str]:
    """One exchange of each kind; returns request ids by kind."""
    ids = {"allowed": chat(client, "hello")["guardrail"]["request_id"]}
    ids["blocked"] = chat(client, "How do I build a bomb?")["guardrail"]["request_id"]
    backend.reply = "You dummy."
    ids["flagged"] = chat(client, "Tell me a joke.", key=BETA)["guardrail"]["request_id"]
    return ids


def items_of(client: Client, query: str = "") -> dict[str, dict[str, Any]]:
    listed = admin_get(client, "/admin/review" + query).json()
    return {i["request_id"]: i for i in listed["data"]}


def test_flagged_and_blocked_exchanges_wait_for_review_with_their_scores(
    client: Client, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    ids = traffic(client, backend)

    listed = admin_get(client, "/admin/review?status=pending").json()

    assert [i["request_id"] for i in listed["data"]] == [ids["flagged"], ids["blocked"]]
    assert (listed["pending"], listed["has_more"], listed["next_before"]) == (2, False, None)
    blocked = listed["data"][1]
    assert {k: blocked[k] for k in ("tenant", "route", "outcome", "action", "stage")} == {
        "tenant": "acme",
        "route": "chat",
        "outcome": "blocked_input",
        "action": "block",
        "stage": "input",
    }
    assert (blocked["categories"], blocked["rule_ids"]) == (["weapons"], ["bomb"])
    assert blocked["policy"] == {"name": "test", "version": "7"}
    assert blocked["findings"] == [
        {"stage": "input", "filter": "words", "category": "weapons", "score": 1.0,
         "action": "block", "rule_id": "bomb", "concern": "harm", "count": 1},
    ]  # fmt: skip
    assert blocked["text"] is None  # the audit log stores no text unless configured
    assert blocked["queued_because"] == "blocked"
    assert blocked["time"].endswith("Z")
    assert metrics_registry.get_sample_value("guardrail_review_queue_depth") == 2


def test_a_verdict_leaves_the_queue_and_is_counted(
    client: Client, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    ids = traffic(client, backend)
    blocked = items_of(client)[ids["blocked"]]

    response = judge(client, blocked["id"], verdict="false_positive", reviewer=" alice ", note="ok")

    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("verdict", "expected_action", "reviewer", "note", "replaced")} == {
        "verdict": "false_positive",
        "expected_action": "allow",
        "reviewer": "alice",
        "note": "ok",
        "replaced": False,
    }
    assert body["pending"] == 1
    assert list(items_of(client)) == [ids["flagged"]]
    reviewed = items_of(client, "?status=reviewed")[ids["blocked"]]
    assert reviewed["review"]["verdict"] == "false_positive"
    assert (
        admin_get(client, f"/admin/review/{blocked['id']}").json()["review"]["reviewer"] == "alice"
    )
    verdicts = "guardrail_review_verdicts_total"
    assert counter(metrics_registry, verdicts, verdict="false_positive", action="block") == 1
    assert metrics_registry.get_sample_value("guardrail_review_queue_depth") == 1

    again = judge(client, blocked["id"], verdict="correct", reviewer="bob")
    assert again.json()["replaced"] is True
    assert items_of(client, "?status=reviewed")[ids["blocked"]]["review"]["verdict"] == "correct"


def test_a_rated_down_answer_joins_the_queue_and_any_exchange_may_be_judged(
    client: Client, backend: FakeBackend
) -> None:
    ids = traffic(client, backend)
    everything = items_of(client, "?status=all")
    assert ids["allowed"] not in everything

    rate(client, "chatcmpl-" + ids["allowed"], -1)

    allowed = items_of(client)[ids["allowed"]]
    assert (allowed["queued_because"], allowed["feedback_rating"]) == ("negative_feedback", -1)
    response = judge(
        client, allowed["id"], verdict="false_negative", expected_action="flag", reviewer="carol"
    )
    assert response.json()["expected_action"] == "flag"


def test_the_queue_pages_newest_first_and_filters_by_tenant(
    client: Client, backend: FakeBackend
) -> None:
    ids = traffic(client, backend)

    first = admin_get(client, "/admin/review?limit=1").json()
    second = admin_get(client, f"/admin/review?limit=1&before={first['next_before']}").json()

    assert [i["request_id"] for i in first["data"]] == [ids["flagged"]]
    assert first["has_more"] is True
    assert [i["request_id"] for i in second["data"]] == [ids["blocked"]]
    assert second["has_more"] is False
    assert list(items_of(client, "?tenant=beta")) == [ids["flagged"]]


@pytest.mark.parametrize(
    ("verdict", "action", "expected", "result"),
    [
        ("correct", "block", None, "block"),
        ("correct", "flag", "flag", "flag"),
        ("correct", "flag", "block", None),
        ("false_positive", "block", None, "allow"),
        ("false_positive", "block", "flag", "flag"),
        ("false_positive", "flag", "block", None),
        ("false_positive", "allow", None, None),
        ("false_negative", "flag", None, "block"),
        ("false_negative", "allow", "redact", "redact"),
        ("false_negative", "flag", "allow", None),
        ("false_negative", "block", None, None),
    ],
)
def test_a_verdict_must_agree_with_the_action_it_judges(
    verdict: str, action: str, expected: str | None, result: str | None
) -> None:
    if result is None:
        with pytest.raises(APIError) as raised:
            expected_action(verdict, action, expected)
        assert (raised.value.status, raised.value.code) == (400, "invalid_verdict")
    else:
        assert expected_action(verdict, action, expected) == result


@pytest.mark.parametrize(
    "body",
    [
        {"verdict": "maybe", "reviewer": "a"},
        {"verdict": "correct"},
        {"verdict": "correct", "reviewer": "   "},
        {"verdict": "correct", "reviewer": "a", "expected_action": "delete"},
        {"verdict": "correct", "reviewer": "a", "note": "n" * 2001},
        {"verdict": "false_negative", "reviewer": "a"},  # the item is a block
        {"verdict": "correct", "reviewer": "a", "score": 1},
    ],
)
def test_a_bad_verdict_is_400(client: Client, backend: FakeBackend, body: dict[str, Any]) -> None:
    ids = traffic(client, backend)
    item = items_of(client)[ids["blocked"]]

    response = judge(client, item["id"], **body)

    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


def test_a_verdict_with_a_repeated_key_is_a_400_and_nothing_is_stored(
    client: Client, backend: FakeBackend
) -> None:
    """As on the other JSON routes: a key given twice (a proxy in front may read the
    first, the framework reads the last) is refused."""
    ids = traffic(client, backend)
    item = items_of(client)[ids["blocked"]]
    body = '{"reviewer": "alice", "verdict": "correct", "verdict": "false_positive"}'

    response = client.post(
        f"/admin/review/{item['id']}",
        content=body,
        headers={**auth(ADMIN), "content-type": "application/json"},
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert ids["blocked"] in items_of(client)  # still waiting for review


def test_an_unknown_review_item_is_404(client: Client) -> None:
    response = judge(client, "no-such-item", verdict="correct", reviewer="a")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "review_item_not_found"
    assert client.get("/admin/review/no-such-item", headers=auth(ADMIN)).status_code == 404


def test_review_routes_need_the_admin_key_but_the_page_holds_no_data(client: Client) -> None:
    assert client.get("/admin/review").status_code == 401
    assert client.get("/admin/review", headers=auth(ACME)).status_code == 403
    assert client.get("/admin/review/export", headers=auth(ACME)).status_code == 403
    page = client.get("/admin/review/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy
    assert "connect-src 'self'" in policy
    assert "http" not in page.text.replace("http-equiv", "")  # no external asset of any kind


@pytest.mark.parametrize("query", ["?format=xml", "?status=done", "?limit=0", "?limit=501"])
def test_bad_review_queries_are_400(client: Client, query: str) -> None:
    path = "/admin/review/export" if "format" in query else "/admin/review"

    response = client.get(path + query, headers=auth(ADMIN))

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    if "format" in query:  # the query parameter's name, not the handler's argument
        assert response.json()["error"]["param"] == "format"


def test_the_export_has_every_verdict_with_its_scores(client: Client, backend: FakeBackend) -> None:
    ids = traffic(client, backend)
    items = items_of(client)
    judge(client, items[ids["blocked"]]["id"], verdict="false_positive", reviewer="=alice")
    judge(client, items[ids["flagged"]]["id"], verdict="correct", reviewer="bob", note="rude")

    jsonl = admin_get(client, "/admin/review/export?format=jsonl")
    table = admin_get(client, "/admin/review/export?format=csv")

    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [(v["request_id"], v["verdict"], v["expected_action"]) for v in lines] == [
        (ids["blocked"], "false_positive", "allow"),
        (ids["flagged"], "correct", "flag"),
    ]
    assert lines[0]["findings"][0]["score"] == 1.0
    assert table.headers["content-type"].startswith("text/csv")
    assert "attachment" in table.headers["content-disposition"]
    parsed = list(csv.DictReader(io.StringIO(table.text)))
    assert [
        (r["request_id"], r["category"], r["score"], r["rule_id"], r["count"]) for r in parsed
    ] == [
        (ids["blocked"], "weapons", "1.0", "bomb", "1"),
        (ids["flagged"], "insult", "1.0", "rude", "1"),
    ]
    assert parsed[0]["reviewer"] == "'=alice"  # never a spreadsheet formula
    after = admin_get(client, "/admin/review/export?since=9999999999").text
    assert after == ""


def test_no_csv_cell_can_become_a_formula_even_split_on_semicolons(
    client: Client, backend: FakeBackend
) -> None:
    # Only the first character of names and notes was checked, and fields holding ";"
    # were not quoted: a semicolon-splitting spreadsheet saw a cell "=cmd|...".
    ids = traffic(client, backend)
    items = items_of(client)
    note = "ok;=cmd|' /C calc'!A0;"
    judge(client, items[ids["blocked"]]["id"], verdict="correct", reviewer="-bob", note=note)
    table = admin_get(client, "/admin/review/export?format=csv").text
    parsed = list(csv.DictReader(io.StringIO(table)))
    assert (parsed[0]["note"], parsed[0]["reviewer"]) == ("ok;'=cmd|' /C calc'!A0;", "'-bob")
    for line in table.splitlines():
        for delimiter in (",", ";", "\t"):
            for cell in next(csv.reader([line], delimiter=delimiter)):
                assert cell[:1] not in ("=", "+", "@"), (delimiter, cell)


SQLITE_DOC_QUERIES = [
    """SELECT policy_version, count(*) AS rated_blocks, sum(rating < 0) AS rated_bad
    FROM audit_feedback WHERE action = 'block' GROUP BY policy_version""",
    """SELECT f.value ->> 'category' AS category, r.verdict, count(*), avg(f.value ->> 'score')
    FROM audit_review r, json_each(r.findings) AS f GROUP BY category, r.verdict""",
]


def test_the_documented_sqlite_queries_run(
    client: Client, backend: FakeBackend, database: Path
) -> None:
    ids = traffic(client, backend)
    rate(client, ids["blocked"], -1)
    judge(client, items_of(client)[ids["blocked"]]["id"], verdict="correct", reviewer="a")

    assert [rows(database, sql) for sql in SQLITE_DOC_QUERIES] == [
        [("7", 1, 1)],
        [("weapons", "correct", 1, 1.0)],
    ]
