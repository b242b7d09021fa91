"""One request through the gateway, as everything that records sees it.

The HTTP layer fills an :class:`Exchange` as the request moves through input
filters, backend and output filters, then hands the finished exchange to metrics
and logs. Nothing records from inside a filter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final, Literal

from guardrail.guard.types import Action, Decision, Stage

Route = Literal["chat", "completions", "moderations", "models", "feedback", "admin"]
Outcome = Literal[
    "allowed",  # passed every filter untouched
    "flagged",  # passed, with findings
    "redacted",  # passed with text rewritten
    "blocked_input",
    "blocked_output",
    "invalid_request",  # the client's mistake (4xx)
    "backend_error",  # the backend failed (502/503/504) or was full (429), or the gateway was
    "cancelled",  # the client went away
    "error",  # a gateway bug (500)
]

OVERLOADED: Final = "overloaded"
"""The error code of a request the gateway shed at capacity (503): counted with the
``backend_error`` outcome, and in ``overloaded_total`` rather than as a backend's error."""

RESPONSE_ID_PREFIXES: dict[str, str] = {
    "chat": "chatcmpl",
    "completions": "cmpl",
    "moderations": "modr",
}
"""Route -> prefix of the response ids it answers with (OpenAI's prefixes)."""


MONITORED_ROUTES: Final = frozenset({"chat", "completions"})
"""Routes whose exchanges count in the harmful-content metrics, drift windows and
report: the prompts and completions of the traffic (not ``/v1/moderations`` checks)."""


@dataclass(frozen=True, slots=True, order=True)
class GroupMention:
    """A demographic group named by a text checked at ``stage``.

    ``axis`` and ``group`` are names from the group lexicon
    (:mod:`guardrail.observability.groups`), never the words of the text.
    """

    stage: Stage
    axis: str
    group: str


@dataclass(slots=True)
class Exchange:
    """The record of one request. Times are ``time.perf_counter()`` seconds."""

    request_id: str
    route: Route
    tenant: str = "default"
    model: str | None = None
    stream: bool = False
    backend: str | None = None
    policy_name: str = ""
    policy_version: str = ""
    started: float = field(default_factory=time.perf_counter)
    decisions: list[Decision] = field(default_factory=list)
    # The size of each held-back stream window the output decisions checked, in order.
    stream_window_chars: list[int] = field(default_factory=list)
    # The ids of the output filters whose stream hold-back failed, each once.
    stream_holdback_failures: list[str] = field(default_factory=list)
    # A stream's completion as its windows' checks read it, whole (StreamGuard.read_text):
    # groups are read from it once, not from each window. Never logged.
    stream_text: str | None = None
    backend_duration_s: float | None = None
    time_to_first_token_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    outcome: Outcome | None = None
    status_code: int = 200
    error_code: str | None = None
    duration_s: float | None = None
    groups: tuple[GroupMention, ...] | None = None
    """Groups the checked texts name, set when the exchange is recorded; ``None`` when
    they were not looked for (group detection off, or a route without prompts)."""

    @property
    def response_id(self) -> str | None:
        """The ``id`` of the response body (``chatcmpl-<request id>`` for chat, ``cmpl-``
        for completions, ``modr-`` for moderations); ``None`` for routes without one."""
        prefix = RESPONSE_ID_PREFIXES.get(self.route)
        return None if prefix is None else f"{prefix}-{self.request_id}"

    def decisions_at(self, stage: Stage) -> list[Decision]:
        return [d for d in self.decisions if d.stage is stage]

    @property
    def action(self) -> Action:
        """The strictest action over every decision so far."""
        return Action.strictest(d.action for d in self.decisions)

    def finish(
        self, outcome: Outcome, status_code: int = 200, error_code: str | None = None
    ) -> None:
        """Close the record once; later calls keep the first outcome."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.status_code = status_code
        self.error_code = error_code
        self.duration_s = time.perf_counter() - self.started

    def passed_outcome(self) -> Outcome:
        """The outcome of an exchange that was not blocked, from its strictest action."""
        action = self.action
        if action is Action.REDACT:
            return "redacted"
        if action is Action.FLAG:
            return "flagged"
        return "allowed"
