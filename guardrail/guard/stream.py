"""Moderating a streamed completion: hold text back until the output filters passed it.

Text from the backend accumulates in a held-back window. When the window reaches a
release point (a sentence end, or ``window_chars`` characters), the window is checked
together with the last ``context_chars`` of already released text, so a phrase split
across windows is still seen whole. Only text that passed is released; a block ends
the stream and nothing of the blocked window is ever sent.

A window cut at ``window_chars`` inside a token (no whitespace or delimiter in the
whole window: a URL, base64) is checked with the rest of that token too, up to
:data:`LOOKAHEAD_CHARS` (or ``context_chars``, if fewer), and waits for it: a redaction
across the cut moves the cut to the redaction's start (or past its end, when it starts
the window), so no part of it is released unredacted.

A finding lying wholly in the released tail (or in that look-ahead) is not the window's:
it was (or will be) decided with its own window. A finding that rests on several matches
(``Finding.extent``) is the window's if any part of it is. The filters are told which
part of the checked text the window is (``FilterContext.window``): a score of the whole
text, as groundedness's, is the window's own, not one of the tail's sentences again.

A completion that continues a text the client wrote (the prompt of ``/v1/completions``, a
chat's trailing assistant message) starts from that text's end as its ``lead``: released,
so the first window is checked after it, yet never sent. A whole completion is checked
the same way (:func:`check_continuation`). Either way the decision is about the
completion alone: a finding wholly in the lead is set aside (the lead passed the input
filters), spans and redactions are moved onto the completion. A finding with no span (a
score of the whole text, as toxicity's) is taken from the text without the lead, checked
again only when one acts: the lead is there for phrases across the join, and the
prompt's own toxicity is not the completion's.

Invariant (tested with Hypothesis over arbitrary chunkings): everything released is
the (possibly redacted) text of windows whose check did not block, in order. In
``sentence`` mode a sentence shorter than ``window_chars`` is checked whole before
any of it is released; in ``window`` mode the words before a harmful phrase may be
released before the phrase arrives (the phrase itself never is).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from guardrail.filters.normalize import OVERRIDE, normalize, open_override
from guardrail.guard.guard import Guard
from guardrail.guard.types import (
    Action,
    Decision,
    FilterContext,
    FilterOutcome,
    Finding,
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
# Letters of scripts written without spaces (Thai, Lao, Myanmar, Khmer, kana, CJK
# ideographs), as a regex class body: their text is running words, not one endless token
# (the pii filter's hold-back of a token reads them so too).
UNSPACED_LETTERS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
)
# The rest of a token a window cut runs through: up to whitespace, a delimiter, or an
# unspaced letter. At most this many characters are awaited past the cut (or
# context_chars, if fewer): a longer run (a hex digest, base64) is cut like a long word,
# as the pii filter's hold-back of a token does.
LOOKAHEAD_CHARS = 64
# What may read as much less than it is written (see StreamGuard._tail): characters other
# than printable ASCII and single line breaks, markup and escape openers, runs of spaces.
_MAY_SHRINK = re.compile(r"[^\t\n\x20-\x7e]|[<&%\\*`]|\s{3,}")
_TAIL_LIMIT = 16_384
# How often the cut is moved back over what the filters need kept (see
# StreamGuard._held_back) before the first move is taken.
_HOLDBACK_STEPS = 8
_TOKEN_RUN = re.compile(f"""[^\\s,;{{}}\\[\\]"'<>{UNSPACED_LETTERS}]+""")


@dataclass(frozen=True, slots=True)
class Release:
    """What may be sent now. ``decision`` is the check that released it (if one ran)."""

    text: str
    decision: Decision | None = None

    @property
    def blocked(self) -> bool:
        return self.decision is not None and self.decision.blocked


class StreamGuard:
    """Holds back one stream's text and releases it window by window, checked.

    ``lead``: the text the completion continues (see the module doc), taken as released
    before the first window and never part of :attr:`released_text`.
    """

    def __init__(
        self, guard: Guard, ctx: FilterContext, settings: StreamSettings, lead: str = ""
    ) -> None:
        self._guard = guard
        self._ctx = ctx.at(Stage.OUTPUT)
        self._settings = settings
        self._held = ""
        lead = _closed(lead)
        # No tail reaches further back than _TAIL_LIMIT: a long prompt is not copied
        # whole with every window released after it.
        cut = max(0, len(lead) - _TAIL_LIMIT)
        self._released = lead[cut:]
        self._lead = len(self._released)
        # The released text, with the restores of placeholders left out (see
        # unrestored_text); the lead is not in it.
        self._unrestored = ""
        # The checked windows as the filters read them, the blocked one too (see read_text).
        self._read = ""
        # Whether an override (U+202E) is in force after the first _override_mark released
        # characters: each window reads only what was released since.
        self._override_mark = 0
        self._override_open = open_override(lead, cut)
        self.blocked = False
        self.decisions: list[Decision] = []
        # The held-back size of each checked window (the metric's, never the text).
        self.window_chars: list[int] = []
        # The ids of the filters whose hold-back failed, each once (counted as their
        # errors: the failure decides no window, so no outcome of a check records it).
        self.holdback_failures: list[str] = []

    @property
    def released_text(self) -> str:
        """What was released to the client (the lead is not)."""
        return self._released[self._lead :]

    @property
    def unrestored_text(self) -> str:
        """The released text with the request's own values left as the placeholders the
        model wrote (every other redaction applied): the form self-consistency's samples
        and question are in."""
        return self._unrestored

    @property
    def read_text(self) -> str:
        """The completion as far as its windows were checked, as the filters read them (a
        blocked window too, unredacted), with the placeholders the model wrote restored:
        the whole text group detection scans, once, where each window's own text would
        split a term at its cut ("African" + "Americans"). Never sent or logged."""
        return self._read

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
        while (point := self._release_point())[0] > 0:
            window = await self._check(*point)
            yield window
            if window.blocked:
                return

    async def finish(self) -> Release:
        """The backend is done: check and release whatever is still held."""
        if self.blocked or not self._held:
            return Release("")
        return await self._check(len(self._held))

    def _release_point(self) -> tuple[int, int]:
        """Where to cut the held text now, and how much of the text after the cut to
        check with it (``(0, 0)``: nothing to release yet)."""
        settled = self._held_back(*self._window_cut())
        if (
            settled is None
            and self._settings.release == "sentence"
            and len(self._held) >= self._settings.window_chars
        ):
            # The filters keep back everything up to the window's last sentence end (to
            # them it is none: "J. " of "J. Smith"), and a full window has no other: the
            # window is cut at its size instead, or nothing would go out until the end.
            settled = self._held_back(*self._size_cut())
        if settled is None:
            return 0, 0
        cut, forced, ahead = settled
        if not forced:
            return cut, ahead
        # Cut through a token (no space or delimiter in the whole window): what the token
        # holds on both sides of the cut (a key, a URL's secret) is seen whole only with
        # the rest of the token, so that is awaited and checked too, up to a limit.
        limit = min(self._settings.context_chars, LOOKAHEAD_CHARS)
        run = _TOKEN_RUN.match(self._held, cut, cut + limit)
        ahead = run.end() - cut if run else 0
        if ahead < limit and cut + ahead == len(self._held):
            return 0, 0  # the token may run on in the text still to come
        return cut, ahead

    def _held_back(self, cut: int, forced: bool) -> tuple[int, bool, int] | None:
        """``cut`` moved back over what the filters need kept, whether it still cuts
        through a token, and how much of the text after it to check with it; ``None`` if
        nothing can be released there now."""
        # A filter may need the end of the window kept (a placeholder cut in half, the
        # start of a card number). Moving the cut back can split something else, so ask
        # again at the new cut until no filter wants more kept.
        end = first = cut
        for step in range(_HOLDBACK_STEPS):
            if cut <= 0:
                break
            held = self._guard.holdback(Stage.OUTPUT, self._held[:cut])
            if held.failed is not None:
                if held.failed not in self.holdback_failures:
                    self.holdback_failures.append(held.failed)
                return None  # all of it kept, at any step: no walk-back that did not settle
            if held.chars <= 0:
                return cut, forced, 0
            cut -= held.chars
            forced = False
            if step == 0:
                first = cut
        if first <= 0 or len(self._held) < self._settings.window_chars:
            return None  # the filters keep it all, or more text may settle it
        # Still moving with a full window held: in list-like text every item reads as
        # the start of an entity ("97, " of a JSON array of numbers, "23) stir the pot "
        # of numbered steps), so each step held one more, back to the window's start.
        # Kept whole, such an answer went out in one piece when the backend was done.
        # The first step's cut keeps the window's last unfinished entity whole. It is
        # moved back to a space or a delimiter, as a window's cut is (a hold-back may
        # start inside a word: "05-1120" of "078-05-1120"), and what it held back is
        # checked with the window: an entity across the cut (a card in a list of
        # numbers) is seen whole, and the cut moves back to where it starts.
        floor = max(0, first - LOOKAHEAD_CHARS)
        for boundary in (THROUGH_LAST_SPACE, _THROUGH_LAST_DELIMITER):
            through = boundary.match(self._held, floor, first)
            if through:
                first = through.end()
                break
        return first, False, end - first

    def _window_cut(self) -> tuple[int, bool]:
        """The release point, and whether it falls inside a token (at the size limit)."""
        if self._settings.release == "sentence":
            last_end = 0
            # Only the window's own text is searched: a megabyte held with no sentence
            # end would otherwise be scanned whole for every window cut from it.
            for m in _SENTENCE_END.finditer(self._held, 0, self._settings.window_chars):
                last_end = m.end()
            if last_end:
                return last_end, False
        return self._size_cut()

    def _size_cut(self) -> tuple[int, bool]:
        """The cut of a window of ``window_chars`` (``0``: fewer are held)."""
        held, limit = self._held, self._settings.window_chars
        if len(held) < limit:
            return 0, False
        # Cut after the window's last whitespace (a space, a line break) so words are
        # not split across checks: a token cut in half is released before its end is seen.
        for boundary in (THROUGH_LAST_SPACE, _THROUGH_LAST_DELIMITER):
            through = boundary.match(held, 0, limit)
            if through and through.end() > 1:
                return through.end(), False
        return limit, True

    def _tail(self) -> str:
        """The released text the next window is checked with: its last ``context_chars``,
        counted in what the filters read.

        Characters that normalisation removes (zero-width padding, markup between two
        letters, runs of whitespace) fill the raw characters without adding to what is
        read: 600 zero-width characters after "pipe b" left a context of nothing, and
        "omb" went out. The tail reaches back until it reads as ``context_chars / 2``
        characters at least (at most ``_TAIL_LIMIT`` raw ones). An override (U+202E)
        still open before the tail's start is put in front of it, so the window reads
        in the same order as the whole text.
        """
        want = self._settings.context_chars
        if not want:
            return ""
        released = self._released
        start = _context_start(released, want)
        tail = released[start:]
        # No tail, this one or a later one, starts before this: the state is kept up to it.
        mark = max(0, len(released) - max(want, _TAIL_LIMIT))
        if mark > self._override_mark:
            self._override_open = open_override(
                released, mark, self._override_mark, self._override_open
            )
            self._override_mark = mark
        if open_override(released, start, self._override_mark, self._override_open):
            tail = OVERRIDE + tail
        return tail

    async def _check(self, cut: int, ahead: int = 0) -> Release:
        """Check the first ``cut`` held characters, with the released tail before them
        and ``ahead`` held characters after them, and release what passed."""
        tail = self._tail()
        start = len(tail)
        checked = tail + self._held[: cut + ahead]
        # The lead's part of the tail: the decision is about the completion alone (the
        # audit row keeps no prompt text as the output's).
        lead = len(tail) - min(len(tail), len(self._released) - self._lead)
        # The tail was scored with its own windows: a score of the whole text (the
        # groundedness of its sentences) is the window's alone.
        ctx = dataclasses.replace(self._ctx, window=(start, start + cut))
        decision = await self._guard.check(Stage.OUTPUT, checked, ctx)
        if ahead:
            # A redaction across the cut: release up to where it starts, so the next
            # window holds it whole; if it starts the window, release through its end.
            every = [r for o in decision.outcomes for r in o.verdict.redactions]
            crossing = [r.start for r in every if r.start < start + cut < r.end]
            if crossing and min(crossing) > start:
                back = min(crossing) - start
                return await self._check(back, cut + ahead - back)
            cut = _through(every, start + cut) - start
        decision = await _scored_after_lead(self._guard, ctx, decision, checked, lead)
        decision = _own(self._guard, decision, checked, start, start + cut)
        if lead:
            decision = _after_lead(decision, checked, lead)
            start -= lead
        self.decisions.append(decision)
        self.window_chars.append(cut)
        window = self._held[:cut]
        if decision.blocked:
            self.blocked = True
            self._held = ""
            self._read += window
            return Release("", decision)
        self._held = self._held[cut:]
        released = unrestored = read = window
        if decision.action is Action.REDACT:
            redactions = _shift(decision.redactions, start, len(window))
            released = apply_redactions(window, redactions)
            unrestored = apply_redactions(window, [r for r in redactions if not r.restore])
            read = apply_redactions(window, [r for r in redactions if r.restore])
        self._released += released
        self._unrestored += unrestored
        self._read += read
        return Release(released, decision)


def lead_context(lead: str, context_chars: int) -> str:
    """What of ``lead``, the text a completion continues, the completion is checked
    with: its end, as a stream's window gets the text released before it
    (:meth:`StreamGuard._tail`)."""
    if not context_chars:
        return ""
    lead = _closed(lead)
    start = _context_start(lead, context_chars)
    return OVERRIDE + lead[start:] if open_override(lead, start) else lead[start:]


_POP = "\u202c"  # ends a right-to-left override (POP DIRECTIONAL FORMATTING)


def ends_inside_override(lead: str) -> bool:
    """Whether a right-to-left override (U+202E) is still in force at the end of
    ``lead``: what continues it reads backwards wherever the two are shown as one text."""
    return open_override(lead, len(lead))


def _closed(lead: str) -> str:
    """``lead`` with a right-to-left override still in force at its end closed (U+202C).

    The completion is the model's own text, shown as written (a chat shows it in a
    message of its own): read on under the prompt's override, it was read backwards,
    and a prompt ending in U+202E let "... build a bomb ..." out unchecked.
    """
    return lead + _POP if ends_inside_override(lead) else lead


async def check_continuation(
    guard: Guard, ctx: FilterContext, text: str, lead: str, context_chars: int
) -> Decision:
    """The output decision on the whole completion ``text`` that continues ``lead``.

    Checked after the lead's end (:func:`lead_context`), so a phrase split across the
    join ("The pipe" + " bomb is simple: ...") is seen whole. A finding wholly in the
    lead is set aside: the lead passed the input filters, and a rule of the output stage
    alone must not withhold a harmless completion for the prompt's own words. A score of
    the whole text (a finding with no span) is the completion's own
    (:func:`_scored_after_lead`). The decision is about ``text`` alone: its spans,
    redactions and text.
    """
    context = lead_context(lead, context_chars)
    output = ctx.at(Stage.OUTPUT)
    if not context or not text:  # nothing is joined (an empty stream checks nothing)
        return await guard.check(Stage.OUTPUT, text, output)
    checked = context + text
    decision = await guard.check(Stage.OUTPUT, checked, output)
    decision = await _scored_after_lead(guard, output, decision, checked, len(context))
    decision = _own(guard, decision, checked, len(context), len(checked))
    return _after_lead(decision, checked, len(context))


async def _scored_after_lead(
    guard: Guard, ctx: FilterContext, decision: Decision, checked: str, lead: int
) -> Decision:
    """``decision`` on ``checked``, whose first ``lead`` characters are the lead, with
    each filter's findings that have no span (a score of the whole text: toxicity's)
    those of ``checked[lead:]`` alone, unless the join itself raised them.

    Such a finding rests on every character, so no span sets it aside with the lead:
    the prompt's own toxicity (0.95 after "... 'All immigrants are filthy animals ...'",
    0.18 alone) withheld the harmless refusal that followed it. The text after the lead
    is checked again by the filters that gave one, acting or not: a score is recorded
    whatever it decides (a groundedness score of the prefill's claims with the answer's,
    0.27 for an answer that scores 0.66 alone, pulled the dashboard's median down), and
    the encoder's cache holds the completion's sentences already. Their span findings
    and redactions stay those of ``checked``, where a phrase across the join is seen.

    A score that acts more strictly on the joined text than on the completion alone is
    read on the lead alone too: if the lead does not raise it by itself, the join did
    (an insult split across it, "... They are fil" + "thy animals"), and the joined
    finding stands. A filter that fails in any of these checks keeps what the others
    found and its failure (the stricter of the two decides), and one whose action is
    not its findings' is kept whole (what decided it is unknown).
    """
    scored = [o.filter_id for o in decision.outcomes if _whole_scored(o)]
    if not lead or not scored:
        return decision
    # An override in force at the join is kept: the text is read in the same order.
    prefix = OVERRIDE if open_override(checked, lead) else ""
    window = ctx.window
    if window is not None:  # the same characters, in the text without the lead
        shift = len(prefix) - lead
        window = (max(0, window[0] + shift), window[1] + shift)
    alone = await guard.check(
        Stage.OUTPUT,
        prefix + checked[lead:],
        dataclasses.replace(ctx, window=window),
        only=scored,
    )
    own = {o.filter_id: o for o in alone.outcomes}
    joined = {o.filter_id: o for o in decision.outcomes}
    raised = [i for i, o in own.items() if o.status == "ok" and _raised(joined[i], o)]
    by_lead: dict[str, FilterOutcome] = {}
    if raised:
        lead_check = await guard.check(
            Stage.OUTPUT, checked[:lead], dataclasses.replace(ctx, window=None), only=raised
        )
        by_lead = {o.filter_id: o for o in lead_check.outcomes}
    outcomes = [
        _with_scores(o, own[o.filter_id], by_lead.get(o.filter_id)) if o.filter_id in own else o
        for o in decision.outcomes
    ]
    return guard.combine(Stage.OUTPUT, checked, outcomes)


def _whole_scored(outcome: FilterOutcome) -> bool:
    """Whether ``outcome`` gives a score of the whole text that may be taken again from
    another check: it ran, its action is its findings', and one of them has no span, or
    its verdict carries the score (toxicity's, reporting only the findings that act)."""
    verdict = outcome.verdict
    return (
        outcome.status == "ok"
        and verdict.action is _action_of(verdict.findings, verdict.redactions)
        and (verdict.score is not None or any(f.reach is None for f in verdict.findings))
    )


def _whole_actions(outcome: FilterOutcome) -> dict[str, Action]:
    """The strictest action of each category among ``outcome``'s findings with no span."""
    actions: dict[str, Action] = {}
    for f in outcome.verdict.findings:
        if f.reach is None:
            actions[f.category] = Action.strictest((f.action, actions.get(f.category, f.action)))
    return actions


def _stricter(a: Action, b: Action | None) -> bool:
    return b is None or (a is not b and Action.strictest((a, b)) is a)


def _raised(joined: FilterOutcome, alone: FilterOutcome) -> bool:
    """Whether a score of the whole text acts more strictly with the lead than without."""
    without = _whole_actions(alone)
    return any(
        a is not Action.ALLOW and _stricter(a, without.get(c))
        for c, a in _whole_actions(joined).items()
    )


def _with_scores(
    joined: FilterOutcome, alone: FilterOutcome, by_lead: FilterOutcome | None
) -> FilterOutcome:
    """``joined`` with its findings that have no span replaced by those of ``alone``
    (the same filter on the text without the lead), but for a category the join raised:
    stricter on the joined text than alone, and not raised by the lead alone
    (``by_lead``, the filter on the lead alone; a failure there keeps the joined one).
    A failure of ``alone`` keeps every joined finding beside its own: its ``on_error``
    may tighten the decision, never loosen it."""
    verdict = joined.verdict
    duration = joined.duration_s + alone.duration_s
    if alone.status != "ok":
        findings = tuple(dict.fromkeys((*verdict.findings, *alone.verdict.findings)))
        return dataclasses.replace(
            joined,
            verdict=dataclasses.replace(
                verdict, action=_action_of(findings, verdict.redactions), findings=findings
            ),
            duration_s=duration,
            status=alone.status,
            error=alone.error,
        )
    without, with_lead = _whole_actions(alone), _whole_actions(joined)
    lead_failed = by_lead is not None and by_lead.status != "ok"
    on_lead = _whole_actions(by_lead) if by_lead is not None and not lead_failed else {}
    kept = {
        c
        for c, a in with_lead.items()
        if a is not Action.ALLOW
        and _stricter(a, without.get(c))
        and (lead_failed or not (by_lead is not None and not _stricter(a, on_lead.get(c))))
    }
    findings = tuple(
        f for f in verdict.findings if f.reach is not None or f.category in kept
    ) + tuple(f for f in alone.verdict.findings if f.reach is None and f.category not in kept)
    action = _action_of(findings, verdict.redactions)
    # The verdict's own score is the completion's too (a category the join raised keeps
    # its joined score in its finding).
    score = alone.verdict.score
    return dataclasses.replace(
        joined,
        verdict=dataclasses.replace(verdict, action=action, findings=findings, score=score),
        duration_s=duration + (by_lead.duration_s if by_lead is not None else 0.0),
    )


def _own(guard: Guard, decision: Decision, checked: str, start: int, end: int) -> Decision:
    """``decision`` on ``checked`` with only the findings of the window
    ``checked[start:end]``: one that lies wholly in the released tail before it was
    reported with its own window, and one wholly in the text after it will be.

    Nor does such a finding decide this window: the tail was released, so it passed
    when it was checked (the lead passed the input filters), and a match that the
    tail's cut alone creates ("doe@example.com" of an email already sent) must not
    block what follows.
    Nor does a restore outside it (a placeholder of the prompt in the lead): a restore is
    no finding, yet it makes the pii filter's verdict a redaction, and the completion
    after "Contact <EMAIL_ADDRESS_1>", with nothing restored, was recorded as redacted.
    Decided again only when every filter ran and decided by its findings; otherwise
    the decision stands.
    """
    restores = (r for o in decision.outcomes for r in o.verdict.redactions if r.restore)
    if all(_within(f, start, end) for f in decision.findings) and all(
        _touches(r, start, end) for r in restores
    ):
        return decision
    derived = all(
        o.status == "ok"
        and o.verdict.action is _action_of(o.verdict.findings, o.verdict.redactions)
        for o in decision.outcomes
    )
    if not derived:
        return dataclasses.replace(
            decision, findings=tuple(f for f in decision.findings if _within(f, start, end))
        )
    # Each filter's verdict loses them too: a finding already counted with its own
    # window must not count again, per filter, in filter_verdicts_total and the audit
    # row, for every window it stays in the context. Combined again, so the action
    # and the redactions are those of the findings left (a block in the tail alone
    # had left a redaction in the window unapplied).
    outcomes = [_only_within(o, start, end) for o in decision.outcomes]
    return guard.combine(Stage.OUTPUT, checked, outcomes)


# What may stand between two letters and be read away (see normalize): emphasis marks
# and characters that show nothing; tags are found by their brackets.
_READ_AWAY = frozenset("*~`")


def _markup_run(text: str, end: int, floor: int) -> int:
    """The start of the run of markup that ends at ``end`` (``end`` if there is none):
    tags, emphasis marks and characters that show nothing, all of which normalisation
    reads away between two letters."""
    k = end
    while k > floor:
        char = text[k - 1]
        if char == ">":
            opened = text.rfind("<", floor, k - 1)
            if opened < 0:
                break
            k = opened
        elif char in _READ_AWAY or (
            unicodedata.category(char) in ("Cf", "Cc") and not char.isspace()
        ):
            k -= 1
        else:
            break
    return k


def _tag_start(text: str, at: int, floor: int) -> int:
    """Where the tag that ``at`` falls inside begins (a window may be cut in one, or its
    attributes be longer than the context), or ``at`` if it is in none."""
    opened = text.rfind("<", floor, at)
    return opened if opened >= 0 and text.find(">", opened, at) < 0 else at


def _context_start(released: str, want: int) -> int:
    """Where the context of the text after ``released`` starts (see StreamGuard._tail)."""
    start = max(0, len(released) - want)
    floor = max(0, len(released) - _TAIL_LIMIT)
    start = _before_markup(released, start, floor)
    if _MAY_SHRINK.search(released, start):
        # Markup the released text ends in may be read away with the window's first
        # letter: what the tail gives the window is what it reads before that.
        read = _markup_run(released, _tag_start(released, len(released), floor), floor)
        # Back in doubling steps: each step normalises the tail again, so a fixed step
        # over 16,384 characters of padding cost 80 normalisations per window.
        step = want
        while start > floor and len(normalize(released[start:read]).text) < want // 2:
            start = _before_markup(released, max(floor, start - step), floor)
            step *= 2
    return start


def _before_markup(text: str, start: int, floor: int) -> int:
    """``start`` moved back over the markup it is in to the letter before it.

    Tags between two letters are read away only when both letters are seen: a tail that
    starts among (or inside one of) the tags of ``b<b></b><b></b>...`` reads them as
    written, and ``omb`` in the next window is a word of its own.
    """
    k = _markup_run(text, _tag_start(text, start, floor), floor)
    return max(floor, k - 1) if k < start else start


def _within(finding: Finding, start: int, end: int) -> bool:
    """Whether ``finding`` rests on any of ``[start, end)`` (one with no span always does)."""
    reach = finding.reach
    return reach is None or (reach[1] > start and reach[0] < end)


def _touches(redaction: Redaction, start: int, end: int) -> bool:
    """Whether ``redaction`` rewrites any of ``[start, end)``."""
    return redaction.start < end and start < redaction.end


def _through(redactions: list[Redaction], cut: int) -> int:
    """``cut`` moved past every redaction that crosses it (and those that cross that)."""
    while True:
        moved = max((r.end for r in redactions if r.start < cut < r.end), default=cut)
        if moved == cut:
            return cut
        cut = moved


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


def _after_lead(decision: Decision, checked: str, lead: int) -> Decision:
    """``decision`` on ``checked`` as one on ``checked[lead:]``, the completion after
    the lead: its findings, each filter's, and their redactions moved onto it and
    clipped to it, and its text the completion's alone. A finding or redaction wholly in
    the lead is dropped (no lead text is rewritten or sent); one across the join is
    kept, cut at the completion's start."""
    text = checked[lead:]
    length = len(text)

    def moved(findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
        out = []
        for f in findings:
            reach = f.reach
            if reach is not None and reach[1] <= lead:
                continue
            extent = _onto(f.extent, lead, length)
            # A span in the lead whose other matches reach the completion: the part of
            # them in it (the audit row marks the span).
            span = _onto(f.span, lead, length) or extent
            out.append(dataclasses.replace(f, span=span, extent=extent))
        return tuple(out)

    outcomes = tuple(
        dataclasses.replace(
            o,
            verdict=dataclasses.replace(
                o.verdict,
                findings=moved(o.verdict.findings),
                redactions=tuple(_shift(o.verdict.redactions, lead, length)),
            ),
        )
        for o in decision.outcomes
    )
    redactions = tuple(_shift(decision.redactions, lead, length))
    return dataclasses.replace(
        decision,
        text=apply_redactions(text, redactions) if redactions else text,
        findings=moved(decision.findings),
        outcomes=outcomes,
        redactions=redactions,
        checked=text if redactions else None,
    )


def _onto(span: tuple[int, int] | None, offset: int, length: int) -> tuple[int, int] | None:
    """``span`` of ``lead + text`` as a span of ``text`` (``offset`` the lead's length),
    clipped to it; ``None`` if none of it is in ``text``."""
    if span is None:
        return None
    start, end = max(span[0] - offset, 0), min(span[1] - offset, length)
    return (start, end) if end > start else None


def _action_of(findings: Iterable[Finding], redactions: Iterable[Redaction]) -> Action:
    """The action a verdict with ``findings`` and ``redactions`` takes: the strictest of
    its findings', and at least a redaction where it restores a placeholder (a restore is
    no finding, the user's own value put back being nothing harmful, yet its rewrite has
    to be applied, as the pii filter's own verdict says)."""
    action = Action.strictest(f.action for f in findings)
    if action.rank < Action.REDACT.rank and any(r.restore for r in redactions):
        return Action.REDACT
    return action


def _only_within(outcome: FilterOutcome, start: int, end: int) -> FilterOutcome:
    """``outcome`` with only the findings that rest on ``[start, end)``, its verdict's
    action the one those and its restores in ``[start, end)`` take (redactions are kept:
    they are clipped to the window)."""
    verdict = outcome.verdict
    kept = tuple(f for f in verdict.findings if _within(f, start, end))
    if len(kept) == len(verdict.findings) and all(
        _touches(r, start, end) for r in verdict.redactions if r.restore
    ):
        return outcome
    # A finding in the tail alone (the end of the user's own email, "jane@corp.com" of
    # "mary.jane@corp.com", where the tail starts inside it) set aside, the action had
    # been that of the findings left: none, so allow, and the window's restores were
    # dropped ("<PHONE_NUMBER_1>" went out as written).
    # A restore outside it (a placeholder in the lead) is dropped with it: it
    # rewrites none of the window.
    restores = (r for r in verdict.redactions if _touches(r, start, end))
    action = _action_of(kept, restores)
    return dataclasses.replace(
        outcome, verdict=dataclasses.replace(verdict, findings=kept, action=action)
    )
