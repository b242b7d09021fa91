"""Shadow mode: a candidate policy decides live traffic alongside the active one, unenforced.

A policy author trying a new policy sets ``shadow_policy`` to its file. Every prompt
(and every completion) the active policy decides is also checked by the shadow policy,
off the request path: the client's answer never waits for it and never changes. The
two actions are compared and counted (``guardrail_shadow_decisions_total{stage,
active, shadow}``); a disagreement is logged with the request id, the two actions and
the shadow policy's categories, never the text.

Shadow checks are bounded: at most ``max_in_flight`` run at once; past that a check is
dropped and counted, so a slow candidate policy cannot pile up work. The shadow store
reloads with the active one; a bad shadow file keeps the previous shadow policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import structlog

from guardrail.chat import Message
from guardrail.guard.guard import Guard
from guardrail.guard.store import GuardStore
from guardrail.guard.stream import check_continuation
from guardrail.guard.types import Action, Decision, FilterContext, Stage

log = structlog.get_logger("guardrail.shadow")

# (stage, active action, shadow action or "dropped"/"error", shadow policy version)
Recorder = Callable[[Stage, Action, str, str], None]


class ShadowPolicy:
    """Runs a second policy on the same texts and records how its decisions compare."""

    def __init__(self, store: GuardStore, record: Recorder, *, max_in_flight: int = 64) -> None:
        self.store = store
        self._record = record
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def observe_messages(
        self, messages: Sequence[Message], ctx: FilterContext, active: Action
    ) -> None:
        """Compare the input stage: the shadow policy checks the same messages."""

        async def run(guard: Guard) -> list[Decision]:
            decided = await guard.check_messages(Stage.INPUT, messages, _detached(ctx))
            return [d for _, d in decided]

        self._spawn(Stage.INPUT, ctx.request_id, active, run)

    def observe_text(
        self, stage: Stage, text: str, ctx: FilterContext, active: Action, *, lead: str = ""
    ) -> None:
        """Compare one text's decision (a completion at the output stage, checked after
        ``lead``, the text it continues, as the active policy checks it: a phrase split
        at the join was blocked by the active policy alone, a disagreement of neither)."""

        async def run(guard: Guard) -> list[Decision]:
            checked = _detached(ctx).at(stage)
            if lead and stage is Stage.OUTPUT:
                context = guard.policy.stream.context_chars
                return [await check_continuation(guard, checked, text, lead, context)]
            return [await guard.check(stage, text, checked)]

        self._spawn(stage, ctx.request_id, active, run)

    def _spawn(
        self,
        stage: Stage,
        request_id: str,
        active: Action,
        run: Callable[[Guard], Awaitable[list[Decision]]],
    ) -> None:
        # The candidate in force now decides, and names its version, even if a reload
        # swaps it before the task runs: one decision, one policy version.
        guard = self.store.current
        version = guard.policy.version
        if len(self._tasks) >= self._max_in_flight:
            self._record(stage, active, "dropped", version)
            return
        task = asyncio.get_running_loop().create_task(
            self._compare(stage, request_id, active, version, lambda: run(guard))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(
        self,
        stage: Stage,
        request_id: str,
        active: Action,
        version: str,
        run: Callable[[], Awaitable[list[Decision]]],
    ) -> None:
        try:
            decisions = await run()
        except Exception as e:  # the shadow never affects traffic; count and log the type
            self._record(stage, active, "error", version)
            log.warning("shadow_error", request_id=request_id, error=type(e).__name__)
            return
        failed = sorted({o.status for d in decisions for o in d.outcomes if o.status != "ok"})
        if failed:
            # A candidate filter that errored or timed out decided by its on_error, not by
            # the text: that is the candidate failing, not a disagreement to count.
            self._record(stage, active, "error", version)
            log.warning("shadow_error", request_id=request_id, error="filter_" + failed[0])
            return
        shadow = Action.strictest(d.action for d in decisions)
        self._record(stage, active, shadow.value, version)
        if shadow is not active:
            categories = sorted(
                {f.category for d in decisions for f in d.findings if f.action is not Action.ALLOW}
            )
            log.info(
                "shadow_disagreement",
                request_id=request_id,
                stage=stage.value,
                active=active.value,
                shadow=shadow.value,
                shadow_policy_version=version,
                shadow_categories=categories,
            )

    async def drain(self) -> None:
        """Wait for the checks in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _detached(ctx: FilterContext) -> FilterContext:
    """The context with fresh request state, so shadow filters never touch the live state."""
    return replace(ctx, state={})
