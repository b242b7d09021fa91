"""Train the groundedness probe: a logistic head on a causal LM's hidden states.

Writes guardrail/filters/data/grounding_probe.npz (or ``--out``): the probe that a
hallucination filter with ``groundedness: {probe: {}}`` blends into each claim's support
(:mod:`guardrail.filters.probe`). Every answer is read as
``Source: CONTEXT\\nQuestion: QUESTION\\nAnswer: ANSWER`` (:func:`probe_pair`, as the
gateway reads a claim) by the embedded SmolLM2-135M-Instruct, or by ``--model``; the
states of ``--layer`` are averaged over the answer's tokens.

Data and split: exactly train_grounding.py's (data/grounding/, written for this project;
80/20 by a hash of the question; each item's answers plus its copied context sentences
and another item's answer). The probe is fit on the train split only. Its weight in the
blend with the shipped head (``--mix``) and the layer and regularisation were chosen on
TruthfulQA's dev half by ``scripts/grounding_probe_experiment.py`` (README, hallucination
flags); nothing of TruthfulQA is read here. The knee is the blend's value that flags as
many supported answers of our dev split as the head alone at the groundedness threshold
(0.4); the gateway maps it to 0.4, so the threshold keeps its meaning.

    .venv/bin/python scripts/train_grounding_probe.py [--layer 18] [--c 0.001] [--mix 0.5]

19 minutes on 2 CPU cores shared with a test run, for the embedded model; deterministic.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_grounding as training  # noqa: E402

from guardrail.backends.embedded import embedded_model_path  # noqa: E402
from guardrail.backends.local import load_local_model  # noqa: E402
from guardrail.filters.embedder import load_sentence_model  # noqa: E402
from guardrail.filters.grounding import DEFAULT_HEAD, SupportHead, probe_pair  # noqa: E402
from guardrail.filters.hallucination import GroundednessSettings, GroundingProbeSettings  # noqa: E402
from guardrail.filters.probe import (  # noqa: E402
    DEFAULT_GROUNDING_PROBE,
    Probe,
    calibrate,
    decoder_of,
    features_in_batches,
    mix_scores,
    signature,
)
from guardrail.settings import default_cache_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "grounding")
    parser.add_argument("--model", help="model folder or .gguf (default: the embedded model)")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--c", type=float, default=0.001, help="inverse regularisation")
    parser.add_argument("--mix", type=float, default=0.5, help="the probe's log-odds weight")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_GROUNDING_PROBE)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    source = args.model or embedded_model_path(default_cache_dir())
    if source is None:
        sys.exit("the embedded model is not prepared: run 'guardrail model prepare'")
    items = training.load(args.data)
    x, y, dev = training.build_rows(load_sentence_model(), items, with_question=True)
    head_scores = SupportHead.load(DEFAULT_HEAD).predict(x, question=True)
    max_chars = GroundingProbeSettings().max_chars
    pairs = []
    for i, item in enumerate(items):
        supported, unsupported = training.answers_of(items, i)
        context, question = str(item["context"]), str(item["question"])
        pairs.extend(probe_pair([context], question, a, max_chars) for a in supported + unsupported)
    assert len(pairs) == len(y)
    print(f"{len(items)} items, {len(y)} answers: train {int((~dev).sum())}, dev {int(dev.sum())}")

    model, tokenizer = load_local_model(str(source), dtype="fp32", device=args.device)
    decoder = decoder_of(model, [args.layer])
    started = time.perf_counter()
    texts, prefixes = [t for _, t in pairs], [p for p, _ in pairs]
    features = features_in_batches(decoder, tokenizer, texts, [args.layer], prefixes=prefixes)
    print(f"hidden states of {len(pairs)} answers in {time.perf_counter() - started:.0f} s")

    train = ~dev
    mean = features[train].mean(axis=0)
    scale = features[train].std(axis=0) + 1e-6
    fitted = LogisticRegression(C=args.c, max_iter=2000).fit(
        (features[train] - mean) / scale, y[train]
    )
    probe = Probe(
        layers=(args.layer,),
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        coef=fitted.coef_[0].astype(np.float32),
        intercept=float(fitted.intercept_[0]),
        mix=args.mix,
        knee=0.5,
        signature=signature(decoder),
        target=GroundednessSettings().threshold,
    )
    probed = probe.predict(features[dev].astype(np.float32)).astype(np.float64)
    heads, labels = head_scores[dev], y[dev]
    blend = mix_scores(heads, probed, args.mix).astype(np.float64)
    for name, scores in (("head alone", heads), ("probe alone", probed), ("blend", blend)):
        print(f"dev AUROC, {name}: {roc_auc_score(labels, scores):.3f}")
    threshold = probe.target
    share = float((heads[labels == 1] < threshold).mean())
    knee = float(np.quantile(blend[labels == 1], share))
    probe = Probe(**{**probe.__dict__, "knee": knee})
    probe.save(args.out)
    saved = Probe.load(args.out)  # what the gateway computes must be what was chosen here
    check = saved.blend(heads, saved.predict(features[dev].astype(np.float32)))
    assert np.allclose(check, calibrate(blend, knee, threshold), atol=1e-5), "disagrees"
    for name, scores in (("head", heads), ("blend", check)):
        flagged = scores < threshold
        print(
            f"dev at {threshold}, {name}: flags {flagged[labels == 0].mean():.3f} of "
            f"unsupported, {flagged[labels == 1].mean():.3f} of supported"
        )
    print(f"wrote {args.out}: layer {args.layer}, C {args.c}, mix {args.mix}, knee {knee:.3f}")


if __name__ == "__main__":
    main()
