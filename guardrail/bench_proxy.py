"""``guardrail bench proxy``: what the gateway adds to a call, in latency and throughput.

One run measures, against the same fake OpenAI upstream (a fixed simulated model
latency, 20 ms by default):

- **direct**: clients call the upstream itself;
- **no filters**: clients call a gateway (``--backend remote``) whose policy has no filters;
- **default policy**: the same with ``policies/default.yaml``.

Each of the three runs in its own process (upstream, two gateways) so that the load
generator, a small keep-alive HTTP/1.1 client of its own, does not share an event loop
with what it measures. ``--concurrency`` clients send non-streaming chat completions
back to back for ``--seconds`` per phase; the phases are interleaved and repeated
``--runs`` times, and the report is the median over runs. *Added* latency is the
gateway's percentile minus the direct percentile; the throughput ratio is gateway
requests per second over direct requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from guardrail.errors import GuardrailError

if TYPE_CHECKING:
    from guardrail.settings import Settings

NO_FILTERS_POLICY = 'name: no-filters\nversion: "1"\nfilters: []\n'
# Every request and every answer is a different text (a number in it), as in real traffic:
# the gateway caches verdicts and embeddings by text, and one text sent again and again
# would measure those caches, not the filters.


def answer_body(n: int) -> bytes:
    """The fake upstream's completion; ``n`` makes each answer's text its own."""
    return json.dumps(
        {
            "id": f"bench-{n}",
            "object": "chat.completion",
            "created": 0,
            "model": "bench-model",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": f"Paris is the capital of France (answer {n}).",
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
        }
    ).encode()


def request_body(tag: str) -> bytes:
    """A chat request whose question carries ``tag``, so no two are the same text."""
    return json.dumps(
        {
            "model": "bench-model",
            "max_tokens": 32,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": f"What is the capital of France? Answer in one line. ({tag})",
                },
            ],
        }
    ).encode()


RESPONSE_TIMEOUT_S = 30.0
MODELS = json.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model"}]}).encode()


# --- the fake upstream: a minimal HTTP/1.1 server, cheap so it never is the bottleneck ---


class _Upstream(asyncio.Protocol):
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            self.answered += 1
            body = MODELS if head.startswith("GET") else answer_body(self.answered)
            asyncio.get_running_loop().call_later(self.latency_s, self._answer, body)

    def _answer(self, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )


async def _serve_upstream(port: int, latency_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Upstream(latency_s), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def gateway_settings(
    port: int,
    upstream: str,
    policy: str,
    audit_dsn: str,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The settings of a benchmark gateway: its own, but the filters' models found and
    run as the operator's settings say (``GUARDRAIL_CACHE_DIR``, ``..._ALLOW_DOWNLOADS``,
    ``..._EMBEDDING_PRECISION``), as for ``guardrail serve``. Nothing else is taken: the
    operator's API keys or rate limits would refuse or slow the benchmark's requests."""
    from guardrail.settings import Settings, load_settings

    operator = load_settings(environ=environ)
    # Audited as it serves, into the benchmark's own database: never the operator's audit
    # log, which tens of thousands of synthetic exchanges per run would fill.
    return Settings(
        policy=policy,
        backend="remote",
        backend_urls=[upstream],
        models=["bench-model"],
        port=port,
        audit_dsn=audit_dsn,
        cache_dir=str(operator.cache_path),
        allow_downloads=operator.allow_downloads,
        embedding_precision=operator.embedding_precision,
    )


def _serve_gateway(port: int, upstream: str, policy: str, audit_dsn: str) -> None:
    import uvicorn

    from guardrail.app import build_backend, create_app, frozen_heap
    from guardrail.observability.logging import configure_logging

    # Logged as `guardrail serve` logs (one JSON line per exchange); stderr is discarded.
    settings = gateway_settings(port, upstream, policy, audit_dsn)
    configure_logging(settings.log_level, settings.log_format, log_text=False)
    app = create_app(settings, backend=build_backend(settings))
    with frozen_heap():  # as `guardrail serve` runs
        uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)


# --- the load generator --------------------------------------------------------------------


async def _one_client(
    client: int,
    port: int,
    path: str,
    *,
    deadline: float,
    warmup_until: float,
    latencies: list[float],
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request_head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        "authorization: Bearer bench\r\ncontent-length: "
    ).encode()
    errors = 0
    sent = 0
    try:
        while True:
            sent += 1
            body = request_body(f"{port} {client} {sent}")
            started = time.perf_counter()
            if started >= deadline:
                return errors
            writer.write(request_head + str(len(body)).encode() + b"\r\n\r\n" + body)
            try:
                # A target that stops answering is an error, never a benchmark that hangs.
                async with asyncio.timeout(RESPONSE_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    await reader.readexactly(length)
            except TimeoutError:
                return errors + 1
            if status != 200:
                errors += 1
            elif started >= warmup_until:
                latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


@dataclass(frozen=True, slots=True)
class Phase:
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


async def _phase(port: int, path: str, concurrency: int, seconds: float) -> Phase:
    latencies: list[float] = []
    start = time.perf_counter()
    warmup_until = start + min(1.0, seconds / 5)
    deadline = warmup_until + seconds
    errors = await asyncio.gather(
        *(
            _one_client(
                i, port, path, deadline=deadline, warmup_until=warmup_until, latencies=latencies
            )
            for i in range(concurrency)
        )
    )
    latencies.sort()
    n = len(latencies)
    return Phase(
        p50_ms=latencies[n // 2] * 1000 if n else float("nan"),
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan"),
        rps=n / seconds,
        errors=sum(errors),
    )


# --- orchestration -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(
    port: int, proc: subprocess.Popen[bytes], log: IO[bytes], role: str, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            said = ("; it said:\n  " + "\n  ".join(tail)) if tail else ""
            raise GuardrailError(
                f"a benchmark process ({role}) exited early (code {proc.returncode}){said}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:g}s")


@contextmanager
def _process(args: list[str], port: int) -> Iterator[None]:
    # Its stderr is kept (not read while it runs) so a start that fails says why.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guardrail.bench_proxy", *args, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            _wait_for(port, proc, log, args[1])
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(
    *,
    policy: str,
    latency_ms: float = 20.0,
    concurrency: int = 8,
    seconds: float = 5.0,
    runs: int = 3,
) -> dict[str, Any]:
    """Run the benchmark; the result as a JSON-ready dict.

    A SIGTERM (``timeout``, a cancelled CI job, ``kill``) ends it as Ctrl-C does, through
    the cleanup: by default it ended the process at once, leaving the three servers
    running and the temporary folder behind.
    """
    with _terminated_as_exit():
        return _run(policy, latency_ms, concurrency, seconds, runs)


@contextmanager
def _terminated_as_exit() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers are the main thread's alone
        return

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    policy: str, latency_ms: float, concurrency: int, seconds: float, runs: int
) -> dict[str, Any]:
    up_port, plain_port, default_port = _free_port(), _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        no_filters = Path(tmp) / "no-filters.yaml"
        no_filters.write_text(NO_FILTERS_POLICY, encoding="utf-8")
        upstream = f"http://127.0.0.1:{up_port}/v1"
        gateway = ["--role", "gateway", "--upstream", upstream]

        def audit(name: str) -> list[str]:
            return ["--audit-dsn", f"sqlite:///{Path(tmp).resolve() / name}"]

        with (
            _process(["--role", "upstream", "--latency-ms", str(latency_ms)], up_port),
            _process([*gateway, *audit("plain.db"), "--policy", str(no_filters)], plain_port),
            _process([*gateway, *audit("default.db"), "--policy", policy], default_port),
        ):
            targets = {
                "direct": up_port,
                "no_filters": plain_port,
                "default_policy": default_port,
            }
            results: dict[str, list[Phase]] = {name: [] for name in targets}
            for _ in range(runs):
                for name, port in targets.items():
                    phase = asyncio.run(_phase(port, "/v1/chat/completions", concurrency, seconds))
                    results[name].append(phase)

    def med(name: str, field: str) -> float:
        return float(statistics.median(getattr(p, field) for p in results[name]))

    direct_p50, direct_p99, direct_rps = (
        med("direct", "p50_ms"),
        med("direct", "p99_ms"),
        med("direct", "rps"),
    )
    report: dict[str, Any] = {
        "added_p50_ms_no_filters": round(med("no_filters", "p50_ms") - direct_p50, 3),
        "added_p99_ms_no_filters": round(med("no_filters", "p99_ms") - direct_p99, 3),
        "throughput_ratio_no_filters": round(med("no_filters", "rps") / direct_rps, 4),
        "added_p50_ms_default_policy": round(med("default_policy", "p50_ms") - direct_p50, 3),
        "added_p99_ms_default_policy": round(med("default_policy", "p99_ms") - direct_p99, 3),
        "throughput_ratio_default_policy": round(med("default_policy", "rps") / direct_rps, 4),
        "phases": {
            name: {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(p).items()}
            for name, phases in results.items()
            for p in [
                Phase(
                    med(name, "p50_ms"),
                    med(name, "p99_ms"),
                    med(name, "rps"),
                    sum(x.errors for x in phases),
                )
            ]
        },
        "config": {
            "upstream_latency_ms": latency_ms,
            "concurrency": concurrency,
            "seconds_per_phase": seconds,
            "runs": runs,
            "policy": policy,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    return report


def format_table(report: dict[str, Any]) -> str:
    phases = report["phases"]
    direct = phases["direct"]
    lines = [
        "| target | p50 ms | p99 ms | req/s | added p50 ms | added p99 ms | throughput ratio "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("direct", "upstream directly"),
        ("no_filters", "gateway, no filters"),
        ("default_policy", "gateway, default policy"),
    ):
        p = phases[name]
        added = (
            ("—", "—", "—")
            if name == "direct"
            else (
                f"{p['p50_ms'] - direct['p50_ms']:.2f}",
                f"{p['p99_ms'] - direct['p99_ms']:.2f}",
                f"{p['rps'] / direct['rps']:.3f}",
            )
        )
        lines.append(
            f"| {label} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['rps']:.0f} | "
            f"{added[0]} | {added[1]} | {added[2]} | {p['errors']} |"
        )
    c, m = report["config"], report["machine"]
    lines.append("")
    lines.append(
        f"{report['date']}, {m['cpus']} CPUs, Python {m['python']}; upstream latency "
        f"{c['upstream_latency_ms']:g} ms, {c['concurrency']} clients, "
        f"{c['seconds_per_phase']:g} s per phase, median of {c['runs']} runs"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the helper processes (``python -m guardrail.bench_proxy --role ...``)."""
    parser = argparse.ArgumentParser(prog="guardrail.bench_proxy")
    parser.add_argument("--role", choices=["upstream", "gateway"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--upstream")
    parser.add_argument("--policy")
    parser.add_argument("--audit-dsn", default="off")
    args = parser.parse_args(argv)
    try:
        if args.role == "upstream":
            asyncio.run(_serve_upstream(args.port, args.latency_ms / 1000))
        else:
            _serve_gateway(args.port, args.upstream, args.policy, args.audit_dsn)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
