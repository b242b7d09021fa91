"""Moderating a streamed completion: hold text back until the output filters passed it.

Text from the backend accumulates in a held-back window. When the window reaches a
release point (a sentence end, or ``window_chars`` characters), the window is checked
together with the last ``context_chars`` of already released text, so a phrase split
across windows is still seen whole. Only text that passed is released; a block ends
the stream and nothing of the blocked window is ever sent.

Invariant (tested with Hypothesis over arbitrary chunkings): everything released is
the (possibly redacted) text of windows whose check did not block, in order. In
``sentence`` mode a sentence shorter than ``window_chars`` is checked whole before
any of it is released; in ``window`` mode the words before a harmful phrase may be
released before the phrase arrives (the phrase itself never is).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from guardrail.guard.guard import Guard
from guardrail.guard.types import (
    Action,
    Decision,
    FilterContext,
    FilterOutcome,
    Redaction,
    Stage,
    apply_redactions,
)
from guardrail.policy.model import StreamSettings

# A sentence ends at terminal punctuation (optionally closed by quotes or brackets)
# followed by whitespace, or at a line break; matched from the start of a run of
# punctuation only, so a long run with no space after it is not retried at every dot.
_SENTENCE_END = re.compile(
    r"""(?<![.!?\u2026\u3002])[.!?\u2026\u3002]+["'\u201d\u2019)\]]*\s+|\n+"""
)
# Everything up to and including the last whitespace character (any kind, not only " ";
# a line break too). The toxicity filter's chunking cuts at the same place.
THROUGH_LAST_SPACE = re.compile(r".*\s", re.DOTALL)
# ... or, in text with no whitespace (minified JSON, CSV), the last delimiter between
# values: a value a rule matches (a key, an id) does not hold one.
_THROUGH_LAST_DELIMITER = re.compile(r""".*[,;{}\[\]"'<>]""", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Release:
    """What may be sent now. ``decision`` is the check that released it (if one ran)."""

    text: str
    decision: Decision | None = None

    @property
    def blocked(self) -> bool:
        return self.decision is not None and self.decision.blocked


class StreamGuard:
    """Holds back one stream's text and releases it window by window, checked."""

    def __init__(self, guard: Guard, ctx: FilterContext, settings: StreamSettings) -> None:
        self._guard = guard
        self._ctx = ctx.at(Stage.OUTPUT)
        self._settings = settings
        self._held = ""
        self._released = ""
        self.blocked = False
        self.decisions: list[Decision] = []
        # The held-back size of each checked window (the metric's, never the text).
        self.window_chars: list[int] = []

    @property
    def released_text(self) -> str:
        return self._released

    @property
    def held_chars(self) -> int:
        return len(self._held)

    async def feed(self, text: str) -> Release:
        """Add backend text; returns the text that may be released now (maybe empty)."""
        released: list[str] = []
        decision = None
        async for window in self.releases(text):
            released.append(window.text)
            decision = window.decision
        return Release("".join(released), decision)

    async def releases(self, text: str) -> AsyncIterator[Release]:
        """Add backend text; yield each window as soon as its check passed (or blocked).

        A large chunk may hold many windows: the first can be sent while the rest are
        still being checked, instead of a megabyte chunk waiting for its last window.
        Nothing follows a blocked window.
        """
        if self.blocked:
            raise RuntimeError("stream already blocked")
        self._held += text
        while (cut := self._release_point()) > 0:
            window = await self._check(cut)
            yield window
            if window.blocked:
                return

    async def finish(self) -> Release:
        """The backend is done: check and release whatever is still held."""
        if self.blocked or not self._held:
            return Release("")
        return await self._check(len(self._held))

    def _release_point(self) -> int:
        cut = self._window_cut()
        # A filter may need the end of the window kept (a placeholder cut in half, the
        # start of a card number). Moving the cut back can split something else, so ask
        # again at the new cut until no filter wants more kept.
        for _ in range(8):
            if cut <= 0:
                return 0
            keep = self._guard.holdback(Stage.OUTPUT, self._held[:cut])
            if keep <= 0:
                return cut
            cut -= keep
        return 0  # still moving: keep it all until more text (or the end) settles it

    def _window_cut(self) -> int:
        held, limit = self._held, self._settings.window_chars
        if self._settings.release == "sentence":
            last_end = 0
            # Only the window's own text is searched: a megabyte held with no sentence
            # end would otherwise be scanned whole for every window cut from it.
            for m in _SENTENCE_END.finditer(held, 0, limit):
                last_end = m.end()
            if last_end:
                return last_end
        if len(held) < limit:
            return 0
        # Cut after the window's last whitespace (a space, a line break) so words are
        # not split across checks: a token cut in half is released before its end is seen.
        for boundary in (THROUGH_LAST_SPACE, _THROUGH_LAST_DELIMITER):
            through = boundary.match(held, 0, limit)
            if through and through.end() > 1:
                return through.end()
        return limit

    async def _check(self, cut: int) -> Release:
        window = self._held[:cut]
        tail = (
            self._released[-self._settings.context_chars :] if self._settings.context_chars else ""
        )
        decision = await self._guard.check(Stage.OUTPUT, tail + window, self._ctx)
        # A finding that lies wholly in the tail was reported with the window before: the
        # answer's findings list it once, as for a whole completion.
        fresh = tuple(f for f in decision.findings if f.span is None or f.span[1] > len(tail))
        if len(fresh) < len(decision.findings):
            # Nor does it decide this window: that text was released, so it passed when it
            # was checked, and a match that the tail's cut alone creates ("doe@example.com"
            # of an email already sent) must not block what follows. Recomputed only when
            # every filter ran and decided by its findings; otherwise the decision stands.
            derived = all(
                o.status == "ok"
                and o.verdict.action is Action.strictest(f.action for f in o.verdict.findings)
                for o in decision.outcomes
            )
            action = Action.strictest(f.action for f in fresh) if derived else decision.action
            outcomes = decision.outcomes
            if derived:
                # Each filter's verdict loses the tail's findings too: a finding already
                # counted with its own window must not count again, per filter, in
                # filter_verdicts_total and the audit row, for every window it stays in
                # the context.
                outcomes = tuple(_without_tail(o, len(tail)) for o in outcomes)
            decision = dataclasses.replace(
                decision, findings=fresh, action=action, outcomes=outcomes
            )
        self.decisions.append(decision)
        self.window_chars.append(len(window))
        if decision.blocked:
            self.blocked = True
            self._held = ""
            return Release("", decision)
        self._held = self._held[cut:]
        released = window
        if decision.action is Action.REDACT:
            released = apply_redactions(window, _shift(decision.redactions, len(tail), len(window)))
        self._released += released
        return Release(released, decision)


def _shift(redactions: tuple[Redaction, ...], offset: int, length: int) -> list[Redaction]:
    """Redactions of ``tail + window`` moved onto ``window``, clipped to it.

    A redaction that lies entirely in the already released tail cannot be undone and
    was checked when that text was released; a redaction straddling the boundary hides
    the part of it that is still held.
    """
    out = []
    for r in redactions:
        start, end = max(r.start - offset, 0), min(r.end - offset, length)
        if end > start:
            out.append(Redaction(start, end, r.replacement, r.restore))
    return out


def _without_tail(outcome: FilterOutcome, tail: int) -> FilterOutcome:
    """``outcome`` without the findings that lie wholly in the first ``tail`` characters,
    its verdict's action the strictest of the findings left (redactions are kept)."""
    verdict = outcome.verdict
    kept = tuple(f for f in verdict.findings if f.span is None or f.span[1] > tail)
    if len(kept) == len(verdict.findings):
        return outcome
    action = Action.strictest(f.action for f in kept)
    return dataclasses.replace(
        outcome, verdict=dataclasses.replace(verdict, findings=kept, action=action)
    )
