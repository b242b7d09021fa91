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

- **street types from the ``faker`` package** (its address providers, every locale with
  Latin letters, read when first needed; nothing is copied here): types after the name
  (``0342 Raymond Well``, ``Astrup Allé 7``), types joined to it (``Kyrkostigen 5``,
  ``Jenniferpad 79``; an English word such as "Offering 5" is no street) and types
  before it (``Incrocio Fernanda, 11``, ``16, boulevard Gauthier``, ``Jl. Cihampelas No.
  2``). Types that are also everyday words ("Gate", "Part", "Lakes") are left out where
  they would match ordinary text;
- **shapes with no street type**: ``P.O. Box 104``; a unit first (``Suite 913 0547
  Bygget 91``); an address block's first line, a name between numbers followed by a
  place (``30102 Kaevu 94\nNicosia``) or a name and a number followed by a postal code
  and a place (``Budějovická 11\n649 74 Zruč nad Sázavou``); ``on Marina Fort Street``;
  the other street of ``the corner of A and B``.

A number beside ordinary words is not an address: "2 people on the street" and "3 miles
up the hill" do not anchor, since function words, units of time and distance never
stand between a house number and its street type, and a street type straight after a
number ("12 Street Fighter", "Chapter 11 Drive") needs a name before the number with a
word that is no English word ("Nieuwe Baan 473 St."). A numbered street's ordinal is a
word of its name (``350 5th Ave``), and a unit written first (``Apt 4B, 350 Fifth
Avenue``) starts the address.

From an anchor the match extends over a secondary unit (``Apt. 864``, ``Suite 510``),
and then over at most four short comma- or line-separated parts that look like the
rest of an address (capitalised or upper-case place names, a postal code of one of
several countries' shapes, a state code), stopping at a sentence end or a lower-case
word, and before a phone number under the address (a "postal code" followed by more
digits is one). It is a heuristic: its
precision and recall on the Presidio synthetic data set are in the README (Personal data, Measured).

Presidio is imported lazily by :func:`street_address_recognizer`, so importing this
module costs nothing.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from typing import Any

from guardrail.filters.span_recognizer import Span, span_recognizer

ENTITY = "STREET_ADDRESS"

# Street types that follow the name ("Clarke Avenue"); abbreviations may take a dot.
# These are street words in any case ("3747 fourth avenue").
_SUFFIX = (
    r"street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|terrace|ter"
    r"|parkway|pkwy|highway|hwy|crescent|cres|plaza|pike|mews|esplanade|promenade"
    r"|broadway|expressway|freeway|str"
)
# Street types that are also ordinary nouns ("2 dogs in the park"): capitalised only,
# after capitalised words ("24 Gordon Park", "83 Dora Creek").
_COMMON_SUFFIX = (
    r"Av|Place|Pl|Square|Sq|Way|Circle|Cir|Trail|Trl|Close|Row|Alley|Route|Rte|Path|Walk"
    r"|Gardens?|Grove|Park|Hills?|Heights|Estate|Quay|Wharf|Loop|Ridge|View|Vale|Green"
    r"|Point|Crossing|Union|Prairie|Junction|Creek|Coves?|Dale|Mall|Cliffs?|Falls|Harbou?r"
    r"|Landing|Meadows?|Mills?|Pines|Ranch|Shores?|Springs?|Summit|Valley|Glen|Knolls?"
    r"|Manor|Oval|Spur|Bypass|Causeway|Trace|Vista"
)
# Words that never stand between a house number and its street type: "2 people on the
# street", "3 miles up the hill" are no addresses.
_NOT_STREET_WORD = (
    r"(?!(?:the|a|an|of|in|on|at|to|my|your|his|her|our|their|its|and|or|for|with|from"
    r"|by|into|up|down|over|per|each|every|more|less|than|times|years?|months?|weeks?"
    r"|days?|hours?|minutes?|miles?|people|persons?|today|tomorrow|tonight|yesterday|now"
    r"|soon|please|then|thanks|asap|about|around|near|after|before)\b)"
)
# Street types that come first ("Rue de Virton 38", "Via Roma 131").
_PREFIX = (
    r"rue|via|viale|vicolo|corso|piazza|piazzale|largo|rua|travessa|calle|carrer|avenida"
    r"|avinguda|paseo|passeig|camino|chemin|impasse|allée|allee|boulevard|avenue|place"
    r"|quai|strada|ulica|ul\.|aleja|al\.|pl\.|plac|os\.|ulice|utca|odos|leoforos|λεωφόρος|οδός|οδος"
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
# The same as a test at the end of a word, so a word is read once, not once per letter.
_COMPOUND_END = "(?:{})".format(
    "|".join(
        rf"(?<={w[:-2]})\." if w.endswith(r"\.") else f"(?<={w})" for w in _COMPOUND.split("|")
    )
)
# Every word that could end a compound street name, with its number after it: the
# compound anchor runs only if one does.
_COMPOUND_ENDINGS = tuple(w.replace("\\.", ".") for w in _COMPOUND.split("|"))
_WORD_BEFORE_NUMBER = re.compile(r"(?<![^\W\d_])([^\W\d_]++\.?)[ \t]+\d")
_UNIT = (
    r"(?:apt\.?|apartment|suite|ste\.?|unit|flat|floor|fl\.?|room|rm\.?|box|no\.?)\s*#?\s*\d+[a-z]?"
)
_NUM = r"\d{1,6}[a-z]?(?:[-/]\d{1,4}[a-z]?|-[a-z]\b)?"
# Words start where no word character is before them and never give letters back: on
# a long hyphenated run ("Anna-Maria-Anna-...") a match is tried once per word, not once
# per capital inside it (quadratic: 50,000 characters took 34 s).
_WORD = r"(?<![\w'\u2019.-])[^\W\d_][\w'\u2019.-]*+"

_CAP_WORD = r"(?<![\w'\u2019.-])(?-i:[^\W\d_a-z])[\w'\u2019.-]*+"
# A numbered street's name: "350 5th Ave", "2 E 73rd St" (no word starts with a digit).
_ORDINAL = r"\d{1,4}(?:st|nd|rd|th)\b"
_UNIT_FIRST = r"(?:apt|apartment|suite|ste|unit|flat)\.?[ \t]*#?[ \t]*\d+[a-z]?"

_ANCHORS: tuple[tuple[str, float], ...] = (
    # 24 Clarke Avenue / 675 224 Forrest Hill Road / 363 52 Huntly Street / 10 W 5th St.
    # At least one word names the street: a type straight after a number is something
    # else ("12 Street Fighter", "Chapter 11 Drive", "4 St. John's wort"), but Broadway.
    (
        rf"\b{_NUM}(?:[ \t]+{_NUM})?[ \t]+(?:(?:{_NOT_STREET_WORD}(?:{_WORD}|{_ORDINAL})"
        rf"[ \t]+){{1,4}}?(?:{_SUFFIX})|broadway)\b\.?",
        0.6,
    ),
    # 24 Gordon Park / 903 83 Dora Creek: a common noun is a street type after capitals
    (
        rf"\b{_NUM}(?:[ \t]+{_NUM})?[ \t]+(?:{_CAP_WORD}[ \t]+){{1,4}}?"
        rf"(?-i:{_COMMON_SUFFIX})\b\.?",
        0.6,
    ),
    # Rue de Virton 38 / Via dei Fiorentini 17 / 770 26 rue des Lilas 4
    (rf"(?:\b{_NUM}[ \t]+){{0,2}}(?<!\w)(?:{_PREFIX})[ \t]+(?:{_WORD}[ \t]+){{0,4}}?{_NUM}\b", 0.6),
    # Trenerys gate 232 / Kongens vei 5: a Scandinavian street word on its own, lower case
    (
        rf"(?:\b{_NUM}[ \t]+)?\b{_CAP_WORD}[ \t]+(?-i:gate|gata|vei|vej|gade|väg|vägen|tie)"
        rf"[ \t]+{_NUM}\b",
        0.55,
    ),
    # Apt. 675 62314 Mellemvej 32 / Suite 913 0547 Bygget 91: a unit first, then the street
    (
        rf"\b{_UNIT_FIRST}[ \t,]+{_NUM}[ \t]+(?:{_CAP_WORD}[ \t]+){{1,3}}{_NUM}\b",
        0.55,
    ),
    # P.O. Box 104 / PO Box 77
    (r"\bp\.?[ \t]?o\.?[ \t]+box[ \t]+\d{1,6}\b", 0.6),
    # (on) Marina Fort Street: capitalised words and a capitalised street type, no number
    (
        rf"(?<=\bon |\bat )(?:{_CAP_WORD}[ \t]+){{1,3}}"
        r"(?-i:Street|Avenue|Road|Boulevard|Lane|Drive|Terrace)\b",
        0.5,
    ),
    # 28030 Edeby 55, Apt. 297: a name between numbers is an address when a unit follows
    (
        rf"\b(?:{_NUM}[ \t]+)?(?:(?<![\w'\u2019-])(?-i:[^\W\d_a-z])[\w'\u2019-]*+[ \t]+){{1,3}}"
        rf"{_NUM}"
        rf"(?=[ \t]*,?[ \t]*\n?[ \t]*(?:apt|apartment|suite|ste|unit|flat)\b)",
        0.55,
    ),
    # 29 Rue de Tanger / 770 26 rue des Lilas
    (rf"\b(?:{_NUM}[ \t]+){{1,2}}(?:{_PREFIX})[ \t]+(?:{_WORD}[ \t]+){{0,3}}{_WORD}", 0.55),
    # Military addresses
    (r"\bpsc[ \t]+\d{3,5},?[ \t]+box[ \t]+\d{3,5}\s+[afd]po[ \t]+a[aep][ \t]+\d{5}\b", 0.85),
    (r"\bunit[ \t]+\d{3,5},?[ \t]+box[ \t]+\d{3,5}\s+[afd]po[ \t]+a[aep][ \t]+\d{5}\b", 0.85),
    (r"\b(?:uss|usns|usnv|usv|uscgc)[ \t]+[^\W\d_]+\s+[afd]po[ \t]+a[aep][ \t]+\d{5}\b", 0.85),
)
# Postal codes: 12345, 12345-6789, 5819 JR (Netherlands), 72-880 (Poland), 182 46
# (Czechia, Slovakia), 1613-186 and 99528-907 (Portugal, Brazil), H-7613 (Hungary),
# E9A 7XS (United Kingdom), B5M 7T6 (Canada), T14 HV9N (Ireland).
_POSTAL = (
    r"(?:\d{5}-\d{4}|\d{4,5}-\d{3}|\d{4,6}|\d{4}[ \t]?[A-Z]{2}|\d{2}-\d{3}|\d{3}[ \t]\d{2}"
    r"|[A-Z]-\d{4,5}"
    r"|[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}|[A-Z]\d[A-Z][ \t]?\d[A-Z]\d"
    r"|[A-Z]\d[\dW][ \t]?[A-Z\d]{4})\b"
    # more digits after it: a phone number ("0141 496 0992"), not a postal code
    r"(?![ \t]*[-./]?[ \t]*\d)"
)
# A line of its own in an address block: a house number, a name and a number, with the
# next line a place or a unit ("30102 Kaevu 94\nNicosia", "4923 Parmova 109\n Suite 380").
_NUMBERED_LINE = re.compile(
    r"(?m)(?:^[ \t>\u2022?]*|(?<=\bto )|(?<=\bis )|(?<=\bat )|(?<=: ))"
    rf"(?P<line>{_NUM}(?:[ \t]+{_NUM})?[ \t]+(?:{_CAP_WORD}[ \t]+){{1,3}}"
    rf"{_NUM})[ \t]*,?[ \t]*\n[ \t>\u2022?]*(?=(?-i:[^\W\d_a-z])|(?:{_UNIT_FIRST}))",
    re.IGNORECASE,
)
# The first lines of an address block with no street type: a name and a house number,
# then a postal code and a place on the next line ("Podlešínská 460\n182 46 Němčice").
_BLOCK_LINE = re.compile(
    rf"(?m)^[ \t>\u2022?]*(?P<line>(?:{_CAP_WORD}[ \t]+){{1,3}}{_NUM}\.?)[ \t]*,?[ \t]*\n"
    rf"[ \t>\u2022?]*(?={_POSTAL}[ \t]+(?-i:[^\W\d_a-z]))",
    re.IGNORECASE,
)
# The other street of a corner: "the corner of Nieuwe Baan 473 St. and Inna Loop St."
_CORNER_AND = re.compile(
    rf"(?:[ \t]+(?:{_SUFFIX})\b\.?)?[ \t]+and[ \t]+"
    rf"(?P<street>(?:{_NUM}[ \t]+)?(?:{_CAP_WORD}[ \t]+){{0,3}}"
    rf"(?:{_CAP_WORD}[ \t]+(?:{_SUFFIX})\b\.?|{_CAP_WORD}[ \t]+{_NUM}\b"
    rf"|(?-i:{_COMMON_SUFFIX})\b))",
    re.IGNORECASE,
)
_ANCHOR_RES = tuple((re.compile(p, re.IGNORECASE), s) for p, s in _ANCHORS)
# A street type straight after a number, with the name before it ("Nieuwe Baan 473 St.",
# "Via Tasso 129 street"): an address only where a word of that name is no English word
# ("See Chapter 11 Drive" is none).
_NAME_NUMBER_TYPE = re.compile(
    rf"(?<![\w'\u2019.-])(?P<name>(?:(?-i:[^\W\d_a-z])[\w'\u2019-]*+[ \t]+){{0,2}}"
    rf"(?-i:[^\W\d_a-z])[\w'\u2019-]*+)[ \t]+{_NUM}[ \t]+(?:{_SUFFIX})\b\.?",
    re.IGNORECASE,
)
# Friedhofstrasse 33 / Koskikatu 25 (Luddingsbo Mekanikusv 11 is not covered). Slow (it
# tries each street word at each word): run only when a word before a number ends in one.
_COMPOUND_ANCHOR = (
    re.compile(
        rf"(?:\b{_NUM}[ \t]+)?\b(?:{_NOT_STREET_WORD}[^\W\d_][\w'\u2019.-]*+[ \t]+)?"
        rf"[^\W\d_]++{_COMPOUND_END}[ \t]+{_NUM}\b",
        re.IGNORECASE,
    ),
    0.55,
)

# A cue, then (optionally "the corner of") a capitalised name and a number.
_CUE = re.compile(
    r"\b(?:address(?:\s+is)?|address\s*:|located\s+at|lives?\s+(?:at|on|in)|living\s+at"
    r"|moved\s+to|ship(?:ped)?\s+(?:it\s+)?to|send\s+(?:it\s+)?to|sent\s+to"
    r"|deliver(?:ed)?\s+(?:it\s+)?to|drops?\s+you\s+off\s+at|is\s+on|it'?s\s+in|corner\s+of)"
    r"[:\s]+(?:(?:with|to|at|in|on|is)\s+)?(?:the\s+corner\s+of\s+)?",
    re.IGNORECASE,
)
# A word after a cue; a dot ends it only as an abbreviation, not as a sentence's end
# ("... is on the weekend. I'll turn 23" is no address).
_CUED_WORD = r"[^\W\d_][\w'\u2019-]*(?:\.(?![ \t]+[A-Z]))?(?:[\w'\u2019-]+)?"
_CUED = re.compile(
    rf"(?:{_NUM}[ \t]+)?(?:{_NOT_STREET_WORD}{_CUED_WORD}[ \t]+){{1,4}}?{_NUM}\b"
    rf"|(?:{_NUM}[ \t]+){{1,2}}{_CUED_WORD}(?:[ \t]+{_NOT_STREET_WORD}{_CUED_WORD}){{0,3}}",
)

# A capitalised word that is not a unit word (those start a unit part instead).
_CAP = (
    r"(?!(?i:apt|apartment|suite|ste|unit|flat|floor|room|box)\b)"
    # no digits: "E9A" of "London E9A 7XS" starts a postcode, not a place name
    r"(?:[^\W\d_a-z][^\W\d'\u2019-]{0,2}\.|[^\W\d_a-z](?:[^\W\d]|['\u2019-])*"
    r"|\([^\W\d_][\w'\u2019-]*\))"
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
    rf"|{_POSTAL}"
    r"|[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?\b"
    rf"|(?:and[ \t]+)?{_CAP}(?:[ \t]+(?:{_CAP}|(?:{_LINK})[ \t]+{_CAP})){{0,4}}"
    r"(?:[ \t]+\d{4,6}(?:-\d{4})?\b(?![ \t]*[-./]?[ \t]*\d))?\b)",
)
_MAX_PARTS = 4
_CONTEXT = ["address", "street", "live", "lives", "located", "ship", "deliver", "mail", "home"]


def _extend(text: str, end: int) -> int:
    """Extend an address over a unit and a few trailing address parts."""
    if _ends_sentence(text, end):
        return end - 1
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
    if (end > 1 and text[end - 1] == "." and text[end - 2].isdigit()) or _ends_sentence(text, end):
        end -= 1
    return end


def _ends_sentence(text: str, end: int) -> bool:
    """``text[:end]`` ends in a full stop after a whole word: "Downing Street." ends a
    sentence, so nothing after it is part of the address; "St." is an abbreviation."""
    if end < 2 or text[end - 1] != ".":
        return False
    word = re.search(r"[^\W\d_]+\.\Z", text[max(0, end - 40) : end])
    return word is not None and len(word.group()) > 5


_STOP_WORDS = frozenset(
    {
        *("I", "It", "It's", "The", "A", "An", "This", "That", "He", "She", "We", "They"),
        *("You", "My", "Our", "Your", "His", "Her", "Their", "And", "But", "Or", "Please"),
        *("Thanks", "Thank", "Hi", "Hello", "Dear", "Call", "Phone", "Email", "E-mail"),
        *("Tel", "Fax", "Website", "Cool", "Oh", "So"),
    }
)


# -- street types from Faker's address providers --------------------------------------

# Street types in Faker's lists that are also everyday words. After a house number and
# capitals ("10 Great Lakes") only the first group is left out; after a name and before
# a number ("Boarding Gate 5", "Part 3") the second too.
_NEVER_TYPES_WORDS = (
    "points a b c a. c. part level top end round run rest turn follow break little upper"
    " lower line link flat flats block steps stairs back front ies ny stor gen"
)
_NEVER_TYPES = frozenset(_NEVER_TYPES_WORDS.split(" "))
_COMMON_TYPES_WORDS = (
    "bis brace club common davis deviation divide edge faraday formation gate gates"
    " ground hospital land light lights loaf lock locks magazine maxwell mission"
    " pocket range reach sound station stations strip subway towers trailer triangle"
    " vermont wesley gang key keys lake lakes mount fall falls field fields spring"
)
_COMMON_TYPES = _NEVER_TYPES | frozenset(_COMMON_TYPES_WORDS.split(" "))
_LISTED_SCORE = 0.55
_GLUED_WORD = re.compile(
    rf"(?<![\w'\u2019-])((?-i:[^\W\d_a-z])[\w'\u2019-]{{2,}}+)[ \t]+{_NUM}\b", re.IGNORECASE
)
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f\u1e00-\u1eff][A-Za-z\u00c0-\u024f\u1e00-\u1eff.'-]*")


@functools.cache
def _faker_street_words() -> tuple[frozenset[str], tuple[str, ...], frozenset[str]]:
    """Street types of Faker's address providers (every locale with Latin letters).

    (types written after the name, "Parks"; endings of one word, "-stigen", "-pad";
    types written before the name, "Calle", "Jl."). A locale's street-name formats say
    where its types go: "{{last_name}} {{street_suffix}}", "{{last_name}}{{street_suffix}}"
    or "{{street_suffix}} {{first_name}}". Empty without ``faker``.
    """
    try:
        from faker.providers import address
    except ImportError:
        return frozenset(), (), frozenset()
    after: set[str] = set()
    endings: set[str] = set()
    before: set[str] = set()
    for module in pkgutil.iter_modules(address.__path__):
        provider = importlib.import_module(f"{address.__name__}.{module.name}").Provider
        formats = [str(f) for f in getattr(provider, "street_name_formats", ()) or ()]
        places: dict[str, set[str]] = {"street_suffix": set(), "street_prefix": set()}
        for kind, found in places.items():
            for f in formats:
                at = f.find("{{" + kind)
                if at < 0:
                    continue
                end = f.find("}}", at) + 2
                if at == 0 and f[end : end + 1] == " ":
                    found.add("before")
                elif f[at - 3 : at] == "}} " or f[at - 1 : at] == " ":
                    found.add("after")
                elif f[at - 2 : at] == "}}":
                    found.add("joined")
        for attribute in dir(provider):
            kind = (
                "street_suffix"
                if attribute.startswith("street_suffixes")
                else "street_prefix"
                if attribute.startswith("street_prefixes")
                else ""
            )
            values = getattr(provider, attribute, None) if kind else None
            if not isinstance(values, (list, tuple, dict)):
                continue
            where = places[kind] or ({"after"} if kind == "street_suffix" else {"before"})
            for value in values:
                word = value.strip() if isinstance(value, str) else ""
                if not _LATIN.fullmatch(word) or word.lower() in _NEVER_TYPES:
                    continue
                if len(word) < 3 and not word.endswith("."):
                    continue
                if "joined" in where and word.isalpha():
                    endings.add(word.lower())
                if "after" in where:
                    after.add(word)
                if "before" in where:
                    before.add(word)
    return (
        frozenset(after),
        tuple(sorted(endings, key=len, reverse=True)),
        frozenset(before),
    )


def _alternation(words: set[str] | frozenset[str]) -> str:
    """The words as written and capitalised, longest first, for a regex."""
    forms = set(words) | {w[:1].upper() + w[1:] for w in words}
    return "|".join(re.escape(w) for w in sorted(forms, key=len, reverse=True))


@functools.cache
def _listed_anchors() -> tuple[tuple[re.Pattern[str], float], ...]:
    after, _, before = _faker_street_words()
    anchors = []
    if after:
        types = _alternation(after)
        strict = _alternation({w for w in after if w.lower() not in _COMMON_TYPES})
        anchors += [
            # 0342 Raymond Well / 432/3 Autumn Ramble / 30/16, Boase Marg
            rf"(?<![\w-]){_NUM},?[ \t]+(?:{_NUM}[ \t]+)?{_NOT_STREET_WORD}"
            rf"(?:{_CAP_WORD}[ \t]+){{1,4}}?(?-i:{types})"
            r"(?!\w)\.?",
            # Astrup Allé 7 / Lajoshídi tér 20 / Šilobodov put 189: a name, a type, a number
            rf"\b{_CAP_WORD}[ \t]+(?:{_CAP_WORD}[ \t]+|[a-z\u00df-\u024f]+[ \t]+)?"
            rf"(?P<type>(?-i:{strict}))[ \t]+{_NUM}\b\.?",
        ]
    if before:
        types = _alternation(before)
        name = rf"(?:(?:{_LINK})[ \t]+)?{_CAP_WORD}"
        anchors += [
            # Calle Mayor 5 / Jl. Cihampelas No. 2 / Incrocio Fernanda, 11
            rf"(?<!\w)(?-i:{types})[ \t]+{name}(?:[ \t]+{name}){{0,3}}[ \t]*,?[ \t]+"
            rf"(?:no\.?[ \t]*|nr\.?[ \t]*)?{_NUM}\b",
            # 16, boulevard Gauthier / 59010 montée Gilles
            rf"\b{_NUM}[ \t]*,?[ \t]*(?-i:{types})[ \t]+{name}(?:[ \t]+{name}){{0,3}}",
        ]
    return tuple((re.compile(a, re.IGNORECASE), _LISTED_SCORE) for a in anchors)


def _glued_streets(text: str, lexicon: frozenset[str]) -> list[tuple[int, int]]:
    """One word ending in a joined street type, then a number: "Kyrkostigen 5"."""
    _, endings, _ = _faker_street_words()
    if not endings:
        return []
    found = []
    for m in _GLUED_WORD.finditer(text):
        if m.group(1).isupper():  # "ÖVERTURINGEN 840": a place in capitals, not a street
            continue
        word = m.group(1).lower()
        for ending in endings:
            if word.endswith(ending):
                # "Offering 5", "During 2017": an English word is no street name
                if len(word) >= len(ending) + 3 and word not in lexicon:
                    found.append((m.start(), m.end()))
                break
    return found


def find_addresses(text: str, lexicon: frozenset[str] = frozenset()) -> list[Span]:
    """Street addresses in ``text``, longest first where they overlap.

    ``lexicon``: English words (lower case), which are never a street name of one word.
    """
    found: list[Span] = []
    anchors = (*_ANCHOR_RES, *_listed_anchors())
    if any(
        m.group(1).lower().endswith(_COMPOUND_ENDINGS) for m in _WORD_BEFORE_NUMBER.finditer(text)
    ):
        anchors = (*anchors, _COMPOUND_ANCHOR)
    for pattern, score in anchors:
        for m in pattern.finditer(text):
            kind = m.groupdict().get("type")
            # "Silent Hill 2", "Access Point 2": an English word before a number is no
            # street type (English addresses put the number first: "24 Gordon Park").
            if kind and kind[:1].isupper() and kind.lower() in lexicon:
                continue
            found.append(Span(m.start(), _extend(text, m.end()), score))
    for m in _NAME_NUMBER_TYPE.finditer(text):
        words = m.group("name").split()
        if words[0] not in _STOP_WORDS and any(w.lower() not in lexicon for w in words):
            found.append(Span(m.start(), _extend(text, m.end()), 0.55))
    for start, end in _glued_streets(text, lexicon):
        found.append(Span(start, _extend(text, end), _LISTED_SCORE))
    for line in (_NUMBERED_LINE, _BLOCK_LINE):
        for m in line.finditer(text):
            found.append(Span(m.start("line"), _extend(text, m.end("line")), 0.55))
    for cue in _CUE.finditer(text):
        cued = _CUED.match(text, cue.end())
        if cued:
            found.append(Span(cued.start(), _extend(text, cued.end()), 0.6))
    merged = [_with_unit_before(text, a) for a in _merge(found)]
    # "the corner of A and B": B is an address too, even without a number.
    for a in list(merged):
        if re.search(r"corner\s+of\s+\Z", text[max(0, a.start - 40) : a.start], re.IGNORECASE):
            other = _CORNER_AND.match(text, a.end)
            if other:
                merged.append(Span(other.start("street"), other.end(), a.score))
    return _merge(merged)


# A unit written before the street line ("Apt 4B, 350 Fifth Avenue"), whose number alone
# had started the span: "Apt <ADDRESS>" kept the unit word out of it.
_UNIT_BEFORE = re.compile(
    r"(?<![\w.])(?:apt|apartment|suite|ste|unit|flat)\.?[ \t]*#?[ \t]*"
    r"(?:\d+[a-z]?[ \t]*,?[ \t]*)?\Z",
    re.IGNORECASE,
)


def _with_unit_before(text: str, span: Span) -> Span:
    unit = _UNIT_BEFORE.search(text, max(0, span.start - 40), span.start)
    return Span(unit.start(), span.end, span.score) if unit else span


def _merge(found: list[Span]) -> list[Span]:
    """Overlapping spans joined, in text order."""
    found = sorted(found, key=lambda a: (a.start, -(a.end - a.start)))
    merged: list[Span] = []
    for a in found:
        if merged and a.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, a.end), max(last.score, a.score))
        else:
            merged.append(a)
    return merged


def street_address_recognizer(language: str = "en", lexicon: frozenset[str] = frozenset()) -> Any:
    """A Presidio recognizer for ``STREET_ADDRESS`` built on :func:`find_addresses`."""
    _listed_anchors()  # read Faker's street types now, not on the first request
    return span_recognizer(
        ENTITY,
        "StreetAddressRecognizer",
        functools.partial(find_addresses, lexicon=lexicon),
        language,
        context=_CONTEXT,
    )
