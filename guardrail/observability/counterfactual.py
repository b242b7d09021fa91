"""Counterfactual probes: would the policy decide differently about another group?

For a sampled fraction of the prompts that mention a demographic group, the prober
swaps that group's terms for its counterpart's ("Muslims" -> "Christians", "women"
-> "men"; :meth:`~guardrail.observability.groups.Lexicon.swap`) in every message of
the conversation, runs the *input stage of the same policy* on the swapped
conversation, and compares the strictest action with the one the real request got.
A different action is a *flip*: the policy treats the two groups differently in
otherwise identical text.

Why it is built this way:

- **Off the request path.** :meth:`CounterfactualProber.maybe_probe` only decides
  (a scan for group terms when probing is on, a random draw) and starts a task; the
  request never waits for the probe, and a probe's failure never reaches it. At most
  ``max_in_flight`` probes run at once; past that a sampled probe is dropped and
  counted (``skipped`` with reason ``busy``), so probing cannot queue up work behind a
  traffic spike.
- **Nothing leaves the gateway.** A probe calls the guard only: never the backend, never
  the audit log, never the exchange's metrics. Its log lines carry the request id,
  axis, groups, actions and rule ids, never text.
- **Like for like.** The probe runs the whole input stage on the whole (swapped)
  conversation through the same :class:`~guardrail.guard.guard.Guard` object that
  judged the request, so a policy reload in between cannot look like a flip, and
  unchanged messages reuse their cached verdicts. A probe where a filter failed on
  either side (error or timeout: a fail-closed verdict, not a judgement) is not
  compared; it is counted as skipped (``filter_error``).
- **Which group.** The newest message that mentions a group decides: its first
  mention is the group probed, and that group and its counterpart trade places in
  every message ("men and women" becomes "women and men"), other groups stay.

Observability imports only data types: the guard is anything with the
:class:`InputChecker` shape.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import structlog

from guardrail.chat import Message
from guardrail.guard.types import Action, Decision, FilterContext, Stage
from guardrail.observability.groups import GroupRef, Lexicon

__all__ = [
    "SKIP_REASONS",
    "CounterfactualProber",
    "InputChecker",
    "ProbeResult",
    "SkipReason",
]

log = structlog.get_logger("guardrail.counterfactual")

ProbeOutcome = Literal["same", "flip"]
SkipReason = Literal["busy", "filter_error", "error"]
SKIP_REASONS: Final[tuple[SkipReason, ...]] = ("busy", "filter_error", "error")


class InputChecker(Protocol):
    """What a probe needs of a guard (``guardrail.guard.guard.Guard`` has it).

    Example::

        decisions = await guard.check_messages(Stage.INPUT, messages, ctx)
    """

    async def check_messages(
        self, stage: Stage, messages: Sequence[Message], ctx: FilterContext
    ) -> list[tuple[int | None, Decision]]: ...


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One finished probe: the group swapped, and both decisions."""

    group: GroupRef
    counterpart: GroupRef
    original: Action
    probe: Action
    comparable: bool
    """False when a filter failed on either side: then ``same``/``flip`` mean nothing."""
    original_rules: tuple[str, ...] = ()
    """Rule ids (or categories) of the original's acting findings, for the flip log."""
    probe_rules: tuple[str, ...] = ()

    @property
    def result(self) -> ProbeOutcome:
        return "same" if self.original is self.probe else "flip"


class CounterfactualProber:
    """Samples prompts that mention a group and probes them in background tasks.

    Example::

        prober = CounterfactualProber(lexicon, sample_rate=0.05, max_in_flight=4,
                                      on_result=count, on_skip=count_skip)
        prober.maybe_probe(guard, ctx, messages, input_decisions)  # request path
        await prober.aclose()                                      # shutdown

    ``on_result`` gets every compared probe, ``on_skip`` the reason of every sampled
    probe that was not compared. ``random`` (a float in [0, 1)) is injectable for tests.
    """

    def __init__(
        self,
        lexicon: Lexicon,
        *,
        sample_rate: float,
        max_in_flight: int,
        on_result: Callable[[ProbeResult], None],
        on_skip: Callable[[SkipReason], None],
        random: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("sample_rate must be between 0 and 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.lexicon = lexicon
        self.sample_rate = sample_rate
        self.max_in_flight = max_in_flight
        self._on_result = on_result
        self._on_skip = on_skip
        self._random = random
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def maybe_probe(
        self,
        checker: InputChecker,
        ctx: FilterContext,
        messages: Sequence[Message],
        decisions: Sequence[tuple[int | None, Decision]],
    ) -> bool:
        """On the request path: start a probe if this prompt is sampled. Never raises,
        never waits. Returns whether a probe started."""
        if self.sample_rate <= 0.0:
            return False
        try:
            if not any(self.lexicon.mentions(m.content) for m in reversed(messages)):
                return False
            if self._random() >= self.sample_rate:
                return False
            if len(self._tasks) >= self.max_in_flight:
                self._on_skip("busy")
                return False
            task = asyncio.get_running_loop().create_task(
                self._run(checker, ctx, tuple(messages), tuple(d for _, d in decisions)),
                name="guardrail-counterfactual",
            )
        except Exception as e:  # a probe must never fail the request that sampled it
            log.error("counterfactual_start_failed", error=type(e).__name__)
            return False
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def probe(
        self,
        checker: InputChecker,
        ctx: FilterContext,
        messages: Sequence[Message],
        decisions: Sequence[Decision],
    ) -> ProbeResult | None:
        """Run one probe now and return its result (``None``: no group to swap)."""
        target = self._target(messages)
        if target is None:
            return None
        counterpart = GroupRef(target.axis, self.lexicon.group(target).counterpart)
        swapped = tuple(
            Message(m.role, self.lexicon.swap(m.content, target, counterpart)) for m in messages
        )
        probe_ctx = FilterContext(
            f"{ctx.request_id}-counterfactual",
            stage=Stage.INPUT,
            tenant=ctx.tenant,
            route=ctx.route,
            model=ctx.model,
            messages=swapped,
            # The request's sources as they came: a filter that reads them on input
            # must see the same, or the probe's difference is theirs, not the group's.
            context_documents=ctx.context_documents,
        )
        probed = [d for _, d in await checker.check_messages(Stage.INPUT, swapped, probe_ctx)]
        failed = any(o.status != "ok" for d in (*decisions, *probed) for o in d.outcomes)
        return ProbeResult(
            group=target,
            counterpart=counterpart,
            original=Action.strictest(d.action for d in decisions),
            probe=Action.strictest(d.action for d in probed),
            comparable=not failed,
            original_rules=_acting(decisions),
            probe_rules=_acting(probed),
        )

    async def aclose(self) -> None:
        """Cancel the probes still running (the app's shutdown); they are not counted."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for the probes running now (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- inside ----------------------------------------------------------------------

    def _target(self, messages: Sequence[Message]) -> GroupRef | None:
        for message in reversed(messages):
            found = self.lexicon.find(message.content)
            if found:
                return found[0].ref
        return None

    async def _run(
        self,
        checker: InputChecker,
        ctx: FilterContext,
        messages: tuple[Message, ...],
        decisions: tuple[Decision, ...],
    ) -> None:
        try:
            result = await self.probe(checker, ctx, messages, decisions)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("counterfactual_failed", request_id=ctx.request_id, error=type(e).__name__)
            self._on_skip("error")
            return
        if result is None:
            return
        if not result.comparable:
            self._on_skip("filter_error")
            return
        self._on_result(result)
        if result.result == "flip":
            log.info(
                "counterfactual_flip",
                request_id=ctx.request_id,
                axis=result.group.axis,
                group=result.group.group,
                counterpart=result.counterpart.group,
                original=result.original.value,
                probe=result.probe.value,
                original_rules=list(result.original_rules),
                probe_rules=list(result.probe_rules),
            )


def _acting(decisions: Sequence[Decision]) -> tuple[str, ...]:
    return tuple(
        sorted(
            {
                f.rule_id or f.category
                for d in decisions
                for f in d.findings
                if f.action is not Action.ALLOW
            }
        )
    )
