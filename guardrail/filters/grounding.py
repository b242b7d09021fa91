"""Groundedness: how well each sentence of an answer is supported by given sources.

The gateway cannot know what is true, but when a request brings its sources (retrieved
documents, a system prompt, tool results) it can ask of every sentence of the answer:
does something in the sources say this? Each sentence (a *claim*) gets a support score
in [0, 1]; the answer's groundedness is their mean weighted by each claim's content
words, so a long unsupported sentence weighs more than "Sure.".

A claim's support comes from a small logistic head over features that need no model
beyond the shared sentence embedder (all-MiniLM-L6-v2):

- ``cosine``: the best cosine similarity between the claim and any source unit (a
  sentence, or two neighbouring sentences);
- ``residual_cosine``: the same after removing the question's direction from both
  vectors, when the question is known. Right and wrong answers are both *about* the
  question; what is left is what they claim;
- ``coverage``: the share of the claim's content words (not stop words, not words of the
  question) that occur somewhere in the sources;
- ``new_words``: how many such words the claim has (log scale);
- ``unsupported_number``: the claim states a number the sources never do;
- ``negation_agrees``: the claim and its best source unit are both negated or both not;
- ``hedge_claim`` and ``hedge_source``: hedges ("unclear", "no evidence", "may").

The head is trained by ``scripts/train_grounding.py`` on the hand-written
``data/grounding`` set (never on an evaluation set); its weights are
``data/grounding_head.npz``. A judge model (an NLI-style yes/no question put to a local
causal LM) can be blended in where one is configured; see :class:`LocalJudge`. So can a
probe (opt-in): a logistic head on a causal LM's hidden states over the claim, read after
``Source: ... Question: ... Answer:`` (:func:`probe_pair`; :mod:`guardrail.filters.probe`),
trained by ``scripts/train_grounding_probe.py`` on the same items, used when the
question is known.

Heavy libraries (numpy, torch) are imported inside functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from guardrail.errors import ConfigError
from guardrail.filters.weights import all_finite, read_arrays
from guardrail.guard.filter import text_pass

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.filters.embedder import Embedder
    from guardrail.filters.probe import KeptPrefixes, ProbeScorer

FEATURES = (
    "cosine",
    "residual_cosine",
    "coverage",
    "new_words",
    "unsupported_number",
    "negation_agrees",
    "hedge_claim",
    "hedge_source",
)
# Features are built exactly like this at training time; bump when that changes.
FEATURE_VERSION = 1
DEFAULT_HEAD = Path(__file__).resolve().parent / "data" / "grounding_head.npz"
# Most text (characters of units, words and numbers) the evidence cache holds.
CACHE_CHARS = 8_000_000

T = TypeVar("T")

# A sentence ends at terminal punctuation (optionally closed by quotes or brackets)
# followed by whitespace, or at a line break. The first alternative starts only where
# its run of punctuation starts: tried at every dot of a long run with no space after
# it, it was quadratic (20,000 dots: 6 s of the event loop).
_SENTENCE_END = re.compile(
    r"""(?<![.!?\u2026\u3002])[.!?\u2026\u3002]+["'\u201d\u2019)\]]*(?=\s)"""
    r"""|[\u3002\uff01\uff1f]+["\u201d\u300d)]*|\n"""
)
# A list marker or a step heading in front of a sentence, or standing alone.
_LIST_MARKER = re.compile(
    r"(?:(?:step|part|item)\s*\d{1,3}[.):]?|\d{1,3}[.)]|[a-z][.)]|[-*\u2022])(?:\s+|$)",
    re.IGNORECASE,
)
# A full stop after these ends no sentence: a list marker ("1." at a line's start), an
# abbreviation ("e.g.", "Dr.", "Mt. Everest").
_NOT_AN_END = re.compile(
    r"(?:^|\n)[ \t]*(?:\d{1,3}|[a-z])\.$|"
    r"(?<![\w.])(?:e\.g|i\.e|etc|vs|cf|approx|mr|mrs|ms|dr|prof|st|mt|fig|vol|pp|jr|sr)\.$",
    re.IGNORECASE,
)
# A full stop after these ends a sentence only before a capitalised little word (see
# :func:`_abbreviated`): an initialism ("U.S.", "D.C.", "p.m."), a company's "Inc.", a
# month ("Jan. 2023"), a unit after a number ("5 ft. tall").
_MAY_END = re.compile(
    r"(?<![\w.])(?:(?:[^\W\d_]\.){1,4}[^\W\d_]|ph\.d|inc|ltd|corp|co|bros"
    r"|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)\.$"
    r"|\d[ \t]?(?:ft|in|yd|mi|lbs?|oz|sq|hrs?|mins?|secs?)\.$",
    re.IGNORECASE,
)
# A lone letter, or "no", and its full stop: an initial ("J. Smith"), "no. 5", "p. 12"; or
# a sentence's last word ("as plan B.", "The answer is no."), which is told by the words
# around it (:func:`_abbreviated`).
_LONE_LETTER = re.compile(r"(?<![\w.])(?:[^\W\d_]|no)\.$", re.IGNORECASE)
_WORD_BEFORE = re.compile(r"([^\W\d_]+)[ \t]+$")
# A full stop that ends the text but for whitespace: where a stream's window was cut.
_FINAL_STOP = re.compile(r"(?<![.!?\u2026\u3002])\.\s+$")
_AFTER_DOT = re.compile(r"\s+(?:(?P<number>\d)|(?P<initial>[A-Z]\.)|(?P<word>[^\W\d_]+))")
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATION = re.compile(
    r"\b(?:no|not|never|nothing|none|nobody|nowhere|neither|nor|cannot|without|"
    r"impossible|false|myth|unclear|unknown)\b|n['\u2019]t\b",
    re.IGNORECASE,
)
_HEDGE = re.compile(
    r"\b(?:unclear|unknown|uncertain|depends|may|might|possibly|perhaps|disputed|varies|"
    r"no (?:evidence|comment|one knows)|not (?:known|sure|clear|proven))\b",
    re.IGNORECASE,
)
_STOPWORDS = """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself of off on once only or other
    our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves s t also sure yes yeah ok okay well certainly course hello hi
    thanks thank please great absolutely indeed here's let"""
STOPWORDS = frozenset(_STOPWORDS.split())


def _abbreviated(text: str, dot: int) -> bool:
    """Whether the full stop at ``text[dot]`` (whitespace after it) ends no sentence.

    A lone letter or "no" before it abbreviates only before a number ("no. 5", "p. 12"),
    and a capital is an initial only before a name or another initial, after a capital
    word, a little word or nothing ("J. Smith", "John F. Kennedy", "by J. R. Tolkien"):
    "as plan B. It was painted gold." and "The answer is no. The tower is in Berlin."
    are two sentences each, whose second a groundedness check must see on its own.
    """
    if _NOT_AN_END.search(text, max(0, dot - 12), dot + 1):
        return True
    if _MAY_END.search(text, max(0, dot - 12), dot + 1):
        # "The U.S. Army", "at 5 p.m. every day", "in Jan. 2023": the abbreviation is
        # mostly inside its sentence. Only a capitalised little word after it ("I live in
        # the U.S. It is big.") is clearly the next sentence; "in the U.S. Paris is next."
        # stays one claim, a milder error than the fragment "The U.S." scored alone.
        after = _AFTER_DOT.match(text, dot + 1)
        word = after["word"] if after is not None else None
        return not (word is not None and word[0].isupper() and word.lower() in STOPWORDS)
    lone = _LONE_LETTER.search(text, max(0, dot - 2), dot + 1)
    if lone is None:
        return False
    after = _AFTER_DOT.match(text, dot + 1)
    if after is None:
        return False
    if after["number"]:
        return True
    letter = text[lone.start()]
    if not (letter.isupper() and lone.end() - lone.start() == 2):
        return False
    following = after["word"]
    if following is not None and (not following[0].isupper() or following.lower() in STOPWORDS):
        return False
    before = _WORD_BEFORE.search(text, max(0, lone.start() - 40), lone.start())
    if before is None:
        return True  # at the start, or after punctuation: "(J. Smith", "1990, J. Smith"
    word = before.group(1)
    return word[0].isupper() or word.lower() in STOPWORDS


def held_claim(text: str) -> int:
    """How many trailing characters of ``text`` a stream should keep back because its cut
    falls after a full stop that ends no sentence here, or may not ("Restored by J. ",
    "(fig. ", "as plan B. " or "in the U.S. " before its next word is seen): the sentence
    that full stop is in, which scored alone is a fragment, not a claim. 0 for any other
    text."""
    stop = _FINAL_STOP.search(text)
    if stop is None:
        return 0
    dot = stop.start()
    if not (
        _abbreviated(text, dot)
        or _LONE_LETTER.search(text, max(0, dot - 2), dot + 1)
        or _MAY_END.search(text, max(0, dot - 12), dot + 1)  # "U.S. Army" or "U.S. It"
    ):
        return 0
    start = 0
    for m in _SENTENCE_END.finditer(text, 0, dot):
        if not (m.group() == "." and _abbreviated(text, m.start())):
            start = m.end()
    return len(text[start:].lstrip())


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``, trimmed of surrounding whitespace."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.group() == "." and _abbreviated(text, m.start()):
            continue
        spans.append((start, m.end()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        marker = _LIST_MARKER.match(piece, lead)  # "1. ", "- ", "Step 2: ": no claim
        if marker is not None:
            lead = marker.end()
        trail = len(piece.rstrip())
        if trail > lead:
            out.append((a + lead, a + trail))
    return out


def _stem(word: str) -> str:
    # Crude and language-blind on purpose: "digest", "digested", "digestion" share a stem.
    for suffix in ("'s", "\u2019s", "ing", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:5]


def content_words(text: str) -> list[str]:
    """Stems of the words of ``text`` that carry content (no stop words, no negations)."""
    words = (w.lower() for w in _WORD.findall(text))
    return [_stem(w) for w in words if w not in STOPWORDS and not _NEGATION.fullmatch(w)]


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def source_units(sources: Sequence[str], limit: int) -> list[str]:
    """Sentences of every source and each pair of neighbouring sentences, at most ``limit``.

    A long source keeps evenly spread units, so the end of a document still counts.
    """
    units: list[str] = []
    for doc in sources:
        sentences = [doc[a:b] for a, b in sentence_spans(doc)]
        units.extend(sentences)
        units.extend(f"{x} {y}" for x, y in itertools.pairwise(sentences))
    return spread(units, limit)


def spread(items: list[T], limit: int) -> list[T]:
    """``items`` if there are at most ``limit``, else ``limit`` of them evenly spread
    (the first and the last kept)."""
    if len(items) <= limit:
        return items
    if limit <= 1:  # one unit: the last (the one step below would divide by zero)
        return items[-1:] if limit == 1 else []
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the features need of the sources, computed once per set of sources."""

    units: tuple[str, ...]
    vectors: npt.NDArray[np.float32]  # one unit-length row per unit
    words: frozenset[str]
    numbers: frozenset[str]
    negated: tuple[bool, ...]
    hedged: tuple[bool, ...]


def features(
    claims: Sequence[str],
    claim_vectors: npt.NDArray[np.float32],
    evidence: Evidence,
    question: str | None,
    question_vector: npt.NDArray[np.float32] | None,
) -> npt.NDArray[np.float64]:
    """One row of :data:`FEATURES` per claim (pure numpy: training and serving share it)."""
    import numpy as np

    rows: npt.NDArray[np.float64] = np.zeros((len(claims), len(FEATURES)), dtype=np.float64)
    if not evidence.units or not claims:
        return rows
    units = evidence.vectors.astype(np.float64)
    vecs = claim_vectors.astype(np.float64)
    cosine = vecs @ units.T
    if question_vector is not None:
        q = question_vector.astype(np.float64)
        q = q / max(float(np.linalg.norm(q)), 1e-9)

        def residual(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            r = m - np.outer(m @ q, q)
            out: npt.NDArray[np.float64] = r / np.maximum(
                np.linalg.norm(r, axis=1, keepdims=True), 1e-9
            )
            return out

        resid = residual(vecs) @ residual(units).T
    else:
        resid = cosine
    asked = set(content_words(question)) if question else set()
    for i, claim in enumerate(claims):
        best = int(np.argmax(resid[i]))
        new = [w for w in content_words(claim) if w not in asked]
        covered = sum(w in evidence.words for w in new) / len(new) if new else 1.0
        rows[i] = (
            float(cosine[i].max()),
            float(resid[i, best]),
            covered,
            math.log1p(len(new)),
            float(bool(_numbers(claim) - evidence.numbers)),
            float(bool(_NEGATION.search(claim)) == evidence.negated[best]),
            float(bool(_HEDGE.search(claim))),
            float(evidence.hedged[best]),
        )
    return rows


@dataclass(frozen=True, slots=True)
class Logistic:
    """Logistic regression over standardised :data:`FEATURES`: P(claim is supported)."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    coef: npt.NDArray[np.float64]
    intercept: float

    def predict(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        import numpy as np

        z = ((rows - self.mean) / self.scale) @ self.coef + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


# The two variants of the head: the question known (the usual case: the last user
# message) or not (a moderation request without ``prompt``), where ``residual_cosine``
# is plain cosine and the weights must differ.
VARIANTS = ("question", "plain")


class SupportHead:
    """One :class:`Logistic` per variant: with the question known, and without."""

    def __init__(self, question: Logistic, plain: Logistic) -> None:
        self.variants = {"question": question, "plain": plain}

    @classmethod
    def load(cls, path: Path) -> SupportHead:
        import numpy as np

        arrays = read_arrays(path, "grounding weights", FEATURE_VERSION)
        try:
            names = tuple(str(n) for n in arrays["features"])
            heads = [
                Logistic(
                    arrays[f"{v}_mean"].astype("float64"),
                    arrays[f"{v}_scale"].astype("float64"),
                    arrays[f"{v}_coef"].astype("float64"),
                    float(arrays[f"{v}_intercept"]),
                )
                for v in VARIANTS
            ]
        except KeyError as e:
            raise ConfigError(f"grounding weights {path}: missing array {e}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot read grounding weights {path}: {e}") from e
        if names != FEATURES or any(h.coef.shape != (len(FEATURES),) for h in heads):
            raise ConfigError(f"grounding weights {path}: built for other features {names}")
        # Checked here, not at the first answer: a mean or scale of another shape fails
        # (or broadcasts to several scores per claim) on every request, and a zero, NaN or
        # infinite weight scores every claim NaN, which no threshold comparison catches.
        for variant, head in zip(VARIANTS, heads, strict=True):
            if head.mean.shape != head.coef.shape or head.scale.shape != head.coef.shape:
                raise ConfigError(
                    f"grounding weights {path}: {variant}_mean and {variant}_scale must "
                    f"hold {len(FEATURES)} values, one per feature"
                )
            if not (
                all_finite(head.intercept, head.mean, head.coef, head.scale)
                and np.all(head.scale > 0)
            ):
                raise ConfigError(
                    f"grounding weights {path}: the {variant} head's weights must be "
                    f"finite and its scale above 0"
                )
        return cls(*heads)

    def save(self, path: Path) -> None:
        import numpy as np

        arrays: dict[str, Any] = {
            "feature_version": np.array(FEATURE_VERSION),
            "features": np.array(FEATURES),
        }
        for name, head in self.variants.items():
            arrays[f"{name}_mean"] = head.mean
            arrays[f"{name}_scale"] = head.scale
            arrays[f"{name}_coef"] = head.coef
            arrays[f"{name}_intercept"] = np.array(head.intercept)
        np.savez(path, **arrays)

    def predict(self, rows: npt.NDArray[np.float64], *, question: bool) -> npt.NDArray[np.float64]:
        return self.variants["question" if question else "plain"].predict(rows)


@dataclass(frozen=True, slots=True)
class ClaimSupport:
    """One sentence of the answer: its span in the answer and its support in [0, 1]."""

    start: int
    end: int
    support: float
    weight: int


@dataclass(frozen=True, slots=True)
class Groundedness:
    """An answer's groundedness and the support of each of its claims."""

    score: float
    claims: tuple[ClaimSupport, ...]

    def unsupported(self, threshold: float) -> list[ClaimSupport]:
        return [c for c in self.claims if c.support < threshold]

    def to_dict(self, text: str, threshold: float) -> dict[str, Any]:
        return {
            "score": round(self.score, 6),
            "threshold": threshold,
            "unsupported": [
                {
                    "span": [c.start, c.end],
                    "text": text[c.start : c.end],
                    "support": round(c.support, 6),
                }
                for c in self.unsupported(threshold)
            ],
        }


def claims_of(text: str) -> list[tuple[int, int, int]]:
    """``(start, end, weight)`` of each sentence that says something (has content words)."""
    out = []
    for a, b in sentence_spans(text):
        weight = len(content_words(text[a:b]))
        if weight:
            out.append((a, b, weight))
    return out


# The probe's reading of a claim: the sources and the question in front, then the claim.
PROBE_QUESTION_CHARS = 1000


def probe_pair(
    sources: Sequence[str], question: str, claim: str, max_chars: int
) -> tuple[str, str]:
    """``(prefix, text)`` for the groundedness probe: ``Source: ... Question: ...
    Answer:`` (the sources cut to ``max_chars``) and `` claim``. Training and serving
    build it here alike."""
    source = "\n".join(sources)[:max_chars]
    asked = question[:PROBE_QUESTION_CHARS]
    return f"Source: {source}\nQuestion: {asked}\nAnswer:", f" {claim}"


class LocalJudge:
    """Asks a causal LM whether a source supports a claim: P("yes") against P("no").

    One forward pass per claim, no generation: the first answer token's logits. Any
    instruction-tuned checkpoint the local loader reads works; a bigger one judges
    better. The prompt puts the sources first, then the claim.
    """

    PROMPT = (
        "Source:\n{source}\n\nClaim: {claim}\n\n"
        "Does the source support the claim? Answer yes or no."
    )

    def __init__(
        self, model: Any, tokenizer: Any, executor: Executor, max_chars: int, *, source: str
    ) -> None:
        self._model, self._tokenizer, self._executor = model, tokenizer, executor
        self._max_chars = max_chars
        self._yes = self._first_ids("yes") | self._first_ids("Yes")
        self._no = (self._first_ids("no") | self._first_ids("No")) - self._yes
        if not self._yes or not self._no:
            raise ConfigError(
                f"judge model {source}: its tokenizer starts 'yes' and 'no' with no word "
                "piece of their own, so its answer cannot be read as yes or no"
            )

    def _first_ids(self, word: str) -> set[int]:
        ids: set[int] = set()
        for variant in (word, f" {word}"):
            encoded = self._tokenizer.encode(variant, add_special_tokens=False)
            # A SentencePiece tokenizer may split " Yes" as "▁", "Y", "es": the bare
            # space piece starts "no" as much as "yes", so the first word piece counts.
            for tok in encoded:
                if self._tokenizer.decode([tok]).strip():
                    ids.add(int(tok))
                    break
        return ids

    def _prompt(self, source: str, claim: str) -> str:
        source = source[: self._max_chars]
        content = self.PROMPT.format(source=source, claim=claim)
        if getattr(self._tokenizer, "chat_template", None):
            rendered: str = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            return rendered
        return f"{content}\nAnswer:"

    def judge_sync(self, source: str, claims: Sequence[str]) -> list[float]:
        import torch

        out = []
        device = next(self._model.parameters()).device
        for claim in claims:
            ids = self._tokenizer.encode(self._prompt(source, claim), add_special_tokens=False)
            input_ids = torch.tensor([ids], device=device)
            with torch.inference_mode():
                logits = self._model(input_ids=input_ids).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            yes = torch.logsumexp(logp[sorted(self._yes)], dim=0)
            no = torch.logsumexp(logp[sorted(self._no)], dim=0)
            out.append(float(torch.sigmoid(yes - no)))
        return out

    async def judge(self, source: str, claims: Sequence[str]) -> list[float]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.judge_sync, source, list(claims))


class GroundingScorer:
    """Scores answers against sources; one per process, shared by filters and the API.

    The sources' evidence (unit embeddings, words) is kept in a small LRU keyed by the
    tenant and a hash of the sources, so the windows of one stream embed a request's
    documents once, and no tenant reuses (and so times) another's.
    """

    def __init__(
        self,
        embedder: Embedder,
        head: SupportHead,
        *,
        max_units: int = 128,
        max_claims: int = 256,
        judge: LocalJudge | None = None,
        judge_weight: float = 0.5,
        probe: ProbeScorer | None = None,
        probe_chars: int = 2000,
        probe_cache_bytes: int = 0,
        cache_size: int = 64,
        cache_chars: int = CACHE_CHARS,
        executor: Executor | None = None,
    ) -> None:
        self._embedder = embedder
        self._executor = executor  # for passes over long texts, see text_pass
        self._head = head
        self._max_units = max_units
        self._max_claims = max_claims
        self._judge = judge
        self._judge_weight = judge_weight
        self._probe = probe
        self._probe_chars = probe_chars
        self.kept_prefixes: KeptPrefixes | None = None
        if probe is not None and probe_cache_bytes > 0:
            from guardrail.filters.probe import KeptPrefixes

            self.kept_prefixes = KeptPrefixes(probe_cache_bytes)
        self._cache: OrderedDict[tuple[str | None, str], tuple[Evidence, int]] = OrderedDict()
        # Evidence being worked out, by key: the inputs of one moderation request are
        # checked together, and each had missed the cache and embedded the sources again
        # (64 inputs against a 200 KB context: 64 times, 7.8 s).
        self._pending: dict[tuple[str | None, str], asyncio.Future[Evidence]] = {}
        self._cache_size = cache_size
        self._cache_chars = cache_chars
        self.cached_chars = 0
        self.evidence_hits = 0
        self.evidence_misses = 0

    async def evidence(self, sources: Sequence[str], scope: str | None = None) -> Evidence:
        """The sources' evidence, kept for ``scope`` (the tenant) only."""
        # Each source with its length in front: joined with a separator, ["A", "B"] and
        # ["A\x00B"] (a NUL is valid JSON) had shared one entry, and one got the other's.
        digest = hashlib.sha256()
        for source in sources:
            data = source.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
        key = (scope, digest.hexdigest())
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            self.evidence_hits += 1
            return found[0]
        pending = self._pending.get(key)
        if pending is not None:
            self.evidence_hits += 1
        else:
            self.evidence_misses += 1
            pending = self._pending[key] = asyncio.ensure_future(self._work_out(key, sources))
            pending.add_done_callback(lambda done: self._settled(key, done))
        # Shielded: a caller that gives up (its time limit) leaves the work to the others.
        return await asyncio.shield(pending)

    def _settled(self, key: tuple[str | None, str], done: asyncio.Future[Evidence]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # read: a failure no caller waited for is no loop warning

    async def _work_out(self, key: tuple[str | None, str], sources: Sequence[str]) -> Evidence:
        """The evidence of ``sources``, kept under ``key`` (never a failure: the next
        request tries again)."""
        chars = sum(map(len, sources))
        units = await text_pass(self._executor, chars, source_units, sources, self._max_units)
        vectors = await self._embedder.encode(units, key[0])
        evidence = await text_pass(self._executor, chars, make_evidence, sources, units, vectors)
        # Bounded by size as well as by count: one unit may be a whole sentence-less
        # document, so 64 entries of the largest requests would hold gigabytes.
        size = evidence_chars(evidence)
        if key not in self._cache and size <= self._cache_chars:
            self._cache[key] = (evidence, size)
            self.cached_chars += size
        while len(self._cache) > self._cache_size or self.cached_chars > self._cache_chars:
            _, (_, dropped) = self._cache.popitem(last=False)
            self.cached_chars -= dropped
        return evidence

    async def score(
        self,
        text: str,
        sources: Sequence[str],
        question: str | None = None,
        *,
        scope: str | None = None,
        window: tuple[int, int] | None = None,
    ) -> Groundedness:
        """The groundedness of ``text`` given ``sources``; 1.0 for a text with no claims.
        ``scope`` (the tenant) is whose kept probe prefixes it may reuse; ``window``
        (``[start, end)`` of ``text``): only the claims that rest on it are scored (a
        stream window's, not those of the released text it is checked after)."""
        import numpy as np

        def own() -> list[tuple[int, int, int]]:
            claims = claims_of(text)
            if window is not None:
                claims = [c for c in claims if c[1] > window[0] and c[0] < window[1]]
            return spread(claims, self._max_claims)

        spans = await text_pass(self._executor, len(text), own)
        if not spans:
            return Groundedness(1.0, ())
        claims = [text[a:b] for a, b, _ in spans]
        live = [s for s in sources if s.strip()]
        evidence = await self.evidence(live, scope)
        if not evidence.units:
            supports = np.zeros(len(claims))
        else:
            asked = [question] if question and question.strip() else []
            vectors = await self._embedder.encode(claims + asked, scope)
            rows = features(
                claims, vectors[: len(claims)], evidence, question, vectors[-1] if asked else None
            )
            supports = self._head.predict(rows, question=bool(asked))
            if self._probe is not None and asked:  # trained with the question known only
                pairs = [probe_pair(live, asked[0], c, self._probe_chars) for c in claims]
                probed = await self._probe.scores_after(
                    pairs[0][0], [t for _, t in pairs], self.kept_prefixes, scope
                )
                supports = self._probe.probe.blend(supports, probed).astype(np.float64)
            if self._judge is not None:
                judged = np.asarray(await self._judge.judge("\n".join(sources), claims))
                w = self._judge_weight
                supports = (1 - w) * supports + w * judged
        if not np.all(np.isfinite(supports)):
            raise ValueError("non-finite support score")
        out = tuple(
            ClaimSupport(a, b, float(s), w) for (a, b, w), s in zip(spans, supports, strict=True)
        )
        total = sum(c.weight for c in out)
        return Groundedness(sum(c.support * c.weight for c in out) / total, out)


def evidence_chars(evidence: Evidence) -> int:
    """About how much text ``evidence`` holds: its units, words and numbers."""
    return (
        sum(map(len, evidence.units))
        + sum(map(len, evidence.words))
        + sum(map(len, evidence.numbers))
    )


def make_evidence(
    sources: Sequence[str], units: Sequence[str], vectors: npt.NDArray[np.float32]
) -> Evidence:
    """The :class:`Evidence` of ``sources`` whose ``units`` are embedded as ``vectors``."""
    words: set[str] = set()
    numbers: set[str] = set()
    for doc in sources:
        words.update(content_words(doc))
        numbers.update(_numbers(doc))
    return Evidence(
        tuple(units),
        vectors,
        frozenset(words),
        frozenset(numbers),
        tuple(bool(_NEGATION.search(u)) for u in units),
        tuple(bool(_HEDGE.search(u)) for u in units),
    )
