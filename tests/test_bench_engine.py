"""``guardrail bench engine``: the report's keys and sane values (a tiny real run), and
weight bytes measured from what quantized tensors really store."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from guardrail import bench_engine
from guardrail.cli import build_parser, cmd_bench_engine
from guardrail.errors import ConfigError


def _int8_weight_only(model: Any) -> None:
    # torchao warns at import that its CUDA kernels do not load on a CPU build.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())


def test_weight_bytes_counts_int8_data_and_scales_not_the_dequantized_size() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False))
    assert bench_engine.weight_bytes(model) == 512 * 256 * 4
    _int8_weight_only(model)
    assert model[0].weight.nbytes == 512 * 256 * 4  # what the subclass claims
    stored = bench_engine.weight_bytes(model)
    assert 512 * 256 <= stored < 512 * 256 * 1.1  # int8 data plus per-row scales


def test_weight_bytes_as_fp32_is_the_size_the_model_would_have_in_fp32() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    assert bench_engine.weight_bytes(model) == (64 * 32 + 32) * 2
    assert bench_engine.weight_bytes(model, as_fp32=True) == (64 * 32 + 32) * 4


def test_weight_bytes_counts_tied_weights_once() -> None:
    torch = pytest.importorskip("torch")

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)
            self.head = torch.nn.Linear(8, 100, bias=False)
            self.head.weight = self.embed.weight

    assert bench_engine.weight_bytes(Tied()) == 100 * 8 * 4


def test_bench_engine_command_takes_model_runs_and_json() -> None:
    args = build_parser().parse_args(["bench", "engine", "--model", "/m", "--runs", "2", "--json"])
    assert (args.func, args.model, args.runs, args.json) == (cmd_bench_engine, "/m", 2, True)
    assert (args.device, args.dtype, args.concurrency) == ("auto", "auto", 8)


def test_bench_engine_takes_device_dtype_and_concurrency() -> None:
    args = build_parser().parse_args(
        ["bench", "engine", "--device", "cuda:1", "--dtype", "fp16", "--concurrency", "32"]
    )
    assert (args.device, args.dtype, args.concurrency) == ("cuda:1", "fp16", 32)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "engine", "--dtype", "int8"])


def test_concurrent_prompts_repeat_the_throughput_prompts_in_order() -> None:
    prompts = bench_engine.THROUGHPUT_PROMPTS
    assert bench_engine.concurrent_prompts(len(prompts)) == prompts
    assert bench_engine.concurrent_prompts(3) == prompts[:3]
    twenty = bench_engine.concurrent_prompts(20)
    assert len(twenty) == 20
    assert twenty[len(prompts)] == prompts[0]
    with pytest.raises(ConfigError, match="at least 1"):
        bench_engine.concurrent_prompts(0)


@pytest.mark.slow
def test_a_tiny_run_reports_every_key_with_sane_values(cache_dir: Path) -> None:
    report = bench_engine.run(
        cache_dir=cache_dir,
        device="cpu",
        runs=1,
        answer_tokens=4,
        prompts=bench_engine.THROUGHPUT_PROMPTS[:2],
        max_new_tokens=4,
        max_batch_size=2,
        modes=("none", "int4"),
        agreement_prompts=bench_engine.AGREEMENT_PROMPTS[:2],
        agreement_tokens=4,
    )
    for key in (
        "ttft_recompute_ms",
        "ttft_reuse_ms",
        "ttft_speedup",
        "throughput_sequential_tps",
        "throughput_batched_tps",
        "throughput_ratio",
    ):
        assert isinstance(report[key], float), key
        assert report[key] > 0, key
    assert report["ttft_speedup"] == pytest.approx(
        report["ttft_recompute_ms"] / report["ttft_reuse_ms"], rel=0.01
    )
    assert report["details"]["ttft_same_answers"] is True
    assert report["details"]["ttft_prompt_tokens"] > 500
    assert report["details"]["sequential_completion_tokens"] == [2 * 4]
    assert 0 < report["details"]["batched_completion_tokens"][0] <= 2 * 4

    none = report["quantization"]["none"]
    assert none["greedy_agreement"] == none["greedy_common_prefix"] == 1.0
    assert none["token_agreement"] == 1.0  # the model ranks its own greedy tokens first
    assert none["weight_bytes_ratio"] == 1.0  # fp32 on CPU
    assert none["weight_bytes"] > 100_000_000  # 135M parameters, embeddings tied
    assert "not supported on CPU" in report["quantization"]["int4"]["unsupported"]

    assert (report["device"], report["dtype"], report["runs"]) == ("cpu", "float32", 1)
    assert report["model"] == "smollm2-135m-instruct"
    assert report["machine"]["cpus"] >= 1
    table = bench_engine.format_table(report)
    assert "batched / sequential" in table
    assert "| int4 | unsupported" in table


@pytest.mark.slow
def test_token_agreement_is_low_for_answers_the_model_would_not_give(
    loaded: tuple[Any, Any],
) -> None:
    model, tokenizer = loaded
    prompts = bench_engine.AGREEMENT_PROMPTS[:2]
    own = bench_engine.greedy_answers(model, tokenizer, prompts, tokens=6)
    assert bench_engine.token_agreement(model, tokenizer, prompts, own) == 1.0
    foreign = [list(reversed(answer)) for answer in own]
    assert bench_engine.token_agreement(model, tokenizer, prompts, foreign) < 0.5


def test_bench_engine_prepares_the_embedded_model_in_the_settings_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GUARDRAIL_CACHE_DIR was ignored: in the Docker image, which sets it to the folder
    holding its model, the benchmark looked for the model in ~/.cache instead."""
    from guardrail.backends import embedded
    from guardrail.cli import main

    asked: list[Path] = []

    def prepare(cache_dir: Path, *, log: Any = None) -> Path:
        asked.append(cache_dir)
        raise ConfigError("prepared nowhere")  # the benchmark need not run

    monkeypatch.setattr(embedded, "prepare_embedded_model", prepare)
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path))
    assert main(["bench", "engine", "--runs", "1", "--concurrency", "1", "--json"]) == 2
    assert asked == [tmp_path]
