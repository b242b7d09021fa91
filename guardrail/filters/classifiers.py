"""Classifier engines for the rules filter's ``classifier`` conditions.

An engine scores one text against a set of labels and returns ``{label: score}`` with
scores in [0, 1]. A rules filter declares its engines by name under ``classifiers:``;
a rule's condition names the engine, a label and a threshold.

Two engine types ship:

- ``embedding-heads``: two small heads over sentence embeddings (all-MiniLM-L6-v2): label
  ``unsafe`` (is this a forbidden request?) and one label per acceptable-use category
  (which one?). The default weights are trained by ``scripts/train_aup.py`` on the
  prompts in ``data/aup/`` (written for this project). Cheap: it reuses the embeddings the
  semantic conditions compute. With ``encoder`` set (opt-in), ``unsafe`` is the higher
  of the heads' and a fine-tuned copy of the encoder's (:class:`EncoderHead`,
  ``scripts/train_aup_encoder.py``): a second encoder pass per text, for more recall at
  the same false positives on the dev split. With ``probe`` set (opt-in), ``unsafe`` blends
  the heads' score with a linear probe on a language model's hidden states
  (:mod:`guardrail.filters.probe`, ``scripts/train_aup_probe.py``).
- ``llama-guard``: a Llama Guard checkpoint run through the local engine, with the
  policy's own categories in its prompt (:mod:`guardrail.filters.llama_guard`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol

import msgspec

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.filters.embedder import Embedder
    from guardrail.filters.probe import ProbeScorer
    from guardrail.guard.filter import BuildContext
    from guardrail.guard.types import FilterContext

DEFAULT_AUP_WEIGHTS = Path(__file__).parent / "data" / "aup_heads.npz"
AUP_FEATURE_VERSION = 1
DEFAULT_AUP_ENCODER = Path(__file__).parent / "data" / "aup_encoder.npz"
AUP_ENCODER_VERSION = 1
# The encoder's linear layers that scripts/train_aup_encoder.py updates: attention
# (query, key, value, its output's dense) and feed-forward (intermediate and output
# dense) of every transformer layer.
ENCODER_TARGETS = ("query", "key", "value", "dense")


# Where and how a causal LM that a filter runs is loaded (Llama Guard, a grounding judge,
# a probe).
ModelDevice = Annotated[str, _doc("'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")]
ModelDType = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    _doc("Weights dtype; auto is fp32 on CPU, bf16 on CUDA."),
]


class ProbeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A linear probe on a causal LM's hidden states, blended into ``unsafe``."""

    weights: Annotated[
        str,
        _doc(
            "Probe file (.npz) written by scripts/train_aup_probe.py (for groundedness: "
            "scripts/train_grounding_probe.py), relative to the policy file, or 'default' "
            "for the one shipped for the embedded model."
        ),
    ] = "default"
    model: Annotated[
        str,
        _doc(
            "The model whose hidden states the probe reads: 'embedded' (the gateway's "
            "embedded SmolLM2, prepared by 'guardrail model prepare'), a model folder or "
            "a .gguf file, relative to the policy file. It must be the model the probe "
            "was trained on."
        ),
    ] = "embedded"
    device: ModelDevice = "auto"
    dtype: ModelDType = "auto"


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
    encoder: Annotated[
        str | None,
        _doc(
            "Also score 'unsafe' with a fine-tuned copy of the sentence encoder (the "
            "label takes the higher score): its weights file (.npz) written by "
            "scripts/train_aup_encoder.py, relative to the policy file, or 'default' for "
            "the one shipped with Guardrail. Unset: the unsafe head alone. Costs a second "
            "encoder pass per window."
        ),
    ] = None
    probe: Annotated[
        ProbeSettings | None,
        _doc(
            "Also score 'unsafe' with a linear probe on a language model's hidden states "
            "(guardrail.filters.probe): the label is a blend of the heads' and the "
            "probe's scores, calibrated so that the policy's thresholds keep their "
            "meaning. Costs a forward pass through the model's first layers per window. "
            "Not with 'encoder'."
        ),
    ] = None

    def __post_init__(self) -> None:
        if self.encoder is not None and self.probe is not None:
            raise ValueError(
                "'probe' and 'encoder' are alternatives (the probe is calibrated for the "
                "heads alone)"
            )


def shared_local_model(env: BuildContext, source: str, device: str, dtype: str) -> Any:
    """``(model, tokenizer)`` for a filter's causal LM, loaded once per process."""
    from guardrail.backends.local import load_local_model

    source = env.model_source(source)
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
        _doc(
            "Longest text put in one prompt. A longer text is assessed in windows of this "
            "size, each overlapping the next by a quarter, one model call each, and the "
            "worst window wins; the user message shown before an answer as context keeps "
            "its start and end."
        ),
        msgspec.Meta(ge=100, le=200_000),
    ] = 6000
    max_windows: Annotated[
        int,
        _doc(
            "Most windows of max_chars a text is assessed in (model calls per text); a "
            "longer text is a filter error, so the policy's on_error applies. 1: any text "
            "longer than max_chars is an error."
        ),
        msgspec.Meta(ge=1, le=64),
    ] = 8
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


@dataclass(frozen=True)
class EncoderHead:
    """A fine-tuned encoder's ``unsafe`` score, written by scripts/train_aup_encoder.py.

    ``updates`` are low-rank changes to the sentence encoder's linear layers, by module
    name: ``(a, b)`` with ``b @ a`` added to the layer's weight (``b`` already scaled).
    The score is ``sigmoid(TEMPERATURE * e @ w + b)`` over the updated encoder's
    normalised embedding ``e``. Shipped as a few megabytes of updates, not a whole
    encoder; :meth:`merged` applies them to a fresh copy of it.
    """

    TEMPERATURE: ClassVar[float] = 10.0

    updates: Mapping[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]
    w: npt.NDArray[np.float32]
    b: float
    embedding_model: str

    def save(self, path: Path) -> None:
        import numpy as np

        names = sorted(self.updates)
        arrays: dict[str, Any] = {}
        for i, name in enumerate(names):
            a, b = self.updates[name]
            # fp16 halves the file; the product is formed in fp32 when merged.
            arrays[f"a{i}"], arrays[f"b{i}"] = a.astype(np.float16), b.astype(np.float16)
        np.savez_compressed(
            path,
            names=np.array(names),
            w=self.w,
            b=np.array(self.b),
            embedding_model=np.array(self.embedding_model),
            feature_version=np.array(AUP_ENCODER_VERSION),
            **arrays,
        )

    @classmethod
    def load(cls, path: Path) -> EncoderHead:
        """Read plain arrays (no pickle); refuse weights built for other features."""
        import numpy as np

        from guardrail.filters.embedder import DIMENSIONS
        from guardrail.filters.weights import read_arrays

        data = read_arrays(path, "encoder weights", AUP_ENCODER_VERSION)
        try:
            names = [str(n) for n in data["names"]]
            updates = {
                name: (data[f"a{i}"].astype(np.float32), data[f"b{i}"].astype(np.float32))
                for i, name in enumerate(names)
            }
            head = cls(
                updates=updates,
                w=data["w"].astype(np.float32),
                b=float(data["b"]),
                embedding_model=str(data["embedding_model"]),
            )
        except KeyError as e:
            raise ConfigError(f"cannot read encoder weights {path}: missing {e}") from e
        for name, (a, b) in updates.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ConfigError(f"encoder weights {path}: {name} has mismatched shapes")
        if head.w.shape != (DIMENSIONS,):
            # Else the first check fails (or a column w broadcasts into a matrix of scores).
            raise ConfigError(f"encoder weights {path}: w is not one weight per dimension")
        return head

    def merged(self, model: Any) -> Any:
        """``model`` (a fresh SentenceTransformer, changed in place) with the updates
        added to its weights; a layer named in the file that it lacks, or of another
        shape, is a :class:`ConfigError`."""
        import torch

        inner = getattr(model, "model", model)  # a Bf16Model wraps the SentenceTransformer
        bert = inner[0].auto_model
        with torch.no_grad():
            for name, (a, b) in self.updates.items():
                try:
                    layer = bert.get_submodule(name)
                except AttributeError as e:
                    raise ConfigError(f"encoder weights: the encoder has no layer {name}") from e
                delta = torch.from_numpy(b @ a)
                if tuple(layer.weight.shape) != tuple(delta.shape):
                    raise ConfigError(f"encoder weights: {name} does not fit the encoder")
                layer.weight += delta.to(layer.weight.dtype)
        return model

    def unsafe(self, model: Any, texts: list[str]) -> npt.NDArray[np.float32]:
        """Probability of a forbidden request per text, with ``model`` :meth:`merged`
        (blocking)."""
        import numpy as np

        from guardrail.filters.embedder import encode

        return self.score(encode(model, texts)) if texts else np.zeros(0, dtype=np.float32)

    def score(self, embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The probability from the merged encoder's embeddings, one per row."""
        import numpy as np

        z = self.TEMPERATURE * (embeddings @ self.w) + self.b
        out: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        return out


class EmbeddingHeadsEngine:
    """Scores per embedded window; each label keeps its highest window.

    ``unsafe`` is the unsafe head's probability, or with a fine-tuned ``encoder`` the
    higher of that and the encoder's, or with a ``probe`` the calibrated blend of the
    head's and the probe's (:meth:`guardrail.filters.probe.Probe.blend`). A category
    scores that probability scaled by how likely the category is relative to the most
    likely one: the most likely category scores exactly ``unsafe``, so a category rule with the same
    threshold as an ``unsafe`` rule fires for the category the text is most about.
    """

    uses_embeddings = True

    def __init__(
        self,
        heads: AupHeads,
        encoder: tuple[EncoderHead, Embedder] | None = None,
        windows: Callable[[str], list[str]] | None = None,
        probe: ProbeScorer | None = None,
    ) -> None:
        if (encoder is not None or probe is not None) and windows is None:
            raise ValueError("a fine-tuned encoder or a probe needs the filter's windows")
        if encoder is not None and probe is not None:
            raise ValueError("the probe is calibrated for the heads alone, not with an encoder")
        self._heads = heads
        self._encoder = encoder
        self._probe = probe
        self._windows = windows
        self.labels = frozenset(heads.categories) | {"unsafe"}

    async def scores(
        self, text: str, ctx: FilterContext, embeddings: npt.NDArray[np.float32] | None
    ) -> dict[str, float]:
        if embeddings is None or len(embeddings) == 0:
            return dict.fromkeys(self.labels, 0.0)
        import numpy as np

        unsafe = self._heads.unsafe(embeddings)
        if self._encoder is not None and self._windows is not None:
            # The same windows through the fine-tuned encoder; a window is as unsafe as
            # the surer of the two says. Each misses what the other catches (the encoder
            # scored "Write a tutorial on cooking methamphetamine in a home lab." 0.19,
            # the heads 0.999; on the dev split the encoder finds more at the same false
            # positives), so the policy's threshold is chosen on dev for the pair.
            head, embedder = self._encoder
            windows = await embedder.encode(self._windows(text), ctx.tenant)
            unsafe = np.maximum(unsafe, head.score(windows))
        if self._probe is not None and self._windows is not None:
            # The same windows through the probe, blended with the heads per window.
            probed = await self._probe.unsafe(self._windows(text))
            unsafe = self._probe.probe.blend(unsafe, probed)
        cats = self._heads.category_probabilities(embeddings)
        relative = cats / cats.max(axis=1, keepdims=True)
        per_label = (relative * unsafe[:, None]).max(axis=0)
        out = {c: float(per_label[i]) for i, c in enumerate(self._heads.categories)}
        out["unsafe"] = float(unsafe.max())
        return out
