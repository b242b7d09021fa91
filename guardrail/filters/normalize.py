"""Text normalisation against evasion, keeping a map back to the original offsets.

Rules match on the normalised text; findings and redactions must point into the text
the user sent, so every normalised character remembers the original index it came from.

What is undone, in order:

- compatibility forms, accents and case (full-width ``bomb``, ``bómb``, ``BOMB`` -> ``bomb``);
- invisible format characters (zero-width spaces and joiners, soft hyphens), marks that
  show nothing or draw around a letter (grapheme joiner, variation selectors, enclosing
  circles, keycaps), blank letters (Hangul fillers, the blank braille pattern);
- Unicode dashes become hyphens and middle dots full stops;
- look-alike letters from other scripts (Cyrillic and Greek o -> Latin ``o``);
- leetspeak next to letters in words that hold letters (``b0mb``, ``h4ck``, ``k1ll``);
  numbers are left alone (``2024``, ``4 eggs``, ``covid-19``), and so is a number with a
  unit or suffix (``80MB``, ``1080p``);
- letters spelled out one at a time (``b o m b``, ``b.o.m.b``, ``b/o/m/b``): a run of
  three or more single letters joined by one space or ``. - _ * / , ~ : '`` is glued;
- runs of whitespace become one space.

The text models see gets all of it. Keywords match the text with leetspeak undone and
accept spelled-out letters in their own patterns; regexes see the folded text only.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Zero-width and other invisible formatting characters used to split words.
_INVISIBLE_CATEGORIES = frozenset({"Cf"})
# Marks that show nothing of their own (the grapheme joiner, variation selectors) or draw
# around a letter (enclosing circles, keycaps) go whatever their combining class, and so
# do blank letters: Hangul fillers, Khmer inherent vowels, the blank braille pattern.
_MARK_CATEGORIES = frozenset({"Mn", "Me"})
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0\u17b4\u17b5\u2800")
# Dashes and middle dots between spelled-out letters or words: hyphens and full stops.
_PUNCTUATION = {
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
    **dict.fromkeys("\u00b7\u2022\u2027\u2219", "."),
}

# Letters of other scripts that look like Latin ones (lower case; input is casefolded
# first). Written here from the Unicode charts for Cyrillic and Greek.
_CONFUSABLES = {
    # Cyrillic
    "\u0430": "a",  # cyrillic small letter a
    "\u0432": "b",  # cyrillic small letter ve
    "\u0441": "c",  # cyrillic small letter es
    "\u0501": "d",  # cyrillic small letter komi de
    "\u0435": "e",  # cyrillic small letter ie
    "\u0451": "e",  # cyrillic small letter io
    "\u04bb": "h",  # cyrillic small letter shha
    "\u0456": "i",  # cyrillic small letter byelorussian-ukrainian i
    "\u0457": "i",  # cyrillic small letter yi
    "\u0458": "j",  # cyrillic small letter je
    "\u043a": "k",  # cyrillic small letter ka
    "\u04cf": "l",  # cyrillic small letter palochka
    "\u043c": "m",  # cyrillic small letter em
    "\u043d": "h",  # cyrillic small letter en
    "\u043e": "o",  # cyrillic small letter o
    "\u0440": "p",  # cyrillic small letter er
    "\u051b": "q",  # cyrillic small letter qa
    "\u0433": "r",  # cyrillic small letter ghe
    "\u0455": "s",  # cyrillic small letter dze
    "\u0442": "t",  # cyrillic small letter te
    "\u0443": "y",  # cyrillic small letter u
    "\u0461": "w",  # cyrillic small letter omega
    "\u0445": "x",  # cyrillic small letter ha
    "\u04af": "y",  # cyrillic small letter straight u
    "\u044c": "b",  # cyrillic small letter soft sign
    # Greek
    "\u03b1": "a",  # greek small letter alpha
    "\u03b2": "b",  # greek small letter beta
    "\u03b5": "e",  # greek small letter epsilon
    "\u03b7": "n",  # greek small letter eta
    "\u03b9": "i",  # greek small letter iota
    "\u03ba": "k",  # greek small letter kappa
    "\u03bd": "v",  # greek small letter nu
    "\u03bf": "o",  # greek small letter omicron
    "\u03c1": "p",  # greek small letter rho
    "\u03c4": "t",  # greek small letter tau
    "\u03c5": "u",  # greek small letter upsilon
    "\u03c7": "x",  # greek small letter chi
    "\u03c9": "w",  # greek small letter omega
    # Latin letters with a stroke that NFKD does not take apart
    "\u00f8": "o",  # latin small letter o with stroke
    "\u0111": "d",  # latin small letter d with stroke
    "\u0142": "l",  # latin small letter l with stroke
}

# Capitals that look like a different Latin letter than their small form: Greek capital
# eta is "H" but small eta is "n". Looked up before case folding.
_CAPITAL_CONFUSABLES = {
    "\u0397": "h",  # greek capital letter eta
    "\u039c": "m",  # greek capital letter mu
    "\u039d": "n",  # greek capital letter nu
    "\u0396": "z",  # greek capital letter zeta
}

# Digits and symbols written for letters. Applied only inside a word that also has
# letters, so plain numbers survive.
_LEET = {
    "0": "o",
    "1": "i",
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "8": "b",
    "9": "g",
    "@": "a",
    "$": "s",
    "!": "i",
    "|": "l",
    "+": "t",
}

# One letter or digit, then (separator, one letter or digit) at least twice, with no
# word character on either side: "b o m b", "b.o.m.b", "b-o-m-b".
_SPELLED = re.compile(r"(?<![\w])\w(?:[ ._*/,~:'-]\w){2,}(?![\w])")
_SEPARATORS = frozenset(" ._*/,~:'-")


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
    capital = _CAPITAL_CONFUSABLES.get(char)
    if capital is not None:
        return capital
    punctuation = _PUNCTUATION.get(char)
    if punctuation is not None:
        return punctuation
    decomposed = unicodedata.normalize("NFKD", char)
    kept = "".join(
        c
        for c in decomposed
        if not unicodedata.combining(c) and unicodedata.category(c) not in _MARK_CATEGORIES
    )
    folded = unicodedata.normalize("NFKC", kept).casefold()
    return "".join(_CONFUSABLES.get(c, c) for c in folded)


def _fold_and_squeeze(text: str) -> tuple[list[str], list[int]]:
    out: list[str] = []
    origin: list[int] = []
    last_space = True  # also trims leading whitespace
    for i, char in enumerate(text):
        if unicodedata.category(char) in _INVISIBLE_CATEGORIES or char in _BLANKS:
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
    while out and out[-1] == " ":
        out.pop()
        origin.pop()
    return out, origin


def _unleet(chars: list[str]) -> None:
    """Replace leet characters in place: in words with two or more letters, next to a letter.

    A replaced character counts as a letter for its neighbours, so ``c0c41ne`` becomes
    ``cocaine``; ``covid-19``, ``gpt-4`` and ``3d`` stay as they are.
    """
    start = 0
    n = len(chars)
    while start < n:
        end = start
        while end < n and chars[end] != " ":
            end += 1
        # A number with a unit or a model suffix ("80mb", "16gb", "1080p") is no leet:
        # its digits would turn "80mb" into "bomb".
        digits = start
        while digits < end and chars[digits].isdigit():
            digits += 1
        unit = digits - start >= 2 and all(chars[k].isalpha() for k in range(digits, end))
        if not unit and sum(chars[k].isalpha() for k in range(start, end)) >= 2:
            # Trailing punctuation ("wow!") is punctuation, not a letter.
            last = end
            while last > start and chars[last - 1] in "!$+|":
                last -= 1
            changed = True
            while changed:
                changed = False
                for k in range(start, last):
                    c = chars[k]
                    if c not in _LEET:
                        continue
                    left = k > start and chars[k - 1].isalpha()
                    right = k + 1 < last and chars[k + 1].isalpha()
                    if left or right:
                        chars[k] = _LEET[c]
                        changed = True
        start = end + 1


def _glue_spelled(chars: list[str], origin: list[int]) -> tuple[list[str], list[int]]:
    text = "".join(chars)
    drop: set[int] = set()
    for m in _SPELLED.finditer(text):
        drop.update(k for k in range(m.start(), m.end()) if text[k] in _SEPARATORS)
    if not drop:
        return chars, origin
    keep = [k for k in range(len(chars)) if k not in drop]
    return [chars[k] for k in keep], [origin[k] for k in keep]


def normalize(text: str, *, leet: bool = True, glue: bool = True) -> Normalized:
    """The text with evasion undone (see the module doc), and its map to ``text``.

    ``leet=False`` keeps digits and symbols (regexes on structured text such as e-mail
    addresses need them); ``glue=False`` keeps spelled-out letters apart (keyword
    patterns match them letter by letter, so a neighbouring word is not glued on).
    """
    chars, origin = _fold_and_squeeze(text)
    if leet:
        _unleet(chars)
    if glue:
        chars, origin = _glue_spelled(chars, origin)
    return Normalized("".join(chars), tuple(origin), len(text))
