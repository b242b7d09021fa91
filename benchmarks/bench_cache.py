"""Benchmark: input moderation time of turn 1 vs turn 20 of a 20-turn chat, with and
without the verdict cache (issue: moderate each piece of a conversation once).

Each turn adds a user message and an assistant reply of about 100 tokens (~75 English
words); every turn's request carries the whole conversation, as chat clients send it.
The time measured is what the gateway spends on input moderation per request:
``Guard.check_messages`` on all messages, the same call the serving layer makes.
Each run starts with an empty cache; the table reports the median over runs.

    .venv/bin/python benchmarks/bench_cache.py [--policy policies/default.yaml] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from guardrail.chat import Message
from guardrail.guard.cache import VerdictCache
from guardrail.guard.filter import BuildContext
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.types import FilterContext, Stage
from guardrail.policy.loader import load_policy

TURNS = 20
SUBJECTS = [
    "the history of the printing press",
    "how tides are caused by the moon",
    "the rules of chess openings",
    "growing tomatoes on a balcony",
    "the water cycle in temperate forests",
    "how compilers optimise loops",
    "the migration of arctic terns",
    "baking sourdough bread at home",
    "the causes of the industrial revolution",
    "how vaccines train the immune system",
]


def user_turn(i: int) -> str:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return (
        f"Thanks, that helps. For turn {i}, I would like to understand {subject} in more "
        "detail. Could you explain the main ideas step by step, mention one or two common "
        "misconceptions people have about it, and suggest a simple way I could learn more "
        "on my own this week? Please keep the language plain, avoid jargon where you can, "
        "and give me a short example that makes the idea concrete for a beginner."
    )


def assistant_turn(i: int) -> str:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return (
        f"Here is a plain overview of {subject}. First, the central idea is easier to see "
        "when you follow one concrete case from start to finish. Second, a common "
        "misconception is that the process is simple or instant, when in fact it unfolds "
        "over several stages that depend on each other. Third, a good way to learn more is "
        "to read one introductory chapter, then explain it aloud to a friend in your own "
        "words. A short example: imagine tracing a single step and noting what changes."
    )


def conversation(turn: int) -> list[Message]:
    """The request of ``turn`` (1-based): system prompt, earlier turns, new user message."""
    messages = [Message("system", "You are a patient tutor who explains things clearly.")]
    for i in range(1, turn):
        messages += [Message("user", user_turn(i)), Message("assistant", assistant_turn(i))]
    messages.append(Message("user", user_turn(turn)))
    return messages


async def one_run(guard: Guard) -> list[float]:
    times = []
    for turn in range(1, TURNS + 1):
        messages = conversation(turn)
        ctx = FilterContext(f"bench-{turn}", messages=tuple(messages))
        started = time.perf_counter()
        decisions = await guard.check_messages(Stage.INPUT, messages, ctx)
        times.append(time.perf_counter() - started)
        assert decisions, "the policy checked nothing"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="policies/default.yaml")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    registry = filter_registry()
    policy = load_policy(args.policy, registry)
    results: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(4) as executor:
        base = BuildContext(executor=executor, base_dir=Path(args.policy).resolve().parent)
        # Warm-up: load the models once (shared through base.resources), pay first calls.
        asyncio.run(one_run(Guard.build(policy, registry, base, VerdictCache())))
        for mode in ("no_cache", "cache"):
            # Without the cache, filters keep no per-text results of their own either.
            env = dataclasses.replace(base, incremental=mode == "cache")
            runs = []
            for _ in range(args.runs):
                # A fresh guard per run: new filter instances and an empty cache, so each
                # run is a new conversation; only the loaded models are shared.
                cache = VerdictCache() if mode == "cache" else None
                runs.append(asyncio.run(one_run(Guard.build(policy, registry, env, cache))))
            turn1 = statistics.median(r[0] for r in runs)
            turn20 = statistics.median(r[-1] for r in runs)
            results[mode] = {
                "turn1_ms": round(turn1 * 1000, 3),
                "turn20_ms": round(turn20 * 1000, 3),
                "turn20_over_turn1": round(turn20 / turn1, 2),
            }
    report = {
        "policy": {"name": policy.name, "version": policy.version},
        "filters": [f.id for f in policy.filters],
        "runs": args.runs,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": date.today().isoformat(),
        **results,
        "turn20_speedup_with_cache": round(
            results["no_cache"]["turn20_ms"] / results["cache"]["turn20_ms"], 2
        ),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"policy {policy.name} {policy.version}; filters: {', '.join(report['filters'])}")
    print(f"median of {args.runs} runs, input moderation per request")
    print("| mode | turn 1 (ms) | turn 20 (ms) | turn 20 / turn 1 |")
    print("|---|---|---|---|")
    for mode, row in results.items():
        print(f"| {mode} | {row['turn1_ms']} | {row['turn20_ms']} | {row['turn20_over_turn1']} |")
    print(f"turn 20 with cache is {report['turn20_speedup_with_cache']}x faster than without")


if __name__ == "__main__":
    main()
