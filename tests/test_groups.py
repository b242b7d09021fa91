"""The demographic group lexicon: what counts as a mention, and counterfactual swaps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrail.errors import ConfigError
from guardrail.observability.groups import DEFAULT_LEXICON, GroupRef, Lexicon

AXES = (
    "gender",
    "race_ethnicity",
    "religion",
    "nationality",
    "sexual_orientation",
    "disability",
    "age",
)


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


def refs(*pairs: str) -> set[GroupRef]:
    return {GroupRef(*pair.split("/")) for pair in pairs}


# --- the shipped lexicon --------------------------------------------------------------


def test_the_shipped_lexicon_covers_the_seven_axes_and_states_its_origin(lexicon: Lexicon) -> None:
    assert lexicon.axes == AXES
    text = DEFAULT_LEXICON.read_text(encoding="utf-8")
    assert "Origin: written for Guardrail by its maintainers" in text
    assert "not copied or derived from any other word list" in text


def test_every_group_has_a_counterpart_on_its_axis_and_a_plural_to_swap_in(
    lexicon: Lexicon,
) -> None:
    for group in lexicon.groups:
        counterpart = lexicon.group(GroupRef(group.axis, group.counterpart))
        assert counterpart.name != group.name
        assert lexicon.substitute(group.ref, "people"), group.name


# --- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Why do Muslims fast during Ramadan?", {"religion/muslim"}),
        ("MUSLIM and muslim and Muslim", {"religion/muslim"}),  # any case
        ("a Jew, two Jews, Jewish food, Judaism", {"religion/jewish"}),  # every slot
        ("Are women better drivers than men?", {"gender/women", "gender/men"}),
        ("one woman, one man, a girl and two boys", {"gender/women", "gender/men"}),
        ("non-binary, non binary and nonbinary people", {"gender/nonbinary"}),
        ("trans women are women", {"gender/transgender", "gender/women"}),
        # Ambiguous adjectives count only before a word for people, which counts too.
        ("Black women vote", {"race_ethnicity/black", "gender/women"}),
        ("black coffee and white paint", set()),
        ("old men tell stories", {"age/older", "gender/men"}),
        ("old code, old habits", set()),
        ("go straight ahead", set()),
        (
            "straight people and gay people",
            {"sexual_orientation/straight", "sexual_orientation/gay"},
        ),
        ("the button is disabled", set()),
        ("disabled people deserve access", {"disability/disabled"}),
        # The longest term wins where two start together.
        ("African Americans", {"race_ethnicity/black"}),
        ("Americans abroad", {"nationality/american"}),
        ("Black Americans", {"race_ethnicity/black", "nationality/american"}),
        # A multi-word term is often hyphenated: still one mention, not two nationalities.
        ("African-Americans vote", {"race_ethnicity/black"}),
        ("Asian-American voters", {"race_ethnicity/asian"}),
        # Written with the hyphens and dashes word processors and keyboards type.
        ("African\u2013American voters", {"race_ethnicity/black"}),  # en dash
        ("African\u2011Americans", {"race_ethnicity/black"}),  # non-breaking hyphen
        ("Asian\u2010American, Asian \u2014 Americans", {"race_ethnicity/asian"}),
        ("non\u2011binary and non\u2212binary people", {"gender/nonbinary"}),
        # Whole words only.
        ("Germany, Mandarin, woman-hating, mankind", {"gender/women"}),
        ("humanity, Manchester, amendment, semen", set()),
        ("", set()),
    ],
)
def test_mentions_are_whole_words_in_any_case(
    lexicon: Lexicon, text: str, expected: set[str]
) -> None:
    assert lexicon.mentions(text) == refs(*expected)


def test_find_gives_each_mention_its_slot_and_span(lexicon: Lexicon) -> None:
    text = "Muslims and a Jew"
    found = lexicon.find(text)

    assert [(m.ref.group, m.form, text[m.start : m.end]) for m in found] == [
        ("muslim", "people", "Muslims"),
        ("jewish", "person", "Jew"),
    ]


# Words the prefilter must not lose: terms, people words, near misses, odd separators.
_WORDS = [
    "muslims", "Muslim", "women", "WOMAN", "non", "binary", "nonbinary", "non-binary",
    "black", "people", "old", "men", "african", "american", "americans", "able", "bodied",
    "gay", "straight", "trans", "the", "elderly", "mentally", "ill", "café", "naïve",
    "straße", "İstanbul", "x", "2women", "women_", "_men", "\uff2duslims",
]  # fmt: skip
_SEPARATORS = [" ", "  ", "-", "\u00a0", "\n", ", ", "—", "'s ", "", "\u2009", "\u2011", "\u2013"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_WORDS), st.sampled_from(_SEPARATORS)), min_size=1, max_size=12
    )
)
def test_the_fast_path_finds_exactly_what_the_full_scan_finds(
    lexicon: Lexicon, parts: list[tuple[str, str]]
) -> None:
    text = "".join(word + sep for word, sep in parts)

    assert lexicon.mentions(text) == {m.ref for m in lexicon.find(text)}


# --- swaps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "group", "expected"),
    [
        ("Why do Muslims fast?", "religion/muslim", "Why do Christians fast?"),
        ("Islam teaches", "religion/muslim", "Christianity teaches"),
        ("A Jew walks in", "religion/jewish", "A Christian walks in"),  # optional slot falls back
        ("women earn less than men", "gender/women", "men earn less than women"),
        ("WOMEN and Girls", "gender/women", "MEN and Boys"),
        ("my gay friend", "sexual_orientation/gay", "my straight friend"),
        ("gays and lesbians", "sexual_orientation/gay", "straight people and lesbians"),
        ("Black women vote", "race_ethnicity/black", "White women vote"),
        ("African-American voters", "race_ethnicity/black", "White voters"),
        ("Our African\u2013American voters", "race_ethnicity/black", "Our White voters"),
        ("nothing here", "religion/muslim", "nothing here"),
    ],
)
def test_a_swap_trades_a_group_and_its_counterpart_keeping_slot_and_case(
    lexicon: Lexicon, text: str, group: str, expected: str
) -> None:
    assert lexicon.swap(text, GroupRef(*group.split("/"))) == expected


# --- loading other lexicons -----------------------------------------------------------------


def shipped() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_LEXICON.read_text(encoding="utf-8"))
    return data


def small() -> dict[str, Any]:
    return {
        "version": 1,
        "who": ["people"],
        "axes": {
            "colour": {
                "forms": ["adj", "people"],
                "groups": {
                    "red": {
                        "counterpart": "blue",
                        "terms": {"adj": ["red (who)"], "people": ["reds"]},
                        "swap": {"adj": "red"},
                    },
                    "blue": {"counterpart": "red", "terms": {"adj": ["blue"], "people": ["blues"]}},
                },
            }
        },
    }


def test_a_lexicon_of_ones_own_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "colours.yaml"
    path.write_text(yaml.safe_dump(small()), encoding="utf-8")

    lexicon = Lexicon.load(path)

    assert lexicon.mentions("red people and blues") == refs("colour/red", "colour/blue")
    assert lexicon.mentions("a red car") == set()
    assert lexicon.swap("red people like blues", GroupRef("colour", "red")) == (
        "blue people like reds"
    )


@pytest.mark.parametrize(
    ("term", "text"),
    [("ćwierć", "ĆWIERĆ ludzi"), ("синие", "Синие люди")],  # some ASCII letters, none
)
def test_a_lexicon_with_non_ascii_terms_still_finds_them(term: str, text: str) -> None:
    data = small()
    data["axes"]["colour"]["groups"]["blue"]["terms"]["adj"] = [term, "blue"]
    lexicon = Lexicon.from_mapping(data)

    assert lexicon.mentions(text) == refs("colour/blue")
    assert lexicon.mentions("nothing") == set()


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()
_RED = "axes.colour.groups.red"


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("version", 2, "version: must be 1"),
        ("extra", 1, "unknown keys"),
        ("axes", {}, "axes: must be a non-empty mapping"),
        ("axes.colour.forms", [], "forms: must be a non-empty list"),
        (f"{_RED}.counterpart", "green", "counterpart: must name another group"),
        (f"{_RED}.counterpart", "red", "counterpart: must name another group"),
        (f"{_RED}.terms.size", ["big"], "size: unknown slot"),
        (f"{_RED}.terms.people", ["re*ds"], "bad term 're*ds'"),
        (f"{_RED}.terms.people", ["blues"], "'blues' is already a term of"),
        (f"{_RED}.terms.people", _DELETE, "no term or swap for the slot 'people'"),
        ("axes.Colour", {}, "axis names are lower-case"),
    ],
)
def test_a_bad_lexicon_is_refused_naming_the_key(path: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match="group lexicon") as caught:
        Lexicon.from_mapping(_set(small(), path, value))

    assert fragment in str(caught.value)


def test_a_missing_or_broken_lexicon_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read group lexicon"):
        Lexicon.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("axes: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Lexicon.load(broken)


def test_the_shipped_file_loads_through_the_same_validation() -> None:
    assert len(Lexicon.from_mapping(shipped()).groups) == len(Lexicon.load().groups)
