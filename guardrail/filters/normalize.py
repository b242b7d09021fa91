"""Text normalisation against trivial evasion, keeping a map back to the original offsets.

Rules match on the normalised text; findings and redactions must point into the text
the user sent, so every normalised character remembers the original index it came from.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

# Zero-width and other invisible formatting characters used to split words.
_INVISIBLE_CATEGORIES = frozenset({"Cf"})


@dataclass(frozen=True, slots=True)
class Normalized:
    """``text`` is the normalised form; ``origin[i]`` is the original index of ``text[i]``."""

    text: str
    origin: tuple[int, ...]
    source_length: int

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Map a span of the normalised text back to the original text."""
        if start >= len(self.origin):
            return (self.source_length, self.source_length)
        last = self.origin[end - 1] if end > start else self.origin[start]
        return (self.origin[start], last + 1)


def _fold(char: str) -> str:
    decomposed = unicodedata.normalize("NFKD", char)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFKC", kept).casefold()


def normalize(text: str) -> Normalized:
    """Compatibility-fold, strip accents and invisible characters, casefold, squeeze spaces."""
    out: list[str] = []
    origin: list[int] = []
    last_space = True  # also trims leading whitespace
    for i, char in enumerate(text):
        if unicodedata.category(char) in _INVISIBLE_CATEGORIES:
            continue
        if char.isspace():
            if not last_space:
                out.append(" ")
                origin.append(i)
                last_space = True
            continue
        for piece in _fold(char):
            if piece.isspace():
                if last_space:
                    continue
                last_space = True
                out.append(" ")
            else:
                last_space = False
                out.append(piece)
            origin.append(i)
    return Normalized("".join(out), tuple(origin), len(text))
