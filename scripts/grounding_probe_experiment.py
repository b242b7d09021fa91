"""Does a linear probe on the embedded SmolLM2's hidden states help the groundedness head?

An experiment, not a training script: nothing is written. Every answer (our
``data/grounding`` items as ``train_grounding.py`` expands them, and TruthfulQA's dev and
test halves) is run through the model as ``Source: ...\\nQuestion: ...\\nAnswer: ...``;
the hidden states of each layer are averaged over the answer's tokens ("mean") or taken
at its last token ("last"). A logistic head per layer is fit on our training split only
and scored on our dev split and TruthfulQA's dev half, alone and blended in log-odds with
the shipped head. With ``--test`` the choice given by ``--layer``, ``--pool``, ``--c``
and ``--weight`` (pick them on dev first) is scored once on the test half.

    .venv/bin/python evals/make_eval_sets.py OUT_DIR
    .venv/bin/python scripts/grounding_probe_experiment.py OUT_DIR [--test --layer 18 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from grounding_mix_experiment import groups_of, rows_for  # noqa: E402

from guardrail.filters.embedder import load_sentence_model  # noqa: E402
from guardrail.filters.grounding import DEFAULT_HEAD, SupportHead  # noqa: E402
from guardrail.filters.probe import mix_scores  # noqa: E402

LAYERS = (6, 9, 12, 15, 18, 21, 24, 27, 30)


def states(lm: Any, tokenizer: Any, rows: list[tuple[str, str, str]]) -> dict[str, np.ndarray]:
    """Per row and per layer of :data:`LAYERS`: the answer tokens' mean and last state."""
    import torch

    mean: list[Any] = [None] * len(rows)
    last: list[Any] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][2]))
    for start in range(0, len(order), 32):
        batch = order[start : start + 32]
        heads, fulls = [], []
        for i in batch:
            context, question, answer = rows[i]
            head = f"Source: {context}\nQuestion: {question}\nAnswer:"
            heads.append(len(tokenizer(head)["input_ids"]))
            fulls.append(tokenizer(head + " " + answer)["input_ids"])
        ids = torch.zeros((len(batch), max(map(len, fulls))), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, full in enumerate(fulls):  # right padding: causal states never see it
            ids[j, : len(full)] = torch.tensor(full)
            mask[j, : len(full)] = 1
        with torch.inference_mode():
            hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for j, i in enumerate(batch):
            end = len(fulls[j])
            begin = min(heads[j], end - 1)
            mean[i] = np.concatenate([hidden[n][j, begin:end].mean(0).numpy() for n in LAYERS])
            last[i] = np.concatenate([hidden[n][j, end - 1].numpy() for n in LAYERS])
    return {"mean": np.stack(mean), "last": np.stack(last)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="make_eval_sets.py's output folder")
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded one)")
    parser.add_argument("--test", action="store_true", help="score the chosen probe on test")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--pool", choices=("mean", "last"), default="mean")
    parser.add_argument("--c", type=float, default=0.001)
    parser.add_argument("--weight", type=float, default=0.5, help="the probe's log-odds weight")
    args = parser.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardrail.backends.embedded import embedded_model_path
    from guardrail.settings import default_cache_dir

    path = args.model or embedded_model_path(default_cache_dir())
    if path is None:
        raise SystemExit("no model: run `guardrail model prepare` or pass --model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    encoder = load_sentence_model()
    head = SupportHead.load(DEFAULT_HEAD)
    data: dict[str, dict[str, np.ndarray]] = {}
    halves = ("ours", "test") if args.test else ("ours", "dev")
    groups = groups_of(args.eval_dir)
    for name in halves:
        rows = rows_for(encoder, groups[name])
        texts = [(c, q, a) for c, q, answers, _ in groups[name] for a, _ in answers]
        data[name] = {
            "head": head.predict(rows["h"], question=True),
            "y": rows["y"],
            "dev": rows["dev"].astype(bool),
            **states(lm, tokenizer, texts),
        }
    ours, other = data["ours"], data[halves[1]]
    train, dev = ~ours["dev"], ours["dev"]
    width = lm.config.hidden_size

    def fit(pool: str, index: int, c: float) -> tuple[float, np.ndarray]:
        cut = slice(index * width, (index + 1) * width)
        scaler = StandardScaler().fit(ours[pool][train, cut])
        model = LogisticRegression(C=c, max_iter=2000)
        model.fit(scaler.transform(ours[pool][train, cut]), ours["y"][train])
        own = model.predict_proba(scaler.transform(ours[pool][dev, cut]))[:, 1]
        auc = float(roc_auc_score(ours["y"][dev], own))
        return auc, model.predict_proba(scaler.transform(other[pool][:, cut]))[:, 1]

    print(f"head alone: {roc_auc_score(other['y'], other['head']):.3f} on {halves[1]}")
    if args.test:
        own, scores = fit(args.pool, LAYERS.index(args.layer), args.c)
        blend = mix_scores(other["head"], scores, args.weight)
        print(
            f"probe: ours-dev {own:.3f}, test {roc_auc_score(other['y'], scores):.3f}, "
            f"blend {roc_auc_score(other['y'], blend):.3f}"
        )
        return
    for pool in ("mean", "last"):
        for index, layer in enumerate(LAYERS):
            for c in (0.001, 0.01):
                own, scores = fit(pool, index, c)
                blends = [
                    roc_auc_score(other["y"], mix_scores(other["head"], scores, w))
                    for w in (0.2, 0.33, 0.5)
                ]
                print(
                    f"{pool} layer {layer} C={c}: ours-dev {own:.3f}, "
                    f"tqa-dev {roc_auc_score(other['y'], scores):.3f}, "
                    f"blend w=0.2/0.33/0.5 " + " ".join(f"{b:.3f}" for b in blends),
                    flush=True,
                )


if __name__ == "__main__":
    main()
