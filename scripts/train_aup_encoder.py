"""Fine-tune the sentence encoder for the acceptable-use ``unsafe`` score (LoRA).

Writes guardrail/filters/data/aup_encoder.npz: low-rank updates of every linear layer of
all-MiniLM-L6-v2 (the shared sentence encoder) and a linear head over the updated
encoder's normalised embedding. ``embedding-heads`` engines with ``encoder`` set score
``unsafe`` with it (:class:`guardrail.filters.classifiers.EncoderHead`); the category
head still reads the shared embeddings.

Why: the heads over frozen embeddings separate topics well and intent poorly. Letting
the encoder itself learn the difference between a forbidden request and a harmless one
on the same topic raises recall at the same false-positive rate (README, acceptable
use, measured).

Data and split: exactly train_aup.py's (data/aup/, written for this project; 80/20 by a
hash of the text, fit on train only). No evaluation set is read here. The texts are
normalised as the rules filter normalises them.

    .venv/bin/python scripts/train_aup_encoder.py [--epochs 2] [--out PATH]

About 10 minutes per epoch on 2 CPU cores; seeded, so a rerun gives the same weights on
the same machine and library versions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_aup  # noqa: E402

from guardrail.filters.classifiers import (  # noqa: E402
    DEFAULT_AUP_ENCODER,
    ENCODER_TARGETS,
    EncoderHead,
)
from guardrail.filters.embedder import EMBEDDING_MODEL, load_sentence_model  # noqa: E402
from guardrail.filters.normalize import normalize  # noqa: E402


def lora_layers(bert: Any, rank: int, alpha: float) -> dict[str, Any]:
    """Wrap each target linear layer of ``bert`` with a trainable low-rank update."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
            self.scale = alpha / rank

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale

    wrapped = {}
    for name, module in list(bert.named_modules()):
        inside = name.startswith("encoder.layer.")  # not the pooler, which pooling ignores
        short = name.rsplit(".", 1)[-1]
        if inside and short in ENCODER_TARGETS and isinstance(module, torch.nn.Linear):
            parent = bert.get_submodule(name.rsplit(".", 1)[0])
            layer = LoRALinear(module)
            setattr(parent, name.rsplit(".", 1)[-1], layer)
            wrapped[name] = layer
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "aup")
    parser.add_argument("--out", type=Path, default=DEFAULT_AUP_ENCODER)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    rows = train_aup.load(args.data)
    texts = [normalize(t).text for t, _, _ in rows]
    harmful = np.array([label != "benign" for _, label, _ in rows], dtype=np.float32)
    dev = np.array([train_aup.is_dev(t) for t, _, _ in rows])
    kinds = np.array([kind for _, _, kind in rows])
    train = np.flatnonzero(~dev)
    print(f"{len(rows)} texts: train {len(train)}, dev {int(dev.sum())}")

    model = load_sentence_model()
    bert, tokenizer = model[0].auto_model, model.tokenizer
    for p in bert.parameters():
        p.requires_grad_(False)
    layers = lora_layers(bert, args.rank, alpha=2.0 * args.rank)
    head = torch.nn.Linear(bert.config.hidden_size, 1)

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
        out = bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def logits(batch: list[str]) -> torch.Tensor:
        return head(embed(batch) * EncoderHead.TEMPERATURE).squeeze(-1)

    def scores(subset: np.ndarray) -> np.ndarray:
        bert.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(subset), 128):
                out.append(torch.sigmoid(logits([texts[j] for j in subset[i : i + 128]])).numpy())
        return np.concatenate(out)

    params = [p for layer in layers.values() for p in (layer.a, layer.b)]
    optimiser = torch.optim.AdamW(
        [{"params": params, "lr": args.lr}, {"params": head.parameters(), "lr": 1e-3}],
        weight_decay=0.01,
    )
    # Harmful and benign texts weigh the same.
    pos_weight = float((harmful[train] == 0).sum() / (harmful[train] == 1).sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    for epoch in range(args.epochs):
        bert.train()
        order = np.random.default_rng(epoch).permutation(train)
        started, total = time.perf_counter(), 0.0
        for i in range(0, len(order), 32):
            batch = order[i : i + 32]
            loss = loss_fn(logits([texts[j] for j in batch]), torch.from_numpy(harmful[batch]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        print(
            f"epoch {epoch}: loss {total / len(order):.4f} ({time.perf_counter() - started:.0f} s)"
        )

    dev_rows = np.flatnonzero(dev)
    score = scores(dev_rows)
    d_harm, d_kind = harmful[dev_rows] == 1, kinds[dev_rows]
    general, lookalike = score[~d_harm & (d_kind == "general")], score[d_kind == "lookalike"]
    suggested = max(float(np.quantile(general, 0.99)), float(np.quantile(lookalike, 0.95)))
    print(
        f"suggested threshold {suggested:.3f}: the lowest with at most 1% of dev general "
        f"and 5% of dev look-alike prompts above it; dev recall there "
        f"{float((score[d_harm] > suggested).mean()):.3f}"
    )
    print("dev, fine-tuned encoder:")
    for t in (0.5, 0.8, 0.85, 0.9, 0.95):
        print(
            f"  threshold {t}: recall {float((score[d_harm] >= t).mean()):.3f}; false "
            f"positives general {float((general >= t).mean()):.3f}, "
            f"look-alike {float((lookalike >= t).mean()):.3f}"
        )

    updates = {
        name: (
            layer.a.detach().numpy().astype(np.float32),
            (layer.b.detach().numpy() * layer.scale).astype(np.float32),
        )
        for name, layer in layers.items()
    }
    encoder = EncoderHead(
        updates=updates,
        w=head.weight.detach().numpy()[0].astype(np.float32),
        b=float(head.bias.detach().numpy()[0]),
        embedding_model=EMBEDDING_MODEL,
    )
    encoder.save(args.out)
    # The gateway merges the updates into a copy of the encoder: it must score the same.
    merged = encoder.merged(load_sentence_model())
    sample = dev_rows[:64]
    check = encoder.unsafe(merged, [texts[j] for j in sample])
    assert np.allclose(check, scores(sample), atol=1e-4), "merged encoder disagrees"
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
