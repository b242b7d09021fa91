"""A real Prometheus scrapes a running gateway and answers every dashboard query.

The static checks in ``test_deploy.py`` say the dashboard names only exposed metrics;
this runs the real thing: the gateway under uvicorn, traffic of every kind the panels
show, ``prometheus`` scraping it every second with the shipped alert rules loaded, and
each panel's PromQL sent to Prometheus's HTTP API. A query that does not parse, or uses
a function or label Prometheus rejects, fails here. The queries the operators look at
first must also return data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from tests.fakes.backend import FakeBackend
from tests.servers import free_socket, serve_asgi

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "guardrail.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")

POLICY = """
name: live
version: "3"
filters:
  - id: words
    type: rules
    config:
      rules:
        - id: bomb
          category: weapons
          action: block
          keywords: [build a bomb]
        - id: rude
          category: insult
          action: flag
          keywords: [dummy]
  - id: facts
    type: hallucination
    config:
      cutoff: {date: "2023-07"}
"""


def _expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _query(client: httpx.Client, base: str, expr: str) -> dict[str, Any]:
    r = client.get(f"{base}/api/v1/query", params={"query": expr})
    body: dict[str, Any] = r.json()
    return body


def _traffic(client: httpx.Client, url: str) -> None:
    chat = f"{url}/v1/chat/completions"

    def ask(text: str, **extra: Any) -> httpx.Response:
        return client.post(
            chat,
            json={"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra},
        )

    assert ask("Hello there").status_code == 200
    assert ask("how do I build a bomb").status_code == 400
    assert ask("you dummy, tell me a joke").status_code == 200
    assert ask("Who won the 2025 Tour de France?").status_code == 200
    grounded = ask(
        "When was it built?",
        documents=["The Eiffel Tower was completed in 1889 for the World's Fair."],
    )
    assert grounded.status_code == 200
    assert client.post(f"{url}/v1/moderations", json={"input": "hi"}).status_code == 200
    response_id = ask("Thanks!").json()["id"]
    for _ in range(100):  # the audit log writes off the request path
        r = client.post(f"{url}/v1/feedback", json={"response_id": response_id, "rating": 1})
        if r.status_code != 404:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (CI installs it)")
def test_prometheus_scrapes_the_gateway_and_answers_the_dashboard_queries(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str], Path],
    backend: FakeBackend,
    tmp_path: Path,
) -> None:
    assert PROMETHEUS is not None
    app = make_app(policy=write_policy(POLICY))
    with serve_asgi(app) as url, httpx.Client(timeout=30) as client:
        target = url.removeprefix("http://")
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()
        config = tmp_path / "prometheus.yml"
        shutil.copy(ALERTS, tmp_path / "alerts.yml")
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n"
            "  - job_name: guardrail\n"
            "    metrics_path: /metrics\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n",
            encoding="utf-8",
        )
        log = (tmp_path / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            # Traffic before and between scrapes, so rates over the window have two points.
            _traffic(client, url)
            deadline = time.monotonic() + 60
            scraped = 0
            while time.monotonic() < deadline:
                time.sleep(1)
                try:
                    body = _query(client, base, "count_over_time(up[1m])")
                except httpx.HTTPError:
                    continue
                result = body.get("data", {}).get("result", [])
                scraped = int(float(result[0]["value"][1])) if result else 0
                if scraped == 2:
                    _traffic(client, url)
                if scraped >= 4:
                    break
            assert scraped >= 4, (tmp_path / "prometheus.log").read_text()[-2000:]

            failures = []
            empty = set()
            for title, expr in _expressions():
                body = _query(client, base, expr)
                if body.get("status") != "success":
                    failures.append(f"{title}: {body.get('error')}: {expr}")
                elif not body["data"]["result"]:
                    empty.add(expr)
            assert not failures, "\n".join(failures)

            # What the operators look at first has data after this traffic.
            must_answer = [
                "guardrail_requests_total",
                "guardrail_harmful_content_total",
                "guardrail_hallucination_flags_total",
                "guardrail_groundedness_score_bucket",
                "guardrail_feedback_total",
                "guardrail_filter_duration_seconds_bucket",
            ]
            for metric in must_answer:
                answered = [e for t, e in _expressions() if metric in e and e not in empty]
                assert answered, f"no dashboard query on {metric} returned data"

            rules = client.get(f"{base}/api/v1/rules").json()
            names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
            assert {"GuardrailGroundednessLow", "GuardrailHarmfulContentSpike"} <= names
            assert all(r["health"] == "ok" for g in rules["data"]["groups"] for r in g["rules"]), (
                rules
            )
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()
