"""A street-address recognizer for Presidio, which ships none.

Addresses have no checksum and no single shape, so this recognizer combines anchors
(shapes that are addresses on their own) with a cautious extension over what usually
follows an address line:

- **street lines**: a house number and a street type (``24 Clarke Avenue``,
  ``2450 Crown St``), a street-type word first (``Rue de Virton 38``, ``Via Roma 131``,
  ``Calle Mayor 5``), or a compound street name ending in a street word and a number
  (``Friedhofstrasse 33``, ``Magasinsgatan 7``, ``Rooseveltlaan 110``, ``Koskikatu 25``);
- **military addresses**: ``PSC 3294, Box 9168 APO AA 61487``, ``Unit 1009 Box 0219
  DPO AP 51065``, ``USS Lorenzen FPO AE 25990``;
- **a cue** (``my address is``, ``located at``, ``lives on``, ``ship it to``) followed by
  a capitalised name and a number (``Peter Zuidhove 188``), which alone would match
  too much ("Windows 10"), so it needs the cue.

From an anchor the match extends over a secondary unit (``Apt. 864``, ``Suite 510``),
and then over at most four short comma- or line-separated parts that look like the
rest of an address (capitalised or upper-case place names, a postal code, a state
code), stopping at a sentence end or a lower-case word. It is a heuristic: its
precision and recall on the Presidio synthetic data set are in the README (Personal data, Measured).

Presidio is imported lazily by :func:`street_address_recognizer`, so importing this
module costs nothing.
"""

from __future__ import annotations

import re
from typing import Any

from guardrail.filters.span_recognizer import Span, span_recognizer

ENTITY = "STREET_ADDRESS"

# Street types that follow the name ("Clarke Avenue"); abbreviations may take a dot.
_SUFFIX = (
    r"street|st|avenue|ave|av|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|place|pl"
    r"|square|sq|terrace|ter|way|parkway|pkwy|highway|hwy|circle|cir|trail|trl|crescent"
    r"|cres|close|row|alley|route|rte|plaza|pike|path|walk|mews|gardens?|grove|park|hill"
    r"|heights|estate|quay|wharf|esplanade|promenade|broadway|expressway|freeway|loop"
    r"|ridge|view|vale|green|point|crossing|union|prairie|junction|str"
)
# Street types that come first ("Rue de Virton 38", "Via Roma 131").
_PREFIX = (
    r"rue|via|viale|vicolo|corso|piazza|piazzale|largo|rua|travessa|calle|carrer|avenida"
    r"|avinguda|paseo|passeig|camino|chemin|impasse|allée|allee|boulevard|avenue|place"
    r"|quai|strada|ulica|ul\.|aleja|al\.|ulice|utca|odos|leoforos|λεωφόρος|οδός|οδος"
    r"|avda\.|avd\.|av\."
)
# Street words that end a compound name ("Friedhofstrasse", "Magasinsgatan"). Not
# "ring" or "tee": "During 2017", "Committee 5".
_COMPOUND = (
    r"strasse|straße|str\.|gasse|weg|allee|platz|damm|ufer|gatan|gata|vägen|vagen"
    r"|väg|vej|gade|vei|veien|gaten|tie|katu|kuja|polku|laan|straat|plein|dreef|kade"
    r"|gracht|singel|utca|út|útja|ulica|ulice|cesta|iela|gatve|vegur|gata|stræde|straede"
    r"|gränd|torget|torg|plads|torv|gatvė"
)
_UNIT = (
    r"(?:apt\.?|apartment|suite|ste\.?|unit|flat|floor|fl\.?|room|rm\.?|box|no\.?)\s*#?\s*\d+[a-z]?"
)
_NUM = r"\d{1,6}[a-z]?(?:-\d{1,4})?"
_WORD = r"[^\W\d_][\w'\u2019.-]*"

_ANCHORS: tuple[tuple[str, float], ...] = (
    # 24 Clarke Avenue / 675 224 Forrest Hill Road / 363 52 Huntly Street
    (rf"\b{_NUM}(?:[ \t]+{_NUM})?[ \t]+(?:{_WORD}[ \t]+){{0,4}}?(?:{_SUFFIX})\b\.?", 0.6),
    # Rue de Virton 38 / Via dei Fiorentini 17 / Rua João Pessoa 1636
    (rf"(?:\b{_NUM}[ \t]+)?(?<!\w)(?:{_PREFIX})[ \t]+(?:{_WORD}[ \t]+){{0,4}}?{_NUM}\b", 0.6),
    # Friedhofstrasse 33 / Luddingsbo Mekanikusv 11 is not covered; Koskikatu 25 is
    (rf"(?:\b{_NUM}[ \t]+)?\b(?:{_WORD}[ \t]+)?[^\W\d_]*(?:{_COMPOUND})[ \t]+{_NUM}\b", 0.55),
    # 28030 Edeby 55, Apt. 297: a name between numbers is an address when a unit follows
    (
        rf"\b(?:{_NUM}[ \t]+)?(?:(?-i:[^\W\d_a-z])[\w'\u2019-]*[ \t]+){{1,3}}{_NUM}"
        rf"(?=[ \t]*,?[ \t]*\n?[ \t]*(?:apt|apartment|suite|ste|unit|flat)\b)",
        0.55,
    ),
    # 29 Rue de Tanger
    (rf"\b{_NUM}[ \t]+(?:{_PREFIX})[ \t]+(?:{_WORD}[ \t]+){{0,3}}{_WORD}", 0.55),
    # Military addresses
    (r"\bpsc[ \t]+\d{3,5},?[ \t]+box[ \t]+\d{3,5}\s+[afd]po[ \t]+a[aep][ \t]+\d{5}\b", 0.85),
    (r"\bunit[ \t]+\d{3,5},?[ \t]+box[ \t]+\d{3,5}\s+[afd]po[ \t]+a[aep][ \t]+\d{5}\b", 0.85),
    (r"\b(?:uss|usns|usnv|usv)[ \t]+[^\W\d_]+\s+[afd]po[ \t]+a[aep][ \t]+\d{5}\b", 0.85),
)
_ANCHOR_RES = tuple((re.compile(p, re.IGNORECASE), s) for p, s in _ANCHORS)

# A cue, then (optionally "the corner of") a capitalised name and a number.
_CUE = re.compile(
    r"\b(?:address(?:\s+is)?|address\s*:|located\s+at|lives?\s+(?:at|on|in)|living\s+at"
    r"|moved\s+to|ship(?:ped)?\s+(?:it\s+)?to|send\s+(?:it\s+)?to|sent\s+to"
    r"|deliver(?:ed)?\s+(?:it\s+)?to|drops?\s+you\s+off\s+at|is\s+on|it'?s\s+in|corner\s+of)"
    r"[:\s]+(?:the\s+corner\s+of\s+)?",
    re.IGNORECASE,
)
# A word after a cue; a dot ends it only as an abbreviation, not as a sentence's end
# ("... is on the weekend. I'll turn 23" is no address).
_CUED_WORD = r"[^\W\d_][\w'\u2019-]*(?:\.(?![ \t]+[A-Z]))?(?:[\w'\u2019-]+)?"
_CUED = re.compile(
    rf"(?:{_NUM}[ \t]+)?(?:{_CUED_WORD}[ \t]+){{1,4}}?{_NUM}\b"
    rf"|(?:{_NUM}[ \t]+){{1,2}}{_CUED_WORD}(?:[ \t]+{_CUED_WORD}){{0,3}}",
)

# A capitalised word that is not a unit word (those start a unit part instead).
_CAP = (
    r"(?!(?i:apt|apartment|suite|ste|unit|flat|floor|room|box)\b)"
    r"(?:[^\W\d_a-z][\w'\u2019-]{0,2}\.|[^\W\d_a-z][\w'\u2019-]*|\([^\W\d_][\w'\u2019-]*\))"
)
_UNIT_RE = re.compile(rf"[ \t]*,?[ \t]*\n?[ \t]*{_UNIT}\b\.?", re.IGNORECASE)
# One more part of an address after a separator: a unit, a postal code, a state code,
# or up to four capitalised words (optionally with a postal code).
# Small words inside place names ("Soto del Barco", "Črni Vrh nad Idrijo"), only
# between two capitalised words.
_LINK = (
    r"de|du|des|la|le|les|am|an|upon|on|del|della|di|da|do|dos|das|van|von|der|den|nad"
    r"|pod|na|sur|sous|y|i|et|und|en|op|aan|im|bei|ob"
)
_PART = re.compile(
    # a comma; one line break, or two (a blank line), optionally with a list marker;
    # or spaces before a capital, digit or parenthesis
    rf"(?:[ \t]*,[ \t]*\n?|[ \t]*\n(?:[ \t]*\n)?[ \t]*(?:[>\u2022?]+[ \t]*)?|[ \t]+(?=[A-Z\d(]))"
    rf"(?:(?i:{_UNIT})\b\.?"
    r"|\d{4,6}(?:-\d{4})?\b"
    r"|[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?\b"
    rf"|(?:and[ \t]+)?{_CAP}(?:[ \t]+(?:{_CAP}|(?:{_LINK})[ \t]+{_CAP})){{0,4}}"
    r"(?:[ \t]+\d{4,6}(?:-\d{4})?)?\b)",
)
_MAX_PARTS = 4
_CONTEXT = ["address", "street", "live", "lives", "located", "ship", "deliver", "mail", "home"]


def _extend(text: str, end: int) -> int:
    """Extend an address over a unit and a few trailing address parts."""
    unit = _UNIT_RE.match(text, end)
    if unit:
        end = unit.end()
    for _ in range(_MAX_PARTS):
        m = _PART.match(text, end)
        if not m or m.end() <= end:
            break
        part = text[m.start() : m.end()].strip(" \t,\n>\u2022?")
        # An ordinary capitalised sentence start ("It serves ...") is not an address part.
        if part.split(" ", 1)[0] in _STOP_WORDS:
            break
        end = m.end()
    # Never end on trailing separators or a sentence-ending dot of the next sentence.
    while end > 0 and text[end - 1] in " \t\n,":
        end -= 1
    if end > 1 and text[end - 1] == "." and text[end - 2].isdigit():
        end -= 1
    return end


_STOP_WORDS = frozenset(
    {
        *("I", "It", "It's", "The", "A", "An", "This", "That", "He", "She", "We", "They"),
        *("You", "My", "Our", "Your", "His", "Her", "Their", "And", "But", "Or", "Please"),
        *("Thanks", "Thank", "Hi", "Hello", "Dear", "Call", "Phone", "Email", "E-mail"),
        *("Tel", "Fax", "Website", "Cool", "Oh", "So"),
    }
)


def find_addresses(text: str) -> list[Span]:
    """Street addresses in ``text``, longest first where they overlap."""
    found: list[Span] = []
    for pattern, score in _ANCHOR_RES:
        for m in pattern.finditer(text):
            found.append(Span(m.start(), _extend(text, m.end()), score))
    for cue in _CUE.finditer(text):
        cued = _CUED.match(text, cue.end())
        if cued:
            found.append(Span(cued.start(), _extend(text, cued.end()), 0.6))
    found.sort(key=lambda a: (a.start, -(a.end - a.start)))
    merged: list[Span] = []
    for a in found:
        if merged and a.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, a.end), max(last.score, a.score))
        else:
            merged.append(a)
    return merged


def street_address_recognizer(language: str = "en") -> Any:
    """A Presidio recognizer for ``STREET_ADDRESS`` built on :func:`find_addresses`."""
    return span_recognizer(
        ENTITY, "StreetAddressRecognizer", find_addresses, language, context=_CONTEXT
    )
