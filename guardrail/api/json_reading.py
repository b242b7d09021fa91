"""JSON text as its readers read it: strings decoded, and redactions written back.

A tool call's arguments and a tool's JSON result reach a program (and the model) as JSON,
and every reader decodes it: ``"30102 Kaevu 94\\nNicosia"`` is an address on two lines,
``"jane.doe\\u0040example.com"`` an email address. Read as written, the filters saw the
two characters ``\\n`` and no address, or ``\\u0040`` and no email, while the backend
decoded the value whole. So the filters read the decoded strings, and a redaction or a
restored value lands in the string it lies in, written back as a JSON string: the text
stays JSON, whatever the value holds (a line break, a quote).

A :class:`Reading` is a text for the filters built of parts: *pieces* (values sent on,
rewritten where a redaction lies in them), *fixed* text (sent as written, which no
redaction may touch: a call's id or name) and *filler* (read, never sent: separators).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from guardrail.guard.types import Redaction, apply_redactions

# A JSON string, or a number, in a text that is JSON: outside a string neither a quote
# nor a backslash occurs, so scanning from the left finds each whole.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?[0-9][0-9.eE+-]*', re.DOTALL)
_KEY_FOLLOWS = re.compile(r"[ \t\r\n]*:")
# Between two pieces of a reading: two blank lines, which no detector reads one value
# across (the address recognizer runs over one blank line at most: over one line break,
# an address value took the key after it, "floor", for a unit), while a rule's phrase,
# read across any whitespace, is still seen whole.
SEPARATOR = "\n\n\n"
# A lone surrogate (``"\ud800"`` decodes to one): read as U+FFFD, one character for one,
# so no filter's tokenizer fails on a string no UTF-8 can hold.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class JsonPiece:
    """A string or a number of a JSON text: ``text[start:end]`` as written, ``value`` as
    read (a string decoded; a number as written). ``key``: an object's key."""

    start: int
    end: int
    value: str
    key: bool = False


def json_pieces(text: str) -> tuple[JsonPiece, ...] | None:
    """The strings (object keys included) and numbers of ``text`` in order, or ``None``
    if ``text`` is not JSON.

    JSON as Python's ``json`` module reads it, not strictly: it is what the readers of a
    call's arguments run (vLLM parses them with it before a chat template renders them),
    and it takes what a strict reader refuses (a lone surrogate escape, ``NaN``, a line
    break inside a string). Judged strictly, such a text was read as written, escapes
    and all, while the backend decoded it. A text nested past Python's recursion limit is
    not JSON to that reader either, and is read as written.
    """
    try:
        json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return None
    pieces = []
    for m in _TOKEN.finditer(text):
        token = m.group()
        if token[0] != '"':
            pieces.append(JsonPiece(m.start(), m.end(), token))
            continue
        value = json.loads(token, strict=False) if "\\" in token else token[1:-1]
        key = _KEY_FOLLOWS.match(text, m.end()) is not None
        pieces.append(JsonPiece(m.start(), m.end(), value, key))
    return tuple(pieces)


def json_string(value: str) -> str:
    """``value`` as a JSON string: as UTF-8 text, or escaped to ASCII where it holds a
    lone surrogate (which UTF-8 cannot carry)."""
    written = json.dumps(value, ensure_ascii=False)
    try:
        written.encode()
    except UnicodeEncodeError:
        return json.dumps(value)
    return written


def rewritten_json(text: str, pieces: tuple[JsonPiece, ...], values: Mapping[int, str]) -> str:
    """``text`` with each piece ``i`` of ``values`` written as the JSON string
    ``values[i]`` (a number that a redaction rewrote becomes a string holding it)."""
    out: list[str] = []
    last = 0
    for i in sorted(values):
        piece = pieces[i]
        out += [text[last : piece.start], json_string(values[i])]
        last = piece.end
    out.append(text[last:])
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Segment:
    start: int  # in the reading
    end: int
    piece: int  # whose value starts at ``start``


class Reading:
    """A text for the filters, built of pieces, fixed text and filler (see the module
    docstring), and the way back from its redactions to the pieces'."""

    __slots__ = ("_fixed", "_parts", "_segments", "_starts", "length")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._fixed: list[tuple[int, int]] = []
        self._segments: list[_Segment] = []
        self._starts: list[int] = []
        self.length = 0

    def add(self, text: str, *, piece: int | None = None, fixed: bool = False) -> None:
        """Append ``text``: all of piece ``piece``'s value or the start of it, fixed
        text, or (neither) filler."""
        if not text:
            return
        end = self.length + len(text)
        if piece is not None:
            self._segments.append(_Segment(self.length, end, piece))
            self._starts.append(self.length)
        elif fixed:
            self._fixed.append((self.length, end))
        self._parts.append(text)
        self.length = end

    @property
    def text(self) -> str:
        return _SURROGATE.sub("\ufffd", "".join(self._parts))

    def place(self, redactions: Iterable[Redaction]) -> dict[int, list[Redaction]] | None:
        """``redactions`` of :attr:`text` as redactions of the pieces' values (by piece),
        or ``None`` if one touches fixed text.

        One that lies over several pieces (a value read across two strings) hides each
        one's part: the first keeps the replacement, the others lose theirs, as
        :func:`apply_redactions` replaces a run with one replacement. What lies in filler
        is in nothing sent, and is dropped.
        """
        placed: dict[int, list[Redaction]] = {}
        for r in redactions:
            if any(r.start < end and start < r.end for start, end in self._fixed):
                return None
            at = max(0, bisect.bisect_right(self._starts, r.start) - 1)
            replacement = r.replacement
            for segment in self._segments[at:]:
                if segment.start >= r.end:
                    break
                if segment.end <= r.start:
                    continue
                start = max(r.start, segment.start) - segment.start
                end = min(r.end, segment.end) - segment.start
                own = Redaction(start, end, replacement, restore=r.restore and bool(replacement))
                placed.setdefault(segment.piece, []).append(own)
                replacement = ""
        return placed


def redacted_values(
    values: Mapping[int, str], placed: Mapping[int, list[Redaction]]
) -> dict[int, str]:
    """The pieces' ``values`` (by piece) that ``placed`` (:meth:`Reading.place`) changes,
    redacted."""
    out = {}
    for piece, own in placed.items():
        value = values[piece]
        redacted = apply_redactions(value, own)
        if redacted != value:
            out[piece] = redacted
    return out
