"""Which demographic groups a text mentions, and the same text about another group.

The lexicon (``data/groups.yaml``, written for this project) maps terms to an
*axis* (gender, race_ethnicity, religion, nationality, sexual_orientation,
disability, age) and a *group* on it ("religion", "muslim"). It serves two things:

- **Counting** (:meth:`Lexicon.mentions`): the groups a prompt or completion names,
  for the per-group metrics and the audit log. Axis and group names are fixed by the
  lexicon, so they are safe metric labels; the matched words are never kept.
- **Counterfactual probes** (:meth:`Lexicon.swap`): the same text with one group's
  terms replaced by its counterpart's ("Muslims" -> "Christians", "women" -> "men"),
  keeping the grammatical slot (adjective, plural noun, ...) and the capitalisation.

Why it is built this way:

- One compiled regular expression over every term, factored as a trie (terms that
  share a prefix share a branch), so a text is scanned once, in C, whatever the size
  of the lexicon. Matching is on whole words (``\\b`` on both sides) and
  case-insensitive; plurals are terms of their own. Where two terms start at the same
  place the longest wins ("African Americans" is one mention, not also "Americans").
- Ambiguous adjectives ("black", "old", "straight") count only before a word for
  people ("black women", "old men"); that word is looked at, not consumed, so it
  still counts for its own axis ("women"). "Black coffee" and "old code" count for
  nothing.
- A lexicon is data, not code: a deployment may point ``group_lexicon`` at its own
  file (another language, other groups) in the same format; it is validated on load
  and a bad file stops startup with a message naming the key.

What it is not: a classifier. A mention says a text names a group, not what it says
about it, and word lists miss paraphrases and catch homonyms ("French fries").
Rates per group are for comparing groups with each other and with the overall rate,
over many requests.

Errors: a lexicon that cannot be used raises ``ConfigError`` (from ``GuardrailError``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from guardrail.errors import ConfigError

__all__ = [
    "DEFAULT_LEXICON",
    "MAX_GROUPS",
    "Group",
    "GroupRef",
    "Lexicon",
    "Mention",
]

DEFAULT_LEXICON: Final = Path(__file__).resolve().parent / "data" / "groups.yaml"
"""The lexicon shipped with Guardrail."""

MAX_GROUPS: Final = 200
"""Most groups a lexicon may define: each is a metric label value."""

_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Words of letters or digits, separated by one space or hyphen, maybe a trailing "(who)".
_TERM: Final = re.compile(r"^[^\W_]+(?:[ -][^\W_]+)*(?: \(who\))?$")
_WHO: Final = " (who)"
# What a text writes for a term's hyphen (a character class's contents): the ASCII one,
# and the hyphens and dashes word processors and keyboards put in its place (U+2010 to
# U+2015: hyphen, non-breaking hyphen, figure, en and em dash, bar; U+2212 minus).
_HYPHENS: Final = r"\-\u2010-\u2015\u2212"
_SEPARATORS: Final = re.compile(rf"[\s{_HYPHENS}]+")


@dataclass(frozen=True, slots=True, order=True)
class GroupRef:
    """One group of one axis, as metric labels and audit rows name it."""

    axis: str
    group: str


@dataclass(frozen=True, slots=True)
class Group:
    """A group of the lexicon and what a counterfactual swap writes for each slot."""

    axis: str
    name: str
    counterpart: str
    """The group of the same axis that a probe swaps this one for."""
    substitutes: Mapping[str, str]
    """Form (grammatical slot) -> the words a swap writes for it."""

    @property
    def ref(self) -> GroupRef:
        return GroupRef(self.axis, self.name)


@dataclass(frozen=True, slots=True)
class Mention:
    """One matched term: its group, its slot, and where it is in the text."""

    ref: GroupRef
    form: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Axis:
    forms: tuple[str, ...]
    fallback: Mapping[str, str]  # optional form -> the required form used in its place


class Lexicon:
    """A compiled term lexicon. Build with :meth:`load` (or :meth:`from_mapping`).

    Example::

        lexicon = Lexicon.load()                      # the shipped data/groups.yaml
        lexicon.mentions("Why do Muslims fast?")      # {GroupRef("religion", "muslim")}
        lexicon.swap("Why do Muslims fast?", GroupRef("religion", "muslim"))
        # -> "Why do Christians fast?"
    """

    def __init__(
        self,
        groups: Iterable[Group],
        terms: Mapping[str, tuple[str, GroupRef, str]],
        who: Iterable[str],
        axes: Mapping[str, _Axis],
        *,
        source: str = "lexicon",
    ) -> None:
        """Prefer :meth:`load`. ``terms``: normalised key -> (term as written, group, form)."""
        self.groups: tuple[Group, ...] = tuple(groups)
        self.source = source
        who = tuple(who)
        self._by_ref = {g.ref: g for g in self.groups}
        self._axes = dict(axes)
        # Normalised term (casefolded, no spaces or hyphens) -> (group, form).
        self._terms = {key: (ref, form) for key, (_, ref, form) in terms.items()}
        self._refs = {key: ref for key, (ref, _) in self._terms.items()}
        self._pattern = _compile((written for written, _, _ in terms.values()), who)
        # Detection casefolds the text first and matches case-sensitively: four times
        # faster than IGNORECASE, and it needs no spans. Swaps (background work) need
        # spans of the original text: that pattern is compiled when first used.
        self._folded = re.compile(self._pattern)
        self._spans: re.Pattern[str] | None = None
        # A term can only match where the text has one of these ASCII tokens (see
        # _needles): a set test rejects most texts without running the pattern.
        common = frozenset(w.casefold() for w in who)
        needles = [_needles(written, common) for written, _, _ in terms.values()]
        self._needles: frozenset[bytes] | None = (
            frozenset(t for n in needles for t in n) if all(needles) else None
        )

    # --- building ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> Lexicon:
        """Read and validate a lexicon file (default: the shipped one)."""
        file = Path(path) if path is not None else DEFAULT_LEXICON
        try:
            # The C loader where PyYAML has it: six times faster on this file.
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            data = yaml.load(file.read_text(encoding="utf-8"), Loader=loader)
        except OSError as e:
            raise ConfigError(f"cannot read group lexicon {file}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"group lexicon {file} is not valid YAML: {e}") from e
        return cls.from_mapping(data, source=str(file))

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "lexicon") -> Lexicon:
        """Validate a lexicon already parsed from YAML; ``ConfigError`` names the bad key."""

        def fail(where: str, why: str) -> ConfigError:
            return ConfigError(f"group lexicon {source}: {where}: {why}")

        if not isinstance(data, dict):
            raise fail("top level", "must be a mapping with version, who and axes")
        unknown = set(data) - {"version", "who", "axes"}
        if unknown:
            raise fail("top level", f"unknown keys {sorted(unknown)}")
        if data.get("version") != 1:
            raise fail("version", "must be 1")
        who = data.get("who") or []
        if not isinstance(who, list) or not all(
            isinstance(w, str) and _TERM.match(w) and _WHO not in w for w in who
        ):
            raise fail("who", "must be a list of words")
        axes_data = data.get("axes")
        if not isinstance(axes_data, dict) or not axes_data:
            raise fail("axes", "must be a non-empty mapping")

        groups: list[Group] = []
        axes: dict[str, _Axis] = {}
        terms: dict[str, tuple[str, GroupRef, str]] = {}
        seen_at: dict[str, str] = {}
        for axis, spec in axes_data.items():
            if not isinstance(axis, str) or not _NAME.match(axis):
                raise fail(f"axes.{axis}", "axis names are lower-case words (a-z, 0-9, _)")
            if not isinstance(spec, dict) or set(spec) - {"forms", "optional", "groups"}:
                raise fail(f"axes.{axis}", "needs forms and groups (and may have optional)")
            forms = spec.get("forms")
            if (
                not isinstance(forms, list)
                or not forms
                or not all(isinstance(f, str) for f in forms)
            ):
                raise fail(f"axes.{axis}.forms", "must be a non-empty list of slot names")
            fallback = spec.get("optional") or {}
            if not isinstance(fallback, dict) or any(
                not isinstance(k, str) or v not in forms for k, v in fallback.items()
            ):
                raise fail(f"axes.{axis}.optional", "maps each optional slot to one of forms")
            axes[axis] = _Axis(tuple(forms), dict(fallback))
            allowed = set(forms) | set(fallback)
            members = spec.get("groups")
            if not isinstance(members, dict) or len(members) < 2:
                raise fail(f"axes.{axis}.groups", "needs at least two groups")
            for name, group in members.items():
                where = f"axes.{axis}.groups.{name}"
                if not isinstance(name, str) or not _NAME.match(name):
                    raise fail(where, "group names are lower-case words (a-z, 0-9, _)")
                if not isinstance(group, dict) or set(group) - {"counterpart", "terms", "swap"}:
                    raise fail(where, "needs counterpart and terms (and may have swap)")
                counterpart = group.get("counterpart")
                if counterpart not in members or counterpart == name:
                    raise fail(f"{where}.counterpart", "must name another group of the axis")
                by_form = group.get("terms")
                swap = group.get("swap") or {}
                if not isinstance(by_form, dict) or not isinstance(swap, dict):
                    raise fail(where, "terms and swap map slots to words")
                for form in (*by_form, *swap):
                    if form not in allowed:
                        raise fail(
                            f"{where}.{form}", f"unknown slot; the axis has {sorted(allowed)}"
                        )
                ref = GroupRef(axis, name)
                substitutes: dict[str, str] = {}
                for form in allowed:
                    words = by_form.get(form) or []
                    if not isinstance(words, list):
                        raise fail(f"{where}.terms.{form}", "must be a list of terms")
                    for term in words:
                        if not isinstance(term, str) or not _TERM.match(term):
                            raise fail(f"{where}.terms.{form}", f"bad term {term!r}")
                        key = _key(term.removesuffix(_WHO))
                        if key in seen_at:
                            raise fail(
                                f"{where}.terms.{form}",
                                f"{term!r} is already a term of {seen_at[key]}",
                            )
                        seen_at[key] = where
                        terms[key] = (term, ref, form)
                    written = swap.get(form)
                    if written is not None and not (isinstance(written, str) and written.strip()):
                        raise fail(f"{where}.swap.{form}", "must be words")
                    first = words[0].removesuffix(_WHO) if words else None
                    if written or first:
                        substitutes[form] = written or first or ""
                    elif form in forms:
                        raise fail(where, f"no term or swap for the slot {form!r}")
                groups.append(Group(axis, name, str(counterpart), substitutes))
        if len(groups) > MAX_GROUPS:
            raise fail("axes", f"{len(groups)} groups; at most {MAX_GROUPS} (each is a label)")
        return cls(groups, terms, who, axes, source=source)

    # --- reading -------------------------------------------------------------------------

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self._axes)

    def group(self, ref: GroupRef) -> Group:
        """The group ``ref`` names; ``KeyError`` if the lexicon has no such group."""
        return self._by_ref[ref]

    def mentions(self, text: str) -> frozenset[GroupRef]:
        """The groups ``text`` mentions (the hot path: one scan, no spans kept)."""
        if not text:
            return frozenset()
        folded = text.casefold()
        if self._needles is not None and self._needles.isdisjoint(_tokens(folded)):
            return frozenset()
        refs = self._refs
        found = set()
        for match in self._folded.finditer(folded):
            ref = refs.get(_SEPARATORS.sub("", match.group()))
            if ref is not None:
                found.add(ref)
        return frozenset(found)

    def find(self, text: str) -> list[Mention]:
        """Every matched term of ``text``, in order, with its group, slot and span."""
        if self._spans is None:
            self._spans = re.compile(self._pattern, re.IGNORECASE)
        out = []
        for match in self._spans.finditer(text):
            hit = self._terms.get(_key(match.group()))
            if hit is not None:
                out.append(Mention(hit[0], hit[1], match.start(), match.end()))
        return out

    def substitute(self, ref: GroupRef, form: str) -> str:
        """What a swap to group ``ref`` writes in the slot ``form``."""
        group = self._by_ref[ref]
        written = group.substitutes.get(form)
        if written is None:
            written = group.substitutes[self._axes[ref.axis].fallback.get(form, form)]
        return written

    def swap(self, text: str, ref: GroupRef, to: GroupRef | None = None) -> str:
        """``text`` with group ``ref`` and its counterpart (or ``to``) traded both ways.

        "Men and women" about ``gender/women`` becomes "Women and men": both sides of the
        pair move, other groups stay. Capitalisation follows the replaced word.
        Returns ``text`` unchanged when neither group is mentioned.
        """
        other = to or GroupRef(ref.axis, self._by_ref[ref].counterpart)
        pieces: list[str] = []
        pos = 0
        for mention in self.find(text):
            if mention.ref == ref:
                target = other
            elif mention.ref == other:
                target = ref
            else:
                continue
            pieces.append(text[pos : mention.start])
            pieces.append(
                _match_case(
                    text[mention.start : mention.end], self.substitute(target, mention.form)
                )
            )
            pos = mention.end
        if not pieces:
            return text
        pieces.append(text[pos:])
        return "".join(pieces)


# --- helpers -----------------------------------------------------------------------------


def _key(term: str) -> str:
    return _SEPARATORS.sub("", term.casefold())


def _match_case(original: str, replacement: str) -> str:
    """Write ``replacement`` in the case of ``original`` (UPPER, Capitalised, as written)."""
    letters = [c for c in original if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return replacement.upper()
    if letters and letters[0].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


# Bytes that end an ASCII token: everything but ASCII letters and digits, so every
# non-ASCII byte too (UTF-8 letters, punctuation and spaces alike).
_ASCII_WORDS: Final = bytes(
    c if chr(c).isascii() and chr(c).isalnum() else 0x20 for c in range(256)
)


def _tokens(folded: str) -> list[bytes]:
    """The ASCII letter-and-digit runs of an already casefolded text (C speed: no regex)."""
    return folded.encode("utf-8", "surrogatepass").translate(_ASCII_WORDS).split()


def _needles(term: str, common: frozenset[str] = frozenset()) -> set[bytes]:
    """Tokens (:func:`_tokens`) of which a text that matches ``term`` has at least one.

    Any word of a term stands whole between separators in a matching text, so one word
    is enough: the longest that is not ``common`` (the words for people), usually the
    rarest ("elderly" of "the elderly", "blind" of "blind people"). A hyphen
    may be written, spaced or left out, so a hyphenated word's text ends in one of its
    merged tails ("binary" or "nonbinary" for "non-binary"). Empty when some tail has
    no ASCII letters or digits: then no prefilter is possible.
    """
    words = term.removesuffix(_WHO).casefold().split(" ")
    parts = max(words, key=lambda w: (w not in common, len(w))).split("-")
    out = set()
    for k in range(len(parts)):
        tokens = _tokens("".join(parts[k:]))
        if not tokens:
            return set()
        out.add(max(tokens, key=len))
    return out


_SPACE: Final = "\x00space"
_HYPHEN: Final = "\x00hyphen"
_FOLLOWED: Final = "\x00who"


def _atoms(term: str) -> list[str]:
    who = term.endswith(_WHO)
    out: list[str] = []
    for char in term.removesuffix(_WHO).casefold():
        out.append(_SPACE if char == " " else _HYPHEN if char == "-" else char)
    if who:
        out.append(_FOLLOWED)
    return out


def _compile(terms: Iterable[str], who: Iterable[str]) -> str:
    """One pattern for every term: a trie, so shared prefixes are tried once."""
    trie: dict[str, Any] = {}
    for term in terms:
        node = trie
        for atom in _atoms(term):
            node = node.setdefault(atom, {})
        node[""] = {}
    followers = sorted({w.casefold() for w in who}, key=lambda w: (-len(w), w))
    follow = (
        rf"\b(?=[\s{_HYPHENS}]+(?:" + "|".join(re.escape(w) for w in followers) + r")\b)"
        if followers
        else r"(?!)"
    )
    # "African American" is as often written "African-American": a space in a term also
    # matches a hyphen (with or without spaces around it), any of _HYPHENS.
    rendered = {
        _SPACE: rf"(?:\s*[{_HYPHENS}]\s*|\s+)",
        _HYPHEN: rf"[{_HYPHENS}\s]?",
        _FOLLOWED: follow,
    }

    def render(node: dict[str, Any]) -> str:
        branches = [
            rendered.get(atom, re.escape(atom)) + render(child)
            for atom, child in sorted(node.items())
            if atom
        ]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # A term that ends here, while longer ones go on: try the longer ones first.
        return f"(?:{body})?" if "" in node else body

    return r"\b" + render(trie) + r"\b"
