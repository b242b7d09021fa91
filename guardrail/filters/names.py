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
``from``...). Capitalisation is not required after a cue, and a word may be in any
script, its combining marks included (``My name is राहुल शर्मा``). Score 0.9.

Without a cue, one shape is a name by itself: a capitalised word, a middle initial and
a capitalised word (``Szabina J Gelencsér``, ``Faina D. Yefremova``). The first word must
not be a function word (``Is A Good``), and a bare ``A`` or ``I`` (no full stop) is
not taken as an initial (``Plan A Works``, ``Then I Said``); a street type last is an
address (``New York E Street``). Score 0.85.

**Name lists** (:func:`find_listed_names`, on unless a policy sets ``name_lists: false``):
a capitalised word that is a given name or surname in the person providers of the
``faker`` package (86 locales, MIT) is a name, with up to two capitalised words after it
(``Miklós Hajdu``, ``Lina Artemova``). This is what the small spaCy model misses most:
foreign names, and single names in lists (``Kónya, Becker and Vasquez``). A listed word
that is first an English word (``Edit``, ``Trace``: WordNet lemmas from the spaCy
model's lemmatizer tables) only continues a name, unless it is an English given name
(``John``); nor does a sentence's first English word (``Rush the order``) start one.
A word inside a nationality, language or date that spaCy found is no name, nor a name of
one word inside a place (``France``), nor a run of capitals that ends in a company or
street word (``Morgan Stanley Inc``, ``Martinez Mall``). Score 0.85, as spaCy's own
names.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re
from collections.abc import Iterable
from typing import Any

import regex

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
# A letter, then letters and their combining marks: the vowel signs and viramas of
# Indic scripts and Thai are marks (Mn, Mc), not letters, and a word must not end at
# the first of them ("राहुल" is ra + the sign aa + ...). Latin accents never get here
# loose: the pii filter composes them, or drops the ones with no composed letter.
_WORD = regex.compile(r"\p{L}(?:[\w\p{M}'\u2019-]*[\p{L}\p{M}])?\.?")
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


# -- names from name lists ------------------------------------------------------------

LISTED_SCORE = 0.85
# spaCy entities that are not people: a listed name inside one is not a name ("France",
# "Danish", "August"). Presidio renames spaCy's labels (GPE -> LOCATION, NORP -> NRP).
_VETO_LABELS = frozenset({"NRP", "DATE_TIME", "LANGUAGE", "NORP", "DATE", "TIME"})
# The small model calls many foreign names places ("Tünde Hoffmann" FAC, "Kónya" GPE):
# a place vetoes a name of one word only ("France", "Phoenix"), not "Steffen Mauer".
_PLACE_LABELS = frozenset({"LOCATION", "FAC", "GPE", "LOC"})
# Words after which capitals are an organisation or a street, not a person.
_ORG_OR_STREET_WORDS = (
    "inc incorporated ltd llc llp plc corp corporation company co group gmbh ag sa bv"
    " nv partners associates consulting lines agency bank foundation university"
    " college school hospital hotel orchestra band records studios media labs systems"
    " solutions services industries holdings international ratings club church museum"
    " institute street st avenue ave road rd lane ln drive dr boulevard blvd way"
    " place court mall loop cove coves creek hills hill dale fort park square plaza"
    " terrace gardens bridge river lake mountain mount valley station airport island"
    " islands bay beach"
)
_ORG_OR_STREET = frozenset(_ORG_OR_STREET_WORDS.split(" "))
# Ordinary English words that some locale also lists as a name; with Faker's English
# word list and spaCy's stop words they are never taken as a name on their own.
_ORDINARY_WORDS = (
    "january february march april may june july august september october november"
    " december monday tuesday wednesday thursday friday saturday sunday will grace"
    " hope joy faith love rose summer autumn winter spring dawn hunter page mark bill"
    " art guy chance destiny honor royal prince princess king queen lord lady sir"
    " dame saint date name phone email orange karma star sky river stone city new"
    " north south east west street god mister miss mrs ms mr dr doctor professor"
    " president english french german spanish"
)
_ORDINARY = frozenset(_ORDINARY_WORDS.split(" "))
_NAME_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
_MAX_LISTED_WORDS = 3


@dataclasses.dataclass(frozen=True, slots=True)
class NameLists:
    """What the name-list recognizer knows.

    ``names``: given names and surnames of every locale, ordinary words removed.
    ``english_given``: given names of the English locales ("John", "Grace").
    ``lexicon``: English words, lower case (WordNet lemmas from the spaCy model's
    lemmatizer tables; empty when the model has none).
    """

    names: frozenset[str]
    english_given: frozenset[str]
    lexicon: frozenset[str] = frozenset()

    def listed(self, word: str) -> bool:
        """In the lists, or a double name whose parts all are (``Evans-Bonilla``)."""
        if word in self.names:
            return True
        parts = word.split("-")
        return len(parts) > 1 and all(p in self.names for p in parts)

    def strong(self, word: str) -> bool:
        """A name on its own: listed and not an English word, or an English given name.

        "Edit" (Hungarian), "Trace", "Singer" and "Berlin" are listed somewhere but are
        English words first; they join a name ("Tünde Hoffmann") but never make one.
        """
        if not self.listed(word):
            return False
        return word in self.english_given or word.lower() not in self.lexicon

    def may_follow(self, word: str) -> bool:
        """A word that can continue a name: listed, or not an English word (a surname)."""
        lower = word.lower()
        if lower in _ORDINARY or lower in _ORG_OR_STREET or lower in _stop_words():
            return False
        return self.listed(word) or lower not in self.lexicon


@functools.cache
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


@functools.cache
def _faker_names() -> tuple[frozenset[str], frozenset[str]]:
    """(every locale's given names and surnames, the English locales' given names)."""
    from faker.providers import person
    from faker.providers.lorem.en_US import Provider as EnglishWords

    names: set[str] = set()
    english: set[str] = set()
    given = ("first_names", "first_names_male", "first_names_female", "first_names_nonbinary")
    for module in pkgutil.iter_modules(person.__path__):
        provider = importlib.import_module(f"{person.__name__}.{module.name}").Provider
        for attribute in (*given, "last_names"):
            values = getattr(provider, attribute, None)
            if not isinstance(values, (list, tuple, dict, set, frozenset)):
                continue  # some locales compute these (properties)
            words = {v for v in values if isinstance(v, str)}
            names |= words
            if attribute in given and module.name.startswith("en"):
                english |= words
    ordinary = {w.lower() for w in EnglishWords.word_list} | _stop_words() | _ORDINARY
    kept = frozenset(
        n
        for n in names
        if len(n) >= 3
        and _NAME_WORD.fullmatch(n)
        and n[0].isupper()
        and not n.isupper()
        and n.lower() not in ordinary
        and n.lower() not in _ORG_OR_STREET
    )
    return kept, frozenset(english) & kept


def name_lists(lexicon: frozenset[str] = frozenset()) -> NameLists:
    """The name lists (read once from the installed ``faker`` package) with ``lexicon``.

    Faker is a dependency of the ``pii`` extra; nothing of it is copied into this
    project.
    """
    names, english = _faker_names()
    return NameLists(names, english, lexicon)


@functools.lru_cache(maxsize=8)
def spacy_lexicon(nlp: Any) -> frozenset[str]:
    """English words from a spaCy pipeline's lemmatizer tables (empty when it has none).

    Read once per pipeline: the engine's address recognizer and every pii filter built on
    the engine (each policy reload builds new ones) share it.
    """
    try:
        lemmatizer = dict(nlp.components)["lemmatizer"]
        index = lemmatizer.lookups.get_table("lemma_index")
    except (KeyError, AttributeError):
        return frozenset()
    return frozenset(w for words in index.values() for w in words if w.isalpha())


def find_listed_names(
    text: str,
    lists: NameLists,
    not_names: Iterable[tuple[int, int]] = (),
    places: Iterable[tuple[int, int]] = (),
) -> list[Span]:
    """Names the lists know, with up to two capitalised words after them.

    A name starts at a :meth:`NameLists.strong` capitalised word and goes on over
    capitalised words that :meth:`NameLists.may_follow`. ``not_names`` are spans of
    other entities (nationalities, dates...) where no name starts; a name of one word
    inside one of ``places`` is dropped too. A run of capitals ending in, or followed by,
    a company or street word is no name.
    """
    vetoes = _coverage(text, not_names)
    place_spans = _coverage(text, places)
    words = list(_NAME_WORD.finditer(text))
    found: list[Span] = []
    i = 0
    while i < len(words):
        if not _capitalised(words[i].group()):
            i += 1
            continue
        # A run: capitalised words (not all capitals) one space apart.
        j = i
        while (
            j + 1 < len(words)
            and text[words[j].end() : words[j + 1].start()] == " "
            and _capitalised(words[j + 1].group())
        ):
            j += 1
        run = words[i : j + 1]
        after = words[j + 1].group().lower() if j + 1 < len(words) else ""
        i = j + 1
        if after in _ORG_OR_STREET or any(w.group().lower() in _ORG_OR_STREET for w in run):
            continue
        k = 0
        while k < len(run):
            first = k
            word = run[k]
            if not lists.strong(_base(word.group())) or _inside(word, vetoes):
                k += 1
                continue
            last = k
            while (
                last + 1 < len(run)
                and last + 1 - first < _MAX_LISTED_WORDS
                and not _possessive(run[last].group())
                and lists.may_follow(_base(run[last + 1].group()))
                and not _inside(run[last + 1], vetoes)
            ):
                last += 1
            k = last + 1
            if last == first and (
                _inside(word, place_spans)
                # "Rush the order", "Trace the path": an English word opening a sentence
                or (_opens_sentence(text, word.start()) and word.group().lower() in lists.lexicon)
            ):
                continue
            end = run[last].end()
            if _possessive(run[last].group()):
                end -= 2
            found.append(Span(word.start(), end, LISTED_SCORE))
    return found


def _opens_sentence(text: str, start: int) -> bool:
    # A bounded look back: copying all of text[:start] per word would be quadratic.
    before = text[max(0, start - 64) : start].rstrip(" \t\"'\u201c\u2018(")
    return not before or before[-1] in ".!?:\n"


def _coverage(text: str, spans: Iterable[tuple[int, int]]) -> bytearray:
    """For each character of ``text``, 1 inside one of ``spans``.

    A word is then looked up in its own characters, not in every span (quadratic with
    many entities).
    """
    covered = bytearray(len(text))
    for start, end in spans:
        a, b = max(start, 0), min(end, len(text))
        if a < b:
            covered[a:b] = b"\x01" * (b - a)
    return covered


def _inside(word: re.Match[str], covered: bytearray) -> bool:
    return any(covered[word.start() : word.end()])


def _capitalised(word: str) -> bool:
    return word[0].isupper() and not word.isupper()


def _possessive(word: str) -> bool:
    return word[-2:].lower() in ("'s", "\u2019s")


def _base(word: str) -> str:
    """The word without a possessive ending."""
    return word[:-2] if _possessive(word) else word


def listed_name_recognizer(lists: NameLists, language: str = "en") -> Any:
    """A Presidio recognizer for ``PERSON`` built on :func:`find_listed_names`.

    It reads the NER's entities from Presidio's NLP artefacts: nationalities, languages
    and dates veto a name, and places veto a name of one word.
    """

    def find(text: str, nlp_artifacts: Any) -> list[Span]:
        vetoes, places = [], []
        for e in getattr(nlp_artifacts, "entities", None) or ():
            label = getattr(e, "label_", None)
            if label in _VETO_LABELS:
                vetoes.append((e.start_char, e.end_char))
            elif label in _PLACE_LABELS:
                places.append((e.start_char, e.end_char))
        return find_listed_names(text, lists, vetoes, places)

    return span_recognizer(ENTITY, "ListedNameRecognizer", find, language, with_artifacts=True)
