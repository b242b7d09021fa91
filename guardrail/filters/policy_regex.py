"""The check every regex a policy author writes for the ``regex`` engine goes through.

The rules filter runs its regexes on the ``regex`` engine (for its time limit), and
Presidio, which runs the pii filter's custom patterns, compiles them with it too. That
engine writes a repeated part out in memory as many times as its lower count says:
``x{2000000}`` took half a gigabyte and ``a{4294967294}`` exhausted the gateway's
memory, on a reload too. :func:`regex_problem` says, when the policy loads, what the
filter's own compile would refuse or what would cost that much, at the regex's key.
"""

from __future__ import annotations

import importlib
from typing import Any

import regex as regex_engine

MAX_REPEAT = 1000
"""The most copies of one part a policy regex may repeat (``x{1000}``; nested repeats
multiply, ``(?:x{10}){100}`` is 1000). An upper count (``.{0,5000}``) costs nothing."""

# The regex engine's own parser, for the counts it will expand: the re module reads some
# patterns differently ("(?x)x{2 000 000}" is a literal to re, two million x's to regex).
# Private, and only read: a node's children are its attributes.
_REGEX_CORE: Any = importlib.import_module("regex._regex_core")


def regex_problem(pattern: str, flags: int = 0, *, refused: str = "invalid regex") -> str | None:
    """Why ``pattern``, compiled by the regex engine (VERSION0) with ``flags`` as the
    filter compiles it, may not be a policy's regex: the engine refuses it (the message
    starts with ``refused``), or it repeats a part past :data:`MAX_REPEAT`. None if neither.
    """
    try:
        copies = repeat_copies(pattern, flags)
        if copies <= MAX_REPEAT:
            regex_engine.compile(pattern, flags | regex_engine.VERSION0)
    except (regex_engine.error, OverflowError, MemoryError) as e:  # a{99999999999}: Overflow
        return f"{refused}: {e or type(e).__name__}"
    if copies > MAX_REPEAT:
        return (
            f"regex repeats a part {copies:,} times (counting repeats inside repeats "
            f"together); at most {MAX_REPEAT:,}, since the regex engine holds every copy in "
            "memory"
        )
    return None


def repeat_copies(pattern: str, flags: int = 0) -> int:
    """The most copies of one part of ``pattern`` the regex engine writes out."""
    flags |= regex_engine.VERSION0
    while True:  # as regex.compile does: a global flag met mid-pattern starts it over
        source = _REGEX_CORE.Source(pattern)
        info = _REGEX_CORE.Info(flags, source.char_type, {})
        source.ignore_space = bool(info.flags & regex_engine.VERBOSE)
        try:
            return _copies(_REGEX_CORE._parse_pattern(source, info))
        except _REGEX_CORE._UnscopedFlagSet:
            flags = info.global_flags


def _copies(node: Any) -> int:
    own = max(node.min_count, 1) if isinstance(node, _REGEX_CORE.GreedyRepeat) else 1
    children = (
        child
        for value in vars(node).values()
        for child in (value if isinstance(value, list | tuple) else (value,))
        if isinstance(child, _REGEX_CORE.RegexBase)
    )
    return own * max(map(_copies, children), default=1)
