"""Settings: defaults, YAML file, environment and flags, in that order of precedence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardrail.errors import ConfigError
from guardrail.settings import Settings, load_settings


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
        # The system picked a free port and the startup line said "serving on ...:0".
        ({"GUARDRAIL_PORT": "0"}, "$.port"),
        ({"GUARDRAIL_DTYPE": "int3"}, "$.dtype"),
        ({"GUARDRAIL_BACKEND_TIMEOUT_S": "0"}, "$.backend_timeout_s"),
        # "inf" parses as a float: a time limit that never ends is refused, not taken.
        ({"GUARDRAIL_BACKEND_TIMEOUT_S": "inf"}, "$.backend_timeout_s"),
        ({"GUARDRAIL_QUEUE_TIMEOUT_S": "inf"}, "$.queue_timeout_s"),
        ({"GUARDRAIL_SHUTDOWN_TIMEOUT_S": "inf"}, "$.shutdown_timeout_s"),
        ({"GUARDRAIL_BACKEND_TIMEOUT_S": "nan"}, "$.backend_timeout_s"),
        # An endless window crashed startup (OverflowError in the drift monitor).
        ({"GUARDRAIL_HARMFUL_RATE_BASELINE_S": "inf"}, "$.harmful_rate_baseline_s"),
        ({"GUARDRAIL_HARMFUL_RATE_RECENT_S": "inf"}, "$.harmful_rate_recent_s"),
        ({"GUARDRAIL_AUDIT_QUEUE_BYTES": "0"}, "$.audit_queue_bytes"),
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


def test_a_mistake_in_one_tenant_names_that_tenant(tmp_path: Path) -> None:
    """msgspec writes a mapping's keys as [...]: "at `$.tenants[...]`" left an operator
    to guess which tenant held the typo."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        "tenants:\n  acme: {requests_per_minute: 5}\n  beta:\n    requests_per_minut: 5\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    message = str(raised.value)
    assert "unknown field `requests_per_minut`" in message
    assert '$.tenants["beta"]' in message


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})


# -- the default policy outside a checkout ---------------------------------------------


def test_outside_a_checkout_the_default_policy_is_the_shipped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardrail.settings import shipped_policy

    monkeypatch.chdir(tmp_path)  # no policies/ here
    settings = load_settings(environ={})
    shipped = shipped_policy()
    assert shipped is not None
    assert settings.policy == str(shipped)
    repo_default = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
    assert Path(settings.policy).read_bytes() == repo_default.read_bytes()


def test_a_default_policy_in_the_current_folder_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("name: local\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).policy == "policies/default.yaml"


def test_a_policy_that_was_asked_for_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={"GUARDRAIL_POLICY": "policies/strict.yaml"})
    assert settings.policy == "policies/strict.yaml"  # missing: startup names it


def test_the_wheel_carries_the_shipped_policies() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    wheel = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["hatch"]["build"]
    # shipped_policy() looks for guardrail/policies/ inside an installed package.
    assert wheel["targets"]["wheel"]["force-include"]["policies"] == "guardrail/policies"


def test_guardrail_check_works_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from guardrail.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["check", "hello"]) == 0
    assert '"action": "allow"' in capsys.readouterr().out


def test_a_bare_off_in_the_config_file_switches_the_audit_log_and_lexicon_off(
    tmp_path: Path,
) -> None:
    # YAML reads `off` as false; the README writes `audit_dsn: off`.
    config = tmp_path / "gateway.yaml"
    config.write_text("audit_dsn: off\ngroup_lexicon: off\n", encoding="utf-8")
    settings = load_settings(config, environ={})
    assert (settings.audit_dsn, settings.group_lexicon) == ("off", "off")


@pytest.mark.parametrize(
    ("file", "env", "overrides", "expected"),
    [
        ("", {"GUARDRAIL_PORT": "abc"}, {}, "port (environment variable GUARDRAIL_PORT)"),
        ("port: abc\n", {}, {}, "port (in {config})"),
        ("port: 1\n", {"GUARDRAIL_PORT": "abc"}, {}, "port (environment variable GUARDRAIL_PORT)"),
        ("port: abc\n", {"GUARDRAIL_PORT": "1"}, {}, None),  # the environment wins: valid
        ("", {}, {"port": 70000}, "port (command-line flag --port)"),
        ("prot: 1\n", {}, {}, "prot (in {config})"),
        ("tenants: {a: {modles: [x]}}\n", {}, {}, "tenants (in {config})"),
        (
            "api_keys: [{tenant: a, key_sha256: abc}]\n",
            {},
            {},
            "api_keys (in {config})",
        ),
        (
            "",
            {"GUARDRAIL_ADMIN_KEY_SHA256": "not-hex"},
            {},
            "admin_key_sha256 (environment variable GUARDRAIL_ADMIN_KEY_SHA256)",
        ),
        (
            "",
            {"GUARDRAIL_LOG_TEXT": "maybe"},
            {},
            "log_text (environment variable GUARDRAIL_LOG_TEXT)",
        ),
    ],
)
def test_a_bad_setting_is_named_with_the_source_that_gave_it(
    tmp_path: Path,
    file: str,
    env: dict[str, str],
    overrides: dict[str, object],
    expected: str | None,
) -> None:
    """Three sources can set one field: the error says which one to fix."""
    config = tmp_path / "gw.yaml"
    config.write_text(file)
    if expected is None:
        load_settings(config, environ=env, overrides=overrides)
        return
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ=env, overrides=overrides)
    assert f"invalid settings: {expected.format(config=config)}: " in str(raised.value)


def test_tenants_cannot_be_set_from_the_environment() -> None:
    """Silently ignored, GUARDRAIL_TENANTS left its operator believing limits were on."""
    with pytest.raises(ConfigError, match="GUARDRAIL_TENANTS cannot be set from the environment"):
        load_settings(environ={"GUARDRAIL_TENANTS": "acme"})


def test_a_yaml_merge_key_still_loads(tmp_path: Path) -> None:
    """The check for repeated keys constructed "<<" as a key: no constructor for the
    merge tag, so a file sharing tenant settings through an anchor was "not valid YAML"."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        "tenants:\n"
        "  acme: &limits {requests_per_minute: 5}\n"
        "  beta:\n    <<: *limits\n    models: [m]\n"
    )
    settings = load_settings(config, environ={})
    assert settings.tenants["beta"].requests_per_minute == 5
    assert settings.tenants["beta"].models == ["m"]


def test_a_setting_given_twice_in_the_file_is_an_error(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: which one the operator meant is unknown."""
    config = tmp_path / "gw.yaml"
    config.write_text("port: 9000\nhost: 0.0.0.0\nport: 9001\n")
    with pytest.raises(ConfigError, match=r"gw.yaml:3:1: port is given twice \(first at line 1\)"):
        load_settings(config, environ={})


def test_the_backend_api_key_from_the_environment_is_stripped_like_every_key() -> None:
    # A secret file's line break had gone out in the Authorization header of every call.
    s = load_settings(environ={"GUARDRAIL_BACKEND_API_KEY": "sk-abc123\n"})
    assert s.backend_api_key == "sk-abc123"


@pytest.mark.parametrize("key", ["sk abc", "sk-abc\n123", "sk-abc\n", "", "sk-é"])
def test_a_backend_api_key_no_header_can_carry_is_an_error_that_does_not_echo_it(
    tmp_path: Path, key: str
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(f"backend_api_key: {key!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=r"\$\.backend_api_key") as raised:
        load_settings(config, environ={})
    if key:
        assert key.split(maxsplit=1)[0] not in str(raised.value)  # a secret is never echoed


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("port: " + "9" * 5000 + "\n", "holds a value out of range"),
        ("models: " + "[" * 2000 + "]" * 2000 + "\n", "nests lists or mappings too deeply"),
    ],
    ids=["huge-integer", "deep-nesting"],
)
def test_a_config_file_yaml_cannot_hold_is_a_config_error_naming_it(
    tmp_path: Path, content: str, expected: str
) -> None:
    """Each was a traceback: PyYAML raises ValueError and RecursionError for these."""
    config = tmp_path / "gw.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=f"config file {config} {expected}"):
        load_settings(config, environ={})


@pytest.mark.parametrize(
    "url",
    [
        "foo",
        "http://localhost:6379",
        "redis://h:notaport/0",
        "redis://host/abc",
        "redis://:s3cret-pw@host:70000/0",
        "redis://host:6379/0?db=one",
        "redis://host:6379/-1",
        "unix://",
    ],
)
def test_a_rate_limit_redis_url_redis_cannot_use_stops_startup_naming_it(
    tmp_path: Path, url: str
) -> None:
    """Each was a traceback once the model had loaded (redis-py's ValueError), or, for a
    database that is not a number, silently database 0."""
    config = tmp_path / "gw.yaml"
    config.write_text(f'rate_limit_redis_url: "{url}"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert f"invalid settings: rate_limit_redis_url (in {config}): " in str(raised.value)
    assert "s3cret-pw" not in str(raised.value)  # it may hold a password: never echoed
    with pytest.raises(ConfigError, match=r"rate_limit_redis_url \(environment variable"):
        load_settings(environ={"GUARDRAIL_RATE_LIMIT_REDIS_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@redis",
        "rediss://user:pw@redis.example:6380/2",
        "redis://redis:6379?db=3",
        "unix:///run/redis/redis.sock?db=1",
        "",  # unset: in this process
    ],
)
def test_every_rate_limit_redis_url_redis_py_takes_is_accepted(url: str) -> None:
    settings = load_settings(environ={"GUARDRAIL_RATE_LIMIT_REDIS_URL": url})
    assert settings.rate_limit_redis_url == (url or None)  # blank: unset


def test_a_default_max_tokens_over_the_limit_stops_startup_naming_both() -> None:
    """A request that set no max_tokens was sent the default, past max_tokens_limit,
    though a request that asked for as much was refused (400)."""
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"GUARDRAIL_MAX_TOKENS_LIMIT": "100"})  # the default is 512
    message = str(raised.value)
    assert message.startswith(
        "invalid settings: max_tokens_limit (environment variable GUARDRAIL_MAX_TOKENS_LIMIT): "
    )
    assert "default_max_tokens (512) is larger than max_tokens_limit (100)" in message
    with pytest.raises(ConfigError, match=r"default_max_tokens \(command-line flag"):
        load_settings(environ={}, overrides={"default_max_tokens": 40_000})
    equal = load_settings(environ={"GUARDRAIL_DEFAULT_MAX_TOKENS": "32768"})
    assert equal.default_max_tokens == equal.max_tokens_limit


def test_a_refused_choice_or_yaml_line_is_never_quoted(tmp_path: Path) -> None:
    """A key pasted into the wrong setting was printed back: msgspec quotes the enum
    value it refuses, and the YAML error quoted the line."""
    secret = "sk-live-ZEBRA42-secret"
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"GUARDRAIL_LOG_LEVEL": secret})
    assert secret not in str(raised.value)
    assert "GUARDRAIL_LOG_LEVEL" in str(raised.value)
    assert "not one of debug, info" in str(raised.value)
    config = tmp_path / "gateway.yaml"
    config.write_text(f'port: 8080\nadmin_key: "{secret}\nlog_level: info\n', encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert secret not in str(raised.value)
    assert "not valid YAML" in str(raised.value)
    assert "line " in str(raised.value)


@pytest.mark.parametrize("name", ["host", "policy", "backend", "device"])
@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("env", "environment variable GUARDRAIL_{NAME}"),
        ("file", "in {config}"),
        ("flag", "command-line flag --{name}"),
    ],
)
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_required_setting_is_an_error_naming_it_and_its_source(
    tmp_path: Path, name: str, source: str, where: str, value: str
) -> None:
    """A blank ``GUARDRAIL_HOST=`` line in an env file made the gateway listen on every
    interface (uvicorn binds "" to 0.0.0.0 and ::); an empty policy failed as "Is a
    directory"."""
    config = tmp_path / "gw.yaml"
    config.write_text(f'{name}: "{value}"\n' if source == "file" else "")
    env = {f"GUARDRAIL_{name.upper()}": value} if source == "env" else {}
    overrides = {name: value} if source == "flag" else {}
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ=env, overrides=overrides)
    named = where.format(NAME=name.upper(), name=name, config=config)
    assert str(raised.value).startswith(f"invalid settings: {name} ({named}): {name} is empty")


def test_harmful_rate_windows_the_monitor_cannot_hold_stop_startup_naming_both() -> None:
    """A baseline over 6666 recent windows was refused by the drift monitor as the app
    was built, after the model loaded, in a message that named no setting."""
    env = {"GUARDRAIL_HARMFUL_RATE_RECENT_S": "1", "GUARDRAIL_HARMFUL_RATE_BASELINE_S": "2592000"}
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=env)
    assert str(raised.value) == (
        "invalid settings: harmful_rate_baseline_s (environment variable "
        "GUARDRAIL_HARMFUL_RATE_BASELINE_S): harmful_rate_baseline_s (2592000) may be at "
        "most 6666 times harmful_rate_recent_s (1); shorten the baseline or lengthen the "
        "recent window"
    )
    settings = load_settings(environ={"GUARDRAIL_HARMFUL_RATE_RECENT_S": "13"})  # 6646 times
    assert settings.harmful_rate_recent_s == 13


# Every optional text setting, with a value a config file may give it.
OPTIONAL_TEXT = {
    "model": "checkpoints/guard",
    "model_name": "guard",
    "device_map": "auto",
    "chat_template": "llama-2",
    "cache_dir": "/var/cache/guardrail",
    "shadow_policy": "policies/candidate.yaml",
    "audit_dsn": "/var/lib/guardrail/audit.db",
    "group_lexicon": "groups.yaml",
    "rate_limit_redis_url": "redis://redis:6379/0",
}


@pytest.mark.parametrize("name", sorted(OPTIONAL_TEXT))
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_optional_text_variable_leaves_the_setting_unset(
    tmp_path: Path, name: str, blank: str
) -> None:
    """``GUARDRAIL_MODEL=`` (a blank line in an env file) meant the model "", and the
    local backend loaded the working folder as one; ``GUARDRAIL_CHAT_TEMPLATE=`` was
    refused. Blank is unset, as the settings say (the embedded model, the tokenizer's
    template); a value from the config file stays."""
    variable = f"GUARDRAIL_{name.upper()}"
    assert getattr(load_settings(environ={variable: blank}), name) is None
    config = tmp_path / "gw.yaml"
    config.write_text(f"{name}: {OPTIONAL_TEXT[name]}\n")
    from_file = load_settings(config, environ={variable: blank})
    assert getattr(from_file, name) == OPTIONAL_TEXT[name]


@pytest.mark.parametrize("name", sorted(OPTIONAL_TEXT))
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_optional_text_in_the_config_file_or_a_flag_leaves_the_setting_unset(
    tmp_path: Path, name: str, blank: str
) -> None:
    """``model: ""`` in the config file, or ``--model ""``, meant the model "" (the
    working folder, loaded as a model), though the same blank variable is unset. Blank is
    unset from every source; a blank flag leaves the config file's value."""
    config = tmp_path / "gw.yaml"
    config.write_text(f'{name}: "{blank}"\n')
    assert getattr(load_settings(config, environ={}), name) is None
    assert getattr(load_settings(environ={}, overrides={name: blank}), name) is None
    config.write_text(f"{name}: {OPTIONAL_TEXT[name]}\n")
    from_file = load_settings(config, environ={}, overrides={name: blank})
    assert getattr(from_file, name) == OPTIONAL_TEXT[name]


def test_the_blank_variable_table_holds_every_optional_text_setting() -> None:
    optional_text = {
        name
        for name, kind in Settings.__annotations__.items()
        if re.match(r"Annotated\[(str|Literal\[[^]]*\]) \| None,", kind)
    }
    assert optional_text == set(OPTIONAL_TEXT)
