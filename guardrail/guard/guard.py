"""The pipeline: run a policy's filters on one text, concurrently, and combine their verdicts.

Like structlog's processor chain, the whole pipeline is one loop over small parts:
pick the filters for the stage, run each under its time limit, turn a failure into
the policy's ``on_error`` verdict (fail closed by default), and combine.

For a conversation (:meth:`Guard.check_messages`), each message is checked by the
message-level filters, through the verdict cache where a filter allows it (see
:mod:`guardrail.guard.cache`), and filters that declare ``scope = "conversation"``
see the whole conversation once.
"""

from __future__ import annotations

import asyncio
import itertools
import numbers
import operator
import time
from collections.abc import Awaitable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import structlog

from guardrail.chat import Message
from guardrail.errors import GuardrailError, PolicyError, Problem, TextTooLongError, where
from guardrail.filters.normalize import spaced
from guardrail.guard.cache import (
    CacheKey,
    VerdictCache,
    cache_scope,
    prefix_digests,
    text_digest,
)
from guardrail.guard.filter import (
    LOOP_TEXT_CHARS,
    BuildContext,
    Filter,
    FilterSpec,
    HoldsBack,
    Stateful,
    text_pass,
)
from guardrail.guard.types import (
    FILTER_ERROR_CATEGORY,
    Action,
    Decision,
    FilterContext,
    FilterOutcome,
    FilterStatus,
    Finding,
    Redaction,
    Stage,
    Verdict,
    apply_redactions,
)
from guardrail.plugins import PluginRegistry
from guardrail.policy.model import FilterConfig, Policy

log = structlog.get_logger("guardrail.guard")
# How a conversation-level filter sees the conversation: the message texts in order.
CONVERSATION_SEPARATOR = "\n\n"

Bound = tuple[FilterConfig, Filter]
# Numbers each built Guard for its verdict-cache keys (see Guard.__init__).
_GUARD_IDS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class HeldBack:
    """What a stream must keep back of a text's end: ``chars`` trailing characters, all
    of the text where ``failed`` names the filter whose hold-back failed."""

    chars: int
    failed: str | None = None


def is_conversation_filter(filt: object) -> bool:
    """Whether a filter judges the whole conversation (``scope = "conversation"``)."""
    return getattr(filt, "scope", "message") == "conversation"


class Guard:
    """Runs one policy. Immutable: a reload builds a new Guard and swaps it in whole.

    ``executor`` runs the guard's own passes over a long text (the spaced reading, see
    :func:`text_pass`); ``None``, the event loop's default executor.
    """

    def __init__(
        self,
        policy: Policy,
        filters: Sequence[Bound],
        cache: VerdictCache | None = None,
        executor: Executor | None = None,
        parallel_checks: int = 0,
    ) -> None:
        self.policy = policy
        self.parallel_checks = parallel_checks
        self.cache = cache
        self.executor = executor
        self.filters: tuple[Bound, ...] = tuple(filters)
        self._by_stage: dict[Stage, tuple[Bound, ...]] = {
            stage: tuple((c, f) for c, f in filters if stage in c.stages) for stage in Stage
        }
        self._per_message = {
            s: tuple(b for b in bound if not is_conversation_filter(b[1]))
            for s, bound in self._by_stage.items()
        }
        self._conversation = {
            s: tuple(b for b in bound if is_conversation_filter(b[1]))
            for s, bound in self._by_stage.items()
        }
        # The policy's identity is not enough: the same file bytes in two folders (two
        # tenants' copies) build different filters when a config names a file relative
        # to its policy (a word list, weights), and a reload of unchanged YAML may pick
        # up a changed file. Each Guard keys its own verdicts, so none is ever served by
        # filters other than those that decided it.
        self._cache_id = (
            f"{policy.name}\x00{policy.version}\x00{policy.digest}\x00{next(_GUARD_IDS)}"
        )
        # Decided once here: protocol checks are too slow for the per-message path.
        self._scope = {c.id: cache_scope(f) for c, f in filters}
        self._stateful = {c.id: f for c, f in filters if isinstance(f, Stateful)}

    @classmethod
    def build(
        cls,
        policy: Policy,
        registry: PluginRegistry[FilterSpec],
        env: BuildContext,
        cache: VerdictCache | None = None,
    ) -> Guard:
        """Instantiate every filter of ``policy`` (may load models: call off the event loop).

        A filter that does not build (:class:`ConfigError`: a weights file that is missing
        or does not fit, a key variable that is not set; or any other error its build
        raised) is a :class:`PolicyError` naming the file, line and entry, as the loader's
        errors do: startup and a reload then report it where it is, not as a traceback.
        """
        built = []
        for k, c in enumerate(policy.filters):
            try:
                built.append((c, registry.get(c.type).build(c.id, c.config, env)))
            except Exception as e:
                if policy.source is None or k >= len(policy.filter_positions):
                    raise
                # Our own errors are worded for the reader; another one (a library's) is
                # named by its type, as its message alone may be a bare key or path.
                reason = str(e) if isinstance(e, GuardrailError) else f"{type(e).__name__}: {e}"
                index, line, column = policy.filter_positions[k]
                problem = Problem(
                    str(policy.source), line, column, f"filters[{index}]",
                    f"filter '{c.id}' ({c.type}) does not build: {reason}",
                )  # fmt: skip
                raise PolicyError([problem]) from e
        return cls(policy, built, cache, env.executor, env.parallel_checks)

    def filters_at(self, stage: Stage) -> list[str]:
        return [c.id for c, _ in self._by_stage[stage]]

    def holdback(self, stage: Stage, text: str) -> HeldBack:
        """Trailing characters of ``text`` that some filter needs held back (streams).

        A filter whose hold-back fails (raises, or answers something not a count) has
        all of ``text`` held: nothing is released that it may have needed kept, and the
        check of the whole text at the stream's end applies its ``on_error``. The
        failure is named, so the stream's exchange counts it as that filter's error.
        """
        keep = 0
        for config, f in self._by_stage[stage]:
            if not isinstance(f, HoldsBack):
                continue
            try:
                wanted = f.holdback(text)
                if type(wanted) is not int:
                    raise TypeError("filter's holdback returned a non-integer")
            except Exception as e:
                log.warning("filter_holdback_failed", filter=config.id, error=type(e).__name__,
                            at=where(e))  # fmt: skip
                return HeldBack(len(text), failed=config.id)
            keep = max(keep, wanted)
        return HeldBack(keep)

    async def check(
        self,
        stage: Stage,
        text: str,
        ctx: FilterContext,
        *,
        only: Collection[str] | None = None,
        written: str | None = None,
    ) -> Decision:
        """Decide on one ``text`` at ``stage`` with every filter (or the filters whose
        ids are in ``only``). Never raises for a filter's failure.

        ``ctx.message_index`` reaches the filters only if that message is ``text``.
        ``written``: ``text`` with the readings the request did not write blanked, the
        same length (an id read with its words apart): what a stateful filter (PII's)
        reads instead. Such a reading finds words, but it parts letters written together
        and so makes personal data up ("toolu_01HwusAVE3..." read "01 Hwus AVE3", a
        street address).
        """
        index = ctx.message_index
        if index is not None and ctx.messages[index].content != text:
            index = None  # the text is not that message: filters get no index for it
        if ctx.stage is not stage or index != ctx.message_index:
            # The same text: what is known of it stays (the part being decided, ...).
            ctx = replace(
                ctx.at(stage, index),
                window=ctx.window,
                tool_calls=ctx.tool_calls,
                verbatim=ctx.verbatim,
                identifiers=ctx.identifiers,
            )
        filters = self._by_stage[stage]
        if only is not None:
            filters = tuple(b for b in filters if b[0].id in only)
        return await self._decide(stage, text, ctx, filters, written=written)

    async def check_messages(
        self, stage: Stage, messages: Sequence[Message], ctx: FilterContext
    ) -> list[tuple[int | None, Decision]]:
        """Decide on a conversation: one decision per non-empty message (index), plus
        one for the conversation-level filters (index ``None``), if the policy has any.
        A conversation no filter reads (none at ``stage``, or every message empty) is
        decided all the same: one allow of the whole conversation (index ``None``), as
        :meth:`check` decides a text no filter reads.

        Message-level verdicts come from the verdict cache where a filter allows it; a
        message whose every verdict is cached is decided without starting a task.
        """
        per_message = self._per_message[stage]
        prefixes: list[bytes] | None = None
        if self.cache is not None and any(self._scope[c.id] == "prefix" for c, _ in per_message):
            prefixes = prefix_digests(messages)
        decided: dict[int | None, Decision] = {}
        jobs = []
        pending: list[int | None] = []
        for i, message in enumerate(messages):
            if not message.content or not per_message:
                continue
            message_ctx = ctx.at(stage, i)
            prefix = prefixes[i] if prefixes is not None else b""
            known = self._lookup(stage, message.content, message_ctx, per_message, prefix)
            if len(known) == len(per_message):
                decided[i] = self.combine(stage, message.content, known)
            else:
                jobs.append(
                    self._decide(
                        stage, message.content, message_ctx, per_message, prefix, known=known
                    )
                )
                pending.append(i)
        conversation = self._conversation[stage]
        text = CONVERSATION_SEPARATOR.join(m.content for m in messages)
        if conversation:
            jobs.append(self._decide_conversation(stage, text, ctx.at(stage, None), conversation))
            pending.append(None)
        if 0 < self.parallel_checks < len(jobs):
            # Each job's filter time limits start when it starts: a bounded number at a
            # time, so the last message of a long history does not time out waiting for
            # the CPU behind the others (see BuildContext.parallel_checks).
            running = asyncio.Semaphore(self.parallel_checks)

            async def bounded(job: Awaitable[Decision]) -> Decision:
                async with running:
                    return await job

            jobs = [bounded(job) for job in jobs]
        decided.update(zip(pending, await asyncio.gather(*jobs), strict=True))
        if not decided:
            # The conversation reached the filters and passed: no decision at all made the
            # exchange of an output-only policy look refused before them (no input stage
            # in stage_outcomes_total, the rates' denominator; no input_action in its
            # audit row, so neither feedback nor the report found it).
            return [(None, self.combine(stage, text, ()))]
        ordered: list[tuple[int | None, Decision]] = [
            (i, decided[i]) for i in range(len(messages)) if i in decided
        ]
        if None in decided:
            ordered.append((None, decided[None]))
        return ordered

    def _key(
        self, config: FilterConfig, stage: Stage, digest: bytes, prefix: bytes, tenant: str
    ) -> CacheKey | None:
        scope = self._scope[config.id]
        if scope == "none":
            return None
        scoped = prefix if scope == "prefix" else b""
        return (self._cache_id, config.id, stage.value, digest, scoped, tenant)

    def _lookup(
        self,
        stage: Stage,
        text: str,
        ctx: FilterContext,
        filters: Sequence[Bound],
        prefix: bytes,
    ) -> list[FilterOutcome]:
        """The cached outcomes of ``filters`` on ``text`` (hits only, in filter order)."""
        if self.cache is None:
            return []
        digest = text_digest(text)
        hits = []
        for config, _ in filters:
            key = self._key(config, stage, digest, prefix, ctx.tenant)
            verdict = self.cache.get(key) if key is not None else None
            if verdict is None:
                continue
            stateful = self._stateful.get(config.id)
            if stateful is not None and not _remembered(stateful, text, verdict, ctx):
                continue
            hits.append(FilterOutcome(config.id, config.type, verdict, 0.0, "ok", cache="hit"))
        return hits

    async def _decide(
        self,
        stage: Stage,
        text: str,
        ctx: FilterContext,
        filters: Sequence[Bound],
        prefix: bytes | None = None,
        *,
        known: Sequence[FilterOutcome] = (),
        written: str | None = None,
    ) -> Decision:
        """Run ``filters`` on ``text``; those in ``known`` are already answered. A stateful
        filter reads ``written`` if given (see :meth:`check`).

        ``prefix`` is None for a standalone text (output, moderation, eval): not cached.
        """
        own = text if written is None else written
        cache = self.cache if prefix is not None else None
        digest = text_digest(text) if cache is not None else b""
        answered = {o.filter_id: o for o in known}
        # A long text's spaced reading is made on the executor, within each filter's time
        # limit: a busy executor queue held it past timeout_ms, its status still "ok".
        reading: asyncio.Future[str | None] | None = None
        other = None
        if len(text) > LOOP_TEXT_CHARS:
            reading = asyncio.ensure_future(text_pass(self.executor, len(text), spaced, text))
        else:
            other = _spaced_reading(text, ctx, spaced(text))

        async def one(bound: Bound) -> FilterOutcome:
            config, filt = bound
            if config.id in answered:
                return answered[config.id]
            key = self._key(config, stage, digest, prefix or b"", ctx.tenant) if cache else None
            started = time.perf_counter()
            second = other
            if reading is not None:
                try:
                    read = await asyncio.wait_for(asyncio.shield(reading), config.timeout_s)
                except TimeoutError:
                    return _timed_out(config, started)
                second = _spaced_reading(text, ctx, read)
            limit = max(0.0, config.timeout_s - (time.perf_counter() - started))
            stateful = config.id in self._stateful
            if second is None or stateful:
                # A stateful filter (PII's restore) keeps request state per text it read.
                outcome = await _run(config, filt, own if stateful else text, ctx, limit)
            else:
                outcome = _either(
                    *await asyncio.gather(
                        _run(config, filt, text, ctx, limit), _run(config, filt, *second, limit)
                    )
                )
            if cache is None or key is None:
                return outcome
            if outcome.status == "ok":
                cache.put(key, outcome.verdict)
            return replace(outcome, cache="miss")

        if len(filters) == 1:
            outcomes: Sequence[FilterOutcome] = [await one(filters[0])]
        else:
            outcomes = await asyncio.gather(*(one(b) for b in filters))
        return self.combine(stage, text, outcomes)

    async def _decide_conversation(
        self, stage: Stage, text: str, ctx: FilterContext, filters: Sequence[Bound]
    ) -> Decision:
        """Conversation-level filters block or flag; a redaction of the joined text
        cannot be mapped back onto the messages, so it counts as a flag."""
        decision = await self._decide(stage, text, ctx, filters)
        if decision.action is Action.REDACT:
            return replace(decision, action=Action.FLAG, text=text, redactions=(), checked=None)
        return decision

    def combine(self, stage: Stage, text: str, outcomes: Sequence[FilterOutcome]) -> Decision:
        """The decision the filters' ``outcomes`` on ``text`` make together: the
        strictest action wins, and a redaction applies every filter's redactions."""
        findings = tuple(f for o in outcomes for f in o.verdict.findings)
        action = Action.strictest(o.verdict.action for o in outcomes)
        redactions: tuple[Redaction, ...] = ()
        if action is Action.REDACT:
            redactions = tuple(r for o in outcomes for r in o.verdict.redactions)
        return Decision(
            stage=stage,
            action=action,
            text=apply_redactions(text, redactions) if redactions else text,
            findings=findings,
            outcomes=tuple(outcomes),
            policy_name=self.policy.name,
            policy_version=self.policy.version,
            redactions=redactions,
            checked=text if redactions else None,
        )


def _spaced_reading(
    text: str, ctx: FilterContext, other: str | None
) -> tuple[str, FilterContext] | None:
    """``other``, ``text`` with its invisible characters read as spaces (``spaced(text)``),
    and the context for it, or ``None`` if it holds none.

    Filters compare the checked text with its message (``ctx.message_index``), so the
    message holds this reading in the context the filters get with it.
    """
    if other is None:
        return None
    index = ctx.message_index
    if index is None:
        return other, ctx
    messages = list(ctx.messages)
    messages[index] = replace(messages[index], content=other)
    return other, replace(ctx, messages=tuple(messages))  # the same state object


def _either(first: FilterOutcome, second: FilterOutcome) -> FilterOutcome:
    """One filter's outcome on a text read two ways: the stricter action, with both
    readings' findings and redactions (their spans are spans of the same text). A
    failure of either is the filter's failure."""
    duration = max(first.duration_s, second.duration_s)
    for outcome in (first, second):
        if outcome.status != "ok":
            return replace(outcome, duration_s=duration)
    a, b = first.verdict, second.verdict
    # Both readings' findings, not the stricter one's alone: a stream window keeps only
    # the findings that rest on it, and the stricter reading's may all lie in the
    # released context while the other's block the window itself.
    scores = [v.score for v in (a, b) if v.score is not None]
    verdict = Verdict(
        Action.strictest((a.action, b.action)),
        tuple(dict.fromkeys((*a.findings, *b.findings))),
        tuple(dict.fromkeys((*a.redactions, *b.redactions))),
        max(scores, default=None),
    )
    return replace(first, verdict=verdict, duration_s=duration)


def _remembered(filt: Stateful, text: str, verdict: Verdict, ctx: FilterContext) -> bool:
    """Let a stateful filter rebuild its request state from a cached verdict.

    If it cannot, the cached verdict is not used and the filter runs: the cache may
    save work, never change an answer.
    """
    try:
        filt.remember(text, verdict, ctx)
    except Exception:
        return False
    return True


def _timed_out(config: FilterConfig, started: float) -> FilterOutcome:
    return FilterOutcome(
        filter_id=config.id,
        filter_type=config.type,
        verdict=_failed(config),
        duration_s=time.perf_counter() - started,
        status="timeout",
    )


async def _run(
    config: FilterConfig,
    filt: Filter,
    text: str,
    ctx: FilterContext,
    timeout_s: float | None = None,
) -> FilterOutcome:
    """``filt`` on ``text`` within ``timeout_s`` (the filter's own limit if ``None``)."""
    started = time.perf_counter()
    status: FilterStatus = "ok"
    error: str | None = None
    limit = config.timeout_s if timeout_s is None else timeout_s
    try:
        verdict = _stamp(await asyncio.wait_for(filt.check(text, ctx), limit), config.id, len(text))
    except TimeoutError:
        status, verdict = "timeout", _failed(config)
    except TextTooLongError as e:
        # Not broken: the text is past the filter's bound. The message gives sizes only,
        # and tells the client why (a generic "blocked" read as a verdict on the text).
        status, error = "error", type(e).__name__
        verdict = _failed(
            config,
            f"The text is longer than the gateway's filter {config.id} checks ({e}); "
            "send a shorter text.",
        )
        log.warning("filter_text_too_long", filter=config.id, request_id=ctx.request_id)
    except Exception as e:  # a broken filter must not take the request down with it
        status, error, verdict = "error", type(e).__name__, _failed(config)
        # The type and where it was raised, never the message: it may quote user text.
        log.warning(
            "filter_failed",
            filter=config.id,
            stage=ctx.stage.value,
            error=error,
            at=where(e),
            request_id=ctx.request_id,
        )
    return FilterOutcome(
        filter_id=config.id,
        filter_type=config.type,
        verdict=verdict,
        duration_s=time.perf_counter() - started,
        status=status,
        error=error,
    )


def _failed(config: FilterConfig, message: str | None = None) -> Verdict:
    """The policy's verdict for a filter that errored or timed out (block by default)."""
    finding = Finding(
        category=FILTER_ERROR_CATEGORY,
        score=1.0,
        action=config.on_error,
        filter_id=config.id,
        message=message,
    )
    return Verdict(config.on_error, (finding,))


def _stamp(verdict: object, filter_id: str, length: int) -> Verdict:
    """Key findings by the policy's filter id; reject malformed verdicts as filter errors."""
    if not isinstance(verdict, Verdict):
        raise TypeError(f"filter returned {type(verdict).__name__}, not a Verdict")
    # An action that is not an Action (the string "block", None) would be combined as
    # something other than a block: a plugin's typo must fail closed, not open.
    if type(verdict.action) is not Action:
        raise TypeError("filter returned a verdict whose action is not an Action")
    findings = tuple(verdict.findings)
    for f in findings:
        if not isinstance(f, Finding):
            raise TypeError("filter returned a malformed finding")
        # Typed as Finding, but a plugin is not type-checked: look at what it returned.
        action: object = f.action
        category: object = f.category
        score: object = f.score
        if (
            type(action) is not Action
            or not isinstance(category, str)
            or not isinstance(score, numbers.Real)
        ):
            raise TypeError("filter returned a malformed finding")
        for span in (f.span, f.extent):
            if span is not None and not _fits(span[0], span[1], length):
                raise ValueError("filter returned a finding span outside the text")
    redactions = tuple(verdict.redactions)
    for r in redactions:
        if not isinstance(r, Redaction) or not isinstance(r.replacement, str):
            raise TypeError("filter returned a malformed redaction")
        if not _fits(r.start, r.end, length) or r.start == r.end:
            raise ValueError("filter returned a redaction outside the text")
    # A verdict looser than its own findings (a plugin's Verdict(findings=(block,)) keeps
    # the default allow) would let through what the filter said to block: malformed.
    if verdict.action.rank < Action.strictest(f.action for f in findings).rank:
        raise ValueError("filter returned a verdict less strict than its findings")
    verdict_score: object = verdict.score  # a plugin is not type-checked either
    if verdict_score is not None and not isinstance(verdict_score, numbers.Real):
        raise TypeError("filter returned a malformed verdict score")
    stamped = tuple(replace(f, filter_id=filter_id) for f in findings)
    return Verdict(verdict.action, stamped, redactions, verdict.score)


def _fits(start: object, end: object, length: int) -> bool:
    """Whether ``(start, end)`` is a span of a text of ``length`` characters (integers
    only: a float cannot index the text)."""
    try:
        first, last = operator.index(start), operator.index(end)  # type: ignore[arg-type]
    except TypeError:
        return False
    return 0 <= first <= last <= length
