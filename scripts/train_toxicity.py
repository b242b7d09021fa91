"""Train the embedding engine's toxicity heads (guardrail/filters/data/toxicity_heads.npz).

    .venv/bin/python scripts/train_toxicity.py [--davidson PATH/labeled_data.csv]

Data: Davidson et al. (2017) tweets (MIT licence), split 80/10/10 into train/dev/test by a
stable hash of the row id (``guardrail.filters.toxicity.split_of``); only train is fitted,
dev picks the regularisation, test is never read here. Plus ``scripts/data/toxicity_seed.jsonl``
(hand-written for this project, CC0): implicit hate, threats and insults without swear
words, and benign counter-speech and instructions, which tweets lack; a fifth of them
(by hash, ``seed_is_dev``) is held out and only measured. Plus
``scripts/data/toxicity_identity.jsonl`` (``scripts/make_toxicity_identity.py``, CC0):
benign and hateful sentence frames filled with every group of the group lexicon, and the
hateful seeds swapped to every group of their axis, so that no group word alone carries
the hate label; a fifth of its frames (by hash, ``identity_is_dev``) is held out as
identity dev and only measured. The benign prompts of
``data/aup/`` (ours) give the share of ordinary prompts above each threshold: with the
seed dev recall, that is what the policies' thresholds are chosen on.

Heads: ``toxicity`` (hate or offensive vs neither) and ``identity_attack`` (hate vs the
rest), logistic regression (scikit-learn, liblinear, deterministic) over the features of
``FeatureExtractor`` (MiniLM embedding + profanity log-odds). Prints split sizes and dev
metrics. Deterministic: same data, same weights.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_score, recall_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.filters.toxicity import (  # noqa: E402
    DEFAULT_WEIGHTS,
    EMBEDDING_MODEL,
    FEATURE_VERSION,
    FeatureExtractor,
    LinearHeads,
    split_of,
)

SEED = 20261122
SEED_WEIGHT = 5.0  # each hand-written sentence counts like this many tweets
# Each identity sentence counts like this many tweets (a frame has 100 to 200 fills, so
# it weighs like that many tweets); chosen on identity dev, seed dev and Davidson dev.
IDENTITY_WEIGHT = 1.0


def seed_is_dev(text: str) -> bool:
    """About a fifth of the hand-written sentences, by hash: held out to measure them."""
    return hashlib.sha256(f"toxicity-seed-split|{text}".encode()).digest()[0] < 52


def identity_is_dev(frame: str) -> bool:
    """About a fifth of the identity frames, by hash: held out to measure them."""
    return hashlib.sha256(f"toxicity-identity-split|{frame}".encode()).digest()[0] < 52


def benign_prompts(root: Path) -> list[str]:
    """The benign prompts of ``data/aup/`` (ours): a benign dev set for the thresholds."""
    return [
        json.loads(line)["text"]
        for path in sorted((root / "data" / "aup").glob("benign*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def read_davidson(path: Path) -> list[tuple[str, str, int, int]]:
    """(split, text, toxic, hate) per row; the split comes from the row id alone."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            cls = int(row["class"])
            rows.append(
                (split_of(f"davidson:{row['']}"), row["tweet"], int(cls != 2), int(cls == 0))
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--davidson",
        type=Path,
        default=ROOT.parent / "shared/eval/davidson-hate-offensive/labeled_data.csv",
    )
    parser.add_argument("--seed-data", type=Path, default=ROOT / "scripts/data/toxicity_seed.jsonl")
    parser.add_argument(
        "--identity-data", type=Path, default=ROOT / "scripts/data/toxicity_identity.jsonl"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args()
    np.random.seed(SEED)

    rows = read_davidson(args.davidson)
    train = [r for r in rows if r[0] == "train"]
    dev = [r for r in rows if r[0] == "dev"]
    n_test = sum(r[0] == "test" for r in rows)
    all_seeds = [
        json.loads(line) for line in args.seed_data.read_text().splitlines() if line.strip()
    ]
    seeds = [s for s in all_seeds if not seed_is_dev(s["text"])]
    seed_dev = [s for s in all_seeds if seed_is_dev(s["text"])]
    all_identity = [
        json.loads(line) for line in args.identity_data.read_text().splitlines() if line.strip()
    ]
    identity = [s for s in all_identity if not identity_is_dev(s["frame"])]
    identity_dev = [s for s in all_identity if identity_is_dev(s["frame"])]
    benign = benign_prompts(ROOT)
    print(f"davidson rows: {len(rows)}  train={len(train)} dev={len(dev)} test={n_test} (unused)")
    print(f"seed sentences: {len(seeds)} train (weight {SEED_WEIGHT}), {len(seed_dev)} dev")
    print(
        f"identity sentences: {len(identity)} train (weight {IDENTITY_WEIGHT}), "
        f"{len(identity_dev)} dev ({len({s['frame'] for s in identity_dev})} frames)"
    )

    started = time.perf_counter()
    extractor = FeatureExtractor.load()
    x_train = extractor.features(
        [r[1] for r in train] + [s["text"] for s in seeds] + [s["text"] for s in identity]
    )
    x_dev = extractor.features([r[1] for r in dev])
    x_seed_dev = extractor.features([s["text"] for s in seed_dev])
    x_benign = extractor.features(benign)
    x_identity_dev = extractor.features([s["text"] for s in identity_dev])
    print(f"features: {x_train.shape[1]} per text, {time.perf_counter() - started:.0f} s")
    weight = np.array(
        [1.0] * len(train) + [SEED_WEIGHT] * len(seeds) + [IDENTITY_WEIGHT] * len(identity)
    )

    heads: dict[str, LogisticRegression] = {}
    for name, column in (("toxicity", 2), ("identity_attack", 3)):
        y_train = np.array(
            [r[column] for r in train]
            + [int(s[name]) for s in seeds]
            + [int(s[name]) for s in identity]
        )
        y_dev = np.array([r[column] for r in dev])
        best: tuple[float, float, LogisticRegression] | None = None
        for c in (0.3, 1.0, 3.0, 10.0):
            model = LogisticRegression(C=c, solver="liblinear", random_state=SEED, max_iter=1000)
            model.fit(x_train, y_train, sample_weight=weight)
            prob = model.predict_proba(x_dev)[:, 1]
            f1 = f1_score(y_dev, prob >= 0.5, average="macro")
            print(f"  {name}: C={c:<5} dev macro-F1 at 0.5 = {f1:.4f}")
            if best is None or f1 > best[0]:
                best = (f1, c, model)
        assert best is not None
        f1, c, model = best
        heads[name] = model
        prob = model.predict_proba(x_dev)[:, 1]
        print(f"{name}: chose C={c}; dev (n={len(y_dev)}, positives={int(y_dev.sum())})")
        y_seed = np.array([int(s[name]) for s in seed_dev])
        p_seed = model.predict_proba(x_seed_dev)[:, 1]
        p_benign = model.predict_proba(x_benign)[:, 1]
        y_identity = np.array([int(s[name]) for s in identity_dev])
        p_identity = model.predict_proba(x_identity_dev)[:, 1]
        for threshold in (0.3, 0.5, 0.7, 0.8, 0.9):
            pred = prob >= threshold
            print(
                f"  threshold {threshold}: macro-F1={f1_score(y_dev, pred, average='macro'):.4f} "
                f"precision={precision_score(y_dev, pred, zero_division=0):.4f} "
                f"recall={recall_score(y_dev, pred):.4f}; "
                f"seed dev recall={float((p_seed[y_seed == 1] >= threshold).mean()):.3f} "
                f"(n={int(y_seed.sum())}); "
                f"benign prompts above={float((p_benign >= threshold).mean()):.4f} "
                f"(n={len(benign)}); "
                f"identity dev: hateful recall="
                f"{float((p_identity[y_identity == 1] >= threshold).mean()):.3f} "
                f"(n={int(y_identity.sum())}), benign above="
                f"{float((p_identity[y_identity == 0] >= threshold).mean()):.4f} "
                f"(n={int((y_identity == 0).sum())})"
            )

    names = tuple(heads)
    LinearHeads(
        names=names,
        coef=np.vstack([heads[n].coef_[0] for n in names]).astype(np.float64),
        intercept=np.array([heads[n].intercept_[0] for n in names], dtype=np.float64),
        embedding_model=EMBEDDING_MODEL,
        feature_version=FEATURE_VERSION,
    ).save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
