"""Where the local engine's decoding step goes: the model's forward pass (with and
without the engine's padding mask) against the whole step, and the step's parts.

    python benchmarks/gpu/profile_engine.py MODEL_DIR [--device cuda] [--rows 8]

Prints medians in milliseconds. The engine's methods are wrapped with timers for this
run only (``torch.cuda.synchronize`` after the forward pass, so its time is the GPU's).

Order matters: on a CPU, once the main thread has run a forward pass, the engine
thread's forward passes take about 3x as long (a 30-layer model on 2 cores: 9.8 ms vs
32 ms, and twice the thread's CPU time; a worker thread warming up instead changes
nothing). So the model is loaded and timed on worker threads, the engine is timed
first, and the last two lines repeat it after a forward pass on the main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from guardrail.backends.base import GenerationRequest, SamplingParams
from guardrail.backends.engine import Engine
from guardrail.backends.local import LocalBackend, load_local_model
from guardrail.bench_engine import concurrent_prompts
from guardrail.chat import Message


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_ms(model: Any, rows: int, device: str, *, masked: bool, steps: int = 30) -> float:
    """Median time of one decoding forward pass at ``rows`` rows after a 100-token prefill."""
    from transformers import DynamicCache

    length = 100
    ids = torch.randint(100, 1000, (rows, length), device=device)
    cache = DynamicCache(config=model.config)
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        pads = torch.zeros(rows, dtype=torch.long, device=device)
        for _ in range(steps):
            sync(device)
            started = time.perf_counter()
            kwargs: dict[str, Any] = {}
            if masked:  # what Engine._step passes
                kwargs["attention_mask"] = (
                    torch.arange(length + 1, device=device)[None, :] >= pads[:, None]
                ).long()
                kwargs["position_ids"] = (length - pads)[:, None]
            out = model(
                input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs
            )
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - started)
            length += 1
    return statistics.median(times[5:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def off_main(fn: Any, *a: Any, **k: Any) -> Any:
        return pool.submit(fn, *a, **k).result()

    model, tokenizer = off_main(load_local_model, args.model, device=args.device)
    device = str(model.device)
    spent: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, method: Any, *, synced: bool = False) -> Any:
        def wrapper(self: Any, *a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            result = method(self, *a, **k)
            if synced:
                sync(device)
            spent[name].append(time.perf_counter() - started)
            return result

        return wrapper

    for name in ("_step", "_sample", "_advance", "_leave", "_admit"):
        setattr(Engine, name, timed(name, getattr(Engine, name)))
    Engine._forward = timed("_forward", Engine._forward, synced=True)  # type: ignore[method-assign]

    async def serve() -> None:
        backend = LocalBackend(model, tokenizer, model_name="m", max_batch_size=args.rows)
        try:
            requests = [
                GenerationRequest(
                    model="m",
                    request_id=str(i),
                    messages=(Message(role="user", content=p),),
                    params=SamplingParams(max_tokens=args.tokens, temperature=0),
                )
                for i, p in enumerate(concurrent_prompts(args.rows))
            ]
            await backend.generate(requests[-1])  # warm-up
            spent.clear()
            started = time.perf_counter()
            done = await asyncio.gather(*(backend.generate(r) for r in requests))
            seconds = time.perf_counter() - started
        finally:
            await backend.aclose()
        tokens = sum(c.completion_tokens for c in done)
        print(f"engine: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s")
        for name, values in sorted(spent.items()):
            print(
                f"  {name:9s} calls {len(values):5d}  median "
                f"{statistics.median(values) * 1000:7.3f} ms  total {sum(values) * 1000:8.1f} ms"
            )

    asyncio.run(serve())
    for rows in (1, args.rows):
        for masked in (False, True):
            ms = off_main(forward_ms, model, rows, device, masked=masked)
            print(f"forward, {rows} rows, {'engine mask' if masked else 'no mask'}: {ms:.2f} ms")
    ids = tokenizer("word " * args.tokens)["input_ids"][: args.tokens]
    started = time.perf_counter()
    for _ in range(100):
        tokenizer.decode(ids, skip_special_tokens=True)
    print(f"tokenizer.decode of {len(ids)} ids: {(time.perf_counter() - started) * 10:.3f} ms")
    ms = forward_ms(model, args.rows, device, masked=True)
    print(f"forward on the main thread, {args.rows} rows, engine mask: {ms:.2f} ms")
    print("the engine again, after that:")
    asyncio.run(serve())


if __name__ == "__main__":
    main()
