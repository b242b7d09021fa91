"""The policy loader: typed policies from valid files, ``file:line:column`` errors from bad ones.

Each bad fixture in ``tests/fixtures/policies/`` has one kind of mistake; the tables
below pin the exact location, key and message a policy author would see.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml
from structlog.testing import capture_logs

from guardrail.errors import PolicyError
from guardrail.filters.normalize import invisible_chars
from guardrail.filters.rules import RulesConfig
from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.registry import BUILTIN_FILTERS, filter_registry
from guardrail.guard.store import GuardStore
from guardrail.guard.types import ALLOW, Action, FilterContext, Stage, Verdict
from guardrail.plugins import PluginRegistry
from guardrail.policy.loader import load_policy, load_policy_text
from guardrail.policy.model import VISIBLE_PATTERN
from guardrail.policy.schema import SCHEMA_ID, policy_json_schema, schema_text, write_schema

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
REPO = Path(__file__).parent.parent


class InputOnlyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the test-only ``input-only`` filter."""

    threshold: float = 0.5


class InputOnlyFilter:
    """A filter type that can only check prompts, to exercise stage checks."""

    def __init__(self, name: str, config: InputOnlyConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset({Stage.INPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return ALLOW


INPUT_ONLY = FilterSpec(
    type="input-only",
    config_type=InputOnlyConfig,
    build=InputOnlyFilter,
    stages=frozenset({Stage.INPUT}),
)


@pytest.fixture
def registry() -> PluginRegistry[FilterSpec]:
    """The rules filter plus a test type: messages listing known types stay stable as
    filter families are added to the project."""
    registry = PluginRegistry(
        "guardrail.tests.no-entry-points", FilterSpec, {"rules": BUILTIN_FILTERS["rules"]}
    )
    registry.register("input-only", INPUT_ONLY)
    return registry


def problems_of(path: Path, registry: PluginRegistry[FilterSpec]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path, registry)
    return [str(p) for p in caught.value.problems]


def text_problems(text: str, registry: PluginRegistry[FilterSpec]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "inline.yaml", registry)
    return [str(p) for p in caught.value.problems]


# --- valid policies --------------------------------------------------------------------


def test_valid_policy_loads_with_typed_filter_config(
    registry: PluginRegistry[FilterSpec],
) -> None:
    path = FIXTURES / "valid.yaml"

    policy = load_policy(path, registry)

    assert (policy.name, policy.version, policy.on_error) == ("test-policy", "1.2", Action.FLAG)
    assert policy.source == path
    assert policy.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.messages.input_blocked == "Blocked by the test policy."
    assert policy.messages.output_blocked == "I can't help with that."
    assert (policy.stream.release, policy.stream.window_chars) == ("window", 100)
    words, _ = policy.filters
    assert isinstance(words.config, RulesConfig)
    assert [r.id for r in words.config.rules] == ["weapons.bomb", "pii.email"]
    assert words.config.rules[0].stages == [Stage.INPUT]
    assert words.config.rules[1].regex == [r"[\w.+-]+@[\w-]+\.[\w.]+"]
    assert [t.expect for t in policy.tests] == [Action.BLOCK, Action.ALLOW]
    assert policy.tests[1].stage is Stage.OUTPUT


def test_each_test_keeps_the_line_and_column_its_entry_starts_at(
    registry: PluginRegistry[FilterSpec],
) -> None:
    """`policy test` names a failing test as file:line, like every other policy error."""
    policy = load_policy(FIXTURES / "valid.yaml", registry)

    assert policy.test_positions == ((45, 5), (48, 5))
    text = (
        'name: p\nversion: "1"\ntests:\n'
        "  - {input: a, expect: allow}\n"
        "\n"
        "  -   input: b\n"
        "      expect: block\n"
    )
    assert load_policy_text(text, "inline.yaml", registry).test_positions == ((4, 5), (6, 7))


def test_filter_defaults_come_from_the_policy_and_the_filter_type(
    registry: PluginRegistry[FilterSpec],
) -> None:
    words, output_only = load_policy(FIXTURES / "valid.yaml", registry).filters

    assert (words.stages, words.timeout_s, words.on_error) == (
        frozenset(Stage),
        1.5,
        Action.FLAG,
    )
    assert (output_only.stages, output_only.timeout_s, output_only.on_error) == (
        frozenset({Stage.OUTPUT}),
        0.25,
        Action.BLOCK,
    )


def test_when_a_filter_is_disabled_then_it_is_validated_but_not_in_the_policy(
    registry: PluginRegistry[FilterSpec],
) -> None:
    policy = load_policy(FIXTURES / "valid.yaml", registry)
    assert "switched-off" not in [f.id for f in policy.filters]

    broken = "name: p\nversion: '1'\nfilters:\n  - id: unused\n    type: nope\n    enabled: false\n"
    assert text_problems(broken, registry) == [
        "inline.yaml:5:11: filters[0].type: unknown filter type 'nope' "
        "(known types: input-only, rules)"
    ]


def test_filter_type_default_stages_apply_when_the_entry_names_none(
    registry: PluginRegistry[FilterSpec],
) -> None:
    text = "name: p\nversion: '1'\nfilters:\n  - id: a\n    type: input-only\n"

    (only,) = load_policy_text(text, "inline.yaml", registry).filters

    assert only.stages == frozenset({Stage.INPUT})
    assert only.config == InputOnlyConfig()


def test_text_policy_digest_is_of_its_utf8_bytes_and_it_has_no_source_file(
    registry: PluginRegistry[FilterSpec],
) -> None:
    text = "name: p\nversion: '1'\ndescription: 'é'\n"

    policy = load_policy_text(text, "<api>", registry)

    assert policy.digest == hashlib.sha256(text.encode()).hexdigest()
    assert policy.source is None
    assert policy.filters == ()


def test_text_policy_with_a_base_dir_records_its_file(
    registry: PluginRegistry[FilterSpec], tmp_path: Path
) -> None:
    policy = load_policy_text("name: p\nversion: '1'\n", "p.yaml", registry, base_dir=tmp_path)
    assert policy.source == tmp_path / "p.yaml"


def test_yaml_anchors_and_merge_keys_are_expanded(registry: PluginRegistry[FilterSpec]) -> None:
    text = """\
name: p
version: "1"
filters:
  - id: a
    type: rules
    config:
      rules:
        - &base {id: base, category: misc, keywords: [alpha], action: flag}
        - <<: *base
          id: derived
          action: block
"""
    (rules,) = load_policy_text(text, "inline.yaml", registry).filters

    base, derived = rules.config.rules
    assert (derived.id, derived.category, derived.keywords) == ("derived", "misc", ["alpha"])
    assert (base.action, derived.action) == ("flag", "block")


# --- one mistake per file --------------------------------------------------------------

ERROR_CASES = [
    pytest.param(
        "unknown_top_level_key.yaml",
        "3:1: on_eror: unknown key 'on_eror' (expected one of: name, version, description, "
        "on_error, timeout_ms, messages, stream, filters, tests, openai_categories); "
        "did you mean 'on_error'?",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "unknown_rule_key.yaml",
        "13:11: filters[0].config.rules[1].keywrds: unknown key 'keywrds' (expected one of: "
        "keywords, regex, semantic, classifier, all, any, not, id, category, description, "
        "severity, stages, scope, action, message, score, replacement); did you mean 'keywords'?",
        id="unknown-key-in-a-rule",
    ),
    pytest.param(
        "wrong_type.yaml",
        "10:21: filters[0].config.rules[0].keywords: expected a list, got a string",
        id="wrong-type",
    ),
    pytest.param(
        "bad_action.yaml",
        "10:19: filters[0].config.rules[0].action: 'blok' is not a valid value "
        "(expected one of: block, flag, redact); did you mean 'block'?",
        id="bad-action",
    ),
    pytest.param(
        "unknown_filter_type.yaml",
        "5:11: filters[0].type: unknown filter type 'ruels' (known types: input-only, rules); "
        "did you mean 'rules'?",
        id="unknown-filter-type",
    ),
    pytest.param(
        "bad_regex.yaml",
        "12:15: filters[0].config.rules[0].regex[1]: invalid regex: missing ), "
        "unterminated subpattern at position 0",
        id="bad-regex",
    ),
    pytest.param(
        "duplicate_filter_ids.yaml",
        "6:9: filters[1].id: duplicate filter id 'words' (first used on line 4)",
        id="duplicate-filter-ids",
    ),
    pytest.param(
        "duplicate_rule_ids.yaml",
        "11:15: filters[0].config.rules[1].id: duplicate rule id 'same'",
        id="duplicate-rule-ids",
    ),
    pytest.param(
        "duplicate_yaml_keys.yaml",
        "6:5: filters[0].id: duplicate key 'id' (first given on line 4)",
        id="duplicate-yaml-keys",
    ),
    pytest.param(
        "yaml_syntax_error.yaml",
        "6:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence started on line 5)",
        id="yaml-syntax-error",
    ),
    pytest.param("empty.yaml", "1:1: the policy file is empty", id="empty-file"),
    pytest.param("comments_only.yaml", "1:1: the policy file is empty", id="comments-only"),
    pytest.param(
        "missing_version.yaml",
        "2:1: missing required key 'version'",
        id="missing-version",
    ),
    pytest.param(
        "unsupported_stage.yaml",
        "6:21: filters[0].stages[1]: the 'input-only' filter does not run at stage 'output' "
        "(supported: input)",
        id="stage-not-supported",
    ),
    pytest.param(
        "dead_rule_stage.yaml",
        "14:19: filters[0].config.rules[1].stages: rule 'dead' runs at output only, but this "
        "filter entry runs at input only: the rule would never run (add its stage to the "
        "entry's 'stages', or change the rule's)",
        id="rule-stage-outside-its-filter",
    ),
    pytest.param(
        "not_a_mapping.yaml",
        "1:1: a policy must be a mapping of keys to values, got a list",
        id="not-a-mapping",
    ),
]


@pytest.mark.parametrize(("fixture", "expected"), ERROR_CASES)
def test_a_bad_policy_reports_file_line_column_key_and_message(
    registry: PluginRegistry[FilterSpec], fixture: str, expected: str
) -> None:
    path = FIXTURES / fixture
    assert problems_of(path, registry) == [f"{path}:{expected}"]


def test_every_problem_in_a_file_is_reported_in_file_order(
    registry: PluginRegistry[FilterSpec],
) -> None:
    path = FIXTURES / "many_errors.yaml"

    problems = problems_of(path, registry)

    assert [p.removeprefix(f"{path}:") for p in problems] == [
        "1:7: name: 'test policy' is not a valid id: use letters, digits, '_', '.', ':' and '-', "
        "starting with a letter or digit",
        "2:10: version: expected a string, got a number; put the value in quotes to make it "
        "a string",
        "3:13: timeout_ms: must be at least 1, got 0",
        "7:15: filters[0].on_error: 'explode' is not a valid value "
        "(expected one of: allow, block, flag)",
        "12:19: filters[0].config.rules[0].regex[0]: invalid regex: missing ), "
        "unterminated subpattern at position 0",
        "13:9: filters[1].id: duplicate filter id 'words' (first used on line 5)",
        "14:11: filters[1].type: unknown filter type 'nope' (known types: input-only, rules)",
        "17:5: filters[2]: missing required key 'id'",
        "20:11: filters[2].config.rules[0]: missing required key 'id'",
        "22:11: filters[2].config.rules[0].colour: unknown key 'colour' (expected one of: "
        "keywords, regex, semantic, classifier, all, any, not, id, category, description, "
        "severity, stages, scope, action, message, score, replacement)",
        "23:1: extra: unknown key 'extra' (expected one of: name, version, description, "
        "on_error, timeout_ms, messages, stream, filters, tests, openai_categories)",
    ]


# --- smaller cases, inline -------------------------------------------------------------

HEAD = "name: p\nversion: '1'\n"

INLINE_CASES = [
    pytest.param(
        HEAD + "filters:\n",
        ["3:9: filters: expected a list, got nothing (an empty value)"],
        id="empty-value",
    ),
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    stages: input\n",
        ["6:13: filters[0].stages: expected a list, got a string"],
        id="optional-field-wrong-type",
    ),
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    stages: [inptu]\n",
        [
            "6:14: filters[0].stages[0]: 'inptu' is not a valid value "
            "(expected one of: input, output); did you mean 'input'?"
        ],
        id="bad-stage-name",
    ),
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    stages: []\n",
        [
            "6:13: filters[0].stages: list at least one stage, or remove 'stages' to run at "
            "every stage the 'rules' filter supports (input, output)"
        ],
        id="empty-stages",
    ),
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    timeout_ms: 2.5\n",
        ["6:17: filters[0].timeout_ms: expected a whole number, got a number"],
        id="fractional-timeout",
    ),
    pytest.param(
        HEAD + "tests:\n  - input: hi\n    expect: deny\n",
        [
            "5:13: tests[0].expect: 'deny' is not a valid value "
            "(expected one of: allow, block, flag, redact)"
        ],
        id="bad-expected-action",
    ),
    pytest.param(
        HEAD + "stream: {release: chunk, window_chars: 0}\n",
        [
            "3:19: stream.release: 'chunk' is not a valid value "
            "(expected one of: sentence, window)",
            "3:40: stream.window_chars: must be at least 1, got 0",
        ],
        id="flow-mapping-columns",
    ),
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    config:\n      rules:\n        - id: r\n",
        ["8:11: filters[0].config.rules[0]: missing required key 'category'"],
        id="missing-key-in-a-rule",
    ),
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    config:\n      rules: [{id: r}]\n",
        ["7:15: filters[0].config.rules[0]: missing required key 'category'"],
        id="missing-key-in-a-flow-rule",
    ),
    pytest.param(
        HEAD + "description: !include other.yaml\n",
        ["3:14: description: the YAML tag '!include' is not supported in a policy"],
        id="custom-yaml-tag",
    ),
    pytest.param(
        HEAD + "name: q\nversion: 2\n",
        [
            "3:1: name: duplicate key 'name' (first given on line 1)",
            "4:1: version: duplicate key 'version' (first given on line 2)",
        ],
        id="duplicate-keys-are-all-reported",
    ),
    pytest.param("version: '1'\n", ["1:1: missing required key 'name'"], id="missing-name"),
    # From a bug hunt: each of these was a traceback instead of a located problem.
    pytest.param(
        HEAD + "filters:\n  - id: a\n    type: rules\n    stages: [[input], {output: 1}]\n",
        [
            "6:14: filters[0].stages[0]: ['input'] is not a valid value "
            "(expected one of: input, output)",
            "6:23: filters[0].stages[1]: {'output': 1} is not a valid value "
            "(expected one of: input, output)",
        ],
        id="stage-not-a-string",
    ),
    pytest.param(
        HEAD + "timeout_ms: 1" + "0" * 400 + "\n",
        ["3:13: timeout_ms: must be at most 3600000, got a number of 401 digits"],
        id="timeout-past-a-float",
    ),
    pytest.param(
        HEAD + 'messages: {input_blocked: "No \\ud800 way"}\n',
        ["3:27: messages.input_blocked: the string holds a lone surrogate (U+D800), not text"],
        id="lone-surrogate",
    ),
    pytest.param(
        "just text\n",
        ["1:1: a policy must be a mapping of keys to values, got a string"],
        id="scalar-document",
    ),
]


@pytest.mark.parametrize(("text", "expected"), INLINE_CASES)
def test_inline_policy_problems_are_located(
    registry: PluginRegistry[FilterSpec], text: str, expected: list[str]
) -> None:
    assert text_problems(text, registry) == [f"inline.yaml:{e}" for e in expected]


def test_a_file_nested_past_the_stack_is_a_located_problem(
    registry: PluginRegistry[FilterSpec],
) -> None:
    """PyYAML composes by recursion: some hundreds of "[" raised RecursionError."""
    text = HEAD + "description: " + "[" * 2000 + "]" * 2000 + "\n"
    (problem,) = text_problems(text, registry)
    # Where the reader stood when the stack ran out: on line 3, its column depends on
    # how deep the caller's own stack already was.
    assert re.fullmatch(
        r"inline\.yaml:3:\d+: the file nests lists or mappings too deeply to be read", problem
    ), problem


def nested_rule(levels: int) -> str:
    """A policy whose one rule's ``not`` holds conditions ``levels`` deep."""
    condition = "{keywords: [a]}"
    for _ in range(levels - 1):
        condition = "{all: [" + condition + "]}"
    return (
        HEAD + "filters:\n  - id: f\n    type: rules\n    config:\n      rules:\n"
        "        - {id: r, category: c, keywords: [z], not: " + condition + "}\n"
    )


def test_conditions_nested_as_deep_as_the_limit_load(registry: PluginRegistry[FilterSpec]) -> None:
    policy = load_policy_text(nested_rule(32), "inline.yaml", registry)
    assert len(policy.filters[0].config.rules) == 1


def test_conditions_nested_past_the_limit_are_refused_at_the_rule(
    registry: PluginRegistry[FilterSpec],
) -> None:
    assert text_problems(nested_rule(33), registry) == [
        "inline.yaml:8:11: filters[0].config.rules[0]: conditions nest 33 levels deep "
        "('all', 'any' and 'not' inside one another); at most 32"
    ]


@pytest.mark.parametrize("levels", [130, 150])
def test_conditions_nested_past_the_stack_are_a_located_problem(
    registry: PluginRegistry[FilterSpec], levels: int
) -> None:
    """jsonschema checks all/any/not by recursion: 130 to 160 levels raised RecursionError
    out of the loader (a 2,000-line traceback from policy validate, a bare
    "RecursionError" from a reload)."""
    (problem,) = text_problems(nested_rule(levels), registry)
    # The schema check runs out of stack before the rule's limit is checked, at a depth
    # that depends on how deep the caller's own stack already is.
    assert problem in (
        "inline.yaml:7:7: filters[0].config: the file nests lists or mappings too deeply "
        "to be read",
        f"inline.yaml:8:11: filters[0].config.rules[0]: conditions nest {levels} levels deep "
        "('all', 'any' and 'not' inside one another); at most 32",
    )


def test_when_the_file_cannot_be_read_then_the_problem_is_at_its_start(
    registry: PluginRegistry[FilterSpec], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.yaml"
    assert problems_of(missing, registry) == [
        f"{missing}:1:1: cannot read the policy file: No such file or directory"
    ]


def test_when_the_file_is_not_utf8_then_the_bad_byte_is_located(
    registry: PluginRegistry[FilterSpec], tmp_path: Path
) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: p\ndescription: caf\xe9\n")
    assert problems_of(path, registry) == [
        f"{path}:2:17: the file is not UTF-8 text (byte 0xe9 cannot be decoded)"
    ]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize(
    ("line3", "expected"),
    [
        (b"description: a\x00b", "3:15: the character U+0000 is not allowed in a YAML file"),
        (
            "description: a\u2028b".encode(),
            "3:15: the character U+2028 (line separator) is a line break to YAML but not",
        ),
        (b"description: caf\xe9", "3:17: the file is not UTF-8 text (byte 0xe9 cannot be"),
        # What the YAML reader itself places, for comparison.
        (b"bogus: 1", "3:1: bogus: unknown key 'bogus'"),
    ],
    ids=["nul", "line-separator", "not-utf8", "yaml-mark"],
)
def test_a_problem_found_before_the_yaml_is_read_is_on_the_line_yaml_and_editors_show(
    registry: PluginRegistry[FilterSpec],
    tmp_path: Path,
    newline: str,
    line3: bytes,
    expected: str,
) -> None:
    """YAML ends a line at CR, CR LF or LF; these checks counted LF alone, so in a file
    saved with CR line endings each was on line 1, at a column past the line's end."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(newline.encode().join([b"name: p", b"version: '1'", line3, b""]))
    (problem,) = problems_of(path, registry)
    assert problem.startswith(f"{path}:{expected}"), problem


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029"])
def test_a_line_break_only_yaml_sees_is_refused_where_an_editor_shows_it(
    registry: PluginRegistry[FilterSpec], char: str
) -> None:
    """YAML 1.1 ends a line at NEL, U+2028 and U+2029; editors do not. Read, the comment
    would end there and every later line number would be off by one."""
    text = HEAD + f"# weapons rules{char}more\nfilters:\n  - {{id: f, type: rules}}\n"
    problems = text_problems(text, registry)
    assert len(problems) == 1
    assert problems[0].startswith(f"inline.yaml:3:16: the character U+{ord(char):04X} (")
    assert "is a line break to YAML but not to editors" in problems[0]


def test_a_line_break_written_as_an_escape_in_a_quoted_string_loads(
    registry: PluginRegistry[FilterSpec],
) -> None:
    text = HEAD + 'description: "one\\u2028two\\x85three"\n'
    assert load_policy_text(text, "inline.yaml", registry).description == "one\u2028two\x85three"


def test_a_blank_message_users_would_see_is_refused_where_it_is_written() -> None:
    """A block answered ``"message": ""`` (or an empty refusal) tells the user nothing."""
    text = (
        'name: p\nversion: "1"\nmessages: {input_blocked: "", output_blocked: "  "}\n'
        "filters:\n"
        "  - id: aup\n    type: rules\n    config:\n"
        "      rules:\n        - {id: r, category: c, keywords: [x], message: ''}\n"
        "  - id: tox\n    type: toxicity\n    config:\n"
        "      categories: {toxicity: {threshold: 0.8, action: block, message: ' '}}\n"
        "  - id: hal\n    type: hallucination\n    config:\n"
        "      cutoff: {action: block, message: ''}\n"
    )
    assert text_problems(text, filter_registry()) == [
        "inline.yaml:3:27: messages.input_blocked: must not be blank",
        "inline.yaml:3:47: messages.output_blocked: must not be blank",
        "inline.yaml:9:56: filters[0].config.rules[0].message: must not be blank",
        "inline.yaml:13:71: filters[1].config.categories.toxicity.message: must not be blank",
        "inline.yaml:17:40: filters[2].config.cutoff.message: must not be blank",
    ]
    # Characters that show nothing are blank too: a zero-width space, a byte order mark.
    invisible = (
        'name: p\nversion: "1"\nmessages: {input_blocked: "\\u200b", output_blocked: "\\ufeff "}\n'
    )
    assert text_problems(invisible + "filters: []\n", filter_registry())[:2] == [
        "inline.yaml:3:27: messages.input_blocked: must not be blank",
        "inline.yaml:3:53: messages.output_blocked: must not be blank",
    ]


@pytest.mark.parametrize(
    "blank",
    ["\\u3164", "\\u2800", "\\u180e", "\\ufe0f", "\\u00ad", "\\u034f\\u2800 \\u115f"],
)
def test_a_message_of_blank_letters_or_marks_that_show_nothing_is_blank(blank: str) -> None:
    """A Hangul filler, the blank braille pattern, a Mongolian vowel separator or a
    variation selector alone loaded as a message users would see."""
    text = (
        f'name: p\nversion: "1"\nmessages: {{input_blocked: "{blank}"}}\n'
        "filters:\n  - id: aup\n    type: rules\n    config:\n"
        f'      rules:\n        - {{id: r, category: c, keywords: [x], message: "{blank}"}}\n'
    )
    problems = text_problems(text, filter_registry())
    assert [p.partition(": ")[2] for p in problems] == [
        "messages.input_blocked: must not be blank",
        "filters[0].config.rules[0].message: must not be blank",
    ]


def test_the_blank_check_knows_every_character_normalisation_deletes_as_invisible() -> None:
    """The pattern is written out; here it is held to the normaliser's own set (its
    Basic Multilingual Plane part: a JSON Schema pattern names no character past it)."""
    visible = re.compile(VISIBLE_PATTERN)
    plane = (chr(code) for code in range(0x10000) if not 0xD800 <= code < 0xE000)
    blank = {c for c in plane if not visible.fullmatch(c)}
    assert blank == {c for c in invisible_chars() if ord(c) < 0x10000} | {
        chr(code) for code in range(0x10000) if chr(code).isspace()
    }


def test_policy_error_message_lists_every_problem(registry: PluginRegistry[FilterSpec]) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(FIXTURES / "many_errors.yaml", registry)
    assert str(caught.value).splitlines() == [str(p) for p in caught.value.problems]


class StagedRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    stages: list[Stage] | None = None


class StagedRulesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rules: list[StagedRule] = msgspec.field(default_factory=list)


def test_a_rule_outside_the_stages_its_filter_type_runs_at_is_an_error(
    registry: PluginRegistry[FilterSpec],
) -> None:
    """The entry sets no stages: it runs at every stage its (input-only) type supports."""
    registry.register(
        "input-rules",
        FilterSpec(
            type="input-rules",
            config_type=StagedRulesConfig,
            build=InputOnlyFilter,
            stages=frozenset({Stage.INPUT}),
        ),
    )
    text = (
        HEAD
        + "filters:\n  - id: a\n    type: input-rules\n    config:\n      rules:\n"
        + "        - {id: live, stages: [input, output]}\n"
        + "        - {id: dead, stages: [output]}\n"
    )
    assert text_problems(text, registry) == [
        "inline.yaml:9:30: filters[0].config.rules[1].stages: rule 'dead' runs at output "
        "only, but the 'input-rules' filter runs at input only: the rule would never run "
        "(change the rule's 'stages')"
    ]


# --- the exported editor schema --------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_committed_schema_matches_a_fresh_generation() -> None:
    committed = (REPO / "policies" / "schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(filter_registry()), (
        "policies/schema.json is stale: run `python -m guardrail.policy.schema`"
    )


def test_exported_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = policy_json_schema(filter_registry())

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == SCHEMA_ID
    assert schema["title"] == "Guardrail policy"


def test_write_schema_writes_sorted_pretty_json_with_a_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"

    write_schema(path, filter_registry())

    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_a_valid_policy_validates_against_the_exported_schema() -> None:
    validator = jsonschema.Draft202012Validator(policy_json_schema(filter_registry()))
    validator.validate(load_yaml(FIXTURES / "valid.yaml"))


@pytest.mark.parametrize(
    "fixture",
    [
        "unknown_top_level_key.yaml",
        "unknown_rule_key.yaml",
        "wrong_type.yaml",
        "bad_action.yaml",
        "unknown_filter_type.yaml",
        "missing_version.yaml",
    ],
)
def test_an_invalid_policy_fails_the_exported_schema(fixture: str) -> None:
    validator = jsonschema.Draft202012Validator(policy_json_schema(filter_registry()))
    assert not validator.is_valid(load_yaml(FIXTURES / fixture))


AGREEMENT_CASES = [
    pytest.param("timeout_ms: {v}\n", id="timeout_ms"),
    pytest.param("stream: {{window_chars: {v}}}\n", id="stream.window_chars"),
    pytest.param(
        "filters:\n  - {{id: a, type: rules, timeout_ms: {v}}}\n", id="filters[0].timeout_ms"
    ),
    pytest.param(
        "filters:\n  - {{id: a, type: rules, config: {{segment_chars: {v}}}}}\n",
        id="rules.segment_chars",
    ),
]


@pytest.mark.parametrize("value", ["200", "200.0", "2.5", "'200'", "true", "0", "-1.0"])
@pytest.mark.parametrize("where", AGREEMENT_CASES)
def test_the_loader_and_the_exported_schema_agree_on_whole_numbers(where: str, value: str) -> None:
    """JSON has one number type: Draft 2020-12 counts 200.0 as an integer, as does any
    YAML-to-JSON step a CI check runs first. A file that passes the schema loads, with
    the value as an int, and one the loader refuses fails the schema."""
    text = 'name: p\nversion: "1"\n' + where.format(v=value)
    schema = jsonschema.Draft202012Validator(policy_json_schema(filter_registry()))
    schema_accepts = schema.is_valid(yaml.safe_load(text))
    try:
        policy = load_policy_text(text, "inline.yaml", filter_registry())
    except PolicyError:
        loader_accepts = False
    else:
        loader_accepts = True
        ints = [policy.stream.window_chars] + [
            getattr(f.config, "segment_chars", 0) for f in policy.filters
        ]
        assert all(type(n) is int for n in ints)
    assert loader_accepts == schema_accepts
    assert loader_accepts == (value in ("200", "200.0"))


RULES_ENTRY = "filters:\n  - id: a\n    type: rules\n"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("    stages: []\n", "6:13: filters[0].stages: list at least one stage, or remove"),
        (
            "    config: {rules: [{id: r, category: c, keywords: [x], all: []}]}\n",
            "6:63: filters[0].config.rules[0].all: must not be an empty list",
        ),
        (
            "    config: {rules: [{id: r, category: c, keywords: [x], any: []}]}\n",
            "6:63: filters[0].config.rules[0].any: must not be an empty list",
        ),
        (
            "    config: {rules: [{id: r, category: c, keywords: [x], not: {}}]}\n",
            "6:63: filters[0].config.rules[0].not: must not be empty",
        ),
        (
            "    config: {rules: [{id: r, category: c, any: [{keywords: [x]}, {}]}]}\n",
            "6:66: filters[0].config.rules[0].any[1]: must not be empty",
        ),
        (
            "    config: {rules: [{id: r, category: c, keywords: ['  ']}]}\n",
            "6:54: filters[0].config.rules[0].keywords[0]: must not be blank",
        ),
        # The loader found these empty once normalised; the schema took them.
        (
            '    config: {rules: [{id: r, category: c, keywords: ["\\u200b"]}]}\n',
            "6:54: filters[0].config.rules[0].keywords[0]: must not be blank",
        ),
        (
            '    config: {rules: [{id: r, category: "\\u200b", keywords: [x]}]}\n',
            "6:40: filters[0].config.rules[0].category: must not be blank",
        ),
    ],
)
def test_what_the_loader_refuses_the_exported_schema_refuses_too(where: str, expected: str) -> None:
    """An editor or CI check with policies/schema.json passed these; the loader did not."""
    text = 'name: p\nversion: "1"\n' + RULES_ENTRY + where
    schema = jsonschema.Draft202012Validator(policy_json_schema(filter_registry()))
    assert not schema.is_valid(yaml.safe_load(text))
    problems = text_problems(text, filter_registry())
    assert len(problems) == 1
    assert problems[0].startswith(f"inline.yaml:{expected}")


def test_a_nan_number_is_refused_at_its_key_in_the_loaders_words() -> None:
    """JSON Schema bounds pass NaN (no comparison holds); msgspec's own refusal was raw."""
    text = (
        'name: p\nversion: "1"\n'
        + RULES_ENTRY
        + "    config: {rules: [{id: r, category: c, semantic: {examples: [a b], "
        + "threshold: .nan}}]}\n"
    )
    assert text_problems(text, filter_registry()) == [
        "inline.yaml:6:82: filters[0].config.rules[0].semantic.threshold: '.nan' is not a "
        "number (NaN); write a number"
    ]


class ClashRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pattern: str


class ClashConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rules: list[ClashRule] = msgspec.field(default_factory=list)


# Named like the built-in Rule struct, with different fields: both must survive the merge.
ClashRule.__name__ = ClashRule.__qualname__ = "Rule"


def test_config_schemas_with_clashing_definition_names_keep_their_own_meaning() -> None:
    registry = filter_registry()
    registry.register(
        "clash", FilterSpec(type="clash", config_type=ClashConfig, build=InputOnlyFilter)
    )
    schema = policy_json_schema(registry)
    validator = jsonschema.Draft202012Validator(schema)
    head = {"name": "p", "version": "1"}

    def entry(filter_type: str, rule: dict[str, Any]) -> dict[str, Any]:
        return {**head, "filters": [{"id": "f", "type": filter_type, "config": {"rules": [rule]}}]}

    assert {"Rule", "rules.Rule"} <= set(schema["$defs"])  # types merge in name order
    assert validator.is_valid(entry("clash", {"pattern": "x"}))
    assert not validator.is_valid(entry("clash", {"id": "r", "category": "c"}))
    assert validator.is_valid(entry("rules", {"id": "r", "category": "c"}))
    assert not validator.is_valid(entry("rules", {"pattern": "x"}))


@pytest.mark.parametrize(
    "version",
    [
        "2026.11 \u2013 \u00fcn\u00efcode",
        "v7\r\nx-injected: yes",
        " 1",
        "1 ",
        "tab\there",
        "2026-1\n",  # Python's "$" matched before the final line break: it passed
    ],
)
def test_a_version_that_cannot_be_an_http_header_value_is_refused(
    registry: PluginRegistry[FilterSpec], version: str
) -> None:
    """It is sent in x-guardrail-policy-version: a bad one would break every response."""
    (problem,) = text_problems(f"name: p\nversion: {json.dumps(version)}\n", registry)
    assert problem.startswith("inline.yaml:2:10: version: ")
    assert problem.endswith(
        "cannot be sent in an HTTP header: use printable ASCII (letters, "
        "digits, punctuation, inner spaces), no line breaks"
    )
    for good in ("2026.11.22-6", "1", "v1.2.3+build.7", "shadow 2"):
        load_policy_text(f"name: p\nversion: {json.dumps(good)}\n", "p.yaml", registry)


def test_an_id_ending_in_a_line_break_is_refused(registry: PluginRegistry[FilterSpec]) -> None:
    text = 'name: "p\\n"\nversion: "1"\n'
    problems = text_problems(text, registry)
    assert any(p.startswith("inline.yaml:1:7: name: ") for p in problems), problems


def test_a_mistyped_engine_type_is_named_as_the_mistake(
    registry: PluginRegistry[FilterSpec],
) -> None:
    text = (
        'name: p\nversion: "1"\nfilters:\n  - id: aup\n    type: rules\n    config:\n'
        "      classifiers:\n        guard: {type: llama-gaurd, model: /m}\n"
        "      rules:\n        - {id: a, category: c, keywords: [x]}\n"
    )
    assert text_problems(text, registry) == [
        "inline.yaml:8:23: filters[0].config.classifiers.guard.type: 'llama-gaurd' is not a "
        "valid value (expected one of: embedding-heads, llama-guard); did you mean "
        "'llama-guard'?"
    ]


ENGINE_POLICY = (
    'name: p\nversion: "1"\nfilters:\n  - id: aup\n    type: rules\n    config:\n'
    "      classifiers:\n        g: {ENGINE}\n"
    "      rules:\n        - {id: a, category: c, classifier: {engine: g, label: violence}}\n"
)


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        (
            "{type: llama-guard, model: /m, template: llama-guard-4}",
            "8:53: filters[0].config.classifiers.g.template: 'llama-guard-4' is not a valid "
            "value (expected one of: llama-guard-1, llama-guard-2, llama-guard-3); did you "
            "mean 'llama-guard-3'?",
        ),
        (
            "{type: llama-guard, model: /m, max_char: 500}",
            "8:43: filters[0].config.classifiers.g.max_char: unknown key 'max_char' (expected "
            "one of: type, model, template, device, dtype, max_chars, max_windows, "
            "max_new_tokens, descriptions); did you mean 'max_chars'?",
        ),
        # Neither "missing required key 'model'" (llama-guard's) nor, with the engine
        # left out, "unknown classifier engine 'g'" for the rule that names it.
        (
            "{type: embedding-heads, weights: 5}",
            "8:45: filters[0].config.classifiers.g.weights: expected a string, got a whole "
            "number; put the value in quotes to make it a string",
        ),
        (
            "{type: llama-guard}",
            "8:9: filters[0].config.classifiers.g: missing required key 'model'",
        ),
        (
            "{model: /m}",
            "8:9: filters[0].config.classifiers.g: missing required key 'type' (one of: "
            "embedding-heads, llama-guard)",
        ),
        ("5", "8:12: filters[0].config.classifiers.g: expected a mapping, got a whole number"),
    ],
)
def test_an_engine_setting_is_explained_against_the_engine_type_it_names(
    registry: PluginRegistry[FilterSpec], engine: str, expected: str
) -> None:
    text = ENGINE_POLICY.replace("{ENGINE}", engine)
    assert text_problems(text, registry) == [f"inline.yaml:{expected}"]


def test_a_struct_check_inside_a_mapping_of_names_names_the_key_and_its_line(
    registry: PluginRegistry[FilterSpec],
) -> None:
    """msgspec writes the path as ``$.classifiers[...]``; the engine at fault is found."""
    text = (
        'name: p\nversion: "1"\nfilters:\n  - id: f\n    type: rules\n    config:\n'
        "      rules:\n        - {id: r, category: c, classifier: {engine: aup, label: unsafe}}\n"
        "      classifiers:\n"
        "        other: {type: embedding-heads}\n"
        "        aup: {type: embedding-heads, encoder: default, probe: {}}\n"
        "        later: {type: embedding-heads, encoder: default, probe: {}}\n"
    )
    assert text_problems(text, registry) == [
        "inline.yaml:11:9: filters[0].config.classifiers.aup: 'probe' and 'encoder' are "
        "alternatives (the probe is calibrated for the heads alone)"
    ]


def test_a_schema_error_in_a_config_does_not_hide_its_other_problems(
    registry: PluginRegistry[FilterSpec],
) -> None:
    text = (
        'name: p\nversion: "1"\nfilters:\n  - id: aup\n    type: rules\n    config:\n'
        "      colour: blue\n      rules:\n"
        "        - {id: a, category: c, keywords: [x]}\n"
        "        - {id: a, category: c, regex: ['(']}\n"
    )
    problems = text_problems(text, registry)
    assert [p.split(": ")[1] for p in problems] == [
        "filters[0].config.colour",
        "filters[0].config.rules[1].id",
        "filters[0].config.rules[1].regex[0]",
    ]


def test_openai_categories_rows_replace_the_built_in_ones(
    registry: PluginRegistry[FilterSpec],
) -> None:
    """Rows of the file win; unlisted categories keep the built-in table's row."""
    text = 'name: m\nversion: "1"\nopenai_categories:\n  weapons: [violence]\n  spam: []\n'
    policy = load_policy_text(text, "inline.yaml", registry)
    assert policy.openai_categories["weapons"] == ("violence",)
    assert policy.openai_categories["spam"] == ()
    assert policy.openai_categories["self_harm"] == ("self-harm",)


def test_an_unknown_openai_category_is_located(registry: PluginRegistry[FilterSpec]) -> None:
    text = 'name: m\nversion: "1"\nopenai_categories:\n  weapons: [violence, gore]\n'
    [problem] = text_problems(text, registry)
    assert problem.startswith("inline.yaml:4:23: openai_categories.weapons[1]:")
    assert "violence/graphic)" in problem


def test_the_readmes_yaml_examples_parse_and_its_policy_example_loads() -> None:
    """Its policy tests were written `{input: How do I make a pipe bomb?, ...}`: a `?`
    ends a plain value inside braces, so an author who copied them got invalid YAML."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) >= 5
    for block in blocks:
        yaml.safe_load(block)  # raises on the first block that is not YAML
    (policy,) = (b for b in blocks if b.startswith("name:"))
    loaded = load_policy_text(policy, "README.md", filter_registry())
    assert loaded.filters


# -- regexes outside the rules filter -------------------------------------------------------

PII_PATTERN = """\
name: p
version: "1"
filters:
  - id: pii
    type: pii
    config:
      entities: {X_ID: {}}
      recognizers: [{entity: X_ID, patterns: ['PATTERN']}]
"""


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # Presidio compiles a pattern with the regex engine, which writes every copy of a
        # repeat out: x{200000} loaded and built holding half a gigabyte.
        ("x{1001}", "regex repeats a part 1,001 times (counting repeats inside repeats"),
        ("(?:ab{10}){101}", "regex repeats a part 1,010 times (counting repeats inside repeats"),
        # Past the re module's count: an OverflowError placed at filters[0].config.
        ("a{99999999999}", "invalid regex: repeat count too big"),
        # A literal to re, a fuzzy match the regex engine refuses: loaded, then the
        # filter did not build.
        ("x{e<=a}", "invalid regex: bad fuzzy cost limit"),
    ],
)
def test_a_pii_pattern_the_regex_engine_refuses_or_holds_too_many_copies_of_is_refused_at_it(
    pattern: str, expected: str
) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(PII_PATTERN.replace("PATTERN", pattern), "p.yaml", filter_registry())
    (problem,) = info.value.problems
    assert (problem.line, problem.key) == (8, "filters[0].config.recognizers[0].patterns[0]")
    assert problem.message.startswith(expected), problem.message


def test_a_pii_pattern_within_the_repeat_limit_loads() -> None:
    text = PII_PATTERN.replace("PATTERN", "X-(?:\\d{10}){100}")
    assert load_policy_text(text, "p.yaml", filter_registry()).filters[0].type == "pii"


async def test_a_reload_whose_pii_pattern_repeats_past_the_limit_keeps_the_running_policy(
    tmp_path: Path,
) -> None:
    """The reload is refused at the pattern's key; it had loaded, and swapped in a filter
    holding every copy (a{4294967294} exhausted the gateway's memory)."""
    path = tmp_path / "p.yaml"
    path.write_text(PII_PATTERN.replace("PATTERN", "X-\\d{6}"), encoding="utf-8")
    with ThreadPoolExecutor(1) as pool:
        store = GuardStore(path, filter_registry(), BuildContext(pool, base_dir=tmp_path))
        store.load()
        bad = PII_PATTERN.replace("PATTERN", "x{2000}").replace('version: "1"', 'version: "2"')
        path.write_text(bad, encoding="utf-8")
        result = await store.reload()
    assert (result.ok, result.version, store.current.policy.version) == (False, "1", "1")
    assert (
        f"{path}:8:47: filters[0].config.recognizers[0].patterns[0]: regex repeats a part "
        "2,000 times"
    ) in str(result.error)


def test_a_cutoff_term_past_the_re_modules_repeat_count_is_refused_at_its_key() -> None:
    """re's OverflowError escaped the term check: it was placed at filters[0].config."""
    text = (
        'name: p\nversion: "1"\nfilters:\n  - id: facts\n    type: hallucination\n'
        "    config:\n      cutoff: {terms: [latest, 'a{99999999999}']}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml", filter_registry())
    (problem,) = info.value.problems
    assert (problem.line, problem.key) == (7, "filters[0].config.cutoff.terms[1]")
    assert problem.message.startswith("invalid regular expression: the repetition number is too")


CJK_KEYWORDS = (
    'name: p\nversion: "VERSION"\nfilters:\n  - id: aup\n    type: rules\n    config:\n'
    "      rules:\n"
    "        - {id: poison, category: drugs, action: block, keywords: [毒品, 毒]}\n"
    "        - {id: other, category: weapons, action: block, any: [{keywords: [爆]}]}\n"
)


def test_a_one_character_keyword_of_an_unspaced_script_loads_with_a_warning_at_its_key() -> None:
    """毒 ("poison") has no edges in Chinese text, so it blocked 病毒 ("virus") and 消毒液
    ("disinfectant") with no word from the loader. The policy loads; each such keyword is
    a warning that names its file, line and key."""
    policy = load_policy_text(CJK_KEYWORDS, "p.yaml", filter_registry())
    assert [(w.file, w.line, w.key) for w in policy.warnings] == [
        ("p.yaml", 8, "filters[0].config.rules[0].keywords[1]"),
        ("p.yaml", 9, "filters[0].config.rules[1].any[0].keywords[0]"),
    ]
    assert "'毒'" in policy.warnings[0].message
    assert "matches inside every word" in policy.warnings[0].message
    # A word of two characters, or one letter of a spaced script, is no warning.
    fine = CJK_KEYWORDS.replace("毒]", "xq]").replace("[爆]", "[爆弹]")
    assert load_policy_text(fine, "p.yaml", filter_registry()).warnings == ()


async def test_a_reload_reports_the_new_policy_s_warnings(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(CJK_KEYWORDS.replace("[毒品, 毒]", "[毒品]").replace("[爆]", "[爆弹]"))
    with ThreadPoolExecutor(1) as pool:
        store = GuardStore(path, filter_registry(), BuildContext(pool, base_dir=tmp_path))
        store.load()
        path.write_text(CJK_KEYWORDS.replace("VERSION", "2"), encoding="utf-8")
        with capture_logs() as logs:
            result = await store.reload()
    assert (result.ok, store.current.policy.version) == (True, "2")
    assert [w.split(": ", 2)[1] for w in result.warnings] == [
        "filters[0].config.rules[0].keywords[1]",
        "filters[0].config.rules[1].any[0].keywords[0]",
    ]
    assert [e["line"] for e in logs if e["event"] == "policy_warning"] == [8, 9]
