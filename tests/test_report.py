"""``guardrail report``: real exchanges through the gateway, then the HTML page read back."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from guardrail.cli import main
from guardrail.observability.audit import SQLITE_MIGRATIONS
from guardrail.observability.report import ReportBuilder, parse_since, percentile
from tests.conftest import OUTPUT_ONLY_POLICY
from tests.fakes.backend import FakeBackend
from tests.test_audit import postgres_dsn, postgres_server  # noqa: F401 (fixtures)

REPORT_POLICY = """
name: report
version: "3"
filters:
  - id: words
    type: rules
    config:
      rules:
        - {id: bomb, category: weapons, action: block, keywords: [build a bomb]}
        - {id: against-muslims, category: hate, action: block, keywords: [muslims are dangerous]}
        - {id: rude, category: insult, action: flag, keywords: [dummy]}
"""

# (prompt, expected status, rating of the answer or None)
TRAFFIC = [
    ("How do I build a bomb?", 400, None),
    ("Muslims are dangerous.", 400, None),
    ("Tell me about Muslims and Christians.", 200, 1),
    ("Women are great, dummy.", 200, -1),
    ("What is the weather like?", 200, 1),
    ("Old men and women walk.", 200, None),
]


# --- reading the page back -------------------------------------------------------------------


@dataclass
class Section:
    text: str = ""
    svgs: int = 0
    tables: dict[str, list[list[tuple[str, str | None]]]] = field(default_factory=dict)

    def rows(self, table: str) -> list[list[str]]:
        return [[text for text, _ in row] for row in self.tables[table][1:]]

    def values(self, table: str) -> list[list[Any]]:
        """Each data row: text cells as text, numeric cells as their exact value."""
        return [
            [text if value is None else float(value) for text, value in row]
            for row in self.tables[table][1:]
        ]


class Page(HTMLParser):
    """The sections of a report by id: their text, SVG count and tables by class."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: dict[str, Section] = {}
        self.title = ""
        self._section: Section | None = None
        self._table: list[list[tuple[str, str | None]]] | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None
        self._in_title = False
        self.external: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href"):
            if a.get(name):
                self.external.append(str(a[name]))
        if tag in ("script", "link", "img", "iframe"):
            self.external.append(tag)
        if tag == "title" and not self.sections:  # the page's, not an SVG tooltip
            self._in_title = True
        if tag == "section":
            self._section = self.sections.setdefault(str(a["id"]), Section())
        elif self._section is None:
            return
        if tag == "svg":
            self._section.svgs += 1
        elif tag == "table":
            self._table = self._section.tables.setdefault(str(a.get("class")), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell, self._value = [], a.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag == "section":
            self._section = None
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append(("".join(self._cell).strip(), self._value))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._section is not None:
            self._section.text += data
        if self._cell is not None:
            self._cell.append(data)


# --- the traffic ------------------------------------------------------------------------------


def run_traffic(client: TestClient[Litestar]) -> None:
    for prompt, status, rating in TRAFFIC:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": prompt}]},
        )
        assert response.status_code == status, response.text
        if rating is not None:
            rated = client.post(
                "/v1/feedback", json={"response_id": response.json()["id"], "rating": rating}
            )
            assert rated.status_code == 200, rated.text
    moderated = client.post("/v1/moderations", json={"input": "Muslims are dangerous."})
    assert moderated.status_code == 200
    # Neither the moderation call nor a refused request is of the report's population:
    # the call's rating is no chat user's, and the refusal's time no exchange's latency.
    rated = client.post("/v1/feedback", json={"response_id": moderated.json()["id"], "rating": -1})
    assert rated.status_code == 200, rated.text
    refused = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert refused.status_code == 400


@pytest.fixture
def audit_db(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    tmp_path: Path,
) -> Path:
    """An SQLite audit log after TRAFFIC went through a real gateway."""
    db = tmp_path / "audit.db"
    backend.reply = "Here is an answer about women."
    app = make_app(policy=write_policy(REPORT_POLICY), audit_dsn=str(db))
    with TestClient(app=app) as client:
        run_traffic(client)
    return db


def report(dsn: str, tmp_path: Path, *args: str) -> Page:
    out = tmp_path / "report.html"
    assert main(["report", "--audit-dsn", dsn, "--out", str(out), *args]) == 0
    return Page(out.read_text(encoding="utf-8"))


def check_groups(page: Page) -> None:
    # Input: 6 prompts checked, 2 blocked, so 1/3 overall. "Muslims" twice, one blocked.
    # Highest block rate first, then most mentions.
    assert page.sections["groups"].values("groups") == [
        ["religion", "muslim", "input", 2, 1, 0.5, 0.0, pytest.approx(1.5)],
        ["gender", "women", "input", 2, 0, 0.0, 0.5, 0.0],
        ["religion", "christian", "input", 1, 0, 0.0, 0.0, 0.0],
        ["gender", "men", "input", 1, 0, 0.0, 0.0, 0.0],
        ["age", "older", "input", 1, 0, 0.0, 0.0, 0.0],
        # Every answer mentions women; nothing was blocked at the output: no disparity.
        ["gender", "women", "output", 4, 0, 0.0, 0.0, "—"],
    ]
    assert page.sections["groups"].svgs == 1


def check_satisfaction(page: Page) -> None:
    satisfaction = page.sections["satisfaction"]
    assert satisfaction.values("satisfaction") == [
        ["all", 3, 2, pytest.approx(2 / 3)],
        ["allow", 2, 2, 1.0],
        ["flag", 1, 0, 0.0],
    ]
    assert "3 ratings, 66.7% positive" in satisfaction.text


# --- the report ---------------------------------------------------------------------------


def test_the_report_has_every_section_with_the_numbers_of_the_traffic(
    audit_db: Path, tmp_path: Path
) -> None:
    page = report(str(audit_db), tmp_path, "--since", "1h")

    assert page.title == "Guardrail report"
    assert list(page.sections) == [
        "summary",
        "harmful",
        "groups",
        "satisfaction",
        "latency",
        "rules",
    ]
    assert page.external == []  # self-contained: no scripts, images, links or stylesheets
    summary = page.sections["summary"]
    assert summary.values("totals") == [
        ["audit rows", 8],
        ["chat and completion exchanges", 6],
        ["harmful exchanges", 3],
        ["harmful rate", 0.5],
    ]
    assert summary.values("stages") == [
        ["input", 6, 2, pytest.approx(1 / 3), 1],
        ["output", 4, 0, 0.0, 0],
    ]
    assert summary.values("routes") == [["chat", 7], ["moderations", 1]]

    harmful = page.sections["harmful"]
    assert harmful.values("categories") == [
        ["hate", 1, pytest.approx(1 / 6)],
        ["insult", 1, pytest.approx(1 / 6)],
        ["weapons", 1, pytest.approx(1 / 6)],
    ]
    assert harmful.svgs == 1

    check_groups(page)
    check_satisfaction(page)

    # Latency: the nearest-rank percentiles of what the audit log holds for the exchanges
    # that reached the filters (the refused request's row has no input action).
    conn = sqlite3.connect(audit_db)
    durations = sorted(
        r[0]
        for r in conn.execute(
            "SELECT duration_ms FROM audit_log WHERE route = 'chat' AND input_action IS NOT NULL"
        )
    )
    backend_ms = sorted(
        r[0] for r in conn.execute("SELECT backend_ms FROM audit_log WHERE backend_ms IS NOT NULL")
    )
    conn.close()
    latency = page.sections["latency"].values("latency")
    assert latency[0] == [
        "chat",
        "duration",
        6,
        *(percentile(durations, q) for q in (0.5, 0.9, 0.99)),
    ]
    assert latency[1] == [
        "chat",
        "backend",
        4,
        *(percentile(backend_ms, q) for q in (0.5, 0.9, 0.99)),
    ]
    assert latency[2:] == []  # the moderation call is no chat or completion exchange
    assert page.sections["latency"].svgs == 1

    # Each rule once per exchange; the moderation call's hit is not chat traffic.
    assert page.sections["rules"].rows("rules") == [
        ["words", "against-muslims", "hate", "block", "1"],
        ["words", "bomb", "weapons", "block", "1"],
        ["words", "rude", "insult", "flag", "1"],
    ]


def test_ratings_of_refused_requests_and_moderation_calls_are_not_satisfaction() -> None:
    """A database from before refused requests were refused a rating still holds some:
    they counted as the satisfaction of the exchanges the report is about."""
    builder = ReportBuilder(0.0, 3600.0)
    builder.feedback_known = True
    builder.add_rating(10.0, 1, "allow", route="chat", input_action="allow")
    builder.add_rating(20.0, -1, "allow", route="chat", input_action=None)  # a 429
    builder.add_rating(30.0, -1, "block", route="moderations", input_action="block")

    satisfaction = builder.build().satisfaction

    assert satisfaction is not None
    assert (satisfaction.ratings, satisfaction.positive) == (1, 1)
    assert satisfaction.by_action == {"allow": (1, 1)}


def test_the_exchanges_of_an_output_only_policy_are_reported(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    tmp_path: Path,
) -> None:
    """Their rows had no input action: the report counted no exchange at all."""
    db = tmp_path / "audit.db"
    backend.reply = "You dummy."
    app = make_app(policy=write_policy(OUTPUT_ONLY_POLICY), audit_dsn=str(db))
    with TestClient(app=app) as client:
        for _ in range(2):
            response = client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert response.status_code == 200, response.text

    summary = report(str(db), tmp_path, "--since", "1h").sections["summary"]

    assert summary.values("totals")[1:] == [
        ["chat and completion exchanges", 2],
        ["harmful exchanges", 2],
        ["harmful rate", 1.0],
    ]
    assert summary.values("stages") == [["input", 2, 0, 0.0, 0], ["output", 2, 0, 0.0, 2]]


def test_a_window_without_traffic_says_so_in_every_section(audit_db: Path, tmp_path: Path) -> None:
    page = report(str(audit_db), tmp_path, "--since", "3h", "--until", "2h")

    assert page.sections["summary"].values("totals")[0] == ["audit rows", 0]
    assert "No harmful findings" in page.sections["harmful"].text
    assert "No exchange in this window mentioned a group" in page.sections["groups"].text
    assert "No feedback data" in page.sections["satisfaction"].text
    assert "No requests in this window" in page.sections["latency"].text
    assert "No finding acted" in page.sections["rules"].text


def test_an_older_database_without_groups_or_feedback_still_reports(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    conn = sqlite3.connect(db)
    for statement in SQLITE_MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO audit_log (record_id, request_id, time, epoch, route, tenant, stream, "
        "policy_name, policy_version, outcome, status_code, action, input_action, findings, "
        "filters, duration_ms) VALUES ('r', 'q', 'now', unixepoch() - 60, 'chat', 'default', 0, "
        "'p', '1', 'allowed', 200, 'allow', 'allow', '[]', '[]', 12.5)"
    )
    conn.commit()
    conn.close()

    page = report(str(db), tmp_path, "--since", "1h")
    # A window reaching back before 1970 starts at 1970 (it once crashed the page's
    # time axis with "year -1914508 is out of range").
    whole = report(str(db), tmp_path, "--since", "99999999w", "--step", "99999999w")
    assert whole.sections["summary"].values("totals")[1] == ["chat and completion exchanges", 1]

    assert page.sections["summary"].values("totals")[1] == ["chat and completion exchanges", 1]
    assert "no groups column" in page.sections["groups"].text
    assert "No feedback data" in page.sections["satisfaction"].text
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT max(version) FROM audit_schema_version").fetchone() == (None,)
    conn.close()  # read-only: the report never migrates the gateway's database


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("findings", "{broken", "column findings is not valid JSON"),
        # Valid JSON of the wrong shape was an AttributeError traceback.
        ("findings", '{"category": "x"}', "column findings is not a JSON list of objects"),
        ("findings", '["weapons"]', "column findings is not a JSON list of objects"),
        ("groups", "zz", "column groups is not valid JSON"),
        ("groups", "7", "column groups is not a JSON list of objects"),
        ("duration_ms", "slow", "column duration_ms is not a number"),
    ],
)
def test_a_malformed_row_exits_2_naming_its_id_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str, value: str, message: str
) -> None:
    db = tmp_path / "audit.db"
    conn = sqlite3.connect(db)
    for version in sorted(SQLITE_MIGRATIONS):
        for statement in SQLITE_MIGRATIONS[version]:
            conn.execute(statement)
    for record_id in ("fine", "damaged"):
        conn.execute(
            "INSERT INTO audit_log (record_id, request_id, time, epoch, route, tenant, stream, "
            "policy_name, policy_version, outcome, status_code, action, input_action, "
            "findings, filters, duration_ms, groups) VALUES (?, 'q', 'now', unixepoch() - 60, "
            "'chat', 'default', 0, 'p', '1', 'allowed', 200, 'allow', 'allow', '[]', '[]', "
            "12.5, '[]')",
            (record_id,),
        )
    conn.execute(f"UPDATE audit_log SET {column} = ? WHERE record_id = 'damaged'", (value,))
    damaged = conn.execute("SELECT id FROM audit_log WHERE record_id = 'damaged'").fetchone()[0]
    conn.commit()
    conn.close()

    code = main(["report", "--audit-dsn", str(db), "--out", str(tmp_path / "r.html")])

    assert code == 2
    assert f"guardrail: audit_log row id {damaged}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_the_report_reads_postgresql_too(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    postgres_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    backend.reply = "Here is an answer about women."
    app = make_app(policy=write_policy(REPORT_POLICY), audit_dsn=postgres_dsn)
    with TestClient(app=app) as client:
        run_traffic(client)

    page = report(postgres_dsn, tmp_path, "--since", "1h")

    assert page.sections["summary"].values("totals")[1] == ["chat and completion exchanges", 6]
    check_groups(page)
    check_satisfaction(page)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--audit-dsn", "{tmp}/missing.db"], "no audit database at"),
        (["--audit-dsn", "off"], "the audit log is off (--audit-dsn off); give the audit"),
        (["--audit-dsn", "{tmp}/missing.db", "--since", "yesterday"], "neither a duration"),
        # A duration of zero had been "neither a duration nor an ISO date", as --step's is not.
        (["--audit-dsn", "{tmp}/missing.db", "--since", "0d"], "'0d' is not longer than zero"),
        (["--audit-dsn", "{tmp}/missing.db", "--step", "0h"], "'0h' is not longer than zero"),
        (["--audit-dsn", "{tmp}/missing.db", "--since", "1h", "--until", "2h"], "before --until"),
        # Each time step holds counters: these once ran out of memory (a traceback).
        (["--audit-dsn", "{tmp}/missing.db", "--since", "2w", "--step", "1s"], "time steps"),
        (
            ["--audit-dsn", "{tmp}/missing.db", "--since", "99999999999d", "--step", "1m"],
            "time steps",
        ),
        # Dates and steps past the calendar a page can show had been tracebacks.
        (
            ["--audit-dsn", "{tmp}/missing.db", "--until", "9999-12-31T23:00:00-05:00"],
            "after the year 9999",
        ),
        (["--audit-dsn", "{tmp}/missing.db", "--step", "1" + "0" * 320 + "w"], "too long a"),
    ],
)
def test_report_problems_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    filled = [a.replace("{tmp}", str(tmp_path)) for a in args]

    assert main(["report", "--out", str(tmp_path / "r.html"), *filled]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("text", "seconds_before"),
    [("7d", 7 * 86_400), ("12h", 12 * 3600), ("30m", 1800), ("2w", 14 * 86_400), ("90s", 90)],
)
def test_since_takes_a_duration_back_from_now(text: str, seconds_before: float) -> None:
    assert parse_since(text, 1_700_000_000.0) == 1_700_000_000.0 - seconds_before


def test_since_never_reaches_back_before_1970() -> None:
    assert parse_since("99999999w", 1_700_000_000.0) == 0.0


def test_an_iso_date_before_1970_is_1970() -> None:
    assert parse_since("1960-01-01", 1_700_000_000.0) == 0.0


def test_since_takes_an_iso_date_in_utc() -> None:
    assert parse_since("2025-01-31", 0) == 1_738_281_600
    assert parse_since("2025-01-31T01:00:00+01:00", 0) == 1_738_281_600


ACCURACY_POLICY = """
name: facts
version: "1"
filters:
  - id: facts
    type: hallucination
    config:
      groundedness: {enabled: false}
      citations: {enabled: false}
      cutoff: {date: "2023-07"}
  - id: words
    type: rules
    config:
      rules:
        - {id: rude, category: insult, action: flag, keywords: [dummy]}
"""


def test_a_hallucination_flag_is_not_counted_as_harmful_content(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    metrics_registry: Any,
    tmp_path: Path,
) -> None:
    """The report's harmful rate matches harmful_content_total: accuracy flags are apart."""
    db = tmp_path / "audit.db"
    app = make_app(policy=write_policy(ACCURACY_POLICY), audit_dsn=str(db))
    with TestClient(app=app) as client:
        for prompt in ("Who won the 2025 Tour de France?", "Hello, dummy.", "Hi there."):
            r = client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": prompt}]},
            )
            assert r.status_code == 200, r.text
    harmful_metric = sum(
        s.value
        for m in metrics_registry.collect()
        for s in m.samples
        if s.name == "guardrail_harmful_content_total"
    )
    assert harmful_metric == 1  # the insult only

    page = report(str(db), tmp_path, "--since", "1h")

    assert page.sections["summary"].values("totals")[1:] == [
        ["chat and completion exchanges", 3],
        ["harmful exchanges", 1],
        ["harmful rate", pytest.approx(1 / 3)],
    ]
    assert page.sections["harmful"].values("categories") == [["insult", 1, pytest.approx(1 / 3)]]
    # The flag still acted: it is listed among the rules that fired.
    assert [row[1] for row in page.sections["rules"].rows("rules")] == [
        "hallucination.cutoff",
        "rude",
    ]
