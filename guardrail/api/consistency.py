"""Self-consistency: ask the backend again and see whether it tells the same story.

A model that knows an answer tends to give it again when sampled; one that invents
tends to invent something different each time (the SelfCheckGPT observation). For a
share of requests (``consistency_sample_rate``), the gateway draws ``k`` more samples
of the same request at ``consistency_temperature`` and scores the answer it sent
against them: each sample serves as the source for the groundedness scorer, and the
consistency score is the mean groundedness of the answer over the samples (0-1,
higher is more consistent). Every score goes to ``guardrail_consistency_score``.

Two modes:

- ``background`` (default): after the answer is sent, so users never wait. At most
  ``consistency_max_in_flight`` checks run at once; past that a check is skipped and
  counted (``guardrail_consistency_checks_total{result="dropped"}``).
- ``inline``: before a non-streamed answer is returned; an answer below
  ``consistency_threshold`` gets an ``inconsistent`` flag (``concern: accuracy``) in
  its ``guardrail`` object and in ``guardrail_hallucination_flags_total``. Streams are
  always checked in the background: their text is already sent.

The extra samples are never shown to anyone and never moderated; they do cost backend
time (``k`` generations per checked request), which is why the rate defaults to 0. One
failed sample fails the check (counted as ``error``), and its other samples are cancelled.

What is compared is what the client got: the answer as the policy released it (redacted
where the policy redacted), streamed or not, except that the request's own values the
policy put back for placeholders (reversible PII redaction) stay the placeholders the
model wrote: the samples and the question hold those placeholders, and a restored "Jane
Doe" against a sample's "<PERSON_1>" read as a disagreement. Only answers are
compared, never a refusal or a text the upstream's content filter cut: such a text says
nothing about the model's story, and against real answers it reads as inconsistent. So
an answer that is a refusal or was cut by the upstream's filter is not checked (no
samples drawn), and samples that are empty, refusals or cut by the filter are left out
of the mean. So is a sample cut at ``max_tokens`` that is shorter than a finished answer:
it was cut before it could say as much, and what the answer says past that point would
count against it. A sample cut at ``max_tokens`` is kept otherwise: samples share the
answer's ``max_tokens``, so one longer than the answer had room for all of it (a small
model answers a known fact in a few tokens and rambles past 48 in its samples), and when
the answer was cut too, both are the first ``max_tokens`` of a story. The mean is over
the samples left; a check with none left flags nothing and is counted as ``skipped``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import structlog

from guardrail.backends.base import Backend, Completion, GenerationRequest
from guardrail.guard.types import Action, Decision, Finding, Stage

if TYPE_CHECKING:
    from guardrail.filters.grounding import GroundingScorer

log = structlog.get_logger("guardrail.consistency")

Mode = Literal["background", "inline"]
CONSISTENCY_FILTER_ID = "consistency"


class ConsistencyChecker:
    """Draws extra samples and scores agreement; see the module doc."""

    def __init__(
        self,
        scorer: Callable[[], Awaitable[GroundingScorer]],
        record: Callable[[str, float], None],
        *,
        rate: float,
        samples: int = 3,
        mode: Mode = "background",
        threshold: float = 0.5,
        temperature: float = 1.0,
        max_in_flight: int = 4,
        count: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._scorer = scorer
        self._record = record
        self._count = count or (lambda result: None)
        self.rate = rate
        self.samples = samples
        self.mode: Mode = mode
        self.threshold = threshold
        self.temperature = temperature
        self._max_in_flight = max_in_flight
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    def wanted(self, answer: Completion) -> bool:
        """Whether this answer (the released text, with the backend's finish reason and
        refusal flag) is one to check: an answer at all, and one of the sampled share."""
        if not checkable(answer):
            return False
        return self.rate > 0 and self._rng.random() < self.rate

    async def score(
        self, backend: Backend, request: GenerationRequest, answer: str, *, answer_cut: bool = False
    ) -> float | None:
        """Draw the samples and score ``answer`` against them (blocking the caller);
        ``None`` when no sample is usable. ``answer_cut``: the answer ended at
        ``max_tokens``, so every sample cut there too is compared."""
        params = replace(request.params, temperature=self.temperature, seed=None)
        extra = [
            replace(request, request_id=f"{request.request_id}-sc{i}", params=params)
            for i in range(self.samples)
        ]
        samples = [asyncio.ensure_future(backend.generate(r)) for r in extra]
        try:
            completions = await asyncio.gather(*samples)
        finally:
            # One failed sample fails the check; the others would go on generating, read by
            # no one and outside consistency_max_in_flight, so they are stopped, and waited
            # for: when the check ends, none of its generations is still running.
            for sample in samples:
                sample.cancel()
            await asyncio.gather(*samples, return_exceptions=True)
        texts = [c.text for c in completions if _comparable(c, answer, answer_cut=answer_cut)]
        if not texts:
            return None
        question = _question(request)
        scorer = await self._scorer()
        scope = request.cache_scope  # the tenant: its cached embeddings only
        scores = [(await scorer.score(answer, [t], question, scope=scope)).score for t in texts]
        return float(statistics.fmean(scores))

    async def inline(
        self,
        backend: Backend,
        request: GenerationRequest,
        answer: str,
        decision: Decision,
        *,
        answer_cut: bool = False,
    ) -> Decision | None:
        """Score now; a decision carrying an ``inconsistent`` flag when below threshold.

        A failed or skipped check is logged and counted and flags nothing: the answer
        passed the policy already, and consistency is a signal, not a filter.
        """
        try:
            score = await self.score(backend, request, answer, answer_cut=answer_cut)
        except Exception as e:
            self._count("error")
            log.warning("consistency_failed", request_id=request.request_id, error=type(e).__name__)
            return None
        if score is None:
            self._skipped(request)
            return None
        self._count("scored")
        self._record("inline", score)
        if score >= self.threshold:
            return None
        finding = Finding(
            "inconsistent",
            1.0 - score,
            Action.FLAG,
            rule_id="hallucination.consistency",
            filter_id=CONSISTENCY_FILTER_ID,
            concern="accuracy",
        )
        return Decision(
            stage=Stage.OUTPUT,
            action=Action.FLAG,
            # The answer as the policy left it, never the raw completion: this decision
            # can be the one whose text the audit log keeps.
            text=decision.text,
            findings=(finding,),
            outcomes=(),
            policy_name=decision.policy_name,
            policy_version=decision.policy_version,
        )

    def background(
        self, backend: Backend, request: GenerationRequest, answer: str, *, answer_cut: bool = False
    ) -> None:
        """Score after the response, off the request path (bounded; never waits)."""
        if len(self._tasks) >= self._max_in_flight:
            self._count("dropped")
            return
        run = self._run(backend, request, answer, answer_cut)
        task = asyncio.get_running_loop().create_task(run)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, backend: Backend, request: GenerationRequest, answer: str, answer_cut: bool
    ) -> None:
        try:
            score = await self.score(backend, request, answer, answer_cut=answer_cut)
        except Exception as e:
            self._count("error")
            log.warning("consistency_failed", request_id=request.request_id, error=type(e).__name__)
            return
        if score is None:
            self._skipped(request)
            return
        self._count("scored")
        self._record("background", score)
        log.info("consistency_scored", request_id=request.request_id, score=round(score, 4))

    def _skipped(self, request: GenerationRequest) -> None:
        self._count("skipped")
        log.info("consistency_skipped", request_id=request.request_id, samples=self.samples)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel checks still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def checkable(answer: Completion) -> bool:
    """Whether an answer is one to check: text that is not a refusal and that the
    upstream's content filter did not cut (see the module doc)."""
    if answer.refusal or answer.finish_reason == "content_filter":
        return False
    return bool(answer.text.strip())


def _comparable(sample: Completion, answer: str, *, answer_cut: bool) -> bool:
    """Whether a sample is evidence about the answer: an answer itself (see
    :func:`checkable`), and not cut at ``max_tokens`` before it said as much as a
    finished answer did (see the module doc)."""
    if not checkable(sample):
        return False
    cut_short = sample.finish_reason == "length" and len(sample.text) < len(answer)
    return answer_cut or not cut_short


def _question(request: GenerationRequest) -> str | None:
    if request.messages is None:
        return request.prompt
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else None
