"""What running a shared prefix once saves the groundedness probe, on the embedded model.

    .venv/bin/python benchmarks/bench_probe_prefix.py [--runs 5] [--claims 1 5 20]

The claims of one answer are all read after the same ``Source: ... Question: ...
Answer:`` prefix. :func:`guardrail.filters.probe.features_after` runs that prefix once and
reuses its keys and values; the plain way (``hidden_features`` with the prefix in front
of each claim) runs it once per claim. Both are timed alternately in one process on the
same texts (five retrieved documents cut to the probe's 2,000 characters, and the given
numbers of one-sentence claims); the median of ``--runs`` is printed with the ratio.
Needs ``guardrail model prepare``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.backends.embedded import embedded_model_path  # noqa: E402
from guardrail.backends.local import load_local_model  # noqa: E402
from guardrail.filters.grounding import probe_pair  # noqa: E402
from guardrail.filters.probe import decoder_of, features_after, hidden_features  # noqa: E402
from guardrail.settings import default_cache_dir  # noqa: E402

DOC = (
    "Order {n} ships from the Leeds warehouse within two working days. Standard delivery "
    "takes three to five days after dispatch. Express delivery costs 9 pounds and arrives "
    "the next working day. Returns are accepted within 30 days of delivery for unused "
    "items. Refunds go back to the original payment method within 10 days."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--claims", type=int, nargs="+", default=[1, 5, 20])
    args = parser.parse_args()
    source = embedded_model_path(default_cache_dir())
    if source is None:
        sys.exit("the embedded model is not prepared: run 'guardrail model prepare'")
    model, tokenizer = load_local_model(str(source), dtype="fp32", device="cpu")
    decoder = decoder_of(model, [18])
    docs = [DOC.format(n=i) for i in range(5)]
    prefix, _ = probe_pair(docs, "When will my order arrive?", "", 2000)
    print(f"prefix: {len(tokenizer(prefix)['input_ids'])} tokens; median of {args.runs} runs")
    for count in args.claims:
        claims = [f" Your order {i} arrives within five days." for i in range(count)]
        shared, plain = [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            features_after(decoder, tokenizer, prefix, claims, [18])
            shared.append(time.perf_counter() - started)
            started = time.perf_counter()
            hidden_features(decoder, tokenizer, claims, [18], [prefix] * count)
            plain.append(time.perf_counter() - started)
        a, b = statistics.median(shared) * 1000, statistics.median(plain) * 1000
        print(f"  {count:3d} claims: prefix once {a:8.1f} ms, per claim {b:8.1f} ms ({b / a:.1f}x)")


if __name__ == "__main__":
    main()
