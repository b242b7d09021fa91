"""The verdict cache: judge each piece of a conversation once.

Chat clients resend the whole conversation every turn. The cache keeps, per process,
each filter's verdict on each input message, keyed by

    (policy name, version and digest and the guard built from it, filter id, stage,
     sha256 of the message text [, sha256 of the conversation before the message],
     tenant)

so unchanged system prompts and earlier turns reuse their verdicts and only new or
changed messages are checked. The guard is part of the key because the policy's bytes
do not fix its filters: two tenants' copies of one file in different folders may read
different word lists or weights next to them, and must never share verdicts. The tenant
is part of it because a hit answers faster: tenants sharing one policy would otherwise
let one time whether another recently sent a given message.

What it stores is the verdict alone: categories, scores, rule ids, spans and
replacement strings. Never the text, and never an original value behind a reversible
redaction (filters rebuild those from the text of the current request through
:class:`~guardrail.guard.filter.Stateful`).

The text is hashed exactly as sent. Any looser normalisation (case, whitespace)
could give a text the verdict of a different text, with spans that do not fit it;
an exact key can never weaken a verdict.

A filter opts in with ``cache_scope``:

- ``"text"``: its verdict depends on the text alone (rules, toxicity);
- ``"prefix"``: also on the conversation before the message (placeholder numbering);
- ``"none"`` (the default, also for third-party filters that do not say): never cached.

Filters with ``scope = "conversation"`` judge the whole conversation once per request
and are never cached. Failed checks (errors, timeouts) are never cached either.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from guardrail.chat import Message
from guardrail.guard.types import Verdict

CacheScope = Literal["text", "prefix", "none"]
CacheKey = tuple[str, str, str, bytes, bytes, str]  # ..., text, prefix, tenant


def cache_scope(filt: object) -> CacheScope:
    """A filter's declared cache scope; undeclared means never cached."""
    scope = getattr(filt, "cache_scope", "none")
    if scope == "text":
        return "text"
    if scope == "prefix":
        return "prefix"
    return "none"


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def prefix_digests(messages: Sequence[Message]) -> list[bytes]:
    """``result[i]`` identifies ``messages[:i]`` (roles and texts), computed in one pass."""
    running = hashlib.sha256()
    out = [running.digest()]
    for message in messages:
        for part in (message.role, message.content):
            data = part.encode("utf-8", "surrogatepass")
            running.update(len(data).to_bytes(8, "big"))
            running.update(data)
        out.append(running.copy().digest())
    return out[: len(messages)]


class VerdictCache:
    """A bounded LRU map of verdicts, for the event loop's thread only.

    Bounded twice: ``max_entries`` verdicts, and ``max_items`` findings and redactions in
    all (one per verdict besides). A verdict for a text of the maximum body size can carry
    hundreds of thousands of redactions; one larger than ``max_items`` is not kept.
    """

    def __init__(self, max_entries: int = 50_000, max_items: int = 1_000_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.max_items = max_items
        self.held_items = 0  # findings, redactions and verdicts kept (see _weight)
        self._items: OrderedDict[CacheKey, Verdict] = OrderedDict()

    def get(self, key: CacheKey) -> Verdict | None:
        verdict = self._items.get(key)
        if verdict is not None:
            self._items.move_to_end(key)
        return verdict

    def put(self, key: CacheKey, verdict: Verdict) -> None:
        weight = _weight(verdict)
        if self.max_entries == 0 or weight > self.max_items:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.held_items -= _weight(old)
        self._items[key] = verdict
        self.held_items += weight
        while len(self._items) > self.max_entries or self.held_items > self.max_items:
            _, dropped = self._items.popitem(last=False)
            self.held_items -= _weight(dropped)

    def clear(self) -> None:
        self._items.clear()
        self.held_items = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:  # an empty cache is still a cache: `cache or default` must not
        return True


def _weight(verdict: Verdict) -> int:
    return 1 + len(verdict.findings) + len(verdict.redactions)
