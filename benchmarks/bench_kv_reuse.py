"""KV-cache reuse across turns on the local engine: time to the first token of turn 2.

    .venv/bin/python benchmarks/bench_kv_reuse.py [--runs 5]

The TTFT part of ``guardrail bench engine`` alone (see :func:`guardrail.bench_engine.measure_ttft`):
a conversation of about 600 tokens is answered once to fill the cache, then the next
user turn is timed to its first generated token through ``LocalBackend`` with the prefix
cache and through one with it off. The embedded SmolLM2-135M-Instruct, fp32, CPU. Prints
the median of ``--runs`` of each and their ratio, and whether the two gave the same
24-token greedy answer to that turn.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.backends.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model  # noqa: E402
from guardrail.backends.local import load_local_model  # noqa: E402
from guardrail.bench_engine import measure_ttft  # noqa: E402
from guardrail.settings import default_cache_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    folder = prepare_embedded_model(default_cache_dir())
    model, tokenizer = load_local_model(str(folder), dtype="fp32", device="cpu")
    ttft = asyncio.run(measure_ttft(model, tokenizer, EMBEDDED_MODEL_NAME, runs=runs))
    print(f"turn-2 prompt: {ttft.prompt_tokens} tokens; median of {runs} runs")
    print(f"  time to first token, cache reused: {ttft.reuse_ms:.1f} ms")
    print(f"  time to first token, recomputed:   {ttft.recompute_ms:.1f} ms")
    print(
        f"  recomputed / reused: {ttft.recompute_ms / ttft.reuse_ms:.1f}x; "
        f"same answers: {ttft.same_answers}"
    )


if __name__ == "__main__":
    main()
