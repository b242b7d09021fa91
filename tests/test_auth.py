"""API keys, tenants and the admin key, through the real app and Litestar's test client."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.api.auth import KeyRing, from_this_machine, open_mode_warning
from guardrail.app import create_app
from guardrail.errors import ConfigError
from guardrail.settings import ApiKeyEntry, Settings, TenantConfig, load_settings, misspelt_env
from tests.conftest import TEST_POLICY
from tests.fakes.backend import FakeBackend
from tests.servers import serve_asgi

Client = TestClient[Litestar]

ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-9876543210", "sk-admin-secret"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def chat(text: str = "Hi there", model: str = "fake-model") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


STRICT_POLICY = (
    TEST_POLICY.replace("name: test", "name: strict")
    .replace("keywords: [dummy]", "keywords: [dummy, weather]")
    .replace("action: flag", "action: block")
)


@pytest.fixture
def keyed(
    make_app: Callable[..., Litestar],
    write_policy: Callable[[str, str], Path],
    backend: FakeBackend,
) -> Iterator[Client]:
    backend.model_names = ["fake-model", "big-model"]
    strict = write_policy(STRICT_POLICY, "strict.yaml")
    app = make_app(
        api_keys=[
            ApiKeyEntry(tenant="alice", key_sha256=sha(ALICE)),
            ApiKeyEntry(tenant="bob", key_sha256=sha(BOB)),
        ],
        tenants={
            "bob": TenantConfig(policy=str(strict), models=["fake-model"]),
        },
        admin_key_sha256=sha(ADMIN),
    )
    with TestClient(app=app) as c:
        yield c


def test_the_backend_is_told_the_tenant_as_the_scope_of_what_it_may_cache(
    keyed: Client, backend: FakeBackend
) -> None:
    """The local engine shares its KV cache only within a scope: the tenant."""
    assert keyed.post("/v1/chat/completions", json=chat(), headers=bearer(ALICE)).is_success
    completion = {"model": "fake-model", "prompt": "Once upon a time"}
    assert keyed.post("/v1/completions", json=completion, headers=bearer(BOB)).is_success
    assert [r.cache_scope for r in backend.requests] == ["alice", "bob"]


def test_when_no_key_is_sent_then_401_says_how_to_send_one(keyed: Client) -> None:
    r = keyed.post("/v1/chat/completions", json=chat())
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "missing_api_key"
    assert error["type"] == "authentication_error"
    assert "Authorization: Bearer" in error["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["x-request-id"]


def test_when_a_wrong_key_is_sent_then_401_says_it_is_not_valid(
    keyed: Client, backend: FakeBackend
) -> None:
    r = keyed.post("/v1/chat/completions", json=chat(), headers=bearer("sk-nobody"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert "not valid" in r.json()["error"]["message"]
    assert backend.requests == []


@pytest.mark.parametrize(
    "headers", [bearer(ALICE), {"x-api-key": ALICE}, {"authorization": f"bearer {ALICE}"}]
)
def test_a_valid_key_in_either_header_is_served(keyed: Client, headers: dict[str, str]) -> None:
    r = keyed.post("/v1/chat/completions", json=chat(), headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", f"Bearer {ALICE}"), ("x-api-key", BOB)],
        [("x-api-key", BOB), ("authorization", f"Bearer {ALICE}")],
        # A proxy's own token in front of the client's key.
        [("authorization", "Bearer proxy-oauth-token"), ("x-api-key", ALICE)],
        [("x-api-key", ALICE), ("authorization", "Bearer proxy-oauth-token")],
    ],
)
def test_two_different_keys_in_one_request_are_refused_whatever_their_order(
    keyed: Client, backend: FakeBackend, headers: list[tuple[str, str]]
) -> None:
    """The header that came first decided the tenant."""
    r = keyed.post("/v1/chat/completions", json=chat(), headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "ambiguous_api_key"
    assert "one key" in r.json()["error"]["message"]
    assert backend.requests == []


def test_the_same_key_in_both_headers_is_one_key(keyed: Client) -> None:
    headers = [("authorization", f"Bearer {ALICE}"), ("x-api-key", f" {ALICE} ")]
    assert keyed.post("/v1/chat/completions", json=chat(), headers=headers).status_code == 200


def test_each_tenant_gets_its_own_policy(keyed: Client, backend: FakeBackend) -> None:
    text = "what is the weather like"
    alice = keyed.post("/v1/chat/completions", json=chat(text), headers=bearer(ALICE))
    assert alice.status_code == 200
    assert alice.json()["guardrail"]["policy"]["name"] == "test"

    bob = keyed.post("/v1/chat/completions", json=chat(text), headers=bearer(BOB))
    assert bob.status_code == 400
    assert bob.json()["guardrail"]["policy"]["name"] == "strict"
    assert len(backend.requests) == 1


def test_a_model_the_tenant_may_not_use_is_403_naming_what_it_may(
    keyed: Client, backend: FakeBackend
) -> None:
    r = keyed.post("/v1/chat/completions", json=chat(model="big-model"), headers=bearer(BOB))
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["type"] == "permission_error"
    assert error["code"] == "model_not_allowed"
    assert "big-model" in error["message"]
    assert "Allowed: fake-model" in error["message"]
    assert backend.requests == []


def test_models_lists_only_what_the_tenant_may_use(keyed: Client) -> None:
    alice = keyed.get("/v1/models", headers=bearer(ALICE)).json()
    bob = keyed.get("/v1/models", headers=bearer(BOB)).json()
    assert [m["id"] for m in alice["data"]] == ["fake-model", "big-model"]
    assert [m["id"] for m in bob["data"]] == ["fake-model"]
    # One model by id: another tenant's model is as unknown as a model nobody serves.
    assert keyed.get("/v1/models/big-model", headers=bearer(ALICE)).status_code == 200
    assert keyed.get("/v1/models/big-model", headers=bearer(BOB)).status_code == 404
    assert keyed.get("/v1/models/big-model").status_code == 401


def test_a_model_nobody_serves_is_404_naming_only_what_the_tenant_may_use(
    make_app: Callable[..., Litestar], backend: FakeBackend
) -> None:
    """The 404 listed every served model, those of other tenants too, which /v1/models
    hides from this key."""
    backend.model_names = ["fake-model", "big-model"]
    app = make_app(
        api_keys=[
            ApiKeyEntry(tenant="alice", key_sha256=sha(ALICE)),
            ApiKeyEntry(tenant="bob", key_sha256=sha(BOB)),
        ],
        tenants={
            "alice": TenantConfig(models=["retired-model"]),
            "bob": TenantConfig(models=["fake-model", "retired-model"]),
        },
    )
    with TestClient(app=app) as c:
        bob = c.post("/v1/chat/completions", json=chat(model="retired-model"), headers=bearer(BOB))
        alice = c.post(
            "/v1/chat/completions", json=chat(model="retired-model"), headers=bearer(ALICE)
        )
    assert bob.status_code == 404
    assert bob.json()["error"]["code"] == "model_not_found"
    assert "Available: fake-model." in bob.json()["error"]["message"]
    assert "big-model" not in bob.text
    assert alice.status_code == 404
    assert "fake-model" not in alice.text
    assert "big-model" not in alice.text
    assert "None of the models served here is open to this API key" in alice.text
    assert backend.requests == []


def test_admin_routes_need_the_admin_key(keyed: Client) -> None:
    assert keyed.post("/admin/reload").status_code == 401
    tenant = keyed.post("/admin/reload", headers=bearer(ALICE))
    assert tenant.status_code == 403
    assert tenant.json()["error"]["code"] == "admin_key_required"
    admin = keyed.post("/admin/reload", headers=bearer(ADMIN))
    assert admin.status_code == 200, admin.text


def test_a_failed_reload_names_each_tenant_policy_that_failed_by_its_file(
    make_app: Callable[..., Litestar], write_policy: Callable[[str, str], Path]
) -> None:
    """It said "the tenant policy failed": with several tenant policies, not which."""
    policies = {t: write_policy(TEST_POLICY, f"{t}.yaml") for t in ("alice", "bob", "carol")}
    app = make_app(
        api_keys=[ApiKeyEntry(tenant=t, key_sha256=sha(t)) for t in policies],
        tenants={t: TenantConfig(policy=str(p)) for t, p in policies.items()},
        admin_key_sha256=sha(ADMIN),
    )
    with TestClient(app=app) as c:
        for broken in ("alice", "carol"):
            policies[broken].write_text("name: broken\n", encoding="utf-8")
        r = c.post("/admin/reload", headers=bearer(ADMIN))
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert f"the tenant policy {policies['alice']} failed" in message
    assert f"the tenant policy {policies['carol']} failed" in message
    assert str(policies["bob"]) not in message


def test_the_admin_key_is_not_a_tenant_key(keyed: Client) -> None:
    r = keyed.post("/v1/chat/completions", json=chat(), headers=bearer(ADMIN))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "tenant_key_required"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi/openapi.json"])
def test_probes_metrics_and_schema_stay_open(keyed: Client, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_metrics_can_require_the_admin_key(make_app: Callable[..., Litestar]) -> None:
    app = make_app(admin_key_sha256=sha(ADMIN), metrics_require_admin_key=True)
    with TestClient(app=app) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer(ADMIN)).status_code == 200


def test_admin_routes_are_refused_when_keys_exist_but_no_admin_key(
    make_app: Callable[..., Litestar],
) -> None:
    app = make_app(api_keys=[ApiKeyEntry(tenant="alice", key_sha256=sha(ALICE))])
    with TestClient(app=app) as c:
        r = c.post("/admin/reload", headers=bearer(ALICE))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "admin_disabled"


def test_rejected_keys_are_counted_as_invalid_requests(
    keyed: Client, metrics_registry: CollectorRegistry
) -> None:
    keyed.post("/v1/chat/completions", json=chat())
    keyed.post("/v1/chat/completions", json=chat(model="big-model"), headers=bearer(BOB))
    count = metrics_registry.get_sample_value(
        "guardrail_requests_total", {"route": "chat", "outcome": "invalid_request"}
    )
    assert count == 2.0


def test_the_exchange_records_the_tenant(keyed: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        keyed.post("/v1/chat/completions", json=chat(), headers=bearer(ALICE))
    exchange_lines = [e for e in logs if e["event"] == "exchange"]
    assert [e["tenant"] for e in exchange_lines] == ["alice"]
    assert ALICE not in repr(logs)


def test_a_request_refused_before_its_handler_is_recorded_under_its_tenant(
    keyed: Client,
) -> None:
    # Bad JSON and an unknown field are refused by the framework, after the key check.
    with structlog.testing.capture_logs() as logs:
        keyed.post(
            "/v1/chat/completions",
            content=b"{bad",
            headers={**bearer(BOB), "content-type": "application/json"},
        )
        keyed.post("/v1/chat/completions", json={**chat(), "bogus": 1}, headers=bearer(BOB))
    lines = [e for e in logs if e["event"] == "exchange"]
    assert [(e["tenant"], e["status"]) for e in lines] == [("bob", 400), ("bob", 400)]
    assert [e["policy_version"] for e in lines] == ["7", "7"]  # was empty


def test_without_keys_the_gateway_is_open_and_says_so(
    make_app: Callable[..., Litestar],
) -> None:
    with structlog.testing.capture_logs() as logs:
        app = make_app()
    with TestClient(app=app) as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
    warnings = [e for e in logs if e["event"] == "running_open"]
    assert warnings
    assert warnings[0]["log_level"] == "warning"
    assert "/admin/* answers requests from this machine only" in warnings[0]["message"]


def _fresh_app(test_policy: Path, **overrides: Any) -> Litestar:
    """A gateway with metrics of its own, for tests that start two."""
    settings = Settings(policy=str(test_policy), **overrides)
    return create_app(settings, backend=FakeBackend(), metrics_registry=CollectorRegistry())


def test_without_keys_admin_routes_answer_this_machine_only(test_policy: Path) -> None:
    # Over TCP on 127.0.0.1: the caller is this machine.
    with serve_asgi(_fresh_app(test_policy)) as url:
        assert httpx.post(url + "/admin/reload", timeout=30).status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 200
    # Litestar's test client calls from "testclient": not a loopback address.
    with TestClient(app=_fresh_app(test_policy)) as c:
        r = c.post("/admin/reload")
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "admin_local_only"
    assert "GUARDRAIL_ADMIN_KEY" in error["message"]


def test_with_an_admin_key_and_no_tenant_keys_admin_routes_need_that_key_from_anywhere(
    test_policy: Path,
) -> None:
    with serve_asgi(_fresh_app(test_policy, admin_key_sha256=sha(ADMIN))) as url:
        local = httpx.post(url + "/admin/reload", timeout=30)
    assert local.status_code == 401
    with TestClient(app=_fresh_app(test_policy, admin_key_sha256=sha(ADMIN))) as c:
        assert c.post("/admin/reload", headers=bearer(ADMIN)).status_code == 200
    assert open_mode_warning(KeyRing.from_settings(Settings(admin_key_sha256=sha(ADMIN)))) == (
        "running OPEN: no API keys configured; anyone who can reach this port may use it"
    )


@pytest.mark.parametrize(
    ("client", "local"),
    [
        (("127.0.0.1", 50123), True),
        (("127.8.9.10", 1), True),
        (("::1", 50123), True),
        (("::ffff:127.0.0.1", 50123), True),
        (("10.0.0.7", 50123), False),
        (("203.0.113.9", 443), False),
        (("::ffff:203.0.113.9", 443), False),
        (("fe80::1%eth0", 50123), False),
        (("testclient", 50000), False),
        (("", 0), False),
        (None, False),
    ],
)
def test_this_machine_is_a_loopback_address_and_nothing_else(
    client: tuple[str, int] | None, local: bool
) -> None:
    scope: dict[str, Any] = {"type": "http", "client": client}
    assert from_this_machine(scope) is local  # type: ignore[arg-type]


def test_a_misspelt_key_variable_is_named_at_startup_without_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GUARDRAIL_API_KEY (no S) sets nothing: the gateway runs open while its operator
    believes keys are on. Startup names the variable and the one it resembles; a
    variable a policy's key_env may name on purpose (not a near miss) is left alone."""
    from guardrail.app import check_settings

    monkeypatch.setenv("GUARDRAIL_API_KEY", ALICE)
    monkeypatch.setenv("GUARDRAIL_PII_SECRET", "for a policy's encrypt_key_env")
    with structlog.testing.capture_logs() as logs:
        check_settings(Settings(audit_dsn="off"))
    warned = [e for e in logs if e["event"] == "unknown_setting_variable"]
    assert [(e["variable"], e["did_you_mean"]) for e in warned] == [
        ("GUARDRAIL_API_KEY", "GUARDRAIL_API_KEYS")
    ]
    assert warned[0]["log_level"] == "warning"
    assert ALICE not in repr(logs)
    assert misspelt_env({"GUARDRAIL_AUDITDSN": "off", "GUARDRAIL_TEST_DEVICE": "cuda"}) == [
        ("GUARDRAIL_AUDITDSN", "GUARDRAIL_AUDIT_DSN")
    ]


def test_a_tenants_entry_no_key_acts_for_is_named_at_startup(test_policy: Path) -> None:
    """A misspelt tenant ("Alice" for the key's "alice") left that tenant on the default
    policy, every model and the default limits, silently."""
    with structlog.testing.capture_logs() as logs:
        _fresh_app(
            test_policy,
            api_keys=[
                ApiKeyEntry(tenant="alice", key_sha256=sha(ALICE)),
                ApiKeyEntry(tenant="bob", key_sha256=sha(BOB)),
            ],
            tenants={
                "Alice": TenantConfig(requests_per_minute=10),
                "bob": TenantConfig(requests_per_minute=10),
                "carol": TenantConfig(requests_per_minute=10),
            },
        )
    warned = [e for e in logs if e["event"] == "unused_tenant"]
    assert [(e["tenant"], e["did_you_mean"]) for e in warned] == [
        ("Alice", "alice"),
        ("carol", None),
    ]
    assert all(e["log_level"] == "warning" for e in warned)
    # Open mode: every request is tenant "default", whose entry is used.
    with structlog.testing.capture_logs() as logs:
        _fresh_app(test_policy, tenants={"default": TenantConfig(), "acme": TenantConfig()})
    warned = [e for e in logs if e["event"] == "unused_tenant"]
    assert [e["tenant"] for e in warned] == ["acme"]


SCOPED_POLICY = (
    TEST_POLICY
    + """
        - id: eu-weather
          category: secrets
          action: block
          keywords: [weather]
          scope: {tenants: ["team[eu]", "Acme", "ali*", "carol"]}
"""
)


def test_a_rule_scoped_to_a_tenant_no_key_acts_for_is_named_at_startup_and_reload(
    write_policy: Callable[[str, str], Path],
) -> None:
    """A rule scoped to "Acme" where the keys act for "acme" applied to nobody, silently:
    a block rule that blocked nothing, while a misspelt tenants: entry was warned about."""
    policy = write_policy(SCOPED_POLICY, "scoped.yaml")
    keys = [
        ApiKeyEntry(tenant="team[eu]", key_sha256=sha("sk-team-eu-0001")),
        ApiKeyEntry(tenant="acme", key_sha256=sha("sk-acme-0001")),
        ApiKeyEntry(tenant="alice", key_sha256=sha(ALICE)),
    ]
    with structlog.testing.capture_logs() as logs:
        app = _fresh_app(policy, api_keys=keys, admin_key_sha256=sha(ADMIN))
    warned = [e for e in logs if e["event"] == "unmatched_scope_tenant"]
    assert [(e["tenant"], e["did_you_mean"], e["rule"]) for e in warned] == [
        ("Acme", "acme", "eu-weather"),
        ("carol", None, "eu-weather"),
    ]
    line = (
        SCOPED_POLICY.splitlines().index(
            '          scope: {tenants: ["team[eu]", "Acme", "ali*", "carol"]}'
        )
        + 1
    )
    assert {e["line"] for e in warned} == {line}
    assert all(e["log_level"] == "warning" for e in warned)
    assert f"{policy}:{line}:" in warned[0]["message"]
    with TestClient(app=app) as c, structlog.testing.capture_logs() as logs:
        assert c.post("/admin/reload", headers=bearer(ADMIN)).status_code == 200
    assert [e["tenant"] for e in logs if e["event"] == "unmatched_scope_tenant"] == [
        "Acme",
        "carol",
    ]
    # Open mode: every request is tenant "default"; nothing to check the names against.
    with structlog.testing.capture_logs() as logs:
        _fresh_app(policy)
    assert not [e for e in logs if e["event"] == "unmatched_scope_tenant"]


@pytest.mark.parametrize("key", ["clé-secrète", "sk-\u00a0nbsp", "sk-tab\there", "sk-\x7f"])
def test_a_key_no_header_can_carry_is_refused_at_startup_without_echoing_it(key: str) -> None:
    """A key outside printable ASCII was accepted and could never authenticate: a header
    carries bytes, read as latin-1, while the key is hashed as UTF-8."""
    with pytest.raises(ConfigError, match=r"GUARDRAIL_API_KEYS entry 1: .*printable ASCII") as e:
        load_settings(environ={"GUARDRAIL_API_KEYS": f"{key}=alice"})
    assert key not in str(e.value)
    with pytest.raises(ConfigError, match=r"GUARDRAIL_ADMIN_KEY: .*printable ASCII") as e:
        load_settings(environ={"GUARDRAIL_ADMIN_KEY": key})
    assert key not in str(e.value)
    settings = Settings(api_keys=[ApiKeyEntry(tenant="ci", key_env="CI_KEY")])
    with pytest.raises(ConfigError, match=r"api_keys\[0\]: .*CI_KEY .*printable ASCII") as e:
        KeyRing.from_settings(settings, environ={"CI_KEY": key})
    assert key not in str(e.value)


def test_a_key_with_a_space_inside_still_authenticates(
    make_app: Callable[..., Litestar], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Printable ASCII, spaces included: both headers carry it whole.
    monkeypatch.setenv("SPACED_KEY", "sk-two words")
    app = make_app(api_keys=[ApiKeyEntry(tenant="ci", key_env="SPACED_KEY")])
    with TestClient(app=app) as c:
        for headers in (bearer("sk-two words"), {"x-api-key": "sk-two words"}):
            assert c.post("/v1/chat/completions", json=chat(), headers=headers).status_code == 200


def test_env_keys_are_hashed_as_they_are_read() -> None:
    settings = load_settings(
        environ={"GUARDRAIL_API_KEYS": f"{ALICE}=alice, {BOB}=bob", "GUARDRAIL_ADMIN_KEY": ADMIN}
    )
    assert [(e.tenant, e.key_sha256) for e in settings.api_keys] == [
        ("alice", sha(ALICE)),
        ("bob", sha(BOB)),
    ]
    assert settings.admin_key_sha256 == sha(ADMIN)
    assert ALICE not in repr(settings)
    ring = KeyRing.from_settings(settings)
    alice = ring.identify(ALICE)
    assert alice is not None
    assert alice.tenant == "alice"
    assert alice.key_id == sha(ALICE)[:8]
    assert alice.bucket == sha(ALICE)  # rate limits count by the whole digest
    assert ring.identify("sk-nobody") is None
    admin = ring.identify(ADMIN)
    assert admin is not None
    assert admin.admin
    assert open_mode_warning(ring) is None


def test_a_malformed_env_key_list_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"GUARDRAIL_API_KEYS": "sk-secret-without-tenant"})
    assert "entry 1" in str(info.value)
    assert "sk-secret" not in str(info.value)


def test_a_key_can_come_from_a_named_environment_variable() -> None:
    settings = Settings(api_keys=[ApiKeyEntry(tenant="ci", key_env="CI_GATEWAY_KEY")])
    ring = KeyRing.from_settings(settings, environ={"CI_GATEWAY_KEY": "sk-from-env"})
    found = ring.identify("sk-from-env")
    assert found is not None
    assert found.tenant == "ci"
    with pytest.raises(ConfigError, match="CI_GATEWAY_KEY is not set"):
        KeyRing.from_settings(settings, environ={})


@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
def test_a_blank_env_key_list_is_refused_not_read_as_no_keys(value: str) -> None:
    # Taken as "no keys", it replaced the file's keys and ran the gateway open.
    with pytest.raises(ConfigError, match="holds no KEY=TENANT entry"):
        load_settings(environ={"GUARDRAIL_API_KEYS": value})


def test_a_blank_env_admin_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="GUARDRAIL_ADMIN_KEY is set but empty"):
        load_settings(environ={"GUARDRAIL_ADMIN_KEY": " \n"})


def test_the_admin_key_and_its_hash_both_in_the_environment_are_refused() -> None:
    # The hash variable silently won over the key: which admin key is meant is unclear.
    with pytest.raises(ConfigError, match="both set; set one"):
        load_settings(
            environ={"GUARDRAIL_ADMIN_KEY": ADMIN, "GUARDRAIL_ADMIN_KEY_SHA256": sha(ALICE)}
        )


def test_keys_from_every_source_are_stripped_alike() -> None:
    # Kubernetes secrets made --from-file keep the file's last line break.
    settings = load_settings(
        environ={"GUARDRAIL_API_KEYS": f"{ALICE}=alice", "GUARDRAIL_ADMIN_KEY": f"{ADMIN}\n"}
    )
    settings = Settings(
        api_keys=[*settings.api_keys, ApiKeyEntry(tenant="ci", key_env="CI_KEY")],
        admin_key_sha256=settings.admin_key_sha256,
    )
    ring = KeyRing.from_settings(settings, environ={"CI_KEY": "sk-ci-key\n"})
    ci = ring.identify("sk-ci-key")
    assert ci is not None
    assert ci.tenant == "ci"
    admin = ring.identify(ADMIN)
    assert admin is not None
    assert admin.admin


def test_a_key_listed_twice_is_refused_naming_its_id_not_the_key() -> None:
    settings = load_settings(environ={"GUARDRAIL_API_KEYS": f"{ALICE}=alice,{ALICE}=bob"})
    with pytest.raises(ConfigError, match="listed twice") as info:
        KeyRing.from_settings(settings)
    assert sha(ALICE)[:8] in str(info.value)
    assert ALICE not in str(info.value)


def test_a_tenant_key_that_is_also_the_admin_key_is_refused() -> None:
    settings = load_settings(
        environ={"GUARDRAIL_API_KEYS": f"{ADMIN}=alice", "GUARDRAIL_ADMIN_KEY": ADMIN}
    )
    with pytest.raises(ConfigError, match="also the admin key"):
        KeyRing.from_settings(settings)


PREFLIGHT = {"origin": "https://app.example", "access-control-request-method": "POST"}


def test_cors_is_off_by_default(client: Client) -> None:
    r = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_the_configured_origins(make_app: Callable[..., Litestar]) -> None:
    with TestClient(app=make_app(cors_origins=["https://app.example"])) as c:
        r = c.options("/v1/chat/completions", headers=PREFLIGHT)
    assert r.headers["access-control-allow-origin"] == "https://app.example"


def _serve_stderr(test_policy: Path, extra_env: dict[str, str]) -> str:
    """Start ``guardrail serve`` (remote backend, nothing behind it), return its stderr."""
    import os
    import subprocess
    import sys

    from tests.servers import free_socket

    with free_socket() as sock:
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDRAIL_")}
    env |= extra_env
    proc = subprocess.Popen(
        [
            sys.executable, "-c", "import sys; from guardrail.cli import main; sys.exit(main())",
            "serve", "--backend", "remote", "--backend-url", "http://127.0.0.1:9/v1",
            "--policy", str(test_policy), "--port", str(port),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        assert proc.stderr is not None
        proc.stderr.close()
    return "".join(lines)


def test_serve_says_on_stderr_when_it_runs_open(test_policy: Path) -> None:
    err = _serve_stderr(test_policy, {})
    assert "running OPEN: no API keys configured" in err
    assert "/admin/* answers this machine only" in err


def test_serve_with_keys_does_not_say_open_nor_print_a_key(test_policy: Path) -> None:
    err = _serve_stderr(test_policy, {"GUARDRAIL_API_KEYS": f"{ALICE}=alice"})
    assert "running OPEN" not in err
    assert "serving on" in err
    assert ALICE not in err


def test_cors_lets_a_configured_origin_send_the_sdk_headers(
    make_app: Callable[..., Litestar],
) -> None:
    """The OpenAI JavaScript SDK sends x-stainless-* headers on every call."""
    asked = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count"
    with TestClient(app=make_app(cors_origins=["https://app.example"])) as c:
        r = c.options(
            "/v1/chat/completions",
            headers={**PREFLIGHT, "access-control-request-headers": asked},
        )
        other = c.options(
            "/v1/chat/completions",
            headers={**PREFLIGHT, "origin": "https://evil.example"},
        )
    assert r.status_code == 204
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert set(asked.split(",")) <= allowed
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("locked", [False, True])
def test_open_metrics_with_several_tenants_is_a_startup_warning(
    test_policy: Path, locked: bool
) -> None:
    """/metrics counts per tenant and per topic (group mentions): open, anyone polling it
    between two requests learns which tenant asked about what."""
    keys = [
        ApiKeyEntry(tenant="alice", key_sha256=sha(ALICE)),
        ApiKeyEntry(tenant="bob", key_sha256=sha(BOB)),
    ]
    with structlog.testing.capture_logs() as logs:
        _fresh_app(
            test_policy,
            api_keys=keys,
            admin_key_sha256=sha("admin-key-123"),
            metrics_require_admin_key=locked,
        )
    warned = [e for e in logs if e["event"] == "metrics_open"]
    assert len(warned) == (0 if locked else 1)


# A web page's request, as a browser sends it: the Origin and Sec-Fetch-Site headers.
EVIL = "https://evil.example"
JSON_BLOB = b'{"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}'


@pytest.mark.parametrize(
    ("cors_origins", "headers", "status"),
    [
        # fetch(url, {method: "POST", mode: "no-cors", body: new Blob([json])}): no
        # content type, no preflight; the body was read as JSON and the model ran.
        ([], {"origin": EVIL, "sec-fetch-site": "cross-site"}, 403),
        ([], {"origin": EVIL}, 403),
        ([], {"origin": "null"}, 403),  # a sandboxed frame, a file: page
        ([], {"sec-fetch-site": "cross-site"}, 403),
        ([], {"sec-fetch-site": "same-site"}, 403),
        (["https://app.example"], {"origin": EVIL}, 403),
        (["*"], {"origin": "null"}, 403),
        # The gateway's own pages, and pages cors_origins lets in.
        ([], {"origin": "http://testserver.local", "sec-fetch-site": "same-origin"}, 200),
        ([], {"origin": "https://gw.example", "sec-fetch-site": "same-origin"}, 200),
        ([], {"sec-fetch-site": "none"}, 200),
        (["https://app.example"], {"origin": "https://app.example"}, 200),
        (["*"], {"origin": EVIL, "sec-fetch-site": "cross-site"}, 200),
        (["*"], {"sec-fetch-site": "cross-site"}, 200),
        ([], {}, 200),  # not a browser
    ],
)
def test_a_web_page_of_another_origin_cannot_make_a_browser_call_the_api(
    make_app: Callable[..., Litestar],
    backend: FakeBackend,
    cors_origins: list[str],
    headers: dict[str, str],
    status: int,
) -> None:
    with TestClient(app=make_app(cors_origins=cors_origins)) as c:
        r = c.post("/v1/chat/completions", content=JSON_BLOB, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "cross_origin_refused"
        assert r.json()["error"]["type"] == "permission_error"
        assert backend.requests == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"origin": EVIL}, 403),  # cors_origins does not reach /admin/*
        ({"sec-fetch-site": "cross-site"}, 403),
        ({"origin": "http://testserver.local"}, 200),  # the review page, same origin
        ({"sec-fetch-site": "same-origin"}, 200),
        ({}, 200),
    ],
)
def test_admin_routes_take_no_other_sites_page_whatever_cors_allows(
    make_app: Callable[..., Litestar], headers: dict[str, str], status: int
) -> None:
    app = make_app(cors_origins=["*"], admin_key_sha256=sha(ADMIN))
    with TestClient(app=app) as c:
        r = c.post("/admin/reload", headers={**bearer(ADMIN), **headers})
        page = c.get("/admin/review/ui", headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "cross_origin_refused"
    assert page.status_code == 200  # a link from elsewhere to the page still opens it


def test_without_keys_admin_routes_answer_only_a_loopback_name_in_host(
    test_policy: Path,
) -> None:
    """A page on another site can point its name at 127.0.0.1 (DNS rebinding) and call
    this machine as that site, same origin, from a loopback address."""
    app = _fresh_app(test_policy)
    with serve_asgi(app) as url:
        port = url.rsplit(":", 1)[1]

        def review(host: str) -> httpx.Response:
            return httpx.get(url + "/admin/review", headers={"host": host}, timeout=30)

        refused = [
            review(f"rebound.attacker.example:{port}"),
            review("localhost.attacker.example"),
            review(f"10.0.0.7:{port}"),
        ]
        served = [
            review(f"localhost:{port}"),
            review("LOCALHOST"),
            review(f"gw.localhost:{port}"),
            review(f"127.8.9.10:{port}"),
            review(f"[::1]:{port}"),
        ]
        # The browser repro: a page at http://localhost:OTHER posts a reload, no body.
        reload = httpx.post(
            url + "/admin/reload", headers={"origin": "http://localhost:1"}, timeout=30
        )
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert {r.json()["error"]["code"] for r in refused} == {"admin_local_only"}
    assert "Host" in refused[0].json()["error"]["message"]
    assert [r.status_code for r in served] == [200] * len(served)
    assert reload.status_code == 403
    assert reload.json()["error"]["code"] == "cross_origin_refused"
    assert app.state.gateway.metrics.registry.get_sample_value(
        "guardrail_policy_reloads_total", {"result": "ok"}
    ) in (None, 0.0)
