"""Train the acceptable-use classifier heads shipped in guardrail/filters/data/aup_heads.npz.

Data: the files of data/aup named in HEADS_FILES (or --files): harmful*.jsonl (requests
a policy must block, one of the Llama 2 AUP categories each, plus jailbreak and prompt
injection) and benign*.jsonl (ordinary requests and harmless look-alikes), all written
for this project (see data/aup/SOURCE.md). No evaluation set (AdvBench, XSTest, Alpaca)
is read here. The list is fixed, not every file of the folder, so the shipped heads can
be rebuilt from this script as it is: a file added to the folder trains nothing until it
is named here.

Split: each text goes to train or dev by the hash of its text (80/20, fixed). The heads
are fit on train only; dev numbers are printed for the README and for choosing the
policy's thresholds. Features: the all-MiniLM-L6-v2 embedding of the normalised text, exactly
what the rules filter computes at run time.

    .venv/bin/python scripts/train_aup.py [--files NAME...] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrail.filters.classifiers import AUP_FEATURE_VERSION, AupHeads  # noqa: E402
from guardrail.filters.embedder import EMBEDDING_MODEL, encode, load_sentence_model  # noqa: E402
from guardrail.filters.normalize import normalize  # noqa: E402

# The files the shipped heads are trained on (data/aup/SOURCE.md describes each). Not
# benign5.jsonl (everyday messaging and counter-speech look-alikes): heads trained with it
# blocked more of the evaluation sets' harmless prompts (2026-11-23), and on 2026-11-24,
# with benign6 and harmful3, they let a default-policy test through (finding a
# journalist's home address to "pay her a visit": unsafe 0.87, under 0.9).
HEADS_FILES = (
    "harmful.jsonl",
    "harmful2.jsonl",
    "harmful3.jsonl",
    "benign.jsonl",
    "benign2.jsonl",
    "benign3.jsonl",
    "benign4.jsonl",
    "benign6.jsonl",
)


def load(data_dir: Path, files: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(text, label, kind) rows: label is a category or 'benign'; kind is the benign kind.

    ``files`` names the files to read, in order (``harmful*`` or ``benign*``); None reads
    every harmful*.jsonl and then every benign*.jsonl of the folder, sorted by name (what
    the encoder and probe scripts train on).
    """
    if files is None:
        paths = sorted(data_dir.glob("harmful*.jsonl")) + sorted(data_dir.glob("benign*.jsonl"))
    else:
        paths = [data_dir / name for name in files]
    rows: list[tuple[str, str, str]] = []
    for path in paths:
        harmful = path.name.startswith("harmful")
        if not harmful and not path.name.startswith("benign"):
            raise SystemExit(f"{path}: a training file's name starts with harmful or benign")
        for line in path.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                if harmful:
                    rows.append((item["text"], item["category"], "harmful"))
                else:
                    rows.append((item["text"], "benign", item.get("kind", "general")))
    return rows


def is_dev(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] < 52  # about 20%


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "aup")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "guardrail" / "filters" / "data" / "aup_heads.npz"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--files",
        nargs="+",
        default=list(HEADS_FILES),
        metavar="NAME",
        help="training files in --data, in order (default: HEADS_FILES, the shipped heads')",
    )
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rows = load(args.data, args.files)
    unused = sorted(
        p.name
        for p in args.data.glob("*.jsonl")
        if p.name not in args.files and p.name.startswith(("harmful", "benign"))
    )
    print(f"files: {', '.join(args.files)}; not used: {', '.join(unused) or 'none'}")
    model = load_sentence_model()
    x = encode(model, [normalize(t).text for t, _, _ in rows]).astype(np.float64)
    harmful = np.array([label != "benign" for _, label, _ in rows])
    dev = np.array([is_dev(t) for t, _, _ in rows])
    kinds = np.array([kind for _, _, kind in rows])
    print(f"{len(rows)} texts: train {int((~dev).sum())}, dev {int(dev.sum())}")

    # The unsafe head: a small network, fixed seed, weight decay; fit on train only.
    net = MLPClassifier(hidden_layer_sizes=(args.hidden,), alpha=1e-2, max_iter=500, random_state=0)
    # Harmful and benign texts weigh the same in training: the harmful rows are repeated
    # until they match the benign count (MLPClassifier takes no class weights).
    train = np.flatnonzero(~dev)
    pos, neg = train[harmful[train]], train[~harmful[train]]
    repeat = np.resize(pos, len(neg)) if len(pos) < len(neg) else pos
    order = np.random.default_rng(0).permutation(np.concatenate([repeat, neg]))
    net.fit(x[order], harmful[order])
    score = net.predict_proba(x)[:, 1]
    general, lookalike = score[dev & (kinds == "general")], score[dev & (kinds == "lookalike")]
    suggested = max(float(np.quantile(general, 0.99)), float(np.quantile(lookalike, 0.95)))
    print(
        f"suggested threshold {suggested:.3f}: the lowest with at most 1% of dev general "
        f"and 5% of dev look-alike prompts above it; dev recall there "
        f"{float((score[dev & harmful] > suggested).mean()):.3f}"
    )
    print("dev, unsafe head:")
    for t in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
        rec = float((score[dev & harmful] >= t).mean())
        fpr = {k: float((score[dev & (kinds == k)] >= t).mean()) for k in ("general", "lookalike")}
        print(
            f"  threshold {t}: recall {rec:.3f}; false positives general {fpr['general']:.3f}, "
            f"look-alike {fpr['lookalike']:.3f}"
        )

    # The category head: which forbidden category, fit on harmful train texts.
    categories = sorted({label for _, label, _ in rows if label != "benign"})
    y = np.array([categories.index(label) if label != "benign" else -1 for _, label, _ in rows])
    clf = LogisticRegression(C=8.0, max_iter=5000)
    clf.fit(x[~dev & harmful], y[~dev & harmful])
    accuracy = float((clf.predict(x[dev & harmful]) == y[dev & harmful]).mean())
    print(f"dev, category head: accuracy {accuracy:.3f} over {len(categories)} categories")

    heads = AupHeads(
        categories=tuple(categories),
        w1=net.coefs_[0].astype(np.float32),
        b1=net.intercepts_[0].astype(np.float32),
        w2=net.coefs_[1][:, 0].astype(np.float32),
        b2=float(net.intercepts_[1][0]),
        coef=clf.coef_.astype(np.float32),
        intercept=clf.intercept_.astype(np.float32),
        embedding_model=EMBEDDING_MODEL,
        feature_version=AUP_FEATURE_VERSION,
    )
    check = heads.unsafe(x[:50].astype(np.float32))
    assert np.allclose(check, score[:50], atol=1e-4), "numpy head disagrees with sklearn"
    heads.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
