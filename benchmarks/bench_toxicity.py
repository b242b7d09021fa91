"""Benchmark the toxicity filter: latency alone and under 32 concurrent requests,
micro-batched vs one-by-one.

    .venv/bin/python benchmarks/bench_toxicity.py [--runs 5] [--requests 256]
        [--precision auto|fp32|bf16] [--json]

Each text is about 100 tokens. "one-by-one" is the same filter with ``max_batch: 1``.
``--precision`` is the sentence encoder's, as the gateway's ``embedding_precision``
setting (``auto``: bf16 where the CPU has native bf16, else fp32).
Reported: p50 added latency per text with one request at a time, p50 latency and
throughput (texts/s) with 32 concurrent requests; medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.filters.embedder import resolve_precision  # noqa: E402
from guardrail.filters.toxicity import ToxicityConfig, ToxicityFilter  # noqa: E402
from guardrail.guard.filter import BuildContext, SharedResources  # noqa: E402
from guardrail.guard.types import FilterContext  # noqa: E402

BASE = (
    "The committee met on Tuesday to review the quarterly budget, and after a long "
    "discussion about travel costs, software licences and the new office lease, the "
    "members agreed to postpone the decision until the auditors had finished their "
    "report, which is expected early next month along with revised figures for "
    "staffing, training and equipment across all three regional branches of the firm"
)


_issued = 0


def texts(n: int) -> list[str]:
    """Texts of about 100 tokens each, never the same twice in a process.

    The gateway caches embeddings by text (``CachingModel``): a text measured twice
    would measure the cache, not the filter.
    """
    global _issued
    first, _issued = _issued, _issued + n
    return [f"Note {first + i}: {BASE}." for i in range(n)]


async def _alone(filt: ToxicityFilter, items: list[str]) -> list[float]:
    out = []
    for i, text in enumerate(items):
        started = time.perf_counter()
        await filt.check(text, FilterContext(f"b{i}"))
        out.append(time.perf_counter() - started)
    return out


async def _concurrent(
    filt: ToxicityFilter, items: list[str], concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(reversed(items))

    async def client() -> None:
        while queue:
            text = queue.pop()
            started = time.perf_counter()
            await filt.check(text, FilterContext("c"))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, len(items) / (time.perf_counter() - started)


def run(runs: int, requests: int, concurrency: int, precision: str = "auto") -> dict[str, Any]:
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(4) as executor:
        resources = SharedResources()
        env = BuildContext(executor, resources=resources, embedding_precision=precision)
        modes = {
            "micro-batched": ToxicityFilter("t", ToxicityConfig(max_batch=32, max_wait_ms=5), env),
            "one-by-one": ToxicityFilter("t", ToxicityConfig(max_batch=1, max_wait_ms=0), env),
        }
        for name, filt in modes.items():
            alone, conc, tput, batch = [], [], [], []
            for _ in range(runs):
                alone.append(statistics.median(asyncio.run(_alone(filt, texts(20)))) * 1000)
                before = (filt.batcher.stats.batches, filt.batcher.stats.items)
                lat, rate = asyncio.run(_concurrent(filt, texts(requests), concurrency))
                conc.append(statistics.median(lat) * 1000)
                tput.append(rate)
                batches = filt.batcher.stats.batches - before[0]
                batch.append((filt.batcher.stats.items - before[1]) / max(1, batches))
            results[name] = {
                "alone_p50_ms": round(statistics.median(alone), 2),
                f"c{concurrency}_p50_ms": round(statistics.median(conc), 2),
                f"c{concurrency}_texts_per_s": round(statistics.median(tput), 1),
                "mean_batch": round(statistics.median(batch), 1),
                "runs": runs,
            }
    mb, one = results["micro-batched"], results["one-by-one"]
    key = f"c{concurrency}_texts_per_s"
    results["throughput_ratio"] = round(mb[key] / one[key], 2)
    results["embedding_precision"] = resolve_precision(precision)
    results["machine"] = (
        f"{platform.machine()}, {_cores()} cores, Python {platform.python_version()}"
    )
    return results


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main() -> int:
    parser = argparse.ArgumentParser(description="toxicity filter latency and throughput")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.runs, args.requests, args.concurrency, args.precision)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    c = args.concurrency
    print(
        f"machine: {results['machine']}; encoder {results['embedding_precision']}; "
        f"medians of {args.runs} runs, ~100-token texts"
    )
    print(f"| mode | alone p50 ms | {c} concurrent p50 ms | {c} concurrent texts/s | mean batch |")
    print("|---|---|---|---|---|")
    for name in ("micro-batched", "one-by-one"):
        r = results[name]
        print(
            f"| {name} | {r['alone_p50_ms']} | {r[f'c{c}_p50_ms']} | "
            f"{r[f'c{c}_texts_per_s']} | {r['mean_batch']} |"
        )
    print(f"throughput ratio (micro-batched / one-by-one): {results['throughput_ratio']}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
