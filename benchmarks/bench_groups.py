"""Benchmark: the cost of finding demographic group mentions in one text.

``Lexicon.mentions`` runs on every text of every chat and completion exchange when it is
recorded (README: Bias across groups). This measures it on English prose of several
lengths, without mentions (the common case, where the token prefilter answers), with
one mention and dense with them (where the trie pattern runs), and a swap (the
counterfactual probe's work, off the request path). Each figure is the median of
``--runs`` runs of many calls.

    .venv/bin/python benchmarks/bench_groups.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

from guardrail.observability.groups import GroupRef, Lexicon

PLAIN = (
    "Could you explain how photosynthesis works in plants, and why leaves change colour "
    "in autumn? I am writing a report for school and need a clear summary with examples. "
    "The teacher asked for three sources and a diagram of the light reactions. "
)
MENTIONS = (
    "Why are Muslims and Christians, women and old men, gay people and immigrants from "
    "Mexico treated so differently by the press? Write a balanced answer with sources. "
)
SIZES = (100, 1_000, 10_000)


def _text(base: str, size: int) -> str:
    return (base * (size // len(base) + 1))[:size]


def _per_call(fn: Callable[[], object], budget_s: float = 0.3) -> float:
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s:
            return elapsed / calls
        calls *= 2


def run(runs: int) -> dict[str, object]:
    started = time.perf_counter()
    lexicon = Lexicon.load()
    load_ms = (time.perf_counter() - started) * 1000
    rows = []
    for kind, base in (("no mention", PLAIN), ("one mention", PLAIN), ("mentions", MENTIONS)):
        for size in SIZES:
            text = _text(base, size)
            if kind == "one mention":  # a typical prompt about a group: one term, mid-text
                text = text[: size // 2] + " women " + text[size // 2 + 7 :]
            samples = [_per_call(lambda t=text: lexicon.mentions(t)) for _ in range(runs)]
            per_call = statistics.median(samples)
            rows.append(
                {
                    "operation": "mentions",
                    "text": kind,
                    "chars": size,
                    "us_per_text": round(per_call * 1e6, 2),
                    "ns_per_char": round(per_call * 1e9 / size, 1),
                }
            )
    muslim = GroupRef("religion", "muslim")
    for size in SIZES:
        text = _text(MENTIONS, size)
        samples = [_per_call(lambda t=text: lexicon.swap(t, muslim)) for _ in range(runs)]
        per_call = statistics.median(samples)
        rows.append(
            {
                "operation": "swap",
                "text": "mentions",
                "chars": size,
                "us_per_text": round(per_call * 1e6, 2),
                "ns_per_char": round(per_call * 1e9 / size, 1),
            }
        )
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "groups": len(lexicon.groups),
        "load_ms": round(load_ms, 1),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.runs)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['groups']} groups, lexicon loaded in {report['load_ms']} ms "
        f"(Python {report['python']}, {report['machine']})"
    )
    print(f"{'operation':10} {'text':11} {'chars':>7} {'us/text':>9} {'ns/char':>8}")
    for row in report["rows"]:  # type: ignore[attr-defined]
        print(
            f"{row['operation']:10} {row['text']:11} {row['chars']:>7} "
            f"{row['us_per_text']:>9} {row['ns_per_char']:>8}"
        )


if __name__ == "__main__":
    main()
