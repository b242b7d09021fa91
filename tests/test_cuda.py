"""The local engine on a CUDA device: the dtype chosen there, bitsandbytes int8 and nf4,
``device_map``, and the real embedded SmolLM2-135M-Instruct answering through each.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine run these, and
the whole engine suite on the GPU, with ``benchmarks/gpu/run.sh`` (it sets
``GUARDRAIL_TEST_DEVICE=cuda`` for ``tests/test_local_backend.py``). The bitsandbytes
tests also skip where bitsandbytes is not installed (``pip install bitsandbytes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guardrail.backends.base import GenerationRequest, SamplingParams
from guardrail.backends.embedded import EMBEDDED_MODEL_NAME
from guardrail.backends.local import LocalBackend, load_local_model
from guardrail.bench_engine import AGREEMENT_PROMPTS, greedy_answers, token_agreement, weight_bytes
from guardrail.chat import Message
from guardrail.errors import ConfigError

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# SmolLM2's 30 decoder layers each have q, k, v, o, gate, up and down projections; the
# output head is tied to the input embedding and stays as loaded.
QUANTIZED_LINEARS = 30 * 7


def chat(text: str, *, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        model=EMBEDDED_MODEL_NAME,
        request_id="cuda",
        messages=(Message(role="user", content=text),),
        params=SamplingParams(max_tokens=max_tokens),
    )


async def answer(model: Any, tokenizer: Any, *texts: str) -> list[str]:
    """Greedy answers through the local engine, sent together (one batch)."""
    import asyncio

    backend = LocalBackend(model, tokenizer, model_name=EMBEDDED_MODEL_NAME)
    try:
        done = await asyncio.gather(*(backend.generate(chat(t)) for t in texts))
    finally:
        await backend.aclose()
    assert backend.engine.largest_batch == len(texts)
    return [c.text for c in done]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[Any, Any]:
    """The unquantized model as ``dtype: auto`` loads it on CUDA."""
    return load_local_model(str(model_dir), device="auto")


@pytest.fixture(scope="module")
def reference_answers(reference: tuple[Any, Any]) -> list[list[int]]:
    model, tokenizer = reference
    return greedy_answers(model, tokenizer, AGREEMENT_PROMPTS, tokens=24)


def _free(model: Any) -> None:
    del model
    import gc

    gc.collect()
    torch.cuda.empty_cache()


async def test_auto_picks_cuda_and_bf16_and_the_model_answers(reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    assert model.device.type == "cuda"
    assert model.dtype == torch.bfloat16
    france, fruits = await answer(
        model, tokenizer, "What is the capital of France?", "List three fruits."
    )
    assert "Paris" in france
    assert fruits.strip()


def test_a_cuda_device_the_machine_lacks_is_a_clear_startup_error(model_dir: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=f"{missing}.*CUDA device"):
        load_local_model(str(model_dir), device=missing)


async def test_fp16_loads_and_answers(model_dir: Path) -> None:
    model, tokenizer = load_local_model(str(model_dir), device="cuda", dtype="fp16")
    try:
        assert model.dtype == torch.float16
        (france,) = await answer(model, tokenizer, "What is the capital of France?")
        assert "Paris" in france
    finally:
        _free(model)


async def test_int8_is_bitsandbytes_8bit_at_under_half_the_fp32_bytes_and_agrees(
    model_dir: Path, reference: tuple[Any, Any], reference_answers: list[list[int]]
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model, tokenizer = load_local_model(str(model_dir), device="cuda", quantization="int8")
    try:
        linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        assert len(linears) == QUANTIZED_LINEARS
        assert {m.weight.dtype for m in linears} == {torch.int8}
        assert model.lm_head.weight is model.model.embed_tokens.weight
        fp32 = weight_bytes(reference[0], as_fp32=True)
        assert weight_bytes(model) / fp32 <= 0.45
        # Teacher-forced: the int8 model ranks the bf16 model's own next token first.
        agreement = token_agreement(model, tokenizer, AGREEMENT_PROMPTS, reference_answers)
        assert agreement >= 0.90, agreement
        france, fruits = await answer(
            model, tokenizer, "What is the capital of France?", "List three fruits."
        )
        assert "Paris" in france
        assert fruits.strip()
    finally:
        _free(model)


async def test_int4_is_bitsandbytes_nf4_smaller_than_int8_and_still_agrees(
    model_dir: Path, reference: tuple[Any, Any], reference_answers: list[list[int]]
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model, tokenizer = load_local_model(str(model_dir), device="cuda", quantization="int4")
    try:
        linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(linears) == QUANTIZED_LINEARS
        assert {m.weight.quant_state.quant_type for m in linears} == {"nf4"}
        fp32 = weight_bytes(reference[0], as_fp32=True)
        # The tied bf16 embedding (28M of the 135M parameters) is most of what is left.
        assert weight_bytes(model) / fp32 <= 0.30
        agreement = token_agreement(model, tokenizer, AGREEMENT_PROMPTS, reference_answers)
        assert agreement >= 0.60, agreement  # garbage output (quanto int4 on CPU) is near 0
        (france,) = await answer(model, tokenizer, "What is the capital of France?")
        assert france.strip()
    finally:
        _free(model)


async def test_a_device_map_places_the_layers_through_accelerate(model_dir: Path) -> None:
    model, tokenizer = load_local_model(str(model_dir), device="cuda", device_map="auto")
    try:
        # accelerate records a map only when it spreads the model over several devices.
        gpus = {torch.device("cuda", i) for i in range(torch.cuda.device_count())}
        assert {p.device for p in model.parameters()} <= gpus
        placed = set(getattr(model, "hf_device_map", {}).values())
        assert placed <= set(range(torch.cuda.device_count())), placed  # no "cpu", no "disk"
        (france,) = await answer(model, tokenizer, "What is the capital of France?")
        assert "Paris" in france
    finally:
        _free(model)
