"""Presidio recognizers for personal data made of digits: phone and card numbers.

**Phone numbers.** Presidio's ``PhoneRecognizer`` runs phonenumbers' matcher over the
whole text once per region (eight by default: 3.2 ms per 110-word text on this
project's machine) and finds only numbers valid in those regions, so local formats of
other countries (``699 956 915``, ``(99) 645-791``) and short numbers (``467 3395``) are
missed. This one makes one pass with a regular expression for candidates (digit groups
with spaces, dots, dashes or parentheses, a leading ``+`` or ``00``, an extension; 7 to
15 digits, in as many as 15 groups: ``2 1 2 5 5 5 0 1 2 3``) and then scores each:

- a phone word just before it (``phone``, ``mobile``, ``fax``, ``call``, ``reach me
  at``...) or just after it (``... office``, ``... mobile``): 0.5;
- otherwise, valid for its own country code or in one of Presidio's eight default
  regions, unless it is shaped like an amount (``129 000 000``), an SSN or a ZIP+4
  code, is a bare run of fewer than 10 digits, or follows the name of another
  identifier (``license number``, ``order``, ``account``, ``epoch``), and, for a bare
  run or a dotted number only, unless it holds a compact date (``20240115``), is a
  dotted version (``550.54.15``, ``5.15.0``: a last group of one or two digits, or a
  middle one of one or two before a last of at most three), follows a version word
  (``driver``, ``build``, ``kernel``, ``version``) or has a technical unit after it
  (``nanoseconds``, ``ms``, ``bytes``, ``(unix time)``): 0.5. Dashed, spaced,
  parenthesised and international numbers, and dotted ones laid out as a phone
  (``212.555.0187``), are never taken for versions or times, and the words people
  write beside a phone number (``days``, ``hours``, ``mins``, ``(UTC-5)``) are not units;
- otherwise, written in international form (``+447700 921 916``): 0.45;
- anything else is not reported: bare digit groups are as often amounts, ids or codes.

Anything holding a date, dotted IP addresses and numbers glued to letters are never candidates.

**Card numbers.** Presidio's ``CreditCardRecognizer`` knows the common issuers' lengths
and prefixes; cards of 12 to 19 digits outside them (Maestro, 19-digit Visa, JCB 15)
are missed. This one adds any 12-19 digit number that passes the Luhn check *and* has
a card word before it (``card``, ``card no``, ``credit card number is``): 0.6. Without
the word, one random number in ten passes Luhn, which is not evidence enough. Digits may
be grouped by spaces, dashes or dots. A number that passes Luhn dotted in a card's own
groups (``4111.1111.1111.1111``, Amex's ``3782.822463.10005``) needs no word, as
Presidio's recognizer needs none for the spaced and dashed forms it knows (it knows no
dotted one); no version, IP address, date or timestamp is written in those groups.

Presidio is imported lazily by the factory functions, so importing this module costs
nothing.
"""

from __future__ import annotations

import re
from typing import Any

from guardrail.filters.span_recognizer import Span, span_recognizer

PHONE = "PHONE_NUMBER"
CARD = "CREDIT_CARD"

# Regions whose national formats validate a number that has no country code.
# Presidio's default set.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")

_SEP = r"[ \t.\-\u00a0]"
# Up to 15 groups, as many as a phone number has digits ("2 1 2 5 5 5 0 1 2 3"); the
# digit count is checked afterwards. A digit run is possessive (\d++): one that could
# end anywhere would have a long run of digits backtrack through all its splits.
_CANDIDATE = re.compile(
    r"(?<![\w+/.-])"  # not inside a word, a path, a decimal or another number
    r"(?:\+|00)?"
    r"(?:\(\d{1,5}\)|\d++)"
    rf"(?:{_SEP}?(?:\(0?\d{{1,5}}\)|\d++)){{0,14}}"
    r"(?:[ \t]?(?:x|ext\.?|#)[ \t]?\d{1,5})?"
    r"(?![\w@]|[.,]\d)"
)
_EXTENSION = re.compile(r"[ \t]?(?:x|ext\.?|#)[ \t]?\d{1,5}$")
_DATE = re.compile(
    r"\b(\d{4})[-./](\d{1,2})[-./](\d{1,2})\b|\b(\d{1,2})[-./](\d{1,2})[-./](\d{2,4})\b"
)
_DOTTED_QUAD = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
# Shapes that pass a region's validation but are more often something else: amounts
# with thousands separators, SSNs, ZIP+4 codes. They count as phones only with a cue.
_OTHER_SHAPE = re.compile(r"^(?:\d{1,3}(?:[ .\u00a0]\d{3})+|\d{3}-\d{2}-\d{4}|\d{5}-\d{4})$")
_PHONE_BEFORE = re.compile(
    r"(?:phone|tel|telephone|mobile|cell|cellphone|fax|call|calling|text|sms|whatsapp"
    r"|desk|office|landline|contact|reach|dial|ring|hotline|answering|extension|messages?)"
    r"(?:\s+(?:me|us|him|her|them|number|no\.?|on|at|to|is|was|:|#))*[\s:#.=-]*$",
    re.IGNORECASE,
)
_PHONE_AFTER = re.compile(
    r"^[\s(,-]{0,3}(?:office|fax|mobile|cell|home|work|desk|tel|phone)\b", re.IGNORECASE
)
# Words that say a number is some other identifier ("driver's license number is 6940579").
_OTHER_BEFORE = re.compile(
    r"(?:licen[cs]e|passport|account|acct|ssn|social security|card|id|order|invoice|zip"
    r"|postal|postcode|iban|routing|member|membership|policy|ticket|tracking|reference|ref"
    r"|serial|isbn|pin|code|epoch|timestamp|unix time)"
    r"(?:\s+(?:number|no\.?|num|#|is|was|:))*[\s:#.=-]*$",
    re.IGNORECASE,
)
# Software versions, build ids and timestamps that phonenumbers accepts in some region:
# "driver 550.54.15", "Build 20240115.3", "Kernel 5.15.0-1051-azure", "1700000000
# (unix time)" and "2125550187 nanoseconds" were all redacted as phone numbers. Each
# needs a phone word. A version word only counts before a dotted number or a bare run:
# "the driver 555-123-4567" may be the driver's phone.
_VERSION_BEFORE = re.compile(
    r"\b(?:version|ver|v|driver|build|kernel|release|firmware|revision|rev)[\s:#.=-]*$",
    re.IGNORECASE,
)
# A dotted triple with a last group of one or two digits ("535.104.05"), or a middle
# group of one or two and a last of at most three ("5.15.0"). Dotted phone numbers end in
# groups of three or four ("212.555.0123", "03.123.4567"), and national ones with a
# two-digit middle group end in a long one ("0212.55.5018", "030.12.345678").
_VERSION_SHAPE = re.compile(r"^\d+\.(?:\d{1,2}\.\d{1,3}|\d+\.\d{1,2})$")
# A dotted number laid out as a phone number: a group of three, then one of four.
_DOTTED_PHONE = re.compile(r"^\d{2,4}\.\d{3}\.\d{4}$")
# A year-month-day date written without separators, 1900-2099, as a whole digit group.
_COMPACT_DATE = re.compile(r"(?<!\d)(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)")
# Technical units of time and data after a number. Not the words people write next to a
# phone number ("212-555-0187 days", "(UTC-5)", "24 hours", "mins ago"), nor "us" or
# "GB", which after a phone number are its country.
_UNIT_AFTER = re.compile(
    r"^[ \t]*\(?[ \t]*(?:(?:nano|micro|milli)seconds?|[n\u00b5\u03bc]s|ms"
    r"|(?:kilo|mega|giga|tera)?bytes?|[kmgt]ib|bits?|ticks?|cycles?|unix|epoch)\b",
    re.IGNORECASE,
)
_CARD_BEFORE = re.compile(
    r"\bcard(?:\s+(?:no\.?|number|num|#|ending|is|:))*[\s:#.=-]*(?:is\s+)?$", re.IGNORECASE
)
_CARD_CANDIDATE = re.compile(r"(?<![\w.-])\d(?:[ .-]?\d){11,18}(?![\w-]|[.,]\d)")
# A card number grouped as printed on cards (4.4.4.4, up to three digits more for a
# 19-digit card; Amex's 4.6.5, Diners' 4.6.4), dots its only separator. Presidio's
# pattern takes spaces and dashes only: "4111.1111.1111.1111" went to the model as
# written. Versions, IP addresses, dates and timestamps have no such groups.
_DOTTED_CARD = re.compile(r"\d{4}(?:\.\d{4}){3}(?:\.\d{1,3})?|\d{4}\.\d{6}\.\d{4,5}")
# ... and starting as the networks' numbers do (Visa 4, Mastercard 2 and 5, Amex, Diners
# and JCB 3, Discover, UnionPay and Maestro 6): one dotted serial in ten passes Luhn,
# and one that starts 0, 1, 7, 8 or 9 is no card a customer holds.
_CARD_START = re.compile(r"[2-6]")
_LOOK_BEFORE = 40
_LOOK_AFTER = 16


def _holds_date(body: str) -> bool:
    """Whether a year-month-day or day-month-year (either order) date is in ``body``."""
    for m in _DATE.finditer(body):
        if m.group(1):
            month, day = int(m.group(2)), int(m.group(3))
            if 1 <= month <= 12 and 1 <= day <= 31:
                return True
        else:
            a, b = int(m.group(4)), int(m.group(5))
            if 1 <= min(a, b) <= 12 and max(a, b) <= 31:
                return True
    return False


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _valid_phone(body: str) -> bool:
    """Whether phonenumbers accepts a number (no extension): by its country code, or in
    one of the regions."""
    import phonenumbers  # presidio-analyzer's dependency; imported on first use

    if body.startswith("00"):
        body = "+" + body[2:]
    regions: tuple[str | None, ...] = (None,) if body.startswith("+") else PHONE_REGIONS
    for region in regions:
        try:
            number = phonenumbers.parse(body, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


def _version_or_time(body: str, before: str, after: str) -> bool:
    """Whether a number between ``before`` and ``after`` reads as a version, a build id,
    a compact date or a quantity of time or data rather than a phone number.

    Only a bare digit run or a dotted number can be one: groups split by dashes or spaces
    (``212-555-0187``), a parenthesised area code, the international form and a dotted
    number laid out as a phone (``212.555.0187``) are a phone's shapes, whatever word is
    next to them."""
    if body.startswith(("+", "00")) or "(" in body:
        return False
    if not body.isdigit() and ("." not in body or _DOTTED_PHONE.match(body)):
        return False
    return bool(
        _VERSION_SHAPE.match(body)
        or _COMPACT_DATE.search(body)
        or _VERSION_BEFORE.search(before)
        or _UNIT_AFTER.match(after)
    )


def find_phone_numbers(text: str) -> list[Span]:
    """Phone numbers in ``text`` with their scores (see the module's docstring)."""
    found = []
    for m in _CANDIDATE.finditer(text):
        candidate = m.group().rstrip(" \t.-")
        body = _EXTENSION.sub("", candidate)
        if not 7 <= len(_digits(body)) <= 15:
            continue
        if _holds_date(body) or _DOTTED_QUAD.match(body):
            continue
        start, end = m.start(), m.start() + len(candidate)
        before = text[max(0, start - _LOOK_BEFORE) : start]
        after = text[end : end + _LOOK_AFTER]
        cued = bool(_PHONE_BEFORE.search(before) or _PHONE_AFTER.match(after))
        if cued or (
            not _OTHER_SHAPE.match(body)
            and (len(body) >= 10 or not body.isdigit())  # a bare 7-9 digit run is an id
            and not _OTHER_BEFORE.search(before)
            and not _version_or_time(body, before, after)
            and _valid_phone(body)
        ):
            score = 0.5
        elif body.startswith(("+", "00")):  # international form
            score = 0.45
        else:
            continue
        found.append(Span(start, end, score))
    return found


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that card numbers carry."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_card_numbers(text: str) -> list[Span]:
    """12-19 digit numbers passing Luhn with a card word just before them, or dotted in
    a card's groups and starting as a card network's numbers do."""
    found = []
    for m in _CARD_CANDIDATE.finditer(text):
        digits = _digits(m.group())
        if not 12 <= len(digits) <= 19 or not luhn_valid(digits):
            continue
        dotted = _DOTTED_CARD.fullmatch(m.group()) and _CARD_START.match(digits)
        if dotted or _CARD_BEFORE.search(text[max(0, m.start() - _LOOK_BEFORE) : m.start()]):
            found.append(Span(m.start(), m.end(), 0.6))
    return found


def phone_recognizer(language: str = "en") -> Any:
    """A Presidio recognizer for ``PHONE_NUMBER`` built on :func:`find_phone_numbers`."""
    context = ["phone", "telephone", "cell", "mobile", "call", "fax", "tel"]
    return span_recognizer(PHONE, "PhoneRecognizer", find_phone_numbers, language, context=context)


def card_recognizer(language: str = "en") -> Any:
    """A Presidio recognizer for ``CREDIT_CARD`` built on :func:`find_card_numbers`."""
    return span_recognizer(
        CARD, "CardNumberRecognizer", find_card_numbers, language, context=["card"]
    )
