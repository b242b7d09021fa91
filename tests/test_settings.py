"""Settings: defaults, YAML file, environment and flags, in that order of precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.errors import ConfigError
from guardrail.settings import load_settings


def test_precedence_is_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("port: 9001\nhost: 0.0.0.0\nmodels: [a, b]\nlog_text: false\n")
    env = {"GUARDRAIL_PORT": "9002", "GUARDRAIL_BACKEND_URLS": "http://x/v1, http://y/v1"}
    s = load_settings(config, environ=env, overrides={"port": 9003, "model": None})
    assert s.port == 9003
    assert s.host == "0.0.0.0"
    assert s.models == ["a", "b"]
    assert s.backend_urls == ["http://x/v1", "http://y/v1"]
    assert s.model is None


def test_defaults_serve_the_default_policy_on_loopback() -> None:
    s = load_settings(environ={})
    assert (s.host, s.port, s.policy, s.backend) == (
        "127.0.0.1",
        8080,
        "policies/default.yaml",
        "local",
    )
    assert s.log_text is False
    assert s.cache_path.name == "guardrail"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"GUARDRAIL_PORT": "eighty"}, "$.port"),
        ({"GUARDRAIL_PORT": "70000"}, "$.port"),
        ({"GUARDRAIL_DTYPE": "int3"}, "$.dtype"),
        ({"GUARDRAIL_BACKEND_TIMEOUT_S": "0"}, "$.backend_timeout_s"),
    ],
)
def test_bad_values_are_errors_naming_the_field(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("$", r"\$")):
        load_settings(environ=env)


def test_unknown_keys_in_the_file_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("prot: 9000\n")
    with pytest.raises(ConfigError, match="unknown field `prot`"):
        load_settings(config, environ={})


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})
