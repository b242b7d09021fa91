"""The ``guardrail`` command: validate, test, check, eval, schema."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from guardrail.cli import main
from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.registry import BUILTIN_FILTERS
from guardrail.guard.types import Action, FilterContext, Finding, Stage, Verdict
from tests.conftest import DEFAULT_POLICY, ROOT, TEST_POLICY


def jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write ``rows`` to ``path`` as JSON lines (a data set for ``guardrail eval``)."""
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_accepts_the_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "policies").glob("*.yaml"))
    code, out, _ = run(["policy", "validate", *files], capsys)
    assert code == 0
    assert "default.yaml: ok (default" in out


def test_validate_build_finds_what_only_building_the_filters_can(
    write_policy: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy can be valid and still not start: here the toxicity weights file is
    missing. ``validate`` checks the file alone; ``--build`` builds the filters as
    ``serve`` does and fails on it."""
    missing = write_policy(
        'name: tox-missing\nversion: "1"\nfilters:\n  - id: tox\n    type: toxicity\n'
        "    config: {weights: no-such-heads.npz}\n",
        "tox.yaml",
    )
    good = write_policy(TEST_POLICY, "good.yaml")
    code, out, _ = run(["policy", "validate", str(missing)], capsys)
    assert (code, out.strip()) == (0, f"{missing}: ok (tox-missing 1, 1 filters)")
    code, out, _ = run(["policy", "validate", "--build", str(good), str(missing)], capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{good}: ok (")
    assert lines[0].endswith(", filters built)")
    assert lines[1].startswith(f"{missing}: the policy is valid but its filters do not build: ")
    # Named where the entry is, as the loader names its problems.
    assert f"{missing}:4:5: filters[0]: filter 'tox' (toxicity) does not build: " in lines[1]
    assert "no-such-heads.npz" in lines[1]


def test_validate_reports_every_error_as_file_line_column(
    write_policy: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_policy(
        TEST_POLICY.replace("action: flag", "action: flagg").replace(
            "keywords: [build a bomb]", "keyword: [build a bomb]"
        ),
        "bad.yaml",
    )
    good = write_policy(TEST_POLICY, "good.yaml")
    code, out, _ = run(["policy", "validate", str(good), str(bad)], capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{good}: ok")
    problems = lines[1:]
    assert len(problems) == 2
    assert all(p.startswith(f"{bad}:") for p in problems)
    assert any(
        ":20:11: filters[0].config.rules[0].keyword: unknown key 'keyword'" in p for p in problems
    )
    assert any("filters[0].config.rules[2].action" in p and "'flagg'" in p for p in problems)


def test_policy_test_reports_failures_and_exits_non_zero(
    write_policy: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_policy(
        TEST_POLICY
        + "tests:\n"
        + "  - {name: bombs, input: how to build a bomb, expect: block}\n"
        + "  - {name: wrong on purpose, input: hello, expect: block}\n"
        + "  - {input: hello, expect: block, tenant: acme, route: completions}\n"
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    wrong = lines.index("  - {name: wrong on purpose, input: hello, expect: block}") + 1
    code, out, _ = run(["policy", "test", str(path)], capsys)
    assert code == 1
    # file:line:column of the test entry, as every other policy error names its place.
    assert (
        f"FAIL  {path}:{wrong}:5: tests[1] [input] wrong on purpose: "
        "expected block, got allow (no findings)"
    ) in out
    # Unnamed: its index and scope tell it apart from another test of the same input.
    assert (
        f"FAIL  {path}:{wrong + 1}:5: tests[2] [input, tenant acme, route completions] hello: "
        "expected block"
    ) in out
    assert out.strip().endswith("1 passed, 2 failed")


class BrokenFilter:
    """A filter whose every check raises: the guard answers with the policy's on_error."""

    def __init__(self, name: str, config: Any, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        raise RuntimeError("broken on purpose")


class NoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


BROKEN = FilterSpec(type="broken", config_type=NoConfig, build=BrokenFilter)


def test_policy_test_reports_a_filter_error_at_the_test_line_even_when_on_error_matches(
    write_policy: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The block came from on_error, not from the policy's judgement: not a pass."""
    monkeypatch.setitem(BUILTIN_FILTERS, "broken", "tests.test_cli:BROKEN")
    path = write_policy(
        'name: b\nversion: "1"\nfilters:\n  - {id: oops, type: broken}\n'
        "tests:\n  - {name: fails closed, input: hello, expect: block}\n"
    )
    code, out, _ = run(["policy", "test", str(path)], capsys)
    assert code == 1
    assert (
        f"ERROR {path}:6:5: tests[0] [input] fails closed: filter oops error (RuntimeError)" in out
    )
    assert out.strip().endswith("0 passed, 0 failed, 1 errored")


class SlowFilter:
    """A filter slower than its policy's timeout_ms, then allowing."""

    def __init__(self, name: str, config: Any, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        await asyncio.sleep(0.3)
        return Verdict()


SLOW = FilterSpec(type="slow", config_type=NoConfig, build=SlowFilter)


def test_policy_tests_check_decisions_not_the_policys_time_limits(
    write_policy: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow first model call on a busy CI machine must not be an ERROR."""
    monkeypatch.setitem(BUILTIN_FILTERS, "slow", "tests.test_cli:SLOW")
    path = write_policy(
        'name: s\nversion: "1"\ntimeout_ms: 50\nfilters:\n  - {id: lazy, type: slow}\n'
        "tests:\n  - {name: slow but fine, input: hello, expect: allow}\n"
    )
    code, out, _ = run(["policy", "test", str(path)], capsys)
    assert (code, out.strip().splitlines()[-1]) == (0, "1 passed, 0 failed")


def test_policy_test_reports_an_invalid_file_and_still_runs_the_others(
    write_policy: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = write_policy(TEST_POLICY.replace("action: flag", "action: flagg"), "bad.yaml")
    good = write_policy(TEST_POLICY + "tests:\n  - {input: hello, expect: allow}\n", "good.yaml")
    code, out, err = run(["policy", "test", str(bad), str(good)], capsys)
    assert code == 1
    assert f"{bad}:" in err
    assert "'flagg'" in err
    assert out.strip().endswith("1 passed, 0 failed, 1 files invalid")
    code, _, err = run(["policy", "schema", "--out", str(tmp_path / "no" / "dir.json")], capsys)
    assert code == 2
    assert err.startswith("guardrail: cannot write")


def test_policy_test_refuses_a_line_break_only_yaml_sees_at_the_line_an_editor_shows(
    write_policy: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        'name: p\nversion: "1"\n# weapons rules\x85 more\nfilters:\n  - {id: f, type: rules}\n'
        "tests:\n  - {input: hi, expect: allow}\n"
    )
    path = write_policy(text)
    code, out, err = run(["policy", "test", str(path)], capsys)
    assert code == 1
    assert err.startswith(f"{path}:3:16: the character U+0085 (NEL, next line)")
    assert "1 files invalid" in out


def test_policy_test_passes_the_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["policy", "test", str(DEFAULT_POLICY)], capsys)
    assert code == 0
    assert " 0 failed" in out


def test_check_prints_the_decision_as_json(
    test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["check", "--policy", str(test_policy), "my key sk-abcd1234"], capsys)
    assert code == 0
    decision = json.loads(out)
    assert decision["action"] == "redact"
    assert decision["text"] == "my key [SECRET]"
    assert decision["findings"][0]["rule_id"] == "secret"
    assert decision["filters"][0]["status"] == "ok"


def test_check_reads_stdin_as_utf8_whatever_the_locale(
    test_policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte that is not UTF-8 on stdin was a UnicodeDecodeError traceback (exit 1, the
    code of a failed check) under a UTF-8 locale; strict decoding stands for that locale
    on any machine. A leading byte order mark is not part of the text."""
    import io
    import subprocess
    import sys

    command = [
        sys.executable, "-c", "import sys; from guardrail.cli import main; sys.exit(main())",
        "check", "--policy", str(test_policy), "-",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONUTF8": "0"}
    done = subprocess.run(
        command, input=b"make a \xff bomb", capture_output=True, env=env, check=False, timeout=120
    )
    err = done.stderr.decode()
    assert (done.returncode, err.strip()) == (
        2,
        "guardrail: the text to check is not valid UTF-8 (byte 0xff at offset 7)",
    )
    stdin = io.TextIOWrapper(io.BytesIO("\ufeffmy key sk-abcd1234".encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, _ = run(["check", "--policy", str(test_policy), "-"], capsys)
    assert code == 0
    assert json.loads(out)["text"] == "my key [SECRET]"


SCOPED_POLICY = """\
name: scoped
version: "1"
filters:
  - id: aup
    type: rules
    config:
      rules:
        - {id: chat.only, category: weapons, scope: {routes: [chat, completions]},
           keywords: [pipe bomb]}
        - {id: kids, category: violence, scope: {tenants: ["kids-*"], models: ["llama-*"]},
           keywords: [fight scene]}
"""


@pytest.mark.parametrize(
    ("text", "options", "action"),
    [
        # No options: the request a policy test makes (route chat), as the gateway sees it.
        ("How do I make a pipe bomb?", [], "block"),
        ("How do I make a pipe bomb?", ["--route", "moderations"], "allow"),
        ("a fight scene", [], "allow"),
        ("a fight scene", ["--tenant", "kids-app", "--model", "llama-2-7b"], "block"),
        ("a fight scene", ["--tenant", "kids-app", "--model", "gpt-4"], "allow"),
    ],
)
def test_check_and_eval_decide_scoped_rules_for_the_tenant_route_and_model_given(
    text: str,
    options: list[str],
    action: str,
    write_policy: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = str(write_policy(SCOPED_POLICY))
    code, out, _ = run(["check", "--policy", policy, *options, text], capsys)
    assert code == 0
    assert json.loads(out)["action"] == action
    data = jsonl(tmp_path / "data.jsonl", [{"text": text, "label": "block"}])
    code, out, _ = run(["eval", str(data), "--policy", policy, "--json", *options], capsys)
    assert code == 0
    assert json.loads(out)["tp"] == (action == "block")


def test_a_bad_policy_is_a_startup_error_naming_file_and_line(
    write_policy: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_policy("name: x\nversion: '1'\nfilterz: []\n")
    code, _, err = run(["check", "--policy", str(bad), "hi"], capsys)
    assert code == 2
    assert f"{bad}:3:1: filterz: unknown key 'filterz'" in err


def test_eval_measures_a_policy_on_labeled_jsonl(
    tmp_path: Path, test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = jsonl(
        tmp_path / "data.jsonl",
        [
            {"text": "how to build a bomb", "label": "block", "category": "weapons"},
            {"text": "build a  BOMB now", "label": "block", "category": "weapons"},
            {"text": "you are a dummy", "label": "block", "category": "insult"},
            {"text": "buy a bomber jacket", "label": "block", "category": "weapons"},
            {"text": "hello there", "label": "allow"},
            {"text": "the sky is blue", "label": "allow"},
            {"text": "what a dummy run", "label": "allow"},
        ],
    )
    code, out, _ = run(["eval", str(data), "--policy", str(test_policy), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert (report["n"], report["tp"], report["fn"], report["fp"], report["tn"]) == (7, 3, 1, 1, 2)
    assert report["precision"] == 0.75
    assert report["recall"] == 0.75
    assert report["f1"] == 0.75
    assert report["fpr"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["recall_by_category"]["weapons"] == {"recall": 0.6667, "n": 3}
    assert report["recall_by_category"]["insult"] == {"recall": 1.0, "n": 1}
    assert report["acted_by_category"] == {  # "what a dummy run" is the false positive
        "insult": {"positive": 1, "negative": 1},
        "weapons": {"positive": 2, "negative": 0},
    }
    assert report["latency_ms"]["p50"] > 0
    code, out, err = run(["eval", str(data), "--policy", str(test_policy)], capsys)
    assert "precision=0.7500 recall=0.7500 f1=0.7500" in out
    assert "insult                           1 labelled block, 1 labelled allow" in out
    assert "7/7" in err  # the progress bar


def test_eval_names_the_line_of_a_malformed_row(
    tmp_path: Path, test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "allow"}\n{"text": "b", "label": "maybe"}\n')
    code, _, err = run(["eval", str(data), "--policy", str(test_policy)], capsys)
    assert code == 2
    assert f"{data}:2:" in err
    assert '"label" must be "allow" or "block"' in err


def test_schema_command_matches_the_committed_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "schema.json"
    code, _, _ = run(["policy", "schema", "--out", str(out_file)], capsys)
    assert code == 0
    assert out_file.read_text() == (ROOT / "policies" / "schema.json").read_text()


@pytest.mark.parametrize("value", ["3", "0", "1.5", "true", "false", '["weapons"]', '{"a": 1}'])
def test_an_eval_record_whose_category_is_not_a_string_is_an_error(
    tmp_path: Path, value: str
) -> None:
    """Never stringified into a category ("3", "True"): the file and line are named."""
    from guardrail.errors import ConfigError
    from guardrail.evaluation import read_dataset

    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"text": "a", "label": "allow", "category": "fine"}\n'
        f'{{"text": "b", "label": "block", "category": {value}}}\n'
    )
    with pytest.raises(ConfigError) as raised:
        read_dataset(data)
    assert str(raised.value) == f'{data}:2: "category" must be a string, got {json.loads(value)!r}'


@pytest.mark.parametrize(("value", "category"), [("null", None), ('""', None), ('"x"', "x")])
def test_a_null_or_empty_eval_category_means_none(
    tmp_path: Path, value: str, category: str | None
) -> None:
    from guardrail.evaluation import read_dataset

    data = tmp_path / "data.jsonl"
    data.write_text(f'{{"text": "a", "label": "block", "category": {value}}}\n')
    assert [e.category for e in read_dataset(data)] == [category]


def test_bad_inputs_and_paths_are_clear_errors_not_tracebacks(
    test_policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'\xff\xfe{"text": "a"}\n')
    code, _, err = run(["eval", str(binary), "--policy", str(test_policy)], capsys)
    assert (code, err.strip()) == (
        2,
        f"guardrail: {binary}: not UTF-8 text (byte 0xff at offset 0)",
    )
    context = tmp_path / "ctx.jsonl"
    context.write_text('{"text": "a", "label": "allow", "context": 7}\n')
    code, _, err = run(["eval", str(context), "--policy", str(test_policy)], capsys)
    assert code == 2
    assert '"context" must be a string or a list of strings' in err
    category = tmp_path / "cat.jsonl"
    category.write_text('{"text": "a", "label": "block", "category": ["weapons"]}\n')
    code, _, err = run(["eval", str(category), "--policy", str(test_policy)], capsys)
    assert code == 2
    assert f"{category}:1: \"category\" must be a string, got ['weapons']" in err
    code, _, err = run(["model", "prepare", "--cache-dir", "/proc/no/such"], capsys)
    assert code == 2
    assert err.startswith("guardrail: ")


@pytest.mark.parametrize("slashes", ["///", "////"])
def test_report_names_an_sqlite_file_by_its_path_not_the_dsn_remainder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], slashes: str
) -> None:
    missing = tmp_path / "no-audit.db"  # sqlite:////tmp/... was once shown as //tmp/...
    dsn = f"sqlite:{slashes}{str(missing).lstrip('/')}"
    code, _, err = run(["report", "--audit-dsn", dsn], capsys)
    assert code == 2
    assert f"no audit database at {missing} " in err


def test_startup_problems_are_exit_2_with_one_line_not_a_traceback(
    test_policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A config file that is not UTF-8 gave a UnicodeDecodeError traceback (exit 1).
    config = tmp_path / "bin.yaml"
    config.write_bytes(b"\xff\xfe")
    code, _, err = run(["report", "--config", str(config)], capsys)
    assert code == 2
    assert "is not UTF-8 text (byte 0xff at offset 0)" in err
    # Bench sizes under 1 ran the whole benchmark, then died dividing by zero.
    for flags in (["--runs", "0"], ["--concurrency", "0"], ["--seconds", "-1"]):
        with pytest.raises(SystemExit) as usage:
            main(["bench", "proxy", *flags])
        assert usage.value.code == 2
    assert "must be at least" in capsys.readouterr().err
    # A bad setting is not every policy file's fault: exit 2 once, files untouched.
    monkeypatch.setenv("GUARDRAIL_PORT", "abc")
    code, out, err = run(["policy", "test", str(test_policy)], capsys)
    assert code == 2
    assert "invalid settings" in err
    assert "files invalid" not in out + err


def test_serve_that_cannot_listen_exits_2(
    test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(
            [
                "serve",
                "--backend",
                "remote",
                "--backend-url",
                "http://127.0.0.1:9/v1",
                "--policy",
                str(test_policy),
                "--port",
                str(port),
            ],
            capsys,
        )
    assert code == 2  # uvicorn's own exit code was 3
    assert f"cannot listen on 127.0.0.1:{port}" in err


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_serve_with_an_audit_database_it_cannot_open_exits_2_before_loading_the_backend(
    test_policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """The audit database was first opened by the app's startup, after the model loaded,
    and serve blamed the port ("cannot listen on ..."): it is opened before the backend,
    and its problem is one line that never shows the DSN's password."""
    if kind == "postgres":
        pytest.importorskip("psycopg")
        dsn = f"postgresql://guardrail:s3cret-pw@127.0.0.1:{_closed_port()}/guardrail"
        where = "cannot open the audit log PostgresStore(127.0.0.1:"
    else:
        (tmp_path / "file").write_text("not a folder")  # no folder can be made under it
        dsn = str(tmp_path / "file" / "audit" / "audit.db")
        where = f"cannot open the audit log SQLiteStore('{dsn}'): "
    monkeypatch.setenv("GUARDRAIL_AUDIT_DSN", dsn)
    code, _, err = run(
        [
            "serve", "--backend", "remote", "--backend-url", "http://127.0.0.1:9/v1",
            "--policy", str(test_policy), "--port", str(_closed_port()),
        ],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "loading remote backend" not in err
    assert "cannot listen" not in err
    (line,) = [line for line in err.splitlines() if "audit" in line]
    assert line.startswith(f"guardrail: {where}")
    assert "s3cret-pw" not in err


def test_serve_whose_app_startup_fails_does_not_blame_the_port(
    test_policy: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn exits 3 both when it cannot bind and when the app's startup (its lifespan)
    fails: the second was reported as a port it could not listen on."""
    from guardrail.observability.audit import AuditLog

    async def fails(self: AuditLog) -> None:
        raise OSError("the database went away")

    monkeypatch.setattr(AuditLog, "start", fails)
    port = _closed_port()
    code, _, err = run(
        [
            "serve", "--backend", "remote", "--backend-url", "http://127.0.0.1:9/v1",
            "--policy", str(test_policy), "--port", str(port),
        ],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "guardrail: the gateway's startup failed before it listened" in err
    assert "cannot listen" not in err


def test_serve_checks_keys_and_tenant_policies_before_loading_the_model(
    test_policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key whose variable is not set, or a tenant's broken policy, stops ``serve`` at
    once: a local model may take minutes to load before they were looked at."""
    monkeypatch.delenv("CI_GATEWAY_KEY", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"backend: local\nmodel: {tmp_path / 'no-such-model'}\npolicy: {test_policy}\n"
        "api_keys: [{tenant: ci, key_env: CI_GATEWAY_KEY}]\n",
        encoding="utf-8",
    )
    code, _, err = run(["serve", "--config", str(config)], capsys)
    assert code == 2
    assert "CI_GATEWAY_KEY" in err
    assert "loading local backend" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\n", encoding="utf-8")
    # A tenant's policy, and the shadow policy (its typo was reported only after the
    # model had loaded).
    for setting in (f"tenants: {{acme: {{policy: {bad}}}}}", f"shadow_policy: {bad}"):
        config.write_text(
            f"backend: local\nmodel: {tmp_path / 'no-such-model'}\npolicy: {test_policy}\n"
            f"{setting}\n",
            encoding="utf-8",
        )
        code, _, err = run(["serve", "--config", str(config)], capsys)
        assert code == 2, setting
        assert f"{bad}:" in err
        assert "missing required key 'version'" in err
        assert "loading local backend" not in err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GUARDRAIL_AUDIT_DSN", "mysql://audit", "audit dsn scheme 'mysql' is not supported"),
        ("GUARDRAIL_GROUP_LEXICON", "{tmp}/groups.yaml", "cannot read group lexicon {tmp}"),
        (
            "GUARDRAIL_HARMFUL_RATE_RECENT_S",
            "1",
            "invalid settings: harmful_rate_recent_s (environment variable "
            "GUARDRAIL_HARMFUL_RATE_RECENT_S): harmful_rate_baseline_s (86400) may be at "
            "most 6666 times harmful_rate_recent_s (1)",
        ),
    ],
)
def test_serve_refuses_settings_the_gateway_cannot_use_before_loading_the_model(
    test_policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    """An audit DSN, a group lexicon or harmful-rate windows the gateway cannot use were
    refused only as the app was built, after a model that may take minutes had loaded."""
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    code, _, err = run(
        ["serve", "--model", str(tmp_path / "no-such-model"), "--policy", str(test_policy)],
        capsys,
    )
    assert code == 2
    assert message.format(tmp=tmp_path) in err
    assert "loading local backend" not in err


def test_serve_names_a_misspelt_variable_even_when_the_backend_then_fails(
    test_policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GUARDRAIL_BACKEND_URL (for ..._URLS) left the remote backend with no URL: startup
    failed in the backend, before the warning that names the misspelling was logged."""
    monkeypatch.setenv("GUARDRAIL_BACKEND_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("GUARDRAIL_AUDIT_DSN", "off")
    code, _, err = run(["serve", "--backend", "remote", "--policy", str(test_policy)], capsys)
    assert code == 2
    assert "needs backend_urls" in err
    warned = [json.loads(line) for line in err.splitlines() if "unknown_setting_variable" in line]
    assert [(w["variable"], w["did_you_mean"]) for w in warned] == [
        ("GUARDRAIL_BACKEND_URL", "GUARDRAIL_BACKEND_URLS")
    ]


def test_serve_with_a_filter_that_does_not_build_exits_2_naming_its_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pii filter whose encryption key variable is not set: ``serve`` printed a
    traceback and exited 1; it reports the entry as ``file:line:column: key:`` and
    exits 2, as for any other bad policy."""
    monkeypatch.delenv("CI_UNSET_AES_KEY", raising=False)
    policy = tmp_path / "pii.yaml"
    policy.write_text(
        'name: enc\nversion: "1"\nfilters:\n  - id: pii\n    type: pii\n    config:\n'
        "      encrypt_key_env: CI_UNSET_AES_KEY\n"
        "      entities: {EMAIL_ADDRESS: {input: redact, operator: encrypt}}\n",
        encoding="utf-8",
    )
    code, _, err = run(
        [
            "serve", "--backend", "remote", "--backend-url", "http://127.0.0.1:9/v1",
            "--policy", str(policy), "--port", "9",
        ],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert f"{policy}:4:5: filters[0]: filter 'pii' (pii) does not build: " in err
    assert "CI_UNSET_AES_KEY is not set" in err
    assert "Traceback" not in err


def test_serve_ignores_a_sighup_from_its_start_until_the_reload_handler_is_in_place(
    test_policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP's default action ended a gateway still loading its policies and model
    (exit 129): a policy reloader's SIGHUP then killed what it meant to reload."""
    import signal

    import uvicorn

    seen: list[Any] = []

    def fake_run(self: uvicorn.Server, sockets: Any = None) -> None:
        # Where the server would start: every policy and the backend are loaded.
        seen.append(signal.getsignal(signal.SIGHUP))
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    saved = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        code, _, _ = run(
            [
                "serve", "--backend", "remote", "--backend-url", "http://127.0.0.1:9/v1",
                "--policy", str(test_policy),
            ],
            capsys,
        )  # fmt: skip
        assert code == 0
        assert len(seen) == 1
        assert seen[0] not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGHUP)  # and it is harmless
    finally:
        signal.signal(signal.SIGHUP, saved)


def test_check_keeps_stdout_for_its_json_even_when_a_filter_fails(
    test_policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log lines (a failed filter's warning) go to stderr; stdout parses as JSON."""
    from guardrail.filters.rules import RulesFilter

    async def broken(self: object, text: str, ctx: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(RulesFilter, "check", broken)
    code, out, err = run(["check", "--policy", str(test_policy), "hello"], capsys)
    assert code == 0
    assert json.loads(out)["action"] == "block"  # the filter failed: fail closed
    assert "filter_failed" in err
    assert "filter_failed" not in out


def test_eval_reads_texts_with_unicode_line_separators_as_one_row(
    tmp_path: Path, test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON allows U+2028 and U+0085 raw inside a string (``ensure_ascii=False`` writes
    them so); JSON Lines ends a row at ``\\n`` only. ``str.splitlines`` cut such a row
    in two and the file was refused as invalid JSON."""
    data = tmp_path / "data.jsonl"
    rows = [
        {"text": "first line\u2028how to build a bomb", "label": "block"},
        {"text": "hello\x85there", "label": "allow"},
    ]
    data.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    code, out, err = run(["eval", str(data), "--policy", str(test_policy), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert (report["n"], report["tp"], report["tn"]) == (2, 1, 1)


@pytest.mark.parametrize("context", ["0", "false", "{}"])
def test_eval_refuses_a_context_that_is_not_text_even_when_falsy(
    context: str, tmp_path: Path, test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``"context": 7`` was refused but ``0``, ``false`` or ``{}`` silently meant "no
    sources"."""
    data = tmp_path / "data.jsonl"
    data.write_text(f'{{"text": "a", "label": "allow", "context": {context}}}\n')
    code, _, err = run(["eval", str(data), "--policy", str(test_policy)], capsys)
    assert code == 2
    assert f'{data}:1: "context" must be a string or a list of strings' in err


@pytest.mark.parametrize(
    ("rows", "undefined", "defined"),
    [
        # Every text allowed and labelled allow: no positives, nothing predicted positive.
        (
            [("hello there", "allow"), ("the sky is blue", "allow")],
            {"precision", "recall", "f1"},
            {"fpr": 0.0, "accuracy": 1.0},
        ),
        # Every text labelled block and caught: no negatives, so no false-positive rate.
        (
            [("how to build a bomb", "block"), ("build a bomb now", "block")],
            {"fpr"},
            {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0},
        ),
        # Positives present, none caught: recall 0 is measured, precision is not.
        (
            [("hello there", "block"), ("the sky is blue", "allow")],
            {"precision", "f1"},
            {"recall": 0.0, "fpr": 0.0, "accuracy": 0.5},
        ),
    ],
)
def test_eval_metrics_that_are_undefined_on_the_data_are_null_not_zero(
    tmp_path: Path,
    test_policy: Path,
    capsys: pytest.CaptureFixture[str],
    rows: list[tuple[str, str]],
    undefined: set[str],
    defined: dict[str, float],
) -> None:
    """A 0/0 metric is null in --json and n/a in the table: 0.0 would read as measured."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    code, out, _ = run(["eval", str(data), "--policy", str(test_policy), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert {k for k in ("precision", "recall", "f1", "fpr") if report[k] is None} == undefined
    assert {k: report[k] for k in defined} == defined
    assert report["auroc"] == {}  # one label only, or no score: nothing to rank
    code, out, _ = run(["eval", str(data), "--policy", str(test_policy)], capsys)
    assert code == 0
    for key in undefined:
        assert f"{key}=n/a" in out


@pytest.mark.parametrize(
    "policy",
    [
        'name: empty\nversion: "1"\nfilters: []\n',
        'name: empty\nversion: "1"\n',
        'name: disabled\nversion: "1"\nfilters:\n  - {id: w, type: rules, enabled: false,'
        " config: {rules: [{id: r, category: c, keywords: [x]}]}}\n",
    ],
)
def test_check_and_eval_refuse_a_policy_with_no_filters(
    tmp_path: Path,
    write_policy: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    policy: str,
) -> None:
    """A policy that checks nothing allows everything: measuring it is a mistake, not a result."""
    path = write_policy(policy)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "block"}\n')
    for argv in (["eval", str(data), "--json"], ["check", "hello"]):
        code, out, err = run([*argv, "--policy", str(path)], capsys)
        assert (code, out) == (2, "")
        assert err.strip() == f"guardrail: {path}: the policy has no enabled filters"
    # Valid all the same (the proxy benchmark uses one), but said on stderr.
    code, out, err = run(["policy", "validate", str(path)], capsys)
    assert code == 0
    assert "0 filters" in out
    assert "no enabled filters: every text is allowed" in err


class PartlyBrokenFilter:
    """Blocks texts with "bad" in them and raises on texts with "boom"."""

    def __init__(self, name: str, config: Any, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        if "boom" in text:
            raise RuntimeError("broken on purpose")
        if "bad" in text:
            return Verdict(Action.BLOCK, (Finding("bad", 1.0),))
        return Verdict()


PARTLY = FilterSpec(type="partly", config_type=NoConfig, build=PartlyBrokenFilter)


def test_eval_leaves_out_and_counts_the_examples_a_filter_failed_on(
    write_policy: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Their block came from on_error: counted as detections, it had made a policy that
    fails on everything look perfect."""
    monkeypatch.setitem(BUILTIN_FILTERS, "partly", "tests.test_cli:PARTLY")
    monkeypatch.setitem(BUILTIN_FILTERS, "slow", "tests.test_cli:SLOW")
    path = write_policy(
        'name: p\nversion: "1"\ntimeout_ms: 50\n'
        "filters:\n  - {id: oops, type: partly}\n  - {id: lazy, type: slow}\n"
    )
    data = jsonl(
        tmp_path / "data.jsonl",
        [
            {"text": "a bad thing", "label": "block"},
            {"text": "boom", "label": "block"},
            {"text": "boom boom", "label": "allow"},
            {"text": "a fine thing", "label": "allow"},
        ],
    )
    code, out, err = run(["eval", str(data), "--policy", str(path), "--json"], capsys)
    assert code == 1
    report = json.loads(out)
    counts = [report[k] for k in ("n", "errors", "tp", "fp", "tn", "fn")]
    assert counts == [4, 2, 1, 0, 1, 0]
    assert report["errors_by_filter"] == {"oops": 2}
    assert (report["precision"], report["recall"], report["fpr"]) == (1.0, 1.0, 0.0)
    assert "filter_error" not in report["auroc"]
    assert "2 of 4 examples were left out" in err
    # The slow filter (300 ms against the policy's 50) is waited for, not an error.
    code, out, _ = run(["eval", str(data), "--policy", str(path)], capsys)
    assert code == 1
    assert (
        "errors=2: left out of every number here (a filter failed or timed out on them: oops 2)"
        in out
    )


def test_eval_reads_a_file_that_starts_with_a_byte_order_mark(
    tmp_path: Path, test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "how to build a bomb", "label": "block"}\n')
    code, out, _ = run(["eval", str(data), "--policy", str(test_policy), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["tp"] == 1


def test_eval_names_the_line_of_json_nested_too_deeply(
    tmp_path: Path, test_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "allow"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err = run(["eval", str(data), "--policy", str(test_policy)], capsys)
    assert code == 2
    assert f"{data}:2: not valid JSON: nested too deeply" in err


def test_auroc_of_scores_with_a_nan_is_nan_not_a_hang() -> None:
    from guardrail.evaluation import auroc

    assert math.isnan(auroc([0.9, float("nan")], [0.1]))
    assert math.isnan(auroc([0.9], [float("inf")]))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_bench_numbers_must_be_finite(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--seconds nan`` passed the lower-bound check and the benchmark never ended."""
    for option in ("--seconds", "--latency-ms"):
        with pytest.raises(SystemExit) as raised:
            main(["bench", "proxy", f"{option}={value}"])
        assert raised.value.code == 2
        assert "must be a finite number" in capsys.readouterr().err


def test_a_reader_that_leaves_the_pipe_is_not_a_file_error(
    tmp_path: Path, test_policy: Path
) -> None:
    """``guardrail eval ... --json | head -1``: it had said "guardrail: Broken pipe"."""
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello", "label": "allow"}\n')
    command = [
        sys.executable, "-c", "import sys; from guardrail.cli import main; sys.exit(main())",
        "eval", str(data), "--policy", str(test_policy), "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # gone before the report is written
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Broken pipe" not in err
    assert "Traceback" not in err


def test_validate_shows_a_policy_s_warnings_on_stderr_and_passes(
    write_policy: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_policy(
        'name: p\nversion: "1"\nfilters:\n  - id: aup\n    type: rules\n    config:\n'
        "      rules:\n        - {id: poison, category: drugs, keywords: [毒]}\n"
    )
    code, out, err = run(["policy", "validate", str(path)], capsys)
    assert code == 0
    assert f"{path}: ok" in out
    assert err.startswith(f"guardrail: warning: {path}:8:")
    assert "filters[0].config.rules[0].keywords[0]: the one-character keyword '毒'" in err


def test_serve_leaves_the_startup_heap_out_of_the_collector_while_it_serves(
    test_policy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The models and policies built at startup live as long as the process, yet every
    full garbage collection walked them all (296 ms with the embedded model, the GIL
    held: a pause of every request). While serving they are frozen; after, they are not."""
    import gc

    import uvicorn

    frozen_while_serving: list[int] = []

    def serve(self: uvicorn.Server) -> None:
        frozen_while_serving.append(gc.get_freeze_count())
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    argv = ["serve", "--backend", "remote", "--backend-url", "http://127.0.0.1:9/v1"]
    code, _, _ = run([*argv, "--policy", str(test_policy)], capsys)
    assert code == 0
    (frozen,) = frozen_while_serving
    assert frozen > 10_000  # the app, its policy and the libraries' objects
    assert gc.get_freeze_count() == 0
