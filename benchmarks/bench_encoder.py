"""How much batching can gain on the sentence encoder itself, on this CPU.

    .venv/bin/python benchmarks/bench_encoder.py [--runs 5] [--json]

The toxicity filter's micro-batching goal is a throughput ratio; this measures its
ceiling. With the same ~100-token texts as ``bench_toxicity.py``:

- the shared all-MiniLM-L6-v2 (``guardrail.filters.embedder.load_sentence_model``):
  milliseconds per text encoded one at a time and in batches of 32;
- a plain matrix product of the encoder's feed-forward shape (rows x 384 by 384 x 1536)
  at 100 rows (one text) and 3,200 rows (32 texts): GFLOP/s, i.e. how close one text
  already comes to what the cores can do;
- the same encoder under bf16 autocast (what ``embedding_precision: auto`` picks on a
  CPU with native bf16), when this CPU has it: speed, and the cosine of its embeddings
  to the fp32 ones (the shipped classifier heads were trained on fp32 embeddings);
- for information, the same encoder with torch's dynamic int8 quantization of its
  linear layers: speed and cosine, likewise.

Medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_toxicity import texts  # noqa: E402
from guardrail.filters.embedder import (  # noqa: E402
    Bf16Model,
    encode,
    load_sentence_model,
    native_bf16,
)

BATCH = 32


def _per_text_ms(model: Any, items: list[str], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(items), batch):
        encode(model, items[i : i + batch])
    return (time.perf_counter() - started) / len(items) * 1000


def _gflops(rows: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(rows, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = (time.perf_counter() - started) / repeats
    return 2 * rows * 384 * 1536 / seconds / 1e9


def measure(runs: int) -> dict[str, Any]:
    import numpy as np
    import torch

    model = load_sentence_model()
    items = texts(BATCH * 2)
    tokens = statistics.mean(len(model.tokenizer(t)["input_ids"]) for t in items)
    encode(model, items[:BATCH])  # warm up

    def speeds(m: Any) -> dict[str, float]:
        single = statistics.median(_per_text_ms(m, items[:BATCH], 1) for _ in range(runs))
        batched = statistics.median(_per_text_ms(m, items, BATCH) for _ in range(runs))
        return {
            "one_at_a_time_ms": round(single, 2),
            "batched_ms": round(batched, 2),
            "ratio": round(single / batched, 2),
        }

    fp32 = speeds(model)
    reference = encode(model, items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in favour of torchao
        quantized = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    int8 = speeds(quantized)
    cosines = (reference * encode(quantized, items)).sum(axis=1)

    def versus_fp32(m: Any) -> dict[str, float]:
        rows = (reference * encode(m, items)).sum(axis=1)
        return {
            "cosine_to_fp32_mean": round(float(np.mean(rows)), 5),
            "cosine_to_fp32_min": round(float(np.min(rows)), 5),
        }

    bf16 = Bf16Model(model)
    bf16_result = {**speeds(bf16), **versus_fp32(bf16)} if native_bf16() else None
    return {
        "tokens_per_text": round(tokens, 1),
        "batch": BATCH,
        "fp32": fp32,
        "gemm_gflops": {
            "rows_100": round(statistics.median(_gflops(100, 200) for _ in range(runs)), 1),
            "rows_3200": round(statistics.median(_gflops(3200, 20) for _ in range(runs)), 1),
        },
        "bf16_autocast": bf16_result,
        "int8_dynamic": {
            **int8,
            "cosine_to_fp32_mean": round(float(np.mean(cosines)), 3),
            "cosine_to_fp32_min": round(float(np.min(cosines)), 3),
        },
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    f, q, g = result["fp32"], result["int8_dynamic"], result["gemm_gflops"]
    print(f"~{result['tokens_per_text']} tokens per text, {result['torch_threads']} threads")
    print(f"{'encoder':<14} {'1 at a time ms':>15} {'batch 32 ms':>12} {'ratio':>6}")
    print(f"{'fp32':<14} {f['one_at_a_time_ms']:>15} {f['batched_ms']:>12} {f['ratio']:>6}")
    b = result["bf16_autocast"]
    if b is not None:
        row = f"{b['one_at_a_time_ms']:>15} {b['batched_ms']:>12} {b['ratio']:>6}"
        print(f"{'bf16 autocast':<14} {row}")
    print(f"{'int8 dynamic':<14} {q['one_at_a_time_ms']:>15} {q['batched_ms']:>12} {q['ratio']:>6}")
    if b is not None:
        print(
            f"bf16 embeddings vs fp32: cosine mean {b['cosine_to_fp32_mean']}, "
            f"min {b['cosine_to_fp32_min']}"
        )
    else:
        print("bf16 autocast: not measured, this CPU has no native bf16")
    print(
        f"int8 embeddings vs fp32: cosine mean {q['cosine_to_fp32_mean']}, "
        f"min {q['cosine_to_fp32_min']}"
    )
    print(f"matmul 384x1536: {g['rows_100']} GFLOP/s at 100 rows, {g['rows_3200']} at 3200 rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
