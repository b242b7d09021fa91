"""A circuit breaker per backend URL: stop sending requests to a replica that keeps failing.

States, as usual:

- **closed**: requests go through; ``failures`` consecutive failures open it.
- **open**: requests skip this URL (the failover loop goes on to the next one) until
  ``reset_s`` have passed.
- **half-open**: one trial request goes through; success closes the circuit,
  failure opens it again for another ``reset_s``.

What counts as a failure is the remote backend's business: connection errors,
timeouts, 5xx answers and broken streams. A 4xx is the request's fault, and counts
as a success (the replica is up); a 429 counts as neither (the replica is busy, not
broken). When every URL's circuit is open, the remote backend
fails at once with 503 and a ``Retry-After`` of the soonest reset, instead of waiting on
replicas known to be down.

``on_change(url, state)`` is told about every transition as it is seen. Open to
half-open is seen only when someone asks (:attr:`CircuitBreaker.state`,
:meth:`~CircuitBreaker.allow`): the ``guardrail_backend_circuit_state`` gauge reads
``state`` at each scrape, since failover may never ask a URL behind one that serves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class CircuitState(Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """0 closed, 1 half-open, 2 open: higher is worse, for alerting."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


OnChange = Callable[[str, CircuitState], None]


class CircuitBreaker:
    """The breaker of one URL. ``failures=0`` turns it off (always closed).

    Example::

        breaker = CircuitBreaker("http://vllm-a:8000/v1", failures=5, reset_s=30)
        if breaker.allow():
            try:
                ...
            except ConnectionError:
                breaker.failure()
            else:
                breaker.success()
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self.name = name
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self.on_change = on_change
        self._state = CircuitState.CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._trial_out = False
        self._lock = threading.Lock()

    @property
    def state(self) -> CircuitState:
        with self._lock:
            self._tick()
            return self._state

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial through (0 when not open)."""
        with self._lock:
            self._tick()
            if self._state is not CircuitState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self._reset_s - self._clock())

    def allow(self) -> bool:
        """Whether a request may go to this URL now (half-open: only the one trial)."""
        if not self._threshold:
            return True
        with self._lock:
            self._tick()
            if self._state is CircuitState.CLOSED:
                return True
            if self._state is CircuitState.HALF_OPEN and not self._trial_out:
                self._trial_out = True
                return True
            return False

    def success(self) -> None:
        if not self._threshold:
            return
        with self._lock:
            self._count = 0
            self._trial_out = False
            self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        if not self._threshold:
            return
        with self._lock:
            self._count += 1
            self._trial_out = False
            if self._state is CircuitState.HALF_OPEN or self._count >= self._threshold:
                self._opened_at = self._clock()
                self._set(CircuitState.OPEN)

    def release(self) -> None:
        """End a half-open trial that reached no verdict (the client left, the policy cut
        the stream): the next request may try. Does nothing in any other state, so it is
        safe to call after :meth:`success` or :meth:`failure`."""
        if not self._threshold:
            return
        with self._lock:
            if self._state is CircuitState.HALF_OPEN:
                self._trial_out = False

    def _tick(self) -> None:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self._reset_s:
            self._trial_out = False
            self._set(CircuitState.HALF_OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is self._state:
            return
        self._state = state
        if self.on_change is not None:
            self.on_change(self.name, state)


__all__ = ["CircuitBreaker", "CircuitState", "OnChange"]
