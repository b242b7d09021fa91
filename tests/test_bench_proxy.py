"""``guardrail bench proxy --json``: one object with the documented keys (a short run)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guardrail.cli import main


@pytest.mark.slow
def test_bench_proxy_json_prints_one_object_with_the_documented_keys(
    test_policy: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Where the operator's audit log would be: the benchmark's gateways must not write it.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    code = main(
        [
            "bench", "proxy", "--json", "--policy", str(test_policy),
            "--seconds", "0.5", "--runs", "1", "--concurrency", "2",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "added_p50_ms_no_filters",
        "added_p99_ms_no_filters",
        "throughput_ratio_no_filters",
        "added_p50_ms_default_policy",
    ):
        assert isinstance(report[key], float), key
    assert report["phases"]["no_filters"]["errors"] == 0
    assert report["phases"]["default_policy"]["errors"] == 0
    assert report["throughput_ratio_no_filters"] > 0
    assert not (tmp_path / "guardrail").exists()


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (read from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_terminated_benchmark_stops_its_servers_and_removes_its_folder(
    test_policy: Path, tmp_path: Path
) -> None:
    """``timeout`` and a cancelled CI job send SIGTERM: it had ended the benchmark with no
    cleanup, its three servers left running and its temporary folder left behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "XDG_DATA_HOME": str(tmp_path)}
    command = [
        sys.executable, "-c", "import sys; from guardrail.cli import main; sys.exit(main())",
        "bench", "proxy", "--policy", str(test_policy), "--seconds", "60", "--runs", "1",
    ]  # fmt: skip
    bench = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    servers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(servers := _children(bench.pid)) < 3:
            assert bench.poll() is None, "the benchmark ended before its servers started"
            assert time.monotonic() < deadline, "its servers never started"
            time.sleep(0.2)
        time.sleep(1.0)  # into the measuring
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        for pid in servers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert list(temp.iterdir()) == []
    finally:
        for pid in servers | _children(bench.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        bench.kill()
        bench.wait()


def test_a_benchmark_server_that_fails_to_start_says_why(test_policy: Path) -> None:
    """Its stderr had gone to /dev/null: the user read only "exited early (code 1)"."""
    from guardrail.bench_proxy import _process
    from guardrail.errors import GuardrailError

    args = ["--role", "gateway", "--upstream", "http://127.0.0.1:9/v1"]
    with pytest.raises(GuardrailError) as raised, _process([*args, "--policy", "/nowhere.yaml"], 9):
        pass
    message = str(raised.value)
    assert "a benchmark process (gateway) exited early (code 1); it said:" in message
    assert "/nowhere.yaml:1:1: cannot read the policy file" in message


def test_the_benchmark_gateway_finds_models_as_the_settings_say_and_takes_nothing_else(
    tmp_path: Path,
) -> None:
    """Its gateway was built from defaults: GUARDRAIL_CACHE_DIR, ..._ALLOW_DOWNLOADS and
    ..._EMBEDDING_PRECISION were ignored, so its filters loaded other models, or none."""
    from guardrail.bench_proxy import gateway_settings

    environ = {
        "GUARDRAIL_CACHE_DIR": str(tmp_path),
        "GUARDRAIL_ALLOW_DOWNLOADS": "true",
        "GUARDRAIL_EMBEDDING_PRECISION": "fp32",
        # The operator's keys and limits would refuse or slow the benchmark's requests.
        "GUARDRAIL_API_KEYS": "sk-operator=ops",
        "GUARDRAIL_RATE_LIMIT_REQUESTS_PER_MINUTE": "1",
    }
    settings = gateway_settings(9, "http://127.0.0.1:8/v1", "p.yaml", "off", environ=environ)
    assert (settings.cache_path, settings.allow_downloads, settings.embedding_precision) == (
        tmp_path,
        True,
        "fp32",
    )
    assert (settings.api_keys, settings.rate_limit_requests_per_minute) == ([], 0)
    assert (settings.backend_urls, settings.port, settings.audit_dsn) == (
        ["http://127.0.0.1:8/v1"],
        9,
        "off",
    )
