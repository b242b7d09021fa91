"""KV-cache reuse across turns on the local engine: time to the first token of turn 2.

    .venv/bin/python benchmarks/bench_kv_reuse.py [--runs 5]

A conversation of about 600 tokens (system prompt, three earlier turns) is answered once
to fill the cache; then the next user turn is timed to its first generated token
(``max_tokens=1``) through ``LocalBackend`` with the prefix cache and through one with it
off (plain ``model.generate`` over the whole prompt). The embedded SmolLM2-135M-Instruct,
fp32, CPU. Prints the median of ``--runs`` of each and their ratio, and checks that the
two give the same 24-token greedy answer.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.backends.base import GenerationRequest, SamplingParams  # noqa: E402
from guardrail.backends.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model  # noqa: E402
from guardrail.backends.local import LocalBackend, load_local_model  # noqa: E402
from guardrail.chat import Message  # noqa: E402
from guardrail.settings import default_cache_dir  # noqa: E402

TOPICS = ["tides", "volcanoes", "photosynthesis"]


def history() -> list[Message]:
    out = [Message("system", "You are a patient science tutor. " * 8)]
    for topic in TOPICS:
        out.append(Message("user", f"Explain {topic} to a twelve-year-old in detail. " * 3))
        out.append(Message("assistant", f"Here is how {topic} work, step by step. " * 12))
    return out


async def ttft(backend: LocalBackend, messages: list[Message], tag: str) -> float:
    request = GenerationRequest(
        EMBEDDED_MODEL_NAME,
        tag,
        messages=tuple(messages),
        params=SamplingParams(max_tokens=1, temperature=0.0),
    )
    started = time.perf_counter()
    await backend.generate(request)
    return time.perf_counter() - started


async def run(runs: int) -> None:
    folder = prepare_embedded_model(default_cache_dir())
    model, tokenizer = load_local_model(str(folder), dtype="fp32", device="cpu")
    reuse = LocalBackend(model, tokenizer, model_name=EMBEDDED_MODEL_NAME)
    plain = LocalBackend(model, tokenizer, model_name=EMBEDDED_MODEL_NAME, prefix_cache_entries=0)
    turn1 = history()
    params = SamplingParams(max_tokens=24, temperature=0.0)
    timings: dict[str, list[float]] = {"reuse": [], "recompute": []}
    answers = {}
    for i in range(runs):
        for name, backend in (("reuse", reuse), ("recompute", plain)):
            first = await backend.generate(
                GenerationRequest(EMBEDDED_MODEL_NAME, f"t1-{i}", tuple(turn1), params=params)
            )
            turn2 = [*turn1, Message("assistant", first.text), Message("user", f"Now {i}: why?")]
            timings[name].append(await ttft(backend, turn2, f"t2-{i}"))
            answer = await backend.generate(
                GenerationRequest(EMBEDDED_MODEL_NAME, f"a-{i}", tuple(turn2), params=params)
            )
            answers.setdefault(i, []).append(answer.text)
            prompt_tokens = answer.prompt_tokens
    await reuse.aclose()
    await plain.aclose()
    same = all(len(set(v)) == 1 for v in answers.values())
    r, c = statistics.median(timings["reuse"]), statistics.median(timings["recompute"])
    print(f"turn-2 prompt: {prompt_tokens} tokens; median of {runs} runs")
    print(f"  time to first token, cache reused: {r * 1000:.1f} ms")
    print(f"  time to first token, recomputed:   {c * 1000:.1f} ms")
    print(f"  recomputed / reused: {c / r:.1f}x; same answers: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(run(parser.parse_args().runs))


if __name__ == "__main__":
    main()
