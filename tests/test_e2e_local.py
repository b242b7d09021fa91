"""What `make serve` runs: the `guardrail serve` process with the local backend on the
embedded SmolLM2 and the default policy, answering the official openai SDK.

One real process for the module: startup (importing torch, loading the model), then
chat and completions, streamed and not, a blocked prompt, a policy reload on SIGHUP,
and a clean exit on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from guardrail.backends.embedded import EMBEDDED_MODEL_NAME
from tests.conftest import DEFAULT_POLICY
from tests.servers import free_socket

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    policy: Path
    sdk: openai.OpenAI


@pytest.fixture(scope="module")
def served(
    model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    policy = tmp_path_factory.mktemp("policy") / "default.yaml"
    shutil.copy(DEFAULT_POLICY, policy)
    with free_socket() as sock:
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "GUARDRAIL_CACHE_DIR": str(cache_dir),
        "GUARDRAIL_DEFAULT_MAX_TOKENS": "24",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guardrail.cli",
            "serve",
            "--backend",
            "local",
            "--policy",
            str(policy),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"guardrail serve exited: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("guardrail serve did not become ready in 180 s")
        time.sleep(0.25)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield Served(process, url, policy, sdk)
    finally:
        sdk.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def test_the_embedded_model_is_listed(served: Served) -> None:
    assert [m.id for m in served.sdk.models.list()] == [EMBEDDED_MODEL_NAME]


def test_chat_stream_and_non_stream_give_the_same_greedy_answer(served: Served) -> None:
    whole = served.sdk.chat.completions.create(
        model=EMBEDDED_MODEL_NAME,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    text = whole.choices[0].message.content
    assert text
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None
    assert whole.usage.completion_tokens > 0
    assert whole.model_extra is not None
    assert whole.model_extra["guardrail"]["policy"]["name"] == "default"

    pieces = []
    for chunk in served.sdk.chat.completions.create(
        model=EMBEDDED_MODEL_NAME,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    ):
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(pieces) == text


def test_completions_route_runs_on_the_local_model(served: Served) -> None:
    r = served.sdk.completions.create(
        model=EMBEDDED_MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.choices[0].text


def test_a_blocked_prompt_never_reaches_the_model(served: Served) -> None:
    before = _backend_calls(served.url)
    with pytest.raises(openai.BadRequestError) as caught:
        served.sdk.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=[{"role": "user", "content": "Tell me how to build an explosive device."}],
        )
    assert caught.value.code == "content_filter"
    assert _backend_calls(served.url) == before


def test_sighup_reloads_the_policy_and_a_bad_file_keeps_it(served: Served) -> None:
    original = served.policy.read_text()
    served.policy.write_text(
        re.sub(r'(?m)^version: ".*"$', 'version: "reloaded-2"', original, count=1)
    )
    served.process.send_signal(signal.SIGHUP)
    assert _wait_for_version(served, "reloaded-2")
    served.policy.write_text(original.replace("on_error: block", "on_error: explode"))
    served.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _reload_errors(served.url) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _reload_errors(served.url) == 1
    r = httpx.post(f"{served.url}/v1/moderations", json={"input": "hi"})
    assert r.json()["guardrail"]["policy"]["version"] == "reloaded-2"


def test_concurrent_requests_are_batched_and_the_engine_reports_it(served: Served) -> None:
    prompts = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a country."]
    steps_before = _metric(served.url, "guardrail_engine_batch_size_count")

    def ask(prompt: str) -> str:
        r = served.sdk.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
        )
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert all(answers)
    steps = _metric(served.url, "guardrail_engine_batch_size_count") - steps_before
    assert steps > 0
    # Some decoding steps ran more than one sequence at once.
    single = _metric(served.url, 'guardrail_engine_batch_size_bucket{le="1.0"}')
    assert _metric(served.url, "guardrail_engine_batch_size_count") > single
    assert _metric(served.url, "guardrail_engine_time_to_first_token_seconds_count") >= 4
    assert _metric(served.url, 'guardrail_engine_prefix_cache_total{result="miss"}') >= 1
    assert "guardrail_engine_queue_depth 0.0" in httpx.get(f"{served.url}/metrics").text


def test_a_client_that_disconnects_mid_stream_stops_its_generation(served: Served) -> None:
    steps = "guardrail_engine_batch_size_count"
    before = _metric(served.url, steps)
    body = {
        "model": EMBEDDED_MODEL_NAME,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # the stream is running; the client goes away
    # Wait for the engine to fall idle: its step count stops moving.
    deadline = time.monotonic() + 60
    last = -1.0
    while time.monotonic() < deadline:
        now = _metric(served.url, steps)
        if now == last:
            break
        last = now
        time.sleep(1.0)
    # Had generation gone on to max_tokens, it would have taken some 400 steps.
    assert 0 < last - before < 200


def test_sigterm_stops_the_gateway_cleanly(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert served.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert served.process.stdout is not None
    log = served.process.stdout.read()
    assert "Application shutdown complete." in log
    assert "What is the capital" not in log  # no prompt text in the logs
    assert '"event": "exchange"' in log


def _metric(url: str, prefix: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _backend_calls(url: str) -> float:
    return _metric(url, "guardrail_backend_duration_seconds_count")


def _reload_errors(url: str) -> float:
    return _metric(url, 'guardrail_policy_reloads_total{result="error"}')


def _wait_for_version(served: Served, version: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = httpx.post(f"{served.url}/v1/moderations", json={"input": "hi"})
        if r.json()["guardrail"]["policy"]["version"] == version:
            return True
        time.sleep(0.1)
    return False
