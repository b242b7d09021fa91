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
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import structlog

from guardrail.backends.base import Backend, GenerationRequest
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

    def wanted(self) -> bool:
        """Whether this request is one of the sampled share."""
        return self.rate > 0 and self._rng.random() < self.rate

    async def score(self, backend: Backend, request: GenerationRequest, answer: str) -> float:
        """Draw the samples and score ``answer`` against them (blocking the caller)."""
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
        texts = [c.text for c in completions if c.text.strip()]
        if not texts:
            raise ValueError("every consistency sample was empty")
        question = _question(request)
        scorer = await self._scorer()
        scope = request.cache_scope  # the tenant: its cached embeddings only
        scores = [(await scorer.score(answer, [t], question, scope=scope)).score for t in texts]
        return float(statistics.fmean(scores))

    async def inline(
        self, backend: Backend, request: GenerationRequest, answer: str, decision: Decision
    ) -> Decision | None:
        """Score now; a decision carrying an ``inconsistent`` flag when below threshold.

        A failed check is logged and counted and flags nothing: the answer passed the
        policy already, and consistency is a signal, not a filter.
        """
        try:
            score = await self.score(backend, request, answer)
        except Exception as e:
            self._count("error")
            log.warning("consistency_failed", request_id=request.request_id, error=type(e).__name__)
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

    def background(self, backend: Backend, request: GenerationRequest, answer: str) -> None:
        """Score after the response, off the request path (bounded; never waits)."""
        if len(self._tasks) >= self._max_in_flight:
            self._count("dropped")
            return
        task = asyncio.get_running_loop().create_task(self._run(backend, request, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, backend: Backend, request: GenerationRequest, answer: str) -> None:
        try:
            score = await self.score(backend, request, answer)
        except Exception as e:
            self._count("error")
            log.warning("consistency_failed", request_id=request.request_id, error=type(e).__name__)
            return
        self._count("scored")
        self._record("background", score)
        log.info("consistency_scored", request_id=request.request_id, score=round(score, 4))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel checks still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _question(request: GenerationRequest) -> str | None:
    if request.messages is None:
        return request.prompt
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else None
