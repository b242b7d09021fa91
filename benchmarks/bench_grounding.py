"""Latency the hallucination filter adds to one response, on the real shipped head.

    .venv/bin/python benchmarks/bench_grounding.py [--runs 5] [--repeat 20]
        [--precision auto|fp32|bf16] [--probe]

Three shapes, each checked ``--repeat`` times per run (the median per run, then the
median of runs is printed):

- ``short``: a one-sentence answer against a one-sentence source (TruthfulQA-like);
- ``rag``: a five-sentence answer against five retrieved documents of five sentences
  each, sources new each time (no evidence cache: what a fresh request pays);
- ``rag-stream``: a new answer against the same sources, already embedded (each
  window of a stream after the first);
- ``sentence``: one new sentence against the same sources (a stream's later window in
  ``sentence`` mode);
- ``no-sources``: a five-sentence answer with no sources (citation and cutoff checks
  only).

With ``--probe`` a second filter with ``groundedness: {probe: {}}`` (the embedded model's
hidden states; needs ``guardrail model prepare``) checks the same texts right after the
first, in the same run, and its medians and their ratio to the first's are printed too;
a third, ``probe-fresh``, keeps no prefixes (``prefix_cache_mb: 0``), so ``rag-stream``
shows what keeping the sources' keys and values saves a stream's later windows.

The texts are written here; they only need realistic lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from guardrail.chat import Message  # noqa: E402
from guardrail.filters.embedder import resolve_precision  # noqa: E402
from guardrail.filters.hallucination import HallucinationConfig, HallucinationFilter  # noqa: E402
from guardrail.guard.filter import BuildContext  # noqa: E402
from guardrail.guard.types import FilterContext, Stage  # noqa: E402

# Every sentence carries {n}: the gateway caches embeddings by text (CachingModel), and
# a sentence seen before would measure that cache, not what a fresh request pays.
DOC = (
    "Order {n} ships from the Leeds warehouse within two working days. "
    "For order {n}, standard delivery takes three to five days after dispatch. "
    "Express delivery of order {n} costs 9 pounds and arrives the next working day. "
    "Returns of order {n} are accepted within 30 days of delivery for unused items. "
    "Refunds for order {n} go back to the original payment method within 10 days."
)
ANSWER = (
    "Your order {n} ships within two working days. Standard delivery of order {n} then "
    "takes three to five days. Express delivery of order {n} costs 9 pounds and arrives "
    "the next day. You can return unused items of order {n} within 30 days of delivery. "
    "Refunds for order {n} are paid to your card within 10 days."
)


async def timed(filt: HallucinationFilter, text: str, ctx: FilterContext) -> float:
    started = time.perf_counter()
    await filt.check(text, ctx)
    return time.perf_counter() - started


async def run(runs: int, repeat: int, precision: str = "auto", probe: bool = False) -> None:
    with ThreadPoolExecutor(2) as pool:
        env = BuildContext(executor=pool, embedding_precision=precision)
        configs: dict[str, dict[str, Any]] = {"head": {}}
        if probe:
            configs["probe"] = {"groundedness": {"probe": {}}}
            configs["probe-fresh"] = {"groundedness": {"probe": {"prefix_cache_mb": 0}}}
        filters = {
            name: HallucinationFilter("facts", msgspec.convert(config, HallucinationConfig), env)
            for name, config in configs.items()
        }
        question = (Message("user", "When will my order arrive and can I return it?"),)
        warm = FilterContext("warm", Stage.OUTPUT, messages=question, context_documents=("x.",))
        for filt in filters.values():
            await filt.check(ANSWER.format(n="warm"), warm)
        results: dict[tuple[str, str], list[float]] = {}
        counter = 0
        for _ in range(runs):
            per: dict[tuple[str, str], list[float]] = {}
            for _ in range(repeat):
                counter += 1
                for name, filt in filters.items():
                    n = f"{counter}{name}"  # each filter its own texts: no shared caches
                    short_ctx = FilterContext(
                        "s",
                        Stage.OUTPUT,
                        messages=(Message("user", "How long do refunds take?"),),
                        context_documents=(f"Refunds take 10 days (case {n}).",),
                    )
                    per.setdefault((name, "short"), []).append(
                        await timed(filt, f"Refunds are paid within ten days ({n}).", short_ctx)
                    )
                    docs = tuple(DOC.format(n=f"{n}-{i}") for i in range(5))
                    rag_ctx = FilterContext(
                        "r", Stage.OUTPUT, messages=question, context_documents=docs
                    )
                    answer = ANSWER.format(n=n)
                    per.setdefault((name, "rag"), []).append(await timed(filt, answer, rag_ctx))
                    # the same sources, new answer text: a later window of the same stream
                    later = ANSWER.format(n=f"{n}b")
                    per.setdefault((name, "rag-stream"), []).append(
                        await timed(filt, later, rag_ctx)
                    )
                    sentence = f"Refunds for order {n} reach your card within 10 days."
                    per.setdefault((name, "sentence"), []).append(
                        await timed(filt, sentence, rag_ctx)
                    )
                    per.setdefault((name, "no-sources"), []).append(
                        await timed(
                            filt, answer, FilterContext("n", Stage.OUTPUT, messages=question)
                        )
                    )
            for key, values in per.items():
                results.setdefault(key, []).append(statistics.median(values))
        print(
            f"median of {runs} runs of {repeat} checks each (ms), "
            f"encoder {resolve_precision(precision)}:"
        )
        for (name, shape), medians in results.items():
            line = (
                f"  {name:11s} {shape:12s} {statistics.median(medians) * 1000:8.2f}"
                f"   (runs: {', '.join(f'{m * 1000:.1f}' for m in medians)})"
            )
            if name != "head":
                base = statistics.median(results["head", shape])
                line += f"   {statistics.median(medians) / base:.1f}x the head's"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="the sentence encoder's, as the embedding_precision setting",
    )
    parser.add_argument(
        "--probe", action="store_true", help="also time the filter with the probe, alternately"
    )
    args = parser.parse_args()
    asyncio.run(run(args.runs, args.repeat, args.precision, args.probe))


if __name__ == "__main__":
    main()
