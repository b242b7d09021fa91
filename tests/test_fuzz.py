"""Schemathesis against the gateway's own OpenAPI schema (``/openapi/openapi.json``):
valid and invalid requests to every operation of a real gateway on 127.0.0.1. Nothing
a client sends is a 5xx, and every error is in the OpenAI shape.

Bounded: ``GUARDRAIL_FUZZ_EXAMPLES`` examples per operation (default 100), positive and
negative; the whole module takes well under a minute on two cores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode

from guardrail.app import create_app
from guardrail.settings import Settings
from tests.conftest import TEST_POLICY
from tests.fakes.backend import FakeBackend
from tests.servers import serve_asgi

EXAMPLES = int(os.environ.get("GUARDRAIL_FUZZ_EXAMPLES", "100"))

# Schemathesis reads the schema at collection time, before fixtures exist, so the
# policy file lives in a folder of the module's own, removed when the run ends.
_POLICY_DIR = tempfile.TemporaryDirectory(prefix="guardrail-fuzz-")


def _gateway() -> Litestar:
    policy = Path(_POLICY_DIR.name) / "policy.yaml"
    policy.write_text(TEST_POLICY, encoding="utf-8")
    return create_app(
        Settings(policy=str(policy), max_body_bytes=64 * 1024),
        backend=FakeBackend(),
        metrics_registry=CollectorRegistry(),
    )


def _served_schema() -> dict[str, object]:
    with TestClient(app=_gateway()) as client:
        document: dict[str, object] = client.get("/openapi/openapi.json").json()
        return document


schema = schemathesis.openapi.from_dict(_served_schema())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_asgi(_gateway()) as url:
        yield url


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_request_gets_a_5xx_and_every_error_is_openai_shaped(
    case: schemathesis.Case, base_url: str
) -> None:
    response = case.call(base_url=base_url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if case.method.upper() == "HEAD":  # headers alone; the GET twin's body is checked
        assert response.content == b""
        return
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str)
        assert error["message"]
        assert isinstance(error["type"], str)
        assert "param" in error
        assert "code" in error
