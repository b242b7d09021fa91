"""``guardrail bench engine``: the local engine's speed and its quantized models' fidelity.

Everything is measured in one run, on one model (the embedded SmolLM2-135M-Instruct
unless ``--model`` names another), loaded once with ``dtype`` and ``device`` auto
(fp32 on CPU, bf16 on CUDA):

- **Time to first token of a second turn** (``ttft_recompute_ms``, ``ttft_reuse_ms``,
  ``ttft_speedup``): a conversation of about 600 tokens (a system prompt and three
  earlier turns) is answered once, greedily, to fill the cache; the next user turn is
  then timed to its first generated token (``max_tokens=1``) through
  :class:`~guardrail.backends.local.LocalBackend` with its prefix cache, and through one
  with ``prefix_cache_entries=0`` (the whole prompt recomputed). Each run then lets both
  answer that turn greedily and checks the answers are the same (``ttft_same_answers``).
  The report is the median over ``--runs``.
- **Throughput** (``throughput_sequential_tps``, ``throughput_batched_tps``,
  ``throughput_ratio``): the same 8 chat prompts (``--concurrency N``: N prompts, the 8
  repeated in order, and a batch of N), each asking for a long story so the
  model does not stop early, encoded with the model's chat template. *Sequential* is
  plain ``model.generate`` (greedy, a batch of one) on one prompt after another, with
  ``min_new_tokens = max_new_tokens = 64`` so every request generates exactly 64 tokens.
  *Batched* sends the 8 prompts at once (``max_tokens=64``, ``temperature=0``) as
  ``POST /v1/chat/completions`` to the whole gateway, built in process with
  :func:`~guardrail.app.create_app` over a ``LocalBackend(max_batch_size=8)`` and a
  policy with no filters (audit log off), through ``httpx.ASGITransport`` with the app's
  lifespan running. A request cannot force a minimum length, so the batched side counts
  the ``completion_tokens`` each response reports; both throughputs are generated tokens
  over wall time (tokenization included, model loading excluded), so an answer that ends
  early counts for what it generated and no more. Neither side reuses KV caches (the
  batched backend's prefix cache is off: the prompts share the template's system
  prompt). The sequential side has no gateway around it, so the ratio is what batching
  gains net of everything the gateway adds. Both sides run torch off the main thread,
  as the gateway does: on this 2-core machine (libgomp), once the main thread had run a
  forward pass, an 8-row decoding step on another thread took 87-129 ms instead of
  62-73 ms (three paired processes each), and batched/sequential measured 3.3-3.9x with
  the sequential side on the main thread against 4.5-5.2x with it on a worker thread.
  Each side is warmed up with one short generation first; each is measured once per
  run and the report is the median. On CUDA the sequential side is measured a second
  time with the attention backends the engine uses (flash and math: see
  :mod:`guardrail.backends.engine`), as ``throughput_sequential_engine_attention_tps``
  and ``throughput_ratio_engine_attention``, so the engine's choice of backend is not
  counted as a gain of batching.
  ``details.batched_latency_p50_ms`` is the median time a batched request took from
  sending to its whole answer (the stream's first chunk would not be the first token:
  the policy's stream window holds text back).
- **Quantization** (``quantization``: one entry per mode in none, int8, int4): each
  quantized model is loaded on its own with :func:`~guardrail.backends.local.load_local_model`
  and freed afterwards. A mode the device cannot run (int4 on CPU) is reported as
  ``{"unsupported": "<the error>"}``. ``weight_bytes`` is the storage the model's state
  dict really holds: quantized tensor subclasses (torchao's ``Int8Tensor``) are opened
  with ``__tensor_flatten__`` down to plain tensors (int8 data, scales, zero points),
  and each distinct storage is counted once (tied embeddings are one storage). Their
  own ``nbytes`` would report the dequantized size. ``weight_bytes_ratio`` is over the
  same state dict held in fp32. ``greedy_agreement`` is the share of 20 fixed prompts
  (facts, arithmetic, instructions, short creative writing) whose greedy 32-token answer
  (``model.generate``, a batch of one, token ids compared) is exactly the unquantized
  model's; for ``none`` it is 1.0 by construction (the reference itself).
  ``greedy_common_prefix`` is the mean share of the reference answer's tokens the
  quantized answer repeats before its first difference (how early answers diverge).
  ``token_agreement`` is the share of the reference answers' tokens the quantized model
  also ranks first when fed the prompt and the reference answer so far (teacher
  forcing): on a small model one near-tie that flips changes the rest of a greedy
  answer, so whole answers measure chaos as much as quantization error (bf16 alone,
  no quantization, kept 8 of 20 answers of SmolLM2-135M identical).

Sizes are parameters of :func:`run`, so tests can shrink them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.backends.base import GenerationRequest, SamplingParams
from guardrail.bench_proxy import NO_FILTERS_POLICY
from guardrail.chat import Message
from guardrail.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from guardrail.backends.local import DType, LocalBackend, Quantization

__all__ = [
    "AGREEMENT_PROMPTS",
    "QUANTIZATION_MODES",
    "THROUGHPUT_PROMPTS",
    "Throughput",
    "Ttft",
    "concurrent_prompts",
    "format_table",
    "greedy_answers",
    "measure_batched",
    "measure_quantization",
    "measure_sequential",
    "measure_ttft",
    "run",
    "token_agreement",
    "weight_bytes",
]

QUANTIZATION_MODES: tuple[Quantization, ...] = ("none", "int8", "int4")

# Long-answer requests: a gateway request cannot force a minimum length, so these ask
# for more than max_new_tokens and most answers run to the limit.
THROUGHPUT_PROMPTS: tuple[str, ...] = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a young baker who enters a city-wide cake contest.",
    "Write a long story about two friends hiking across a snowy mountain pass.",
    "Write a long story about a robot that learns to tend a vegetable garden.",
    "Write a long story about a girl who discovers a hidden library under her school.",
    "Write a long story about a fisherman caught in a storm far from the coast.",
    "Write a long story about an old clockmaker and his mysterious last apprentice.",
    "Write a long story about a cat that travels across the country on a train.",
)

AGREEMENT_PROMPTS: tuple[str, ...] = (
    # facts
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How many continents are there on Earth?",
    "What planet is known as the Red Planet?",
    # arithmetic
    "What is 7 plus 5?",
    "What is 12 times 3?",
    "What is 100 minus 37?",
    "If I have 3 apples and buy 4 more, how many apples do I have?",
    "What is half of 50?",
    # instructions
    "List three colors of the rainbow.",
    "Give me two tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Explain in one sentence what a noun is.",
    "Name three animals that live in the ocean.",
    # short creative
    "Write a haiku about autumn leaves.",
    "Write one sentence describing a sunset.",
    "Invent a name for a friendly dragon.",
    "Write a two-line poem about coffee.",
    "Describe the smell of rain in one sentence.",
)

_TTFT_TOPICS = ("tides", "volcanoes", "photosynthesis")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ttft:
    """Time to the first token of a second turn, median over runs."""

    recompute_ms: float
    reuse_ms: float
    prompt_tokens: int
    """Tokens in the timed turn-2 prompt."""
    same_answers: bool
    """Whether both backends gave the same greedy turn-2 answer in every run."""


@dataclass(frozen=True, slots=True)
class Throughput:
    """Tokens generated for a set of requests, and the wall time they took."""

    completion_tokens: int
    seconds: float
    latency_p50_ms: float
    """Median time from a request's start to its whole answer."""

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds


# --- time to first token -------------------------------------------------------------------


def ttft_history() -> list[Message]:
    """The earlier turns (about 600 tokens with SmolLM2's template) the timed turn follows."""
    out = [Message("system", "You are a patient science tutor. " * 8)]
    for topic in _TTFT_TOPICS:
        out.append(Message("user", f"Explain {topic} to a twelve-year-old in detail. " * 3))
        out.append(Message("assistant", f"Here is how {topic} work, step by step. " * 12))
    return out


def _chat(model_name: str, request_id: str, messages: Sequence[Message], tokens: int) -> Any:
    return GenerationRequest(
        model_name,
        request_id,
        messages=tuple(messages),
        params=SamplingParams(max_tokens=tokens, temperature=0.0),
    )


async def measure_ttft(
    model: Any, tokenizer: Any, model_name: str, *, runs: int = 5, answer_tokens: int = 24
) -> Ttft:
    """Turn-2 time to first token with the prefix cache and without; see the module doc."""
    from guardrail.backends.local import LocalBackend

    reuse = LocalBackend(model, tokenizer, model_name=model_name)
    plain = LocalBackend(model, tokenizer, model_name=model_name, prefix_cache_entries=0)
    backends = {"reuse": reuse, "recompute": plain}
    turn1 = ttft_history()
    timings: dict[str, list[float]] = {name: [] for name in backends}
    same = True
    prompt_tokens = 0
    try:
        for i in range(runs):
            answers = set()
            for name, backend in backends.items():
                first = await backend.generate(_chat(model_name, f"t1-{i}", turn1, answer_tokens))
                turn2 = [
                    *turn1,
                    Message("assistant", first.text),
                    Message("user", f"Now {i}: why?"),
                ]
                started = time.perf_counter()
                await backend.generate(_chat(model_name, f"t2-{i}", turn2, 1))
                timings[name].append(time.perf_counter() - started)
                answer = await backend.generate(_chat(model_name, f"a-{i}", turn2, answer_tokens))
                answers.add(answer.text)
                prompt_tokens = answer.prompt_tokens or 0
            same = same and len(answers) == 1
    finally:
        await reuse.aclose()
        await plain.aclose()
    return Ttft(
        recompute_ms=statistics.median(timings["recompute"]) * 1000,
        reuse_ms=statistics.median(timings["reuse"]) * 1000,
        prompt_tokens=prompt_tokens,
        same_answers=same,
    )


# --- throughput ----------------------------------------------------------------------------


def _encode_chat(tokenizer: Any, prompt: str, device: Any) -> Any:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return {k: v.to(device) for k, v in encoded.items()}


def _generate(model: Any, tokenizer: Any, prompt: str, tokens: int, *, exact: bool) -> list[int]:
    """Greedy ``model.generate`` on one chat prompt; the generated ids.

    ``exact``: generate exactly ``tokens`` tokens (EOS does not end the answer).
    """
    import torch

    inputs = _encode_chat(tokenizer, prompt, model.device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens if exact else None,
            do_sample=False,
            pad_token_id=pad,
        )
    generated: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return generated


def measure_sequential(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    engine_attention: bool = False,
) -> Throughput:
    """Plain ``model.generate``, one prompt at a time, exactly ``max_new_tokens`` each.

    It runs on a worker thread, as the engine does: the gateway never runs torch on its
    main thread, and torch work there slows OpenMP work on other threads (see the
    module doc). ``engine_attention``: with the attention backends the engine uses (on
    CUDA, flash and math), so the baseline does not pay for what the engine avoids.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-sequential") as pool:
        return pool.submit(
            _sequential, model, tokenizer, prompts, max_new_tokens, engine_attention
        ).result()


def _sequential(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, engine_attention: bool
) -> Throughput:
    from guardrail.backends.engine import attention_backends

    backends = attention_backends(model) if engine_attention else contextlib.nullcontext
    with backends():
        _generate(model, tokenizer, prompts[0], 2, exact=True)  # warm-up
        tokens = 0
        latencies = []
        started = time.perf_counter()
        for prompt in prompts:
            one = time.perf_counter()
            tokens += len(_generate(model, tokenizer, prompt, max_new_tokens, exact=True))
            latencies.append(time.perf_counter() - one)
        seconds = time.perf_counter() - started
    return Throughput(tokens, seconds, statistics.median(latencies) * 1000)


def _batched_backend(
    model: Any, tokenizer: Any, model_name: str, max_batch_size: int
) -> LocalBackend:
    from guardrail.backends.local import LocalBackend

    return LocalBackend(
        model,
        tokenizer,
        model_name=model_name,
        prefix_cache_entries=0,
        max_batch_size=max_batch_size,
    )


async def measure_batched(
    model: Any,
    tokenizer: Any,
    model_name: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    max_batch_size: int = 8,
) -> Throughput:
    """All ``prompts`` at once through the in-process gateway (no filters, audit log off)."""
    import httpx

    from guardrail.app import create_app
    from guardrail.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "no-filters.yaml"
        policy.write_text(NO_FILTERS_POLICY, encoding="utf-8")
        settings = Settings(policy=str(policy), backend="local", audit_dsn="off")
        # The app's lifespan closes the backend on the way out.
        app = create_app(
            settings, backend=_batched_backend(model, tokenizer, model_name, max_batch_size)
        )
        # litestar types its ASGI callable more narrowly than httpx's generic signature.
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with (
            app.lifespan(),
            httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=None) as client,
        ):

            async def one(prompt: str, tokens: int) -> tuple[int, float]:
                started = time.perf_counter()
                response = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model_name,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": tokens,
                        "temperature": 0,
                    },
                )
                if response.status_code != 200:
                    raise RuntimeError(
                        f"the gateway answered {response.status_code}: {response.text[:300]}"
                    )
                completion: int = response.json()["usage"]["completion_tokens"]
                return completion, time.perf_counter() - started

            await one(prompts[0], 2)  # warm-up
            started = time.perf_counter()
            results = await asyncio.gather(*(one(p, max_new_tokens) for p in prompts))
            seconds = time.perf_counter() - started
    return Throughput(
        sum(tokens for tokens, _ in results),
        seconds,
        statistics.median(latency for _, latency in results) * 1000,
    )


# --- quantization --------------------------------------------------------------------------


def _plain_tensors(tensor: Any) -> list[Any]:
    """The plain tensors a (possibly quantized, nested) tensor subclass stores."""
    import torch

    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return [tensor]
    names, _ = flatten()
    out: list[Any] = []
    for name in names:
        inner = getattr(tensor, name)
        if inner is not None:
            out.extend(_plain_tensors(inner))
    return out


def weight_bytes(model: Any, *, as_fp32: bool = False) -> int:
    """Bytes the model's state dict really stores, each distinct storage counted once.

    ``as_fp32``: as if every floating-point tensor were fp32 (the unquantized reference).
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for value in model.state_dict().values():
        if not hasattr(value, "untyped_storage"):  # bitsandbytes keeps a few non-tensors
            continue
        for tensor in _plain_tensors(value):
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            if as_fp32 and tensor.is_floating_point():
                total += storage.nbytes() // tensor.element_size() * 4
            else:
                total += storage.nbytes()
    return total


def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, tokens: int = 32
) -> list[list[int]]:
    """Each prompt's greedy answer (up to ``tokens`` ids, ending early at EOS)."""
    return [_generate(model, tokenizer, p, tokens, exact=False) for p in prompts]


def token_agreement(
    model: Any, tokenizer: Any, prompts: Sequence[str], reference: Sequence[list[int]]
) -> float:
    """Share of the reference answers' tokens that ``model`` also ranks first, each
    predicted from the prompt and the reference answer before it (teacher forcing).

    Unlike whole-answer agreement, one near-tie that flips does not turn every later
    token of the answer into a mismatch.
    """
    import torch

    same = total = 0
    for prompt, answer in zip(prompts, reference, strict=True):
        if not answer:
            continue
        inputs = _encode_chat(tokenizer, prompt, model.device)
        prompt_ids = inputs["input_ids"]
        ids = torch.cat([prompt_ids, torch.tensor([answer], device=model.device)], dim=1)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0]
        start = prompt_ids.shape[1] - 1
        predicted = logits[start : start + len(answer)].argmax(-1).tolist()
        same += sum(p == a for p, a in zip(predicted, answer, strict=True))
        total += len(answer)
    return same / max(1, total)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _collect() -> None:
    """Give back the memory of a model whose last reference was just dropped."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_quantization(
    source: str,
    model: Any,
    tokenizer: Any,
    *,
    modes: Sequence[Quantization] = QUANTIZATION_MODES,
    prompts: Sequence[str] = AGREEMENT_PROMPTS,
    tokens: int = 32,
    device: str = "auto",
    dtype: DType = "auto",
) -> dict[str, dict[str, Any]]:
    """Weight bytes and greedy agreement of each mode against ``model`` (unquantized,
    loaded with the same ``dtype``: it is also the dtype of what a mode leaves unquantized)."""
    from guardrail.backends.local import load_local_model

    fp32_bytes = weight_bytes(model, as_fp32=True)
    reference = greedy_answers(model, tokenizer, prompts, tokens=tokens)
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode == "none":
            size = weight_bytes(model)
            answers = reference
            agreement = token_agreement(model, tokenizer, prompts, reference)
        else:
            try:
                quantized, _ = load_local_model(
                    source, device=device, dtype=dtype, quantization=mode
                )
            except (ConfigError, MissingDependencyError) as e:
                out[mode] = {"unsupported": str(e)}
                continue
            try:
                size = weight_bytes(quantized)
                answers = greedy_answers(quantized, tokenizer, prompts, tokens=tokens)
                agreement = token_agreement(quantized, tokenizer, prompts, reference)
            finally:
                del quantized
                _collect()
        pairs = list(zip(answers, reference, strict=True))
        out[mode] = {
            "weight_bytes": size,
            "weight_bytes_ratio": round(size / fp32_bytes, 4),
            "greedy_agreement": round(sum(a == r for a, r in pairs) / len(pairs), 4),
            "token_agreement": round(agreement, 4),
            "greedy_common_prefix": round(
                statistics.mean(_common_prefix(a, r) / max(1, len(r)) for a, r in pairs), 4
            ),
        }
    return out


# --- the whole run -------------------------------------------------------------------------


def progress(message: str) -> None:
    """A line on stderr: each measurement as it is taken (stdout is kept for the report)."""
    print(f"guardrail: {message}", file=sys.stderr)


def _resolve_model(model: str | None, cache_dir: Path | None) -> tuple[str, str]:
    """``(source, served name)`` of ``--model``, or of the embedded model when it is None."""
    from guardrail.backends.local import served_model_name

    if model is not None:
        return model, served_model_name(model)
    from guardrail.backends.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model
    from guardrail.settings import default_cache_dir

    folder = prepare_embedded_model(cache_dir or default_cache_dir(), log=progress)
    return str(folder), EMBEDDED_MODEL_NAME


def concurrent_prompts(count: int) -> tuple[str, ...]:
    """``count`` throughput prompts: :data:`THROUGHPUT_PROMPTS` repeated in order."""
    if count < 1:
        raise ConfigError(f"concurrency must be at least 1, not {count}")
    return tuple(THROUGHPUT_PROMPTS[i % len(THROUGHPUT_PROMPTS)] for i in range(count))


def run(
    *,
    model: str | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    runs: int = 5,
    answer_tokens: int = 24,
    prompts: Sequence[str] = THROUGHPUT_PROMPTS,
    max_new_tokens: int = 64,
    max_batch_size: int = 8,
    modes: Sequence[Quantization] = QUANTIZATION_MODES,
    agreement_prompts: Sequence[str] = AGREEMENT_PROMPTS,
    agreement_tokens: int = 32,
) -> dict[str, Any]:
    """Run the benchmark; the result as a JSON-ready dict (see the module doc)."""
    from guardrail.backends.local import load_local_model

    source, name = _resolve_model(model, cache_dir)
    loaded, tokenizer = load_local_model(source, device=device, dtype=dtype)
    ttft = asyncio.run(
        measure_ttft(loaded, tokenizer, name, runs=runs, answer_tokens=answer_tokens)
    )
    progress(
        f"turn-2 time to first token {ttft.recompute_ms:.1f} ms recomputed, "
        f"{ttft.reuse_ms:.1f} ms from the cache; measuring throughput"
    )
    sequential: list[Throughput] = []
    # On CUDA, plain generate with torch's default attention backends pays cuDNN's
    # per-length graph builds, which the engine avoids; the same baseline with the
    # engine's backends is measured too, so the ratio is not only that difference.
    on_cuda = loaded.device.type == "cuda"
    sequential_engine_attention: list[Throughput] = []
    batched: list[Throughput] = []
    for _ in range(runs):
        sequential.append(
            measure_sequential(loaded, tokenizer, prompts, max_new_tokens=max_new_tokens)
        )
        if on_cuda:
            sequential_engine_attention.append(
                measure_sequential(
                    loaded, tokenizer, prompts, max_new_tokens=max_new_tokens, engine_attention=True
                )
            )
        batched.append(
            asyncio.run(
                measure_batched(
                    loaded,
                    tokenizer,
                    name,
                    prompts,
                    max_new_tokens=max_new_tokens,
                    max_batch_size=max_batch_size,
                )
            )
        )
    seq_tps = statistics.median(t.tokens_per_second for t in sequential)
    bat_tps = statistics.median(t.tokens_per_second for t in batched)
    device_name = str(loaded.device)
    loaded_dtype = str(loaded.dtype).removeprefix("torch.")
    progress(
        f"throughput {seq_tps:.1f} tokens/s sequential, {bat_tps:.1f} batched "
        f"({bat_tps / seq_tps:.2f}x); measuring quantization"
    )
    like_engine: dict[str, float] = {}
    if sequential_engine_attention:
        tps = statistics.median(t.tokens_per_second for t in sequential_engine_attention)
        like_engine = {
            "throughput_sequential_engine_attention_tps": round(tps, 2),
            "throughput_ratio_engine_attention": round(bat_tps / tps, 3),
        }
        progress(f"sequential with the engine's attention backends: {tps:.1f} tokens/s")
    quantization = measure_quantization(
        source,
        loaded,
        tokenizer,
        modes=modes,
        prompts=agreement_prompts,
        tokens=agreement_tokens,
        device=device,
        dtype=dtype,
    )
    return {
        "ttft_recompute_ms": round(ttft.recompute_ms, 2),
        "ttft_reuse_ms": round(ttft.reuse_ms, 2),
        "ttft_speedup": round(ttft.recompute_ms / ttft.reuse_ms, 3),
        "throughput_sequential_tps": round(seq_tps, 2),
        "throughput_batched_tps": round(bat_tps, 2),
        "throughput_ratio": round(bat_tps / seq_tps, 3),
        **like_engine,
        "quantization": quantization,
        "details": {
            "ttft_prompt_tokens": ttft.prompt_tokens,
            "ttft_same_answers": ttft.same_answers,
            "sequential_completion_tokens": [t.completion_tokens for t in sequential],
            "batched_completion_tokens": [t.completion_tokens for t in batched],
            "sequential_seconds": [round(t.seconds, 3) for t in sequential],
            "batched_seconds": [round(t.seconds, 3) for t in batched],
            "sequential_latency_p50_ms": round(
                statistics.median(t.latency_p50_ms for t in sequential), 1
            ),
            "batched_latency_p50_ms": round(
                statistics.median(t.latency_p50_ms for t in batched), 1
            ),
        },
        "config": {
            "prompts": len(prompts),
            "max_new_tokens": max_new_tokens,
            "max_batch_size": max_batch_size,
            "answer_tokens": answer_tokens,
            "agreement_prompts": len(agreement_prompts),
            "agreement_tokens": agreement_tokens,
        },
        "model": name,
        "device": device_name,
        "dtype": loaded_dtype,
        "runs": runs,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as Markdown tables, for people."""
    d = report["details"]
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| time to first token, turn 2 recomputed | {report['ttft_recompute_ms']:.1f} ms |",
        f"| time to first token, turn 2 from cache | {report['ttft_reuse_ms']:.1f} ms |",
        f"| speed-up | {report['ttft_speedup']:.2f}x |",
        f"| sequential model.generate | {report['throughput_sequential_tps']:.1f} tokens/s |",
        f"| batched through the gateway | {report['throughput_batched_tps']:.1f} tokens/s |",
        f"| batched / sequential | {report['throughput_ratio']:.2f}x |",
        "",
        "| quantization | weight bytes | vs fp32 | same answers | common prefix | same tokens |",
        "|---|---|---|---|---|---|",
    ]
    for mode, entry in report["quantization"].items():
        if "unsupported" in entry:
            lines.append(f"| {mode} | unsupported: {entry['unsupported']} | | | | |")
        else:
            lines.append(
                f"| {mode} | {entry['weight_bytes']:,} | {entry['weight_bytes_ratio']:.3f} | "
                f"{entry['greedy_agreement']:.2f} | {entry['greedy_common_prefix']:.2f} | "
                f"{entry['token_agreement']:.3f} |"
            )
    c, m = report["config"], report["machine"]
    lines.append("")
    lines.append(
        f"{report['model']}, {report['device']}, {report['dtype']}; {report['date']}, "
        f"{m['cpus']} CPUs ({m['processor']}), Python {m['python']}; median of "
        f"{report['runs']} runs. Turn 2: {d['ttft_prompt_tokens']} prompt tokens, same "
        f"answers: {d['ttft_same_answers']}. Throughput: {c['prompts']} prompts x "
        f"{c['max_new_tokens']} tokens, batch {c['max_batch_size']}; batched completion "
        f"tokens {d['batched_completion_tokens']}, request p50 "
        f"{d['batched_latency_p50_ms']:.0f} ms. Agreement: {c['agreement_prompts']} "
        f"prompts x {c['agreement_tokens']} tokens."
    )
    return "\n".join(lines)
