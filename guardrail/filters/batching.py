"""Micro-batching: texts from concurrent requests are scored by one model call.

A model scores 32 texts in little more time than one, so a filter that calls its
model once per text wastes most of the machine under load. :class:`MicroBatcher`
collects items from concurrent callers until ``max_batch`` are waiting or the oldest
has waited ``max_wait_s``, runs the batch function once on the shared executor (never
on the event loop), and hands each caller its own result. Example::

    batcher = MicroBatcher(model.predict, executor, max_batch=32, max_wait_s=0.005)
    score = await batcher.submit("some text")   # concurrent submits share one call

One batch runs at a time per event loop: items that arrive while it runs wait for the
next one, which is what makes batches grow under load. A batch function that raises
fails every caller of that batch with the same exception (so the guard fails closed;
``StopIteration`` and exceptions that are no ``Exception`` become a ``RuntimeError``,
which an asyncio future can hold), and a caller that gives up (a filter timeout) leaves
the others' results intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(slots=True)
class BatchStats:
    """Counters for tests and benchmarks: how many batch calls, how many items."""

    batches: int = 0
    items: int = 0
    largest: int = 0


@dataclass(slots=True)
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    arrived: float


@dataclass(slots=True)
class _LoopState(Generic[In, Out]):
    """What one event loop's callers are waiting for; futures belong to their loop."""

    pending: list[_Pending[In, Out]] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None


class MicroBatcher(Generic[In, Out]):
    """Gathers items from concurrent callers and runs ``fn`` on whole batches.

    ``fn(items)`` is blocking (a model call) and must return one result per item, in
    order; it runs on ``executor``. Safe to share between filters and across policy
    reloads (keep it in ``BuildContext.resources``); each event loop gets its own queue.
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out]],
        executor: Executor,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self._fn = fn
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState[In, Out]]
        self._loops = weakref.WeakKeyDictionary()

    async def submit(self, item: In) -> Out:
        """The result of ``fn`` for ``item``, computed in a batch with concurrent items."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        future: asyncio.Future[Out] = loop.create_future()
        state.pending.append(_Pending(item, future, time.monotonic()))
        if len(state.pending) >= self.max_batch:
            state.full.set()
        if state.runner is None or state.runner.done():
            state.runner = loop.create_task(self._drain(loop, state))
        return await future

    async def _drain(self, loop: asyncio.AbstractEventLoop, state: _LoopState[In, Out]) -> None:
        """Run batches until nobody is waiting; then end (no task lingers when idle)."""
        while state.pending:
            if len(state.pending) < self.max_batch:
                state.full.clear()
                remaining = state.pending[0].arrived + self.max_wait_s - time.monotonic()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(state.full.wait(), remaining)
            batch = state.pending[: self.max_batch]
            del state.pending[: self.max_batch]
            batch = [p for p in batch if not p.future.done()]  # callers that gave up
            if batch:
                await self._run(loop, batch)

    def _call(self, items: list[In]) -> Sequence[Out]:
        """``fn(items)`` on the executor, with what it raises made an ``Exception``
        that an asyncio future can carry."""
        try:
            return self._fn(items)
        except StopIteration as e:
            # asyncio refuses StopIteration in a future, and its executor bridge then
            # leaves the awaited future unset: the batch, and every later one behind it
            # on this loop, would wait for ever.
            raise RuntimeError("the batch function raised StopIteration") from e
        except Exception:
            raise
        except BaseException as e:
            # KeyboardInterrupt, SystemExit or the like from a worker thread is no signal
            # to this process: it fails the batch rather than end the runner's task and
            # strand its callers.
            raise RuntimeError(f"the batch function raised {type(e).__name__}") from e

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[In, Out]]) -> None:
        items = [p.item for p in batch]
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        try:
            results = await loop.run_in_executor(self._executor, self._call, items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(items)} items"
                )
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
        except Exception as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        finally:
            # Whatever else ends the batch, none of its callers is left waiting.
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RuntimeError("the batch ended without a result"))
