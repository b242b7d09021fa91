"""Classifier engines for the rules filter's ``classifier`` conditions.

An engine scores one text against a set of labels and returns ``{label: score}`` with
scores in [0, 1]. A rules filter declares its engines by name under ``classifiers:``;
a rule's condition names the engine, a label and a threshold.

Two engine types ship:

- ``embedding-heads``: two small heads over sentence embeddings (all-MiniLM-L6-v2): label
  ``unsafe`` (is this a forbidden request?) and one label per acceptable-use category
  (which one?). The default weights are trained by ``scripts/train_aup.py`` on the
  prompts in ``data/aup/`` (written for this project). Cheap: it reuses the embeddings the
  semantic conditions compute.
- ``llama-guard``: a Llama Guard checkpoint run through the local engine, with the
  policy's own categories in its prompt (:mod:`guardrail.filters.llama_guard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.guard.filter import BuildContext
    from guardrail.guard.types import FilterContext

DEFAULT_AUP_WEIGHTS = Path(__file__).parent / "data" / "aup_heads.npz"
AUP_FEATURE_VERSION = 1


class EmbeddingHeadsSettings(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="type",
    tag="embedding-heads",
):
    """Heads over sentence embeddings: 'unsafe' and one label per category (offline default)."""

    weights: Annotated[
        str | None,
        _doc(
            "Weights file (.npz) written by scripts/train_aup.py, relative to the policy "
            "file; default: the weights shipped with Guardrail."
        ),
    ] = None


# Where and how a causal LM that a filter runs is loaded (Llama Guard, a grounding judge).
ModelDevice = Annotated[str, _doc("'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")]
ModelDType = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    _doc("Weights dtype; auto is fp32 on CPU, bf16 on CUDA."),
]


def shared_local_model(env: BuildContext, source: str, device: str, dtype: str) -> Any:
    """``(model, tokenizer)`` for a filter's causal LM, loaded once per process."""
    from guardrail.backends.local import load_local_model

    return env.resources.get(
        ("local-model", source, device, dtype),
        lambda: load_local_model(
            source,
            dtype=dtype,  # type: ignore[arg-type]
            device=device,
            allow_downloads=env.allow_downloads,
            cache_dir=env.cache_dir,
        ),
    )


class LlamaGuardSettings(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="type",
    tag="llama-guard",
):
    """A Llama Guard checkpoint, prompted with the policy's own category taxonomy."""

    model: Annotated[str, _doc("Model folder, .gguf file, or hub id (only when downloads are on).")]
    template: Annotated[
        Literal["llama-guard-1", "llama-guard-2", "llama-guard-3"],
        _doc(
            "Prompt layout: 1 uses O1.. codes in [INST] blocks (Llama Guard 1); 2 uses "
            "S1.. codes in [INST] blocks (Llama Guard 2); 3 uses S1.. codes in the "
            "Llama 3 header format (Llama Guard 3)."
        ),
    ] = "llama-guard-3"
    device: ModelDevice = "auto"
    dtype: ModelDType = "auto"
    max_chars: Annotated[
        int,
        _doc("Longest text put in the prompt; longer texts keep their start and end."),
        msgspec.Meta(ge=100, le=200_000),
    ] = 6000
    max_new_tokens: Annotated[
        int, _doc("Tokens generated for the verdict lines."), msgspec.Meta(ge=2, le=64)
    ] = 12
    descriptions: Annotated[
        dict[str, str],
        _doc(
            "Category text shown to the model, by label; default: the description of the "
            "first rule that uses the label."
        ),
    ] = msgspec.field(default_factory=dict)


ClassifierSettings = EmbeddingHeadsSettings | LlamaGuardSettings


class ClassifierEngine(Protocol):
    """Scores a text against labels. ``labels`` lists what it can score."""

    labels: frozenset[str]
    uses_embeddings: bool

    async def scores(
        self, text: str, ctx: FilterContext, embeddings: npt.NDArray[np.float32] | None
    ) -> dict[str, float]: ...


@dataclass(frozen=True, slots=True)
class AupHeads:
    """Two heads over a sentence embedding, written by scripts/train_aup.py.

    ``unsafe``: a one-hidden-layer network, ``sigmoid(relu(x @ w1 + b1) @ w2 + b2)``, the
    probability that the text is a request the policy forbids. ``categories``: a softmax,
    ``softmax(x @ coef.T + intercept)``, over the forbidden categories (which one it is).
    """

    categories: tuple[str, ...]
    w1: npt.NDArray[np.float32]  # (features, hidden)
    b1: npt.NDArray[np.float32]  # (hidden,)
    w2: npt.NDArray[np.float32]  # (hidden,)
    b2: float
    coef: npt.NDArray[np.float32]  # (categories, features)
    intercept: npt.NDArray[np.float32]  # (categories,)
    embedding_model: str
    feature_version: int

    @classmethod
    def load(cls, path: Path) -> AupHeads:
        """Read plain arrays (no pickle); refuse weights built for other features."""
        import numpy as np

        from guardrail.filters.weights import read_arrays

        data = read_arrays(path, "classifier weights", AUP_FEATURE_VERSION)
        try:
            heads = cls(
                categories=tuple(str(c) for c in data["categories"]),
                w1=data["w1"].astype(np.float32),
                b1=data["b1"].astype(np.float32),
                w2=data["w2"].astype(np.float32),
                b2=float(data["b2"]),
                coef=data["coef"].astype(np.float32),
                intercept=data["intercept"].astype(np.float32),
                embedding_model=str(data["embedding_model"]),
                feature_version=int(data["feature_version"]),
            )
        except KeyError as e:
            raise ConfigError(f"cannot read classifier weights {path}: missing {e}") from e
        hidden = heads.w1.shape[1] if heads.w1.ndim == 2 else -1
        if (
            heads.b1.shape != (hidden,)
            or heads.w2.shape != (hidden,)
            or heads.coef.shape != (len(heads.categories), heads.w1.shape[0])
            or heads.intercept.shape != (len(heads.categories),)
        ):
            raise ConfigError(f"classifier weights {path}: array shapes do not match")
        return heads

    def save(self, path: Path) -> None:
        import numpy as np

        np.savez(
            path,
            categories=np.array(self.categories),
            w1=self.w1,
            b1=self.b1,
            w2=self.w2,
            b2=np.array(self.b2),
            coef=self.coef,
            intercept=self.intercept,
            embedding_model=np.array(self.embedding_model),
            feature_version=np.array(self.feature_version),
        )

    def unsafe(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probability of a forbidden request, one per feature row."""
        import numpy as np

        hidden = np.maximum(features @ self.w1 + self.b1, 0.0)
        out: npt.NDArray[np.float32] = 1.0 / (1.0 + np.exp(-(hidden @ self.w2 + self.b2)))
        return out

    def category_probabilities(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One row of category probabilities (given forbidden) per feature row."""
        import numpy as np

        logits = features @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        out: npt.NDArray[np.float32] = exp / exp.sum(axis=1, keepdims=True)
        return out


class EmbeddingHeadsEngine:
    """Scores per embedded window; each label keeps its highest window.

    ``unsafe`` is the unsafe head's probability. A category scores that probability
    scaled by how likely the category is relative to the most likely one: the most
    likely category scores exactly ``unsafe``, so a category rule with the same
    threshold as an ``unsafe`` rule fires for the category the text is most about.
    """

    uses_embeddings = True

    def __init__(self, heads: AupHeads) -> None:
        self._heads = heads
        self.labels = frozenset(heads.categories) | {"unsafe"}

    async def scores(
        self, text: str, ctx: FilterContext, embeddings: npt.NDArray[np.float32] | None
    ) -> dict[str, float]:
        if embeddings is None or len(embeddings) == 0:
            return dict.fromkeys(self.labels, 0.0)
        unsafe = self._heads.unsafe(embeddings)
        cats = self._heads.category_probabilities(embeddings)
        relative = cats / cats.max(axis=1, keepdims=True)
        per_label = (relative * unsafe[:, None]).max(axis=0)
        out = {c: float(per_label[i]) for i, c in enumerate(self._heads.categories)}
        out["unsafe"] = float(unsafe.max())
        return out
