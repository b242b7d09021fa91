"""Would training the groundedness head on TruthfulQA's dev half too close the gap?

An experiment, not a training script: nothing is written. It fits logistic heads on
three kinds of input and prints pooled AUROC on our own dev split
(``data/grounding``, as in ``train_grounding.py``), TruthfulQA's dev half and its test
half:

- ``h``: the eight features the filter computes (:data:`~guardrail.filters.grounding.FEATURES`);
- ``prod``: those plus the product of the claim's and its best source unit's embeddings;
- ``prod+diff``: plus their absolute difference; ``prod+diff+q``: plus claim x question.

Each is fit on our training split alone and on it plus TruthfulQA's dev half, at three
regularisation strengths. The test half is only scored. Answers are scored as single
claims (no sentence split), so the numbers are a little above ``guardrail eval``'s.

    .venv/bin/python evals/make_eval_sets.py OUT_DIR
    .venv/bin/python scripts/grounding_mix_experiment.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_grounding as training  # noqa: E402

from guardrail.filters.embedder import encode, load_sentence_model  # noqa: E402
from guardrail.filters.grounding import features, make_evidence, source_units  # noqa: E402

Group = tuple[str, str, list[tuple[str, int]], bool]  # context, question, answers, dev


def rows_for(model: Any, groups: list[Group]) -> dict[str, np.ndarray]:
    """Features, embeddings (claim, best unit, question), labels and dev flags."""
    texts: set[str] = set()
    for context, question, answers, _ in groups:
        texts.update(source_units([context], 128))
        texts.add(question)
        texts.update(a for a, _ in answers)
    ordered = sorted(texts)
    vec = dict(zip(ordered, encode(model, ordered), strict=True))
    out: dict[str, list[Any]] = {k: [] for k in ("h", "c", "u", "q", "y", "dev")}
    for context, question, answers, dev in groups:
        units = source_units([context], 128)
        unit_vectors = np.stack([vec[u] for u in units])
        evidence = make_evidence([context], units, unit_vectors)
        claims = [a for a, _ in answers]
        claim_vectors = np.stack([vec[a] for a in claims])
        out["h"].append(features(claims, claim_vectors, evidence, question, vec[question]))
        out["c"].append(claim_vectors)
        out["u"].append(unit_vectors[(claim_vectors @ unit_vectors.T).argmax(axis=1)])
        out["q"].append(np.repeat(vec[question][None], len(claims), axis=0))
        out["y"].extend(label for _, label in answers)
        out["dev"].extend([dev] * len(claims))
    return {
        k: (np.concatenate(v) if k in ("h", "c", "u", "q") else np.array(v)) for k, v in out.items()
    }


def groups_of(eval_dir: Path) -> dict[str, list[Group]]:
    """Our items ("ours", with their dev flags) and TruthfulQA's "dev" and "test" halves."""
    items = training.load(ROOT / "data" / "grounding")
    out: dict[str, list[Group]] = {"ours": []}
    for i, item in enumerate(items):
        supported, unsupported = training.answers_of(items, i)
        answers = [(a, 1) for a in supported] + [(a, 0) for a in unsupported]
        question = str(item["question"])
        out["ours"].append((str(item["context"]), question, answers, training.is_dev(question)))
    for half in ("dev", "test"):
        by_question: dict[tuple[str, str], list[tuple[str, int]]] = {}
        path = eval_dir / f"truthfulqa-grounded-{half}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            label = 1 if r["label"] == "allow" else 0
            by_question.setdefault((r["context"], r["prompt"]), []).append((r["text"], label))
        out[half] = [(c, q, a, False) for (c, q), a in by_question.items()]
    return out


def inputs(d: dict[str, np.ndarray], kind: str) -> np.ndarray:
    parts = [d["h"]]
    if "prod" in kind:
        parts.append(d["c"] * d["u"])
    if "diff" in kind:
        parts.append(np.abs(d["c"] - d["u"]))
    if "+q" in kind:
        parts.append(d["c"] * d["q"])
    return np.concatenate(parts, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="make_eval_sets.py's output folder")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    model = load_sentence_model()
    data = {name: rows_for(model, groups) for name, groups in groups_of(args.eval_dir).items()}
    o, tqa_dev, tqa_test = data["ours"], data["dev"], data["test"]
    train = ~o["dev"]
    for kind in ("h", "prod", "prod+diff", "prod+diff+q"):
        for c in (0.01, 0.1, 1.0):
            for mix in ("ours", "ours+tqa-dev"):
                x, y = inputs(o, kind)[train], o["y"][train]
                if mix != "ours":
                    x = np.concatenate([x, inputs(tqa_dev, kind)])
                    y = np.concatenate([y, tqa_dev["y"]])
                mean, scale = x.mean(axis=0), x.std(axis=0)
                scale[scale == 0] = 1.0
                lr = LogisticRegression(C=c, max_iter=3000).fit((x - mean) / scale, y)

                def auc(d: dict[str, np.ndarray], mask: np.ndarray | None = None) -> float:
                    z = lr.decision_function((inputs(d, kind) - mean) / scale)  # noqa: B023
                    if mask is None:
                        return float(roc_auc_score(d["y"], z))
                    return float(roc_auc_score(d["y"][mask], z[mask]))

                print(
                    f"{kind:12} C={c:<5} {mix:13} ours-dev {auc(o, o['dev']):.4f}  "
                    f"tqa-dev {auc(tqa_dev):.4f}  tqa-test {auc(tqa_test):.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
