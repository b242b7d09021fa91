"""Benchmark: latency and throughput the gateway adds (see guardrail/bench_proxy.py).

.venv/bin/python benchmarks/bench_proxy.py [--json]   # same as: guardrail bench proxy
"""

from __future__ import annotations

import sys

from guardrail.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "proxy", *sys.argv[1:]]))
