"""Drift of the harmful-content rate: a recent window against the baseline before it.

The rate is the share of chat and completion exchanges with at least one harmful
finding (a finding whose action is not ``allow``, at either stage; a failed filter's
``filter_error`` finding is not harmful content). Two windows slide with the clock:

    ──────────── baseline (24 h) ────────────┬── recent (15 min) ──▶ now

The baseline ends where the recent window starts, so a burst of harm raises the
recent rate without also raising the baseline it is compared with. ``drift`` is the
difference ``recent - baseline``, in the rate's own unit (0.03 is three percentage
points): defined when the baseline is zero, where a ratio is not, and bounded to
[-1, 1]. The ratio is one division away in PromQL when a dashboard wants it.

Counts are kept in buckets of 1/15 of the recent window (one minute by default), so
memory is fixed (about 1,500 buckets for the defaults) and the windows move in bucket
steps: the recent window covers between 14/15 and all of its length. Each replica
counts its own traffic; the README shows how to combine replicas in PromQL and how to
get the same numbers from counters alone.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from guardrail.errors import ConfigError

__all__ = [
    "BUCKETS_PER_RECENT_WINDOW",
    "MAX_BASELINE_RATIO",
    "DriftSnapshot",
    "HarmfulRateDrift",
    "baseline_fits",
]

BUCKETS_PER_RECENT_WINDOW: Final = 15
_MAX_BUCKETS: Final = 100_000
# How many recent windows long the baseline may be, in round numbers (the rule is in buckets).
MAX_BASELINE_RATIO: Final = _MAX_BUCKETS // BUCKETS_PER_RECENT_WINDOW


def baseline_fits(recent_s: float, baseline_s: float) -> bool:
    """Whether a baseline of ``baseline_s`` fits the buckets :class:`HarmfulRateDrift`
    keeps for a recent window of ``recent_s`` (about :data:`MAX_BASELINE_RATIO` recent
    windows). Both must be longer than zero."""
    return math.ceil(baseline_s / (recent_s / BUCKETS_PER_RECENT_WINDOW)) <= _MAX_BUCKETS


@dataclass(frozen=True, slots=True)
class DriftSnapshot:
    """The two windows' rates at one instant. A rate is NaN when its window is empty."""

    recent_rate: float
    recent_exchanges: int
    baseline_rate: float
    baseline_exchanges: int
    recent_harmful: int = 0
    baseline_harmful: int = 0

    @property
    def drift(self) -> float:
        """``recent_rate - baseline_rate``; NaN unless both windows have traffic."""
        return self.recent_rate - self.baseline_rate


class HarmfulRateDrift:
    """Counts exchanges and harmful exchanges in time buckets; thread-safe.

    Example::

        drift = HarmfulRateDrift(recent_s=900, baseline_s=86_400)
        drift.add(harmful=True)       # once per recorded exchange
        drift.snapshot().drift        # recent rate minus baseline rate

    ``clock`` (seconds, monotonic) is injectable for tests.
    """

    def __init__(
        self,
        recent_s: float = 900.0,
        baseline_s: float = 86_400.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if recent_s <= 0 or baseline_s <= 0:
            raise ConfigError("harmful-rate windows must be longer than zero seconds")
        self.bucket_s = recent_s / BUCKETS_PER_RECENT_WINDOW
        self.recent_buckets = BUCKETS_PER_RECENT_WINDOW
        self.baseline_buckets = max(1, math.ceil(baseline_s / self.bucket_s))
        if not baseline_fits(recent_s, baseline_s):
            raise ConfigError(
                f"the harmful-rate baseline window ({baseline_s:g} s) may be at most "
                f"{MAX_BASELINE_RATIO} times the recent one ({recent_s:g} s)"
            )
        self.recent_s = recent_s
        self.baseline_s = baseline_s
        self._clock = clock
        # (bucket number, exchanges, harmful), oldest first; only buckets with traffic.
        self._buckets: deque[list[int]] = deque()
        self._lock = threading.Lock()

    def add(self, *, harmful: bool) -> None:
        """Count one exchange (and whether it was harmful) in the current bucket."""
        number = int(self._clock() // self.bucket_s)
        with self._lock:
            buckets = self._buckets
            if buckets and buckets[-1][0] == number:
                last = buckets[-1]
            else:
                last = [number, 0, 0]
                buckets.append(last)
                self._expire(number)
            last[1] += 1
            last[2] += harmful

    def snapshot(self) -> DriftSnapshot:
        """The rates of both windows now."""
        number = int(self._clock() // self.bucket_s)
        recent_from = number - self.recent_buckets + 1
        baseline_from = recent_from - self.baseline_buckets
        recent = [0, 0]
        baseline = [0, 0]
        with self._lock:
            self._expire(number)
            for bucket, total, harmful in self._buckets:
                into = recent if bucket >= recent_from else baseline
                if bucket >= baseline_from:
                    into[0] += total
                    into[1] += harmful
        return DriftSnapshot(
            recent_rate=_rate(recent[1], recent[0]),
            recent_exchanges=recent[0],
            baseline_rate=_rate(baseline[1], baseline[0]),
            baseline_exchanges=baseline[0],
            recent_harmful=recent[1],
            baseline_harmful=baseline[1],
        )

    def _expire(self, number: int) -> None:
        oldest = number - self.recent_buckets - self.baseline_buckets + 1
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else math.nan
