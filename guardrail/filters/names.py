"""A Presidio recognizer for names that a cue introduces, for the NER to miss no more.

The small spaCy model misses names it has not seen in a few contexts, above all foreign
ones and lower-case ones (``my name is Rubija``, ``her maiden name is nyberg``). When the
text itself says that a name follows, the words after the cue are the name, whatever
the model thinks:

- ``my name is``, ``her maiden name was``, ``his full name is`` (any possessive, first,
  last, middle, full, maiden, given, family name, surname), ``call me``, ``named``;
- a form field: ``Name: Iva D. Grusová``, ``Last name? Boyle``.

The name is one to four words (initials count: ``Shane M Culp``), ending at
punctuation, a line break or a word that cannot be part of a name (``and``, ``is``,
``from``...). Capitalisation is not required after a cue. Score 0.9.

Without a cue, one shape is a name by itself: a capitalised word, a middle initial and
a capitalised word (``Szabina J Gelencsér``, ``Faina D. Yefremova``). The first word must
not be a function word (``Is A Good``), and a bare ``A`` or ``I`` (no full stop) is
not taken as an initial (``Plan A Works``, ``Then I Said``); a street type last is an
address (``New York E Street``). Score 0.85.
"""

from __future__ import annotations

import re
from typing import Any

from guardrail.filters.span_recognizer import Span, span_recognizer

ENTITY = "PERSON"

_KIND = r"(?:(?:first|last|middle|full|maiden|given|family|birth|real|legal)\s+)?"
# "file name:", "user name:": fields that hold something other than a person's name.
_NOT_PEOPLE_WORDS = (
    "file user domain host product company brand display screen band business pet project"
    " app package class field table column server device"
)
_NOT_PEOPLE = "".join(rf"(?<!{w} )" for w in _NOT_PEOPLE_WORDS.split(" "))
_CUE = re.compile(
    rf"\b(?:(?:my|his|her|their|your|our)\s+{_KIND}(?:name|surname)\s+(?:is|was)\s+"
    rf"|(?<![\w/]){_NOT_PEOPLE}(?:{_KIND}name|surname)\s*[:?]\s*"
    r"|\bcall\s+me\s+|\bnamed\s+)",
    re.IGNORECASE,
)
# Words that end a name: function words and verbs that follow names in sentences.
_STOP_WORDS = (
    "a an and or but the is was are were be been has have had will would can could should"
    " may might do does did not no yes i me my you your he his she her we our they their it"
    " its this that these those from at in on of for to with by as if so than then there here"
    " when where who what which why how please thanks thank also just very too age born"
    " address phone email e-mail tel mobile date job title"
)
_STOP = frozenset(_STOP_WORDS.split(" "))
_WORD = re.compile(r"[^\W\d_](?:[\w'\u2019-]*[^\W\d_])?\.?|[^\W\d_]\.?", re.UNICODE)
_GAP = re.compile(r"[ \t]{1,4}")
_MAX_WORDS = 4
SCORE = 0.9


def find_cued_names(text: str) -> list[Span]:
    """Names introduced by a cue (see the module's docstring)."""
    found = []
    for cue in _CUE.finditer(text):
        pos, start, end, words = cue.end(), cue.end(), cue.end(), 0
        while words < _MAX_WORDS:
            m = _WORD.match(text, pos)
            if m is None or m.group().rstrip(".").lower() in _STOP:
                break
            end = m.end()
            words += 1
            gap = _GAP.match(text, end)
            if gap is None:
                break
            pos = gap.end()
        if words:
            # An initial's dot belongs to the name; a sentence's full stop does not.
            if text[end - 1] == "." and len(text[start:end].rsplit(maxsplit=1)[-1]) > 2:
                end -= 1
            found.append(Span(start, end, SCORE))
    return found


_CAPITAL = r"[^\W\d_a-z](?:[^\W\d_]|['\u2019-](?=[^\W\d_]))+"
_INITIAL_NAME = re.compile(
    rf"(?<![\w'\u2019-])(?P<first>{_CAPITAL}) (?P<initial>[^\W\d_a-z])(?P<dot>\.?) "
    rf"{_CAPITAL}(?![\w'\u2019-])"
)
# Street types that are not also surnames (Hill, Green, Park are both): "York E Street".
_STREET_END = re.compile(
    r"\b(?:street|avenue|road|boulevard|lane|drive|court|place|square|terrace|parkway"
    r"|highway|circle|trail|crescent|plaza|route|alley|st|ave|rd|blvd|ln|dr|ct)\Z",
    re.IGNORECASE,
)
INITIAL_SCORE = 0.85


def find_initial_names(text: str) -> list[Span]:
    """``First M. Last``: two capitalised words around a middle initial."""
    found = []
    for m in _INITIAL_NAME.finditer(text):
        if m["first"].lower() in _STOP or m["first"].isupper():
            continue
        if m["initial"] in ("A", "I") and not m["dot"]:
            continue
        if _STREET_END.search(m.group()):
            continue
        end = m.end()
        if text[end - 2 : end].lower() in ("'s", "\u2019s"):  # a possessive: not the name
            end -= 2
        found.append(Span(m.start(), end, INITIAL_SCORE))
    return found


def find_names(text: str) -> list[Span]:
    """Names after a cue, and ``First M. Last`` shapes (see the module's docstring)."""
    return find_cued_names(text) + find_initial_names(text)


def cued_name_recognizer(language: str = "en") -> Any:
    """A Presidio recognizer for ``PERSON`` built on :func:`find_names`."""
    return span_recognizer(ENTITY, "CuedNameRecognizer", find_names, language)
