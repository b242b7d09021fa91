"""What one decoding step of the local engine launches, against a bare forward pass and
``model.generate``: ``torch.profiler`` counts of kernel launches, synchronisations and
the slowest operators, with the step's wall time.

    python benchmarks/gpu/trace_engine.py MODEL_DIR [--device cuda] [--rows 8]

The weights do not matter for this (a randomly initialised copy of the architecture
launches the same kernels), so it runs on the GPU machine without carrying the GGUF.
Everything that touches torch runs on one worker thread, as in the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import time
from collections import Counter
from typing import Any

import torch

from guardrail.backends.base import GenerationRequest, SamplingParams
from guardrail.backends.engine import Engine
from guardrail.backends.local import LocalBackend, load_local_model
from guardrail.bench_engine import concurrent_prompts
from guardrail.chat import Message
from guardrail.kv import cache_argument, returned_cache

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profiled(label: Any, fn: Any, rows: int = 18) -> Any:
    """Run ``fn`` once under the profiler; print what it launched. ``label``: a string,
    or a function giving one after the run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        result = fn()
    wall = (time.perf_counter() - started) * 1000
    counts: Counter[str] = Counter()
    for event in prof.events():
        counts[event.name] += 1
    launches = sum(counts[n] for n in LAUNCHES)
    syncs = {n: counts[n] for n in (*SYNCS, "cudaMemcpyAsync") if counts[n]}
    ops = sum(c for n, c in counts.items() if n.startswith("aten::"))
    if callable(label):
        label = label()
    print(
        f"\n--- {label}: {wall:.1f} ms under the profiler; {launches} kernel launches, "
        f"{ops} aten ops, {syncs}"
    )
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    print("\n".join(line[:150] for line in table.splitlines()))
    return result


def ttft(model: Any, tokenizer: Any, device: str) -> None:
    """Each admission of ``bench engine``'s turn-2 measure under the profiler (prefix
    lookup, copy, prefill, first token), then the measure itself, unprofiled."""
    from guardrail.bench_engine import measure_ttft

    original = Engine._admit
    count = [0]

    def admit(self: Engine, works: list[Any]) -> None:
        count[0] += 1
        hits = self.prefix_cache.hits
        cached = "on" if self.prefix_cache.entries else "off"
        profiled(
            lambda: (
                f"admission {count[0]}, prefix cache {cached}, "
                f"{'hit' if self.prefix_cache.hits > hits else 'no hit'}"
            ),
            lambda: (original(self, works), sync(device))[0],
            rows=12,
        )

    Engine._admit = admit  # type: ignore[method-assign]
    asyncio.run(measure_ttft(model, tokenizer, "m", runs=2, answer_tokens=8))
    Engine._admit = original  # type: ignore[method-assign]
    print("\nunprofiled:", asyncio.run(measure_ttft(model, tokenizer, "m", runs=5)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: as is)")
    parser.add_argument(
        "--mask4d",
        action="store_true",
        help="decoding steps get a ready 4D mask (no mask building)",
    )
    parser.add_argument("--switch", type=float, default=0, help="sys.setswitchinterval (0: as is)")
    parser.add_argument(
        "--ttft", action="store_true", help="profile the admissions of the turn-2 TTFT measure"
    )
    args = parser.parse_args()
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def off_main(fn: Any, *a: Any, **k: Any) -> Any:
        return pool.submit(fn, *a, **k).result()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.switch:
        sys.setswitchinterval(args.switch)
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, {vars(args)}")
    model, tokenizer = off_main(load_local_model, args.model, device=args.device)
    device = str(model.device)
    print(f"model on {device}, {model.dtype}, attention {model.config._attn_implementation}")

    if args.ttft:
        ttft(model, tokenizer, device)
        return
    forwards: list[float] = []
    trace_at = {"step": 12}
    original = Engine._forward

    def forward(self: Engine, tokens: Any, mask: Any, positions: Any, cache: Any) -> Any:
        decoding = tokens.shape[1] == 1
        if decoding and args.mask4d and mask is not None:
            mask = mask[:, None, None, :].bool()
        if decoding and tokens.shape[0] == args.rows:
            trace_at["step"] -= 1
            if trace_at["step"] == 0:
                pads = None if mask is None else int((mask == 0).sum())
                return profiled(
                    f"engine decoding step, {args.rows} rows, {pads} pad cells",
                    lambda: (original(self, tokens, mask, positions, cache), sync(device))[0],
                )
        started = time.perf_counter()
        out = original(self, tokens, mask, positions, cache)
        sync(device)
        if decoding and tokens.shape[0] == args.rows:
            forwards.append(time.perf_counter() - started)
        return out

    Engine._forward = forward  # type: ignore[method-assign]

    async def serve(label: str) -> None:
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
            forwards.clear()
            started = time.perf_counter()
            done = await asyncio.gather(*(backend.generate(r) for r in requests))
            seconds = time.perf_counter() - started
        finally:
            await backend.aclose()
        tokens = sum(c.completion_tokens for c in done)
        median = statistics.median(forwards) * 1000 if forwards else float("nan")
        print(
            f"\n{label}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s; "
            f"decoding forward at {args.rows} rows: median {median:.2f} ms of {len(forwards)}"
        )

    asyncio.run(serve("engine"))

    def bare(rows: int, pads: list[int] | None) -> None:
        from transformers import DynamicCache

        length = 100
        ids = torch.randint(100, 1000, (rows, length), device=device)
        cache = DynamicCache(config=model.config)
        times = []
        label = f"bare forward, {rows} rows, " + ("no mask" if pads is None else f"pads {pads}")
        with torch.inference_mode():
            out = model(
                input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(model, cache)
            )
            cache = returned_cache(out)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            pad = torch.tensor(pads or [0] * rows, device=device)
            for step in range(25):
                kwargs: dict[str, Any] = {}
                if pads is not None:
                    kwargs["attention_mask"] = (
                        torch.arange(length + 1, device=device)[None, :] >= pad[:, None]
                    ).long()
                    kwargs["position_ids"] = (length - pad)[:, None]

                def run(tokens: Any = tokens, kwargs: dict[str, Any] = kwargs) -> Any:
                    result = model(
                        input_ids=tokens,
                        use_cache=True,
                        logits_to_keep=1,
                        **cache_argument(model, cache),
                        **kwargs,
                    )
                    sync(device)
                    return result

                if step == 20:
                    out = profiled(label, run)
                else:
                    started = time.perf_counter()
                    out = run()
                    if step >= 5:
                        times.append(time.perf_counter() - started)
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
                length += 1
        print(f"{label}: median {statistics.median(times) * 1000:.2f} ms")

    spread = [0, 3, 7, 1, 0, 5, 2, 9, 4, 6, 8, 0][: args.rows] * (1 + args.rows // 12)
    for rows, pads in (
        (1, None),
        (args.rows, None),
        (args.rows, [0] * args.rows),
        (args.rows, spread[: args.rows]),
    ):
        off_main(bare, rows, pads)

    def generate() -> None:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": concurrent_prompts(1)[0]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"].to(device)
        for _ in range(3):
            sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            sync(device)
            new = out.shape[1] - ids.shape[1]
            print(
                f"model.generate, 1 row: {new} tokens, "
                f"{(time.perf_counter() - started) * 1000 / new:.2f} ms per token"
            )

    off_main(generate)
    asyncio.run(serve("engine again"))


if __name__ == "__main__":
    main()
