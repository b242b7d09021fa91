"""Convert the shared labeled data sets into JSONL for ``guardrail eval``.

    .venv/bin/python evals/make_eval_sets.py OUT_DIR [--shared ../shared/eval]

Writes (never commit them: the shared data keeps its own licence and location):

- ``davidson-test.jsonl``: the Davidson et al. (2017) rows of the held-out *test* split
  (``guardrail.filters.toxicity.split_of``; the shipped weights never saw them),
  ``label: block`` for hate speech or offensive language, ``allow`` for neither;
  ``category`` is ``hate`` or ``offensive``.
- ``davidson-dev.jsonl``: the dev split, used to choose thresholds (not for reporting).
- ``alpaca-benign-2k.jsonl``: the 2,000 Alpaca instructions, all ``label: allow``.
- ``advbench-harmful-behaviors.jsonl``: the 520 AdvBench goals, all ``label: block``.
- ``xstest-unsafe.jsonl`` / ``xstest-safe.jsonl``: XSTest's prompts by its label
  (``block`` / ``allow``), ``category`` from its ``type`` column: the acceptable-use
  measurements (recall on the unsafe half, false-positive rate on the safe half).
- ``truthfulqa-grounded-{dev,test,all}.jsonl``: groundedness. For each TruthfulQA
  question, ``context`` is its best answer and ``prompt`` the question; its other correct
  answers are ``label: allow`` and its incorrect answers ``label: block``. Questions split
  in halves by a hash of the question (``dev`` was looked at while designing the
  features; ``test`` was not); nothing of TruthfulQA trains anything.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.filters.toxicity import split_of  # noqa: E402


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows")


def main() -> int:
    parser = argparse.ArgumentParser(description="Convert ../shared/eval data to JSONL.")
    parser.add_argument("out", type=Path, help="folder to write the JSONL files into")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "eval")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    splits: dict[str, list[dict[str, str]]] = {"dev": [], "test": []}
    names = {0: "hate", 1: "offensive"}
    davidson = args.shared / "davidson-hate-offensive" / "labeled_data.csv"
    with davidson.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            split = split_of(f"davidson:{row['']}")
            if split == "train":
                continue
            cls = int(row["class"])
            out = {"text": row["tweet"], "label": "allow" if cls == 2 else "block"}
            if cls in names:
                out["category"] = names[cls]
            splits[split].append(out)
    for split, rows in splits.items():
        _write(args.out / f"davidson-{split}.jsonl", rows)

    alpaca = args.shared / "alpaca-benign-2k" / "alpaca_noinput_2000.jsonl"
    rows = [
        {"text": json.loads(line)["instruction"], "label": "allow"}
        for line in alpaca.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    _write(args.out / "alpaca-benign-2k.jsonl", rows)

    advbench = args.shared / "advbench-harmful-behaviors" / "harmful_behaviors.csv"
    with advbench.open(newline="", encoding="utf-8") as f:
        rows = [{"text": row["goal"], "label": "block"} for row in csv.DictReader(f)]
    _write(args.out / "advbench-harmful-behaviors.jsonl", rows)

    xstest = args.shared / "xstest" / "xstest_prompts.csv"
    halves: dict[str, list[dict[str, str]]] = {"unsafe": [], "safe": []}
    with xstest.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = "block" if row["label"] == "unsafe" else "allow"
            halves[row["label"]].append(
                {"text": row["prompt"], "label": label, "category": row["type"]}
            )
    for half, rows in halves.items():
        _write(args.out / f"xstest-{half}.jsonl", rows)

    truthful = args.shared / "truthfulqa" / "TruthfulQA.csv"
    grounded: dict[str, list[dict[str, str]]] = {"dev": [], "test": []}
    with truthful.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            question, best = row["Question"], row["Best Answer"].strip()
            digest = int(hashlib.sha256(question.encode()).hexdigest(), 16)
            half = "dev" if digest % 2 == 0 else "test"
            answers = [(a, "allow") for a in _answers(row["Correct Answers"]) if a != best]
            answers += [(a, "block") for a in _answers(row["Incorrect Answers"])]
            for answer, label in answers:
                grounded[half].append(
                    {"text": answer, "label": label, "context": best, "prompt": question}
                )
    for half, rows in grounded.items():
        _write(args.out / f"truthfulqa-grounded-{half}.jsonl", rows)
    _write(args.out / "truthfulqa-grounded-all.jsonl", grounded["dev"] + grounded["test"])
    return 0


def _answers(cell: str) -> list[str]:
    return [a.strip() for a in cell.split(";") if a.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
