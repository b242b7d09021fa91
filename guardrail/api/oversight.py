"""The running gateway's feedback and review service: the oversight store, the audit log
it reads, and the metrics it keeps (``guardrail_feedback_total``,
``guardrail_feedback_replaced_total``, ``guardrail_review_verdicts_total``,
``guardrail_review_queue_depth``).

Routes: :mod:`guardrail.api.feedback` (``POST /v1/feedback``) and
:mod:`guardrail.api.review` (``/admin/review...``). Both need the audit log: with
``audit_dsn: off`` (or a store this module does not know) they answer 404
``audit_disabled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Final, TypeVar

import structlog
from litestar.datastructures import State

from guardrail.api.errors import APIError
from guardrail.api.serving import Gateway
from guardrail.exchange import MONITORED_ROUTES
from guardrail.observability.audit import AuditLog
from guardrail.observability.metrics import GatewayMetrics
from guardrail.observability.oversight import (
    AuditedExchange,
    FeedbackEntry,
    OversightStore,
    ReviewEntry,
    answers,
    oversight_store_for,
)

__all__ = ["Oversight", "build_oversight", "oversight_of"]

log = structlog.get_logger("guardrail.oversight")
T = TypeVar("T")

REFRESH_S: Final = 15.0
"""How often the review queue depth gauge is read from the database."""
FLUSH_WAIT_S: Final = 2.0
"""How long a feedback for an id not yet in the database waits for the audit writer."""


class Oversight:
    """Feedback and review on top of the audit database.

    Example::

        oversight = build_oversight(gateway)       # None when the audit log is off
        await oversight.start()                    # app startup, after the audit log's
        found = await oversight.find_response("acme", "chatcmpl-...")
        await oversight.aclose()                   # app shutdown
    """

    def __init__(
        self,
        store: OversightStore,
        metrics: GatewayMetrics,
        *,
        audit: AuditLog | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.audit = audit
        self.refresh_s = refresh_s
        self._task: asyncio.Task[None] | None = None
        self.depth: int | None = None
        """The queue depth last read (``None`` before the first read or after a failure)."""

    async def start(self) -> None:
        """Open the store, read the queue depth once, and keep it fresh in the background."""
        await self.store.open()
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="guardrail-review-depth")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()

    async def refresh(self) -> int | None:
        """Read the queue depth into its gauge; ``None`` (logged) if the database failed."""
        try:
            depth = await self.store.pending_count()
        except Exception as e:
            log.warning("review_queue_refresh_failed", error=type(e).__name__)
            self.depth = None
            return None
        self.metrics.set_review_queue_depth(depth)
        self.depth = depth
        return depth

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    # --- feedback ---------------------------------------------------------------------

    async def find_response(self, tenant: str, response_id: str) -> AuditedExchange | None:
        """The tenant's exchange that answered with ``response_id`` (or had that request id).

        An exchange this replica finished a moment ago may still wait in the audit
        queue: then the queue is flushed (for at most :data:`FLUSH_WAIT_S`) and the
        database asked again. If the queue could not be written in that time and still
        holds the row asked for, that is a 503 the client retries; an id it does not hold
        is in the database or nowhere, so the database's answer is final (a 404 for an id
        that never existed, however long the outage lasts).
        """
        found = await self.guarded(self.store.find_response(tenant, response_id))
        audit = self.audit
        if found is not None or audit is None or not audit.depth:
            return found
        if await self.flush_audit():
            return await self.guarded(self.store.find_response(tenant, response_id))
        # Looked at before asking again: a row that leaves the queue meanwhile was
        # written (the second answer finds it) or dropped (it will never be found).
        queued = audit.holds(lambda record: answers(record, tenant, response_id))
        found = await self.guarded(self.store.find_response(tenant, response_id))
        if found is None and queued:
            log.warning("audit_flush_timed_out", queued=audit.depth)
            raise unavailable()
        return found

    async def flush_audit(self) -> bool:
        """Write this replica's queued audit rows now (waiting :data:`FLUSH_WAIT_S` at
        most), so what it just served can be found; False if they were not all written
        (or dropped) in that time."""
        if self.audit is None or not self.audit.depth:
            return True
        try:
            async with asyncio.timeout(FLUSH_WAIT_S):
                await self.audit.flush()
        except TimeoutError:
            return False
        return True

    async def save_feedback(self, entry: FeedbackEntry) -> bool:
        """Store a rating; True if it replaced an earlier rating of the same response.

        The metrics follow the stored ratings: a changed rating counts its new class and
        the old one as replaced, a repeated one (a retried POST) nothing. Ratings of
        ``/v1/moderations`` checks are stored but not counted: as in the report, they
        are no chat user's satisfaction.
        """
        previous = await self.guarded(self.store.save_feedback(entry))
        if entry.exchange.route in MONITORED_ROUTES:
            self.metrics.feedback_received(
                _rating_class(entry.rating),
                entry.exchange.action,
                replaced=None if previous is None else _rating_class(previous),
            )
        return previous is not None

    # --- review -----------------------------------------------------------------------

    async def save_review(self, entry: ReviewEntry, action: str) -> bool | None:
        replaced = await self.guarded(self.store.save_review(entry))
        if replaced is not None:
            self.metrics.review_verdict(entry.verdict.verdict, action)
            await self.refresh()
        return replaced

    async def guarded(self, call: Awaitable[T]) -> T:
        """Await a store call; a database failure is a 503 the client may retry."""
        try:
            result = await call
        except Exception as e:
            log.error("oversight_store_failed", error=type(e).__name__)
            raise unavailable() from e
        return result


def _rating_class(rating: int) -> str:
    return "positive" if rating > 0 else "negative"


def unavailable() -> APIError:
    """503 ``audit_unavailable``: the audit database did not answer; the client retries."""
    return APIError(
        503,
        "The audit database is not answering; retry shortly.",
        code="audit_unavailable",
        headers={"retry-after": "5"},
    )


def build_oversight(gateway: Gateway) -> Oversight | None:
    """The service for this gateway, or ``None`` when it has no audit database we can read."""
    if gateway.audit is None:
        return None
    store = oversight_store_for(gateway.audit.store)
    if store is None:
        return None
    return Oversight(store, gateway.metrics, audit=gateway.audit)


def oversight_of(state: State) -> Oversight:
    """The app's service; 404 ``audit_disabled`` when the audit log is off."""
    oversight: Oversight | None = state.get("oversight")
    if oversight is None:
        raise APIError(
            404,
            "Feedback and review need the audit log, which is off on this gateway "
            "(audit_dsn: off).",
            code="audit_disabled",
        )
    return oversight


def now() -> float:
    """Unix seconds (one place, so the handlers agree on the clock)."""
    return time.time()
