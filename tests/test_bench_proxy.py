"""``guardrail bench proxy --json``: one object with the documented keys (a short run)."""

from __future__ import annotations

import json
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
