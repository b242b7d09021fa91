"""Train the groundedness head shipped in guardrail/filters/data/grounding_head.npz.

Data: data/grounding/*.jsonl, written for this project (see data/grounding/SOURCE.md).
Each line has a question, a context, three answers the context supports and three it
does not. Every answer is one training row: its features against that context (exactly
what :class:`guardrail.filters.grounding.GroundingScorer` computes at run time) and
whether the context supports it. No evaluation set (TruthfulQA) is read here.

Split: each item goes to train or dev by the hash of its question (80/20, fixed), so the
answers of one question never straddle the split. The head is fit on train only; dev
AUROC is printed for the README. Two heads are fit: one on features computed with the
question known, one without (``residual_cosine`` is then plain cosine).

    .venv/bin/python scripts/train_grounding.py [--out guardrail/filters/data/grounding_head.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.filters.embedder import encode, load_sentence_model  # noqa: E402
from guardrail.filters.grounding import (  # noqa: E402
    DEFAULT_HEAD,
    FEATURES,
    VARIANTS,
    Logistic,
    SupportHead,
    features,
    make_evidence,
    sentence_spans,
    source_units,
)


def load(data_dir: Path) -> list[dict[str, object]]:
    items = []
    for path in sorted(data_dir.glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                item = json.loads(line)
                item["where"] = f"{path.name}:{number}"
                items.append(item)
    return items


def is_dev(question: str) -> bool:
    return hashlib.sha256(question.encode()).digest()[0] < 52  # about 20%


def answers_of(items: list[dict[str, object]], i: int) -> tuple[list[str], list[str]]:
    """The supported and unsupported answers of item ``i``, with two added kinds.

    The written answers are adversarial (unsupported ones reuse the context's words,
    supported ones paraphrase), which alone would teach "close to the source means
    unsupported". So each item also gets its context's own sentences as supported
    answers (a copied sentence is supported) and the first supported answer of the next
    item, on another topic, as an unsupported one.
    """
    item = items[i]
    context = str(item["context"])
    copied = [context[a:b] for a, b in sentence_spans(context)]
    other = str(items[(i + 1) % len(items)]["supported"][0])  # type: ignore[index]
    supported = [str(a) for a in item["supported"]] + copied  # type: ignore[attr-defined]
    unsupported = [str(a) for a in item["unsupported"]] + [other]  # type: ignore[attr-defined]
    return supported, unsupported


def build_rows(
    model: object, items: list[dict[str, object]], *, with_question: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and the dev mask for every answer of every item."""
    texts: set[str] = set()
    unit_lists = []
    for i, item in enumerate(items):
        units = source_units([str(item["context"])], 128)
        unit_lists.append(units)
        texts.update(units)
        texts.add(str(item["question"]))
        supported, unsupported = answers_of(items, i)
        texts.update(supported + unsupported)
    ordered = sorted(texts)
    vectors = dict(zip(ordered, encode(model, ordered), strict=True))
    rows, labels, dev = [], [], []
    for i, (item, units) in enumerate(zip(items, unit_lists, strict=True)):
        context, question = str(item["context"]), str(item["question"])
        evidence = make_evidence([context], units, np.stack([vectors[u] for u in units]))
        supported, unsupported = answers_of(items, i)
        answers = supported + unsupported
        x = features(
            answers,
            np.stack([vectors[a] for a in answers]),
            evidence,
            question if with_question else None,
            vectors[question] if with_question else None,
        )
        rows.append(x)
        labels.extend([1] * len(supported) + [0] * len(unsupported))
        dev.extend([is_dev(question)] * len(answers))
    return np.concatenate(rows), np.array(labels), np.array(dev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "grounding")
    parser.add_argument("--out", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--c", type=float, default=1.0, help="inverse regularisation strength")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    items = load(args.data)
    model = load_sentence_model()
    heads = {}
    for variant in VARIANTS:
        x, y, dev = build_rows(model, items, with_question=variant == "question")
        print(
            f"[{variant}] {len(items)} items, {len(y)} answers: train {int((~dev).sum())}, "
            f"dev {int(dev.sum())}"
        )
        mean, scale = x[~dev].mean(axis=0), x[~dev].std(axis=0)
        scale[scale == 0] = 1.0
        lr = LogisticRegression(C=args.c, max_iter=1000).fit((x[~dev] - mean) / scale, y[~dev])
        head = Logistic(mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))
        heads[variant] = head
        p = head.predict(x[dev])
        print(f"  dev AUROC {roc_auc_score(y[dev], p):.4f}; per-feature dev AUROC:")
        for i, name in enumerate(FEATURES):
            auc = roc_auc_score(y[dev], x[dev, i])
            print(f"    {name:20s} {auc:.4f}  coef {head.coef[i]:+.3f}")
        for t in (0.3, 0.4, 0.5, 0.6):
            bad = float((p[y[dev] == 0] < t).mean())
            good = float((p[y[dev] == 1] < t).mean())
            print(f"    threshold {t}: flags {bad:.3f} of unsupported, {good:.3f} of supported")
    SupportHead(heads["question"], heads["plain"]).save(args.out)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
