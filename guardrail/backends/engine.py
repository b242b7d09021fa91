"""The local engine's scheduler: continuous batching over one transformers model.

One thread owns the model. Requests wait in a bounded queue; the thread admits them
into a running batch between decoding steps, so a request joins as soon as there is
room and leaves as soon as it is done (continuous batching), never waiting for the
slowest member of a batch. Each step feeds every active sequence's last token through
the model at once, then samples each row with its own parameters (temperature, top_p,
top_k, repetition penalty, logit bias, seed) and checks its own stops, token budget and
consumer.

How the batch is kept:

- A new request is prefilled alone (from the :class:`PrefixCache` when an earlier
  conversation covers its start), then its KV cache is joined to the batch's.
  Sequences of different lengths are left-padded with zero keys that the attention
  mask hides; each row's position ids count its own tokens only. Padding common to
  every row is trimmed when rows leave.
- A row leaves on EOS, a stop string, ``max_tokens``, or when its consumer went away
  (a closed stream or a cancelled task): its slot is free at the next step. Its KV
  cache, cut out of the batch, goes to the prefix cache for the conversation's next
  turn.
- Joining and cutting rows needs plain per-layer key/value tensors (``DynamicLayer``:
  Llama and most decoder-only models). For other cache layouts (sliding windows) the
  engine runs one sequence at a time and says so in the log.
- The queue is bounded: once the batch is full and ``max_queue`` requests wait,
  ``submit`` refuses at once (429 with Retry-After) instead of letting the wait grow
  without bound. A consumer that goes away while its request waits (``withdraw``)
  takes it out of the queue at once: it holds no place, and the queue depth counts
  only requests still wanted.
- When idle, the scheduler waits up to ``max_wait_ms`` after the first arrival for
  others to batch with; once a batch runs, arrivals join between steps without waiting.
- On CUDA the model's attention runs on PyTorch's flash and math backends only.
  cuDNN attention builds a new execution graph for every key length it has not seen,
  and while decoding the length grows by one each step. Measured on an H100
  (``benchmarks/gpu/trace_engine.py``), that cost 1.3 to 2.4 ms of CPU per layer per
  step: 40 to 70 ms a step for a 30-layer model whose step otherwise took about 25 ms.
  The memory-efficient backend, next in line for masked (padded) batches, changed
  SmolLM2's batched bf16 answer to "What is the capital of France?" from "The capital
  of France is Paris." to another first token, where fp32, cuDNN, and flash with math
  all gave Paris; it is left out until that is understood.

Everything that touches the model runs on the scheduler thread; ``submit`` and
``close`` may be called from any thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from guardrail.backends.base import FinishReason, SamplingParams
from guardrail.errors import BackendError, BackendUnavailable, GuardrailError
from guardrail.kv import cache_argument, returned_cache
from guardrail.observability.logging import get_logger

__all__ = [
    "Engine",
    "EngineObserver",
    "Outcome",
    "PrefixCache",
    "TextTracker",
    "Work",
    "attention_backends",
    "cache_bytes",
]

log = get_logger(__name__)

_REPLACEMENT_CHAR: Final = "\ufffd"


class EngineObserver(Protocol):
    """What the engine reports as it runs (the gateway's metrics implement this).

    Called from the scheduler thread; implementations must be thread-safe.
    """

    def engine_queue_depth(self, depth: int) -> None: ...

    def engine_step(self, batch_size: int) -> None: ...

    def engine_first_token(self, seconds: float) -> None: ...

    def engine_finished(self, completion_tokens: int, decode_seconds: float) -> None: ...

    def engine_prefix_lookup(self, hit: bool, reused_tokens: int, cached_bytes: int) -> None: ...

    def engine_prefix_bytes(self, cached_bytes: int) -> None: ...


# ------------------------------------------------------------------------- text


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or ``None``."""
    found = [i for s in stops if (i := text.find(s)) != -1]
    return min(found) if found else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent: not a tail that may grow into a stop string,
    nor a trailing half character (decoded as U+FFFD until its other bytes arrive)."""
    end = len(text)
    while end > 0 and text[end - 1] == _REPLACEMENT_CHAR:
        end -= 1
    # Held before the half character too: its other bytes may complete a stop string
    # ("a" then the first byte of "é", for the stop string "aé").
    head = text[:end]
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(head)), hold, -1):
            if head.endswith(stop[:k]):
                hold = k
                break
    return end - hold


class TextTracker:
    """Turns the growing list of generated ids into text deltas; decides when to halt.

    ``update`` is called once per generated token with every id generated so far. It
    hands safe deltas to ``emit`` and returns ``True`` when generation should stop: a
    stop string appeared (``stopped``) or ``cancelled`` is set. Text that could still
    turn into a stop string, or that ends in a half character, is held back until it is
    resolved, so a stop string never leaks, not even in a stream.

    The ids are decoded incrementally, as vLLM's ``detokenize_incrementally`` does:
    decoding the whole answer at every step cost N²/2 token decodes for an answer of N
    tokens (8,000 tokens: 32 s of the scheduler thread, during which no row in the
    batch moved). Each step decodes only the window from ``_prefix`` on, and takes as
    new text what it adds to the window's start up to ``_read``; the window starts on a
    token already decoded, so SentencePiece's dropped leading space and multi-byte
    characters split over byte tokens come out as in a whole decode. The new text is
    taken once it no longer ends in a half character (U+FFFD); until then it is
    ``_pending``. Only text not yet sent is searched for stop strings: a stop string
    never starts in sent text, since a tail that may begin one is held back.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._emit = emit
        self._cancelled = cancelled
        self._prefix = 0
        self._read = 0
        self._unsent = ""
        """Text decoded and taken, from the end of what was sent (or of ``_pending``'s
        part that was sent)."""
        self._pending = ""
        """The text after ``_read``, not taken yet: it ends in a half character."""
        self._sent = 0
        """How much of ``_unsent + _pending`` was sent already (a part of ``_pending``
        released before its half character completes)."""
        self._parts: list[str] = []
        self.stopped = False
        """Whether a stop string ended the text."""

    @property
    def text(self) -> str:
        """What has been emitted so far."""
        return "".join(self._parts)

    def update(self, ids: list[int]) -> bool:
        if self.stopped:
            return True
        self._take(ids)
        tail = self._unsent + self._pending
        cut = _stop_index(tail, self._stops)
        if cut is not None:
            self.stopped = True
            self._send(tail, cut)
            return True
        self._send(tail, _safe_end(tail, self._stops))
        # Sent text is dropped once taken; a sent part of ``_pending`` stays counted.
        dropped = min(self._sent, len(self._unsent))
        self._unsent = self._unsent[dropped:]
        self._sent -= dropped
        return self._cancelled.is_set()

    def finish(self) -> str:
        """Send what was held back (generation ended without a stop string); the whole text."""
        if not self.stopped:
            tail = self._unsent + self._pending
            self._send(tail, len(tail))
        return self.text

    def _take(self, ids: list[int]) -> None:
        before = self._decode(ids[self._prefix : self._read])
        window = self._decode(ids[self._prefix :])
        added = window[len(before) :]
        # The window moves on only past ids that added text: one starting on an id that
        # decodes to nothing (a skipped special token) would lose the leading space a
        # SentencePiece decode drops from a text's first word.
        if not added or window.endswith(_REPLACEMENT_CHAR):
            self._pending = added
            return
        self._unsent += added
        self._pending = ""
        self._prefix, self._read = self._read, len(ids)

    def _send(self, tail: str, end: int) -> None:
        if end > self._sent:
            delta = tail[self._sent : end]
            self._sent = end
            self._parts.append(delta)
            self._emit(delta)


# ----------------------------------------------------------------- prefix cache


def cache_bytes(cache: Any) -> int:
    """Memory held by a KV cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += int(tensor.nbytes)
    return total


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """KV caches of recent sequences, reused when a new prompt starts with one of them.

    A chat client resends the whole conversation every turn. The cache of the last
    turn's prompt and answer covers most of the next prompt, so only the new tokens are
    computed. A prompt takes the entry sharing its longest prefix (at least
    ``min_tokens``); the entry is cropped to that prefix and handed to the model, which
    extends it. Entries are taken out while in use, so a cache is never shared by two
    generations. The least recently used entries go when more than ``entries`` are
    kept or they hold more than ``max_bytes``; a cache larger than ``max_bytes`` on its
    own is not kept. The chat template may tokenize an earlier answer differently from
    how it was generated: the common prefix then simply ends there. Each entry belongs
    to a scope (a tenant): a prompt reuses only entries of its own scope, so no tenant
    can time whether another sent the same prompt start.
    """

    def __init__(
        self, entries: int = 8, min_tokens: int = 16, max_bytes: int | None = None
    ) -> None:
        self.entries = entries
        self.min_tokens = min_tokens
        self.max_bytes = max_bytes
        # (ids, cache, bytes, scope), most recently used last
        self._items: list[tuple[list[int], Any, int, str | None]] = []
        self.bytes = 0
        self.reused_tokens = 0
        self.hits = 0
        self.misses = 0

    def take(self, ids: list[int], scope: str | None = None) -> tuple[Any, int]:
        """The cache to start ``ids`` from (cropped), and how many tokens it covers; only
        entries put in ``scope`` are considered."""
        best, best_len = -1, 0
        for i, (cached, _, _, owner) in enumerate(self._items):
            if owner != scope:
                continue
            n = _common_prefix(cached, ids)
            if n > best_len:
                best, best_len = i, n
        # At least one prompt token must be computed: it yields the first logits.
        best_len = min(best_len, len(ids) - 1)
        if best < 0 or best_len < self.min_tokens:
            self.misses += 1
            return None, 0
        cached_ids, cache, size, _ = self._items[best]
        extra = int(cache.get_seq_length()) - best_len
        if extra > 0 and len(cached_ids) - best_len > 1:
            # The prompt leaves this conversation part-way (another chat sharing only its
            # system prompt): hand out a copy of the shared part and keep the entry for
            # its own next turn. Taking and cropping it left one entry for everyone.
            copied = _copy_prefix(cache, best_len)
            if copied is not None:
                self._items.append(self._items.pop(best))  # most recently used
                self.hits += 1
                self.reused_tokens += best_len
                return copied, best_len
        self._items.pop(best)
        self.bytes -= size
        if extra > 0:
            try:
                cache.crop(-extra)  # transformers 5: a negative count of tokens to drop
            except Exception:  # e.g. a sliding-window cache that has rolled over
                self.misses += 1
                return None, 0
        self.hits += 1
        self.reused_tokens += best_len
        return cache, best_len

    def put(self, ids: list[int], cache: Any, scope: str | None = None) -> None:
        if self.entries <= 0 or cache is None:
            return
        size = cache_bytes(cache)
        if self.max_bytes is not None and size > self.max_bytes:
            return
        length = int(cache.get_seq_length())
        self._items.append((ids[:length], cache, size, scope))
        self.bytes += size
        while len(self._items) > self.entries or (
            self.max_bytes is not None and self.bytes > self.max_bytes
        ):
            self.bytes -= self._items.pop(0)[2]


def _copy_prefix(cache: Any, length: int) -> Any:
    """A new cache holding the first ``length`` positions of ``cache`` (copied, so the
    model can extend it), or None where the cache is not plain keys and values.

    Every layer must be a plain full-attention one: a sliding-window layer past its
    window holds only the last positions, so its first ``length`` are the wrong ones, and
    the cache's length (read from layer 0 alone) did not show it when layer 0 was full
    attention (Qwen2 with ``max_window_layers``): the model answered garbage or failed.
    """
    import copy

    from transformers.cache_utils import DynamicLayer

    try:
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return None
        copied = copy.copy(cache)
        copied.layers = [copy.copy(layer) for layer in cache.layers]
        for layer in copied.layers:
            layer.keys = layer.keys[:, :, :length, :].clone()
            layer.values = layer.values[:, :, :length, :].clone()
        if any(int(layer.get_seq_length()) != length for layer in copied.layers):
            return None
    except Exception:  # a cache type with more state than keys and values
        return None
    return copied


# ----------------------------------------------------------------------- work


@dataclass(frozen=True, slots=True)
class Outcome:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False, slots=True)
class Work:
    """One request, from submission to its outcome.

    ``prepare`` runs on the scheduler thread and returns the prompt's token ids and
    the token budget; it may raise :class:`BackendError` (a prompt over the context).
    ``emit`` receives text deltas; ``cancelled`` is set when the consumer has gone.
    ``cache_scope``: the prefix cache reuses only entries of the same scope (the tenant;
    see :class:`~guardrail.backends.base.GenerationRequest`).
    ``continues``: how many of the prompt's last tokens the generated text continues
    (a plain completion's prompt). They are decoded together with the generated ids and
    their own text is cut off, so the first token's leading space survives: a
    SentencePiece (Llama) decode drops the space at the start of a text, and
    "The capital of France is" would be completed with "Paris", not " Paris". 0 (a chat
    answer) decodes the generated ids alone.
    """

    request_id: str
    params: SamplingParams
    prepare: Callable[[], tuple[list[int], int]]
    emit: Callable[[str], None]
    cancelled: threading.Event
    continues: int = 0
    cache_scope: str | None = None
    future: concurrent.futures.Future[Outcome] = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(eq=False, slots=True)
class _Row:
    """An admitted request: its tokens, sampler and place in the batch."""

    work: Work
    prompt: list[int]
    max_new: int
    tracker: TextTracker
    generator: Any
    reused: int
    # The request's logit_bias as (token ids, biases) tensors, built once, not each step.
    bias: tuple[Any, Any] | None = None
    generated: list[int] = field(default_factory=list)
    pad: int = 0
    first_token_at: float = 0.0


def _settle(future: concurrent.futures.Future[Outcome], result: Outcome | BaseException) -> None:
    """Resolve ``future`` unless its consumer cancelled it meanwhile."""
    try:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


# --------------------------------------------------------------------- engine


class Engine:
    """Runs :class:`Work` on ``model`` in continuous batches of up to ``max_batch``.

    ``decode`` turns generated ids into text; ``eos_ids`` end a sequence;
    ``default_top_k`` applies to sampled requests that set no ``top_k`` (0: none);
    ``prefix_cache`` belongs to this engine alone. ``observer`` (optional, set later)
    receives the metrics.
    """

    def __init__(
        self,
        model: Any,
        *,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        default_top_k: int | None,
        prefix_cache: PrefixCache,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
        name: str = "guardrail-local",
    ) -> None:
        self._model = model
        self._decode = decode
        self._eos_ids = eos_ids
        self._default_top_k = default_top_k
        self.prefix_cache = prefix_cache
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.max_queue = max_queue
        self.observer: EngineObserver | None = None
        self._pending: collections.deque[Work] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._admitting: list[Work] = []  # taken from the queue, not yet in the batch
        self._cache: Any = None  # the batch's KV cache: len(_rows) rows, _length tokens
        self._length = 0
        self._joinable = _joinable(model.config)
        self._attention = attention_backends(model)
        if not self._joinable and self.max_batch > 1:
            log.warning("local engine: this model's KV cache cannot be batched; one at a time")
        self.steps = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a place in the batch."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Sequences in the batch whose consumer is still there."""
        live = sum(1 for row in list(self._rows) if not row.work.cancelled.is_set())
        admitting = sum(
            1 for w in list(self._admitting) if not (w.cancelled.is_set() or w.future.done())
        )
        return live + admitting

    def submit(self, work: Work) -> None:
        with self._cond:
            if self._closed:
                raise BackendUnavailable("the local backend is closed")
            # Free places in the batch first, then max_queue waiting. A client that left
            # while it waited holds no place: work whose ``cancelled`` was set without a
            # ``withdraw`` is dropped here, not at admission.
            gone = [w for w in self._pending if w.cancelled.is_set()]
            if gone:
                self._pending = collections.deque(
                    w for w in self._pending if not w.cancelled.is_set()
                )
                for w in gone:
                    _settle(w.future, Outcome("", "stop", 0, 0))
            free = max(0, self._room() - self.active)
            if len(self._pending) >= self.max_queue + free:
                raise BackendError(
                    f"the local engine is at capacity ({self.active} generating, "
                    f"{len(self._pending)} queued); retry shortly",
                    status=429,
                )
            self._pending.append(work)
            depth = len(self._pending)
            self._cond.notify()
        self._observe("engine_queue_depth", depth)

    def withdraw(self, work: Work) -> None:
        """``work``'s consumer is done with it or has gone (any thread).

        A running row leaves the batch at the next step. Work still waiting for a place
        leaves the queue now, and the new depth is reported: dropped only at the next
        submit or admission, a client that left kept counting in ``queue_depth`` and its
        gauge for as long as the batch stayed full.
        """
        work.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(work)  # by identity (``Work`` has eq=False)
            except ValueError:  # admitted, finished, or dropped already
                return
            depth = len(self._pending)
        _settle(work.future, Outcome("", "stop", 0, 0))
        self._observe("engine_queue_depth", depth)

    def close(self) -> None:
        """Fail queued work, stop the running batch, and wait for the thread to exit."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify()
        for work in pending:
            _settle(work.future, BackendUnavailable("the local backend is closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the scheduler thread

    def _run(self) -> None:
        while True:
            admitted: list[Work] | None = None
            try:
                admitted = self._next_admissions()
                if admitted is None:
                    break
                if admitted:
                    try:
                        self._admit(admitted)
                    finally:
                        self._admitting = []
                if self._rows:
                    self._step()
            except Exception as e:
                # A bug, not a model error (those fail their own requests): the thread
                # must survive it, or every later request would wait forever.
                # The type and where it was raised, never the message: it may quote text.
                log.error(
                    "local engine: unexpected error; failing the batch",
                    error=type(e).__name__,
                    at=_raised_at(e),
                )
                self._fail_batch(_failed(e), admitted or [])
        self._fail_batch(BackendUnavailable("the local backend was closed during generation"))

    def _fail_batch(self, error: BackendError, admitted: Sequence[Work] = ()) -> None:
        for row in self._rows:
            _settle(row.work.future, error)
        for work in admitted:
            _settle(work.future, error)
        self._rows, self._cache, self._length = [], None, 0

    def _next_admissions(self) -> list[Work] | None:
        """Requests to admit before the next step; ``None`` once closed."""
        with self._cond:
            while not self._pending and not self._rows and not self._closed:
                self._cond.wait()
            if not self._rows and self._pending and self.max_wait_s > 0:
                # Idle: give companions a moment to arrive and share the first steps.
                deadline = time.monotonic() + self.max_wait_s
                while len(self._pending) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._closed:
                return None
            room = self._room() - len(self._rows)
            admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            self._admitting = admitted
            depth = len(self._pending)
        if admitted:
            self._observe("engine_queue_depth", depth)
        return admitted

    def _room(self) -> int:
        return self.max_batch if self._joinable else 1

    def _admit(self, works: list[Work]) -> None:
        """Prefill ``works`` and join them to the batch.

        A request that continues a cached conversation is prefilled alone from that
        cache; the others are prefilled together, left-padded to the longest prompt.
        """
        torch = _torch()
        fresh: list[tuple[_Row, list[int]]] = []
        for work in works:
            if work.cancelled.is_set() or work.future.done():  # gone while it waited
                _settle(work.future, Outcome("", "stop", 0, 0))
                continue
            try:
                ids, max_new = work.prepare()
            except GuardrailError as e:
                _settle(work.future, e)
                continue
            except Exception as e:
                _settle(work.future, _failed(e))
                continue
            if max_new <= 0:
                _settle(work.future, Outcome("", "length", len(ids), 0))
                continue
            cache, reused = self.prefix_cache.take(ids, work.cache_scope)
            self._observe(
                "engine_prefix_lookup", cache is not None, reused, self.prefix_cache.bytes
            )
            try:
                row = self._row(work, ids, max_new, reused, torch)
            except Exception as e:  # this request's own parameters: fail it alone
                _settle(work.future, _failed(e))
                continue
            if cache is None:
                fresh.append((row, ids))
                continue
            tail = torch.tensor([ids[reused:]], device=self._model.device)
            self._prefill([row], tail, cache=cache)
        if fresh:
            width = max(len(ids) for _, ids in fresh)
            pads = [width - len(ids) for _, ids in fresh]
            # Padding positions hold token 0, hidden by the mask.
            tokens = torch.tensor(
                [[0] * pad + ids for (_, ids), pad in zip(fresh, pads, strict=True)],
                device=self._model.device,
            )
            columns = torch.arange(width, device=tokens.device)
            mask = (tokens.new_tensor(pads)[:, None] <= columns[None, :]).long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self._prefill(
                [row for row, _ in fresh], tokens, mask=mask, positions=positions, pads=pads
            )

    def _row(self, work: Work, ids: list[int], max_new: int, reused: int, torch: Any) -> _Row:
        params = work.params
        decode = self._decode
        if work.continues > 0:
            decode = _continuing(decode, ids[-work.continues :])
        tracker = TextTracker(decode, params.stop, work.emit, work.cancelled)
        generator = None
        if params.seed is not None and params.temperature:
            generator = torch.Generator(device=self._logits_device())
            generator.manual_seed(params.seed)
        bias = None
        if params.extra.get("logit_bias"):
            # Token ids the backend checked against the vocabulary before admission.
            given = params.extra["logit_bias"]
            device = self._logits_device()
            bias = (
                torch.tensor([int(t) for t in given], device=device),
                torch.tensor([float(b) for b in given.values()], device=device),
            )
        return _Row(work, ids, max_new, tracker, generator, reused, bias)

    def _logits_device(self) -> Any:
        """Where the logits are sampled: the output head's device. With ``device_map``
        over several GPUs that is the last one, not ``model.device`` (the first), and
        ``torch.multinomial`` refuses a generator made for another device."""
        head = self._model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        return weight.device if weight is not None else self._model.device

    def _prefill(
        self,
        rows: list[_Row],
        tokens: Any,
        *,
        mask: Any = None,
        positions: Any = None,
        cache: Any = None,
        pads: list[int] | None = None,
    ) -> None:
        """Run the prompts' (remaining) tokens, sample each row's first token, join them."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self._model.config)
        try:
            out = self._forward(tokens, mask, positions, cache)
        except Exception as e:
            for row in rows:
                _settle(row.work.future, _failed(e))
            return
        now = time.perf_counter()
        logits = out.logits[:, -1]
        done = []
        for i, row in enumerate(rows):
            row.first_token_at = now
            self._observe("engine_first_token", now - row.work.enqueued)
            if self._next(row, logits[i]):
                done.append(len(self._rows) + i)
        self._join(rows, returned_cache(out), pads or [0] * len(rows))
        if done:
            self._leave(done)

    def _forward(self, tokens: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """The model on ``tokens`` after ``cache`` (extended in place); last logits only."""
        torch = _torch()
        with torch.inference_mode(), self._attention():
            return self._model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **cache_argument(self._model, cache),
            )

    def _step(self) -> None:
        """One decoding step for every active row."""
        torch = _torch()
        rows = self._rows
        device = self._model.device
        tokens = torch.tensor([[row.generated[-1]] for row in rows], device=device)
        pads = torch.tensor([row.pad for row in rows], device=device)
        mask = (torch.arange(self._length + 1, device=device)[None, :] >= pads[:, None]).long()
        positions = (self._length - pads)[:, None]
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        self._observe("engine_step", len(rows))
        try:
            out = self._forward(tokens, mask, positions, self._cache)
        except Exception as e:
            error = _failed(e)
            for row in rows:
                _settle(row.work.future, error)
            self._rows, self._cache, self._length = [], None, 0
            return
        self._cache = returned_cache(out)
        self._length += 1
        logits = out.logits[:, -1]
        leaving = [i for i, row in enumerate(rows) if self._next(row, logits[i])]
        if leaving:
            self._leave(leaving)

    def _next(self, row: _Row, logits: Any) -> bool:
        """Sample and add ``row``'s next token; whether the row is done. A failure here
        belongs to the request (its sampling parameters): it fails that row alone, and
        the rest of the batch goes on."""
        try:
            return self._advance(row, self._sample(row, logits))
        except Exception as e:
            log.warning(
                "local engine: sampling failed; failing its request",
                error=type(e).__name__,
                at=_raised_at(e),
            )
            row.work.cancelled.set()  # nothing of it goes to the prefix cache
            _settle(row.work.future, _failed(e))
            return True

    def _sample(self, row: _Row, logits: Any) -> int:
        torch = _torch()
        params = row.work.params
        logits = logits.float()
        penalty = params.extra.get("repetition_penalty")
        if penalty is not None and float(penalty) != 1.0:
            # A copy: the model's output is an inference tensor, not to change in place
            # (and in fp32, .float() returns that very tensor).
            logits = logits.clone()
            seen = torch.tensor(sorted(set(row.prompt) | set(row.generated)), device=logits.device)
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / float(penalty), picked * float(penalty))
        if row.bias is not None:
            # Added to the logits before greedy choice or sampling, as OpenAI and vLLM add
            # it: -100 all but bans a token, 100 all but forces it. Out of place, as above.
            ids, biases = row.bias
            logits = logits.index_add(0, ids, biases)
        if not params.temperature:  # None or 0: greedy
            return int(torch.argmax(logits))
        # The gaps to the best logit, scaled: a tiny temperature sends the others far down
        # (greedy in effect) instead of overflowing every logit to inf and softmax to NaN.
        # Below 1e-6 it changes nothing more, and 1e-300 would be 0 in float32.
        logits = (logits - logits.max()) / max(params.temperature, 1e-6)
        top_k = int(params.extra["top_k"]) if "top_k" in params.extra else self._default_top_k
        # -1 and 0 mean no top-k cut, as in vLLM.
        if top_k is not None and 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p is not None and params.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token once the ones before it already reach top_p (keep the first).
            drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
            drop[0] = False  # top_p 0 keeps the most likely token: greedy
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int) -> bool:
        """Add ``token`` to ``row``; whether the row is done."""
        row.generated.append(token)
        if row.tracker.update(row.generated):
            return True
        return token in self._eos_ids or len(row.generated) >= row.max_new

    def _join(self, rows: list[_Row], cache: Any, pads: list[int]) -> None:
        """Append ``rows`` (``cache``, left-padded by ``pads``) to the batch."""
        self._attach(rows, cache, pads)
        # Only now (for ``active``, read by other threads): no longer being admitted.
        joined = {id(row.work) for row in rows}
        self._admitting = [w for w in self._admitting if id(w) not in joined]

    def _attach(self, rows: list[_Row], cache: Any, pads: list[int]) -> None:
        length = int(cache.get_seq_length())
        if not self._rows:
            self._rows, self._cache, self._length = list(rows), cache, length
            for row, pad in zip(rows, pads, strict=True):
                row.pad = pad
            return
        torch = _torch()
        if length > self._length:
            grow = length - self._length
            _pad_left(self._cache, grow, torch)
            for other in self._rows:
                other.pad += grow
            self._length = length
        shift = self._length - length
        _pad_left(cache, shift, torch)
        for row, pad in zip(rows, pads, strict=True):
            row.pad = pad + shift
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self._rows.extend(rows)

    def _leave(self, leaving: list[int]) -> None:
        """Take finished rows out of the batch (their caches to the prefix cache)."""
        torch = _torch()
        gone = set(leaving)
        for i in leaving:
            row = self._rows[i]
            kept = self.prefix_cache.entries > 0 and not row.work.cancelled.is_set()
            if not kept:
                cache = None  # nothing will reuse it: no copy
            elif len(self._rows) > 1:
                cache = self._cut(i, row.pad)
            else:
                cache = self._cache
            self._finish(row, cache)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._length = [], None, 0
            return
        index = torch.tensor(keep, device=self._model.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]
        trim = min(row.pad for row in self._rows)
        if trim:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, trim:, :]
                layer.values = layer.values[:, :, trim:, :]
            for row in self._rows:
                row.pad -= trim
            self._length -= trim

    def _cut(self, index: int, pad: int) -> Any:
        """Row ``index`` of the batch cache, without its padding, as a cache of its own."""
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=[
                (
                    layer.keys[index : index + 1, :, pad:, :].clone(),
                    layer.values[index : index + 1, :, pad:, :].clone(),
                )
                for layer in self._cache.layers
            ]
        )

    def _finish(self, row: _Row, cache: Any) -> None:
        text = row.tracker.finish()
        generated = row.generated
        finish: FinishReason
        if row.tracker.stopped or (generated and generated[-1] in self._eos_ids):
            finish = "stop"
        elif len(generated) >= row.max_new:
            finish = "length"
        else:
            finish = "stop"  # cancelled: nobody reads this
        if cache is not None and not row.work.cancelled.is_set():
            self.prefix_cache.put(row.prompt + generated, cache, row.work.cache_scope)
            self._observe("engine_prefix_bytes", self.prefix_cache.bytes)
        decode_s = time.perf_counter() - row.first_token_at
        self._observe("engine_finished", len(generated), decode_s)
        log.debug(
            "local generation finished",
            request_id=row.work.request_id,
            prompt_tokens=len(row.prompt),
            reused_tokens=row.reused,
            completion_tokens=len(generated),
            finish_reason=finish,
            cancelled=row.work.cancelled.is_set(),
            seconds=round(time.perf_counter() - row.work.enqueued, 3),
        )
        _settle(row.work.future, Outcome(text, finish, len(row.prompt), len(generated)))

    def _observe(self, event: str, *args: Any) -> None:
        observer = self.observer
        if observer is None:
            return
        try:
            getattr(observer, event)(*args)
        except Exception:  # metrics never break generation
            log.exception("engine observer failed", observed=event)


def _continuing(
    decode: Callable[[list[int]], str], context: list[int]
) -> Callable[[list[int]], str]:
    """``decode`` for ids that follow ``context``: their text after the context's own."""
    before = decode(context)

    def after(ids: list[int]) -> str:
        text = decode(context + ids)
        if text.startswith(before):
            return text[len(before) :]
        return decode(ids)  # a decoder that rewrites the context's text: no context

    return after


def _raised_at(e: BaseException) -> str:
    """``file.py:line in function`` of the innermost frame: enough to find a bug, with
    none of the message (which may quote a prompt)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


def _failed(e: Exception) -> BackendError:
    return BackendError(f"the local model failed: {type(e).__name__}: {e}")


def _torch() -> Any:
    import torch

    return torch


def attention_backends(model: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """What the forward passes run under: on CUDA, the flash and math attention backends
    (see the module doc); elsewhere nothing changes."""
    device = getattr(model, "device", None)
    if getattr(device, "type", None) != "cuda":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(backends)


def _joinable(config: Any) -> bool:
    """Whether this model's KV cache rows can be padded and joined (plain per-layer
    key/value tensors, as for Llama); sliding-window layers cannot."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_left(cache: Any, count: int, torch: Any) -> None:
    if count <= 0:
        return
    for layer in cache.layers:
        shape = list(layer.keys.shape)
        shape[-2] = count
        layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=-2)
        shape = list(layer.values.shape)
        shape[-2] = count
        layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=-2)
