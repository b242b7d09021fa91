"""Find training texts that come close to evaluation texts (decontamination check).

    .venv/bin/python scripts/check_overlap.py data/aup EVAL.jsonl... [--threshold 0.9] [--drop]

Compares every line of DATA/*.jsonl (data/aup or data/grounding) with every evaluation
text by the cosine
similarity of their all-MiniLM-L6-v2 embeddings (and exact match after normalisation).
Prints each pair at or above the threshold; ``--drop`` removes those training lines
from their files. Evaluation texts are only compared, never written anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.filters.embedder import encode, load_sentence_model  # noqa: E402
from guardrail.filters.normalize import normalize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("evals", type=Path, nargs="+")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--drop", action="store_true")
    args = parser.parse_args()

    # A training line's texts: "text" (data/aup) or "question" and "context"
    # (data/grounding); an evaluation line's: "text", "prompt" and "context".
    train: list[tuple[Path, int, str]] = []
    for path in sorted(args.data.glob("*.jsonl")):
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                train.extend((path, i, row[k]) for k in ("text", "question", "context") if k in row)
    evals = sorted(
        {
            text
            for path in args.evals
            for line in path.read_text().splitlines()
            if line.strip()
            for text in _texts(json.loads(line))
        }
    )
    model = load_sentence_model()
    a = encode(model, [normalize(t).text for _, _, t in train])
    b = encode(model, [normalize(t).text for t in evals])
    sims = a @ b.T
    best = sims.argmax(axis=1)
    flagged: dict[Path, set[int]] = {}
    for k, (path, i, text) in enumerate(train):
        score = float(sims[k, best[k]])
        if score >= args.threshold:
            flagged.setdefault(path, set()).add(i)
            print(f"{score:.3f}  {path.name}:{i + 1}  {text!r}  ~  {evals[best[k]]!r}")
    total = sum(len(v) for v in flagged.values())  # lines, not texts
    print(f"{total} of {len(train)} training texts at or above {args.threshold}")
    if args.drop:
        for path, lines in flagged.items():
            kept = [line for i, line in enumerate(path.read_text().splitlines()) if i not in lines]
            path.write_text("\n".join(kept) + "\n")
            print(f"dropped {len(lines)} from {path}")


def _texts(row: dict[str, object]) -> list[str]:
    out = [row[k] for k in ("text", "prompt") if isinstance(row.get(k), str)]
    context = row.get("context")
    out += [context] if isinstance(context, str) else list(context or [])  # type: ignore[call-overload]
    return [str(t) for t in out]


if __name__ == "__main__":
    main()
