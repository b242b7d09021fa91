"""Train the acceptable-use probe: a logistic head on a causal LM's hidden states.

Writes guardrail/filters/data/aup_probe.npz (or ``--out``): the probe that
``embedding-heads`` engines with ``probe`` set blend into ``unsafe``
(:mod:`guardrail.filters.probe`). By default it reads the embedded SmolLM2-135M-Instruct
(``guardrail model prepare``); ``--model`` trains one for another Llama-family checkpoint,
such as the one a deployment serves, and the gateway then needs ``probe: {model: ...}``
pointing at the same checkpoint.

Data and split: exactly train_aup.py's (data/aup/, written for this project; 80/20 by a
hash of the text). The probe is fit on the train split only; the dev split chooses the
probe's weight in the blend with the shipped heads and the blend's threshold (``knee``:
the lowest with at most 1% of ordinary and 5% of look-alike dev prompts above it), which
the gateway maps to the policy's 0.9. No evaluation set is read here. Texts are
normalised as the rules filter normalises them.

    .venv/bin/python scripts/train_aup_probe.py [--layers 12 18] [--c 0.01] [--out PATH]

About 5 minutes on 2 CPU cores for the embedded model (one forward pass per text through
its first 18 layers); deterministic, so a rerun gives the same file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_aup  # noqa: E402

from guardrail.backends.embedded import embedded_model_path  # noqa: E402
from guardrail.backends.local import load_local_model  # noqa: E402
from guardrail.filters.classifiers import DEFAULT_AUP_WEIGHTS, AupHeads  # noqa: E402
from guardrail.filters.embedder import encode, load_sentence_model  # noqa: E402
from guardrail.filters.normalize import normalize  # noqa: E402
from guardrail.filters.probe import (  # noqa: E402
    DEFAULT_AUP_PROBE,
    Probe,
    calibrate,
    decoder_of,
    features_in_batches,
    mix_scores,
    signature,
)
from guardrail.settings import default_cache_dir  # noqa: E402

MIXES = (0.35, 0.5, 0.65, 0.8)


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.bool_], c: float
) -> tuple[npt.NDArray[np.float64], float]:
    """L2-regularised logistic regression with both classes weighing the same:
    minimises ``c * sum(w_i * loss_i) + |coef|^2 / 2`` (``w_i`` = n / (2 n_class))."""
    import torch

    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y.astype(np.float64))
    n, positives = len(y), float(y.sum())
    weights = torch.where(yt > 0, n / (2 * positives), n / (2 * (n - positives)))
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [coef, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        z = xt @ coef + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            z, yt, weight=weights, reduction="sum"
        )
        total = c * loss + 0.5 * (coef @ coef)
        total.backward()
        return total

    optimiser.step(objective)
    return coef.detach().numpy(), float(bias.detach()[0])


def knee_of(
    scores: npt.NDArray[np.float64], harmful: npt.NDArray[np.bool_], kinds: npt.NDArray[np.str_]
) -> float:
    """The lowest threshold with at most 1% of ordinary and 5% of look-alike dev prompts
    above it."""
    general = scores[~harmful & (kinds == "general")]
    lookalike = scores[kinds == "lookalike"]
    return max(float(np.quantile(general, 0.99)), float(np.quantile(lookalike, 0.95)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "aup")
    parser.add_argument("--model", help="model folder or .gguf (default: the embedded model)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 18])
    parser.add_argument("--c", type=float, default=0.01, help="inverse regularisation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_AUP_PROBE)
    args = parser.parse_args()

    source = args.model or embedded_model_path(default_cache_dir())
    if source is None:
        sys.exit("the embedded model is not prepared: run 'guardrail model prepare'")
    rows = train_aup.load(args.data)
    texts = [normalize(t).text for t, _, _ in rows]
    harmful = np.array([label != "benign" for _, label, _ in rows])
    dev = np.array([train_aup.is_dev(t) for t, _, _ in rows])
    kinds = np.array([kind for _, _, kind in rows])
    print(f"{len(rows)} texts: train {int((~dev).sum())}, dev {int(dev.sum())}")

    model, tokenizer = load_local_model(str(source), dtype="fp32", device=args.device)
    decoder = decoder_of(model, args.layers)
    started = time.perf_counter()
    features = features_in_batches(decoder, tokenizer, texts, args.layers)
    print(f"hidden states of {len(texts)} texts in {time.perf_counter() - started:.0f} s")

    train = ~dev
    mean = features[train].mean(axis=0)
    scale = features[train].std(axis=0) + 1e-6
    coef, intercept = fit_logistic((features[train] - mean) / scale, harmful[train], args.c)
    probe = Probe(
        layers=tuple(args.layers),
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        coef=coef.astype(np.float32),
        intercept=intercept,
        mix=1.0,
        knee=0.5,
        signature=signature(decoder),
    )
    probed = probe.predict(features[dev].astype(np.float32)).astype(np.float64)
    heads = AupHeads.load(DEFAULT_AUP_WEIGHTS)
    dev_texts = [texts[j] for j in np.flatnonzero(dev)]
    head_scores = heads.unsafe(encode(load_sentence_model(), dev_texts)).astype(np.float64)
    d_harm, d_kind = harmful[dev], kinds[dev]

    def recall_at_knee(scores: npt.NDArray[np.float64]) -> tuple[float, float]:
        knee = knee_of(scores, d_harm, d_kind)
        return float((scores[d_harm] > knee).mean()), knee

    print(f"dev, heads alone: recall {recall_at_knee(head_scores)[0]:.3f}")
    print(f"dev, probe alone: recall {recall_at_knee(probed)[0]:.3f}")
    best = (-1.0, 0.0, 0.0)
    for mix in MIXES:
        recall, knee = recall_at_knee(mix_scores(head_scores, probed, mix).astype(np.float64))
        print(f"dev, blend with the probe at {mix}: recall {recall:.3f} above {knee:.3f}")
        if recall > best[0]:  # a tie keeps the lower weight: the heads keep more say
            best = (recall, mix, knee)
    recall, mix, knee = best
    probe = Probe(**{**probe.__dict__, "mix": mix, "knee": knee})
    probe.save(args.out)
    # What the gateway computes must be what was chosen here.
    saved = Probe.load(args.out)
    check = saved.blend(head_scores, saved.predict(features[dev].astype(np.float32)))
    expected = calibrate(mix_scores(head_scores, probed, mix), knee)
    assert np.allclose(check, expected, atol=1e-5), "the saved probe disagrees"
    print(f"wrote {args.out}: layers {args.layers}, mix {mix}, knee {knee:.3f}")
    print(f"dev recall at the knee {recall:.3f}")


if __name__ == "__main__":
    main()
