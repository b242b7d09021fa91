"""The guard pipeline: concurrency, time limits, fail-closed, combination, plugins."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from guardrail.chat import Message
from guardrail.errors import PolicyError
from guardrail.guard.filter import LOOP_TEXT_CHARS, BuildContext, FilterSpec
from guardrail.guard.guard import FILTER_ERROR_CATEGORY, Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.types import (
    Action,
    FilterContext,
    Finding,
    Redaction,
    Stage,
    Verdict,
    apply_redactions,
    redacted_span,
)
from guardrail.plugins import PluginRegistry
from guardrail.policy.loader import load_policy_text


class ScriptConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Config of a test filter whose behaviour is set by the policy."""

    # allow | flag | block | redact | raise | hang | garbage | unbuildable
    behaviour: str = "allow"
    delay_ms: int = 0


class ScriptFilter:
    """A real Filter implementation that does what its config says."""

    def __init__(self, name: str, config: ScriptConfig, env: BuildContext) -> None:
        if config.behaviour == "unbuildable":  # a library's own error, not a ConfigError
            raise RuntimeError("model weights could not be loaded")
        self.name = name
        self.stages = frozenset(Stage)
        self.config = config
        self.calls = 0

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        self.calls += 1
        if self.config.delay_ms:
            await asyncio.sleep(self.config.delay_ms / 1000)
        match self.config.behaviour:
            case "raise":
                raise RuntimeError("model exploded: " + text)
            case "hang":
                await asyncio.sleep(3600)
            case "garbage":
                return "not a verdict"  # type: ignore[return-value]
            case "redact":
                return Verdict(
                    Action.REDACT,
                    (Finding("secret", 0.9, Action.REDACT, span=(0, 3)),),
                    (Redaction(0, 3, "<X>"),),
                )
            case "flag" | "block" as action:
                return Verdict.from_findings([Finding(action, 0.5, Action(action))])
        return Verdict()


SCRIPT = FilterSpec(type="script", config_type=ScriptConfig, build=ScriptFilter)


@pytest.fixture
def registry() -> PluginRegistry[FilterSpec]:
    reg = filter_registry()
    reg.register("script", SCRIPT)
    return reg


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
def make_guard(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor
) -> Callable[[str], Guard]:
    def make(filters_yaml: str, head: str = "") -> Guard:
        text = f'name: t\nversion: "1"\n{head}filters:\n' + textwrap.indent(
            textwrap.dedent(filters_yaml), "  "
        )
        policy = load_policy_text(text, "inline.yaml", registry)
        return Guard.build(policy, registry, BuildContext(executor))

    return make


CTX = FilterContext("req-1")


async def test_when_no_filter_objects_the_text_is_allowed_unchanged(
    make_guard: Callable[[str], Guard],
) -> None:
    guard = make_guard("- {id: a, type: script}\n- {id: b, type: script}\n")
    decision = await guard.check(Stage.INPUT, "hello", CTX)
    assert decision.action is Action.ALLOW
    assert decision.text == "hello"
    assert [o.filter_id for o in decision.outcomes] == ["a", "b"]
    assert all(o.status == "ok" for o in decision.outcomes)


async def test_strictest_action_wins_and_findings_are_keyed_by_policy_filter_id(
    make_guard: Callable[[str], Guard],
) -> None:
    guard = make_guard(
        "- {id: soft, type: script, config: {behaviour: flag}}\n"
        "- {id: hard, type: script, config: {behaviour: block}}\n"
    )
    decision = await guard.check(Stage.INPUT, "x", CTX)
    assert decision.action is Action.BLOCK
    assert {(f.filter_id, f.category) for f in decision.findings} == {
        ("soft", "flag"),
        ("hard", "block"),
    }


async def test_filters_of_a_stage_run_concurrently(make_guard: Callable[[str], Guard]) -> None:
    guard = make_guard(
        "".join(f"- {{id: f{i}, type: script, config: {{delay_ms: 200}}}}\n" for i in range(5))
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await guard.check(Stage.INPUT, "x", CTX)
    # Five 200 ms filters one after another would take a full second.
    assert loop.time() - started < 0.8


@pytest.mark.parametrize(
    ("behaviour", "status", "error"),
    [
        ("raise", "error", "RuntimeError"),
        ("hang", "timeout", None),
        ("garbage", "error", "TypeError"),
    ],
)
async def test_a_failing_filter_blocks_by_default_and_is_reported(
    make_guard: Callable[[str], Guard], behaviour: str, status: str, error: str | None
) -> None:
    guard = make_guard(
        f"- {{id: broken, type: script, timeout_ms: 50, config: {{behaviour: {behaviour}}}}}\n"
    )
    with capture_logs() as logs:
        decision = await guard.check(Stage.INPUT, "secret user text", CTX)
    assert decision.action is Action.BLOCK
    outcome = decision.outcomes[0]
    assert (outcome.status, outcome.error) == (status, error)
    assert decision.findings[0].category == FILTER_ERROR_CATEGORY
    # The error is recorded by type only: exception messages may quote user text.
    assert "secret" not in repr(outcome)
    failed = [e for e in logs if e["event"] == "filter_failed"]
    if status == "error":  # logged for operators: filter, type and where, never the text
        assert [(e["filter"], e["error"]) for e in failed] == [("broken", error)]
        assert ".py:" in failed[0]["at"]
        assert "secret" not in repr(failed)
    else:
        assert failed == []


MALFORMED: dict[str, Callable[[], object]] = {
    # The action as a plain string: "block" is not Action.BLOCK, so it must not pass.
    "string_action": lambda: Verdict("block", (Finding("x", 1.0, Action.BLOCK),)),  # type: ignore[arg-type]
    "unknown_action": lambda: Verdict("deny"),  # type: ignore[arg-type]
    "no_action": lambda: Verdict(None),  # type: ignore[arg-type]
    "finding_action_string": lambda: Verdict(Action.FLAG, (Finding("x", 1.0, "flag"),)),  # type: ignore[arg-type]
    "finding_score_string": lambda: Verdict(Action.FLAG, (Finding("x", "high"),)),  # type: ignore[arg-type]
    "finding_span_outside": lambda: Verdict(Action.FLAG, (Finding("x", span=(50, 90)),)),
    "finding_extent_outside": lambda: Verdict(
        Action.FLAG, (Finding("x", span=(0, 2), extent=(0, 90)),)
    ),
    "float_span": lambda: Verdict(Action.REDACT, (), (Redaction(0.0, 2, "#"),)),  # type: ignore[arg-type]
    "replacement_none": lambda: Verdict(Action.REDACT, (), (Redaction(0, 2, None),)),  # type: ignore[arg-type]
    "score_string": lambda: Verdict(score="high"),  # type: ignore[arg-type]
    # Findings that block under a verdict left at its default (allow): the filter said
    # block, so the verdict must not let the text through.
    "allow_with_a_blocking_finding": lambda: Verdict(findings=(Finding("x", 1.0, Action.BLOCK),)),
    "flag_with_a_redacting_finding": lambda: Verdict(
        Action.FLAG, (Finding("x", 1.0, Action.REDACT),)
    ),
}


class MalformedConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    returns: str = ""


class MalformedFilter:
    """A third-party filter that returns a Verdict with ill-typed or impossible parts."""

    def __init__(self, name: str, config: MalformedConfig, env: BuildContext) -> None:
        self.name, self.stages, self.returns = name, frozenset(Stage), config.returns

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return MALFORMED[self.returns]()  # type: ignore[return-value]


@pytest.mark.parametrize("returns", sorted(MALFORMED))
async def test_a_malformed_verdict_is_a_filter_error_and_blocks(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor, returns: str
) -> None:
    registry.register("malformed", FilterSpec("malformed", MalformedConfig, MalformedFilter))
    policy = load_policy_text(
        'name: t\nversion: "1"\nfilters:\n'
        f"  - {{id: odd, type: malformed, config: {{returns: {returns}}}}}\n",
        "inline.yaml",
        registry,
    )
    guard = Guard.build(policy, registry, BuildContext(executor))
    decision = await guard.check(Stage.INPUT, "hello world", CTX)
    assert decision.action is Action.BLOCK
    assert decision.blocked
    assert decision.text == "hello world"
    assert (decision.outcomes[0].status, decision.outcomes[0].error) in {
        ("error", "TypeError"),
        ("error", "ValueError"),
    }
    assert [f.to_dict()["category"] for f in decision.findings] == [FILTER_ERROR_CATEGORY]


@pytest.mark.parametrize(("on_error", "expected"), [("allow", Action.ALLOW), ("flag", Action.FLAG)])
async def test_on_error_can_be_relaxed_per_policy_or_per_filter(
    make_guard: Callable[[str], Guard], on_error: str, expected: Action
) -> None:
    policy_level = make_guard(
        "- {id: broken, type: script, config: {behaviour: raise}}\n", f"on_error: {on_error}\n"
    )
    filter_level = make_guard(
        f"- {{id: broken, type: script, on_error: {on_error}, config: {{behaviour: raise}}}}\n"
    )
    for guard in (policy_level, filter_level):
        decision = await guard.check(Stage.INPUT, "x", CTX)
        assert decision.action is expected
        assert decision.outcomes[0].status == "error"


def test_a_filter_whose_build_raises_any_error_is_a_policy_error_at_its_entry(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    """Not only a ConfigError: a RuntimeError from a model library stopped startup with
    a traceback, not ``file:line:column: key:`` as the loader's problems are named."""
    text = (
        'name: t\nversion: "1"\nfilters:\n  - {id: a, type: script}\n'
        "  - {id: b, type: script, config: {behaviour: unbuildable}}\n"
    )
    policy = load_policy_text(text, "p.yaml", registry, base_dir=tmp_path)
    with pytest.raises(PolicyError) as raised:
        Guard.build(policy, registry, BuildContext(executor))
    assert [str(p) for p in raised.value.problems] == [
        f"{tmp_path / 'p.yaml'}:5:5: filters[1]: filter 'b' (script) does not build: "
        "RuntimeError: model weights could not be loaded"
    ]
    assert isinstance(raised.value.__cause__, RuntimeError)


async def test_a_filter_runs_only_at_its_stages(make_guard: Callable[[str], Guard]) -> None:
    guard = make_guard("- {id: out, type: script, stages: [output], config: {behaviour: block}}\n")
    assert (await guard.check(Stage.INPUT, "x", CTX)).action is Action.ALLOW
    assert (await guard.check(Stage.OUTPUT, "x", CTX)).action is Action.BLOCK
    assert guard.filters_at(Stage.INPUT) == []


@pytest.mark.parametrize(
    ("filters", "texts"),
    [
        ("- {id: out, type: script, stages: [output], config: {behaviour: block}}\n", ("a", "b")),
        ("- {id: any, type: script, config: {behaviour: block}}\n", ("", "")),
    ],
    ids=["no-input-filter", "every-message-empty"],
)
async def test_a_conversation_no_filter_reads_is_decided_allowed_as_a_whole(
    make_guard: Callable[[str], Guard], filters: str, texts: tuple[str, str]
) -> None:
    """An output-only policy's prompts had no input decision: they counted nowhere as
    checked (stage_outcomes_total, the audit row's input_action, feedback, the report)."""
    guard = make_guard(filters)
    messages = tuple(Message("user", t) for t in texts)
    ctx = FilterContext("r", messages=messages)

    decided = await guard.check_messages(Stage.INPUT, messages, ctx)

    assert [(i, d.stage, d.action, d.text, d.outcomes) for i, d in decided] == [
        (None, Stage.INPUT, Action.ALLOW, "\n\n".join(texts), ())
    ]


async def test_redactions_from_several_filters_compose(make_guard: Callable[[str], Guard]) -> None:
    guard = make_guard(
        "- {id: r, type: script, config: {behaviour: redact}}\n"
        "- id: words\n"
        "  type: rules\n"
        "  config: {rules: [{id: e, category: email, action: redact, replacement: '<E>',"
        " regex: ['\\S+@\\S+']}]}\n"
    )
    decision = await guard.check(Stage.INPUT, "abc mail a@b.co now", CTX)
    assert decision.action is Action.REDACT
    assert decision.text == "<X> mail <E> now"


# -- apply_redactions invariants ------------------------------------------------------------

spans = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 12), st.sampled_from(["#", "<P>", ""])),
    max_size=6,
)


@given(text=st.text(alphabet="abcdef xyz", min_size=1, max_size=40), raw=spans)
def test_a_redaction_leaves_none_of_its_findings_behind(
    text: str, raw: list[tuple[int, int, str]]
) -> None:
    redactions = [Redaction(s, min(s + n, len(text)), r) for s, n, r in raw if s < len(text)]
    # Mark every redacted character with a letter that appears nowhere else.
    marked = "".join(
        "Q" if any(r.start <= i < r.end for r in redactions) else c for i, c in enumerate(text)
    )
    assert "Q" not in apply_redactions(marked, redactions)


@given(
    text=st.text(alphabet="abcdef xyz", min_size=1, max_size=40),
    raw=spans,
    where=st.tuples(st.integers(0, 40), st.integers(0, 40)),
)
def test_a_span_clear_of_the_redactions_selects_the_same_text_after_them(
    text: str, raw: list[tuple[int, int, str]], where: tuple[int, int]
) -> None:
    redactions = [Redaction(s, min(s + n, len(text)), r) for s, n, r in raw if s < len(text)]
    start, end = sorted(min(i, len(text)) for i in where)
    redacted = apply_redactions(text, redactions)
    a, b = redacted_span((start, end), redactions)
    assert 0 <= a <= b <= len(redacted)
    if all(r.end <= start or r.start >= end for r in redactions):
        assert redacted[a:b] == text[start:end]


@pytest.mark.parametrize(
    ("span", "selected"),
    [
        ((0, 4), "Mail"),
        ((5, 9), "<E1>"),  # the redacted run itself: its replacement
        ((3, 7), "l <E1>"),  # into the run: through its replacement
        ((14, 17), "now"),  # after it: moved by its length's change
    ],
)
def test_a_span_is_moved_onto_the_redacted_text(span: tuple[int, int], selected: str) -> None:
    text = "Mail a@b.c to now"
    redactions = [Redaction(5, 10, "<E1>")]
    a, b = redacted_span(span, redactions)
    assert apply_redactions(text, redactions)[a:b] == selected


@pytest.mark.parametrize(
    "span", [(5, 7), (3, 9), (-5, -2), (-3, 0)], ids=["after", "at_end", "before", "to_start"]
)
def test_a_redaction_outside_the_text_changes_nothing(span: tuple[int, int]) -> None:
    assert apply_redactions("abc", [Redaction(*span, "[X]")]) == "abc"


@given(text=st.text(max_size=60))
def test_no_redactions_leave_the_text_unchanged(text: str) -> None:
    assert apply_redactions(text, []) is text


@given(text=st.text(max_size=200))
async def test_an_allowed_text_is_never_changed(text: str) -> None:
    registry = filter_registry()
    policy = load_policy_text(
        'name: t\nversion: "1"\nfilters:\n  - {id: w, type: rules, config: {rules: '
        "[{id: r, category: c, keywords: [zzzq]}]}}\n",
        "inline.yaml",
        registry,
    )
    with ThreadPoolExecutor(1) as pool:
        guard = Guard.build(policy, registry, BuildContext(pool))
        decision = await guard.check(Stage.INPUT, text, CTX)
    if decision.action is Action.ALLOW:
        assert decision.text == text


# -- plugins -----------------------------------------------------------------------------


PLUGIN_MODULE = """
import msgspec
from guardrail.guard.filter import FilterSpec
from guardrail.guard.types import Stage, Verdict

class Config(msgspec.Struct, forbid_unknown_fields=True):
    level: int = 1

class Shout:
    def __init__(self, name, config, env):
        self.name, self.stages = name, frozenset(Stage)

    async def check(self, text, ctx):
        return Verdict()

SPEC = FilterSpec(type="shout", config_type=Config, build=Shout)
"""


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Install a real distribution (dist-info with entry points) on sys.path."""

    def install(entry_points: str) -> None:
        (tmp_path / "acme_filters.py").write_text(PLUGIN_MODULE)
        dist = tmp_path / "acme_filters-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-filters\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[guardrail.filters]\n{entry_points}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "acme_filters", raising=False)

    return install


def test_a_third_party_filter_is_found_through_its_entry_point(
    install_plugin: Callable[[str], None],
) -> None:
    """A package that declares a ``guardrail.filters`` entry point needs no change here."""
    install_plugin("shout = acme_filters:SPEC")
    registry = filter_registry()
    assert "shout" in registry.names()
    policy = load_policy_text(
        'name: t\nversion: "1"\nfilters:\n  - {id: s, type: shout, config: {level: 2}}\n',
        "inline.yaml",
        registry,
    )
    assert policy.filters[0].config.level == 2


def test_a_plugin_cannot_replace_a_built_in(install_plugin: Callable[[str], None]) -> None:
    from guardrail.filters import rules

    install_plugin("rules = acme_filters:SPEC")  # the plugin's SPEC has type "shout"
    assert filter_registry().get("rules") is rules.SPEC


async def test_filter_context_state_is_per_request(make_guard: Callable[[str], Guard]) -> None:
    a, b = FilterContext("a"), FilterContext("b")
    a.at(Stage.OUTPUT).state["k"] = 1
    assert a.state == {"k": 1}
    assert b.state == {}


def test_shared_resources_create_each_model_once_across_threads() -> None:
    from guardrail.guard.filter import SharedResources

    shared = SharedResources()
    created: list[int] = []

    def load() -> object:
        created.append(1)
        return object()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: shared.get(("model", "x"), load), range(32)))
    assert len(created) == 1
    assert all(r is results[0] for r in results)
    assert shared.get(("model", "y"), load) is not results[0]
    assert len(shared) == 2


class Seen(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class SeeingFilter:
    """Records what a plugin would see: the text, the index and the message it names."""

    def __init__(self, name: str, config: Seen, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset(Stage)
        self.seen: list[tuple[str, int | None, str | None]] = []

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        message = ctx.message
        self.seen.append((text, ctx.message_index, None if message is None else message.content))
        return Verdict()


@pytest.mark.parametrize("index", [-1, 2, 5])
def test_a_context_cannot_name_a_message_it_does_not_have(index: int) -> None:
    messages = (Message("system", "s"), Message("user", "u"))
    with pytest.raises(ValueError, match="message_index"):
        FilterContext("r", messages=messages, message_index=index)
    with pytest.raises(ValueError, match="message_index"):
        FilterContext("r", messages=messages).at(Stage.INPUT, index)
    assert FilterContext("r", messages=messages, message_index=1).message == messages[1]
    assert FilterContext("r", messages=messages).message is None


async def test_a_filter_gets_an_index_only_for_the_message_it_checks(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor
) -> None:
    registry.register("seeing", FilterSpec(type="seeing", config_type=Seen, build=SeeingFilter))
    policy = load_policy_text(
        'name: t\nversion: "1"\nfilters:\n  - {id: s, type: seeing}\n', "inline.yaml", registry
    )
    guard = Guard.build(policy, registry, BuildContext(executor))
    (_, filt), *_ = guard.filters
    assert isinstance(filt, SeeingFilter)
    messages = (Message("system", "be kind"), Message("user", "hi"), Message("user", ""))
    ctx = FilterContext("r", messages=messages)
    await guard.check_messages(Stage.INPUT, messages, ctx)
    assert sorted(filt.seen) == [("be kind", 0, "be kind"), ("hi", 1, "hi")]
    filt.seen.clear()
    # A caller passing a context for another text: the index does not reach the filter.
    await guard.check(Stage.INPUT, "hi [redacted]", ctx.at(Stage.INPUT, 1))
    await guard.check(Stage.OUTPUT, "an answer", ctx.at(Stage.INPUT, 1))
    await guard.check(Stage.OUTPUT, "hi", ctx.at(Stage.INPUT, 1))  # the same text: kept
    assert filt.seen == [("hi [redacted]", None, None), ("an answer", None, None), ("hi", 1, "hi")]


class RecordingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class RecordingFilter:
    """Notes each text it checks, with the content of the message its context names."""

    def __init__(self, name: str, config: RecordingConfig, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset(Stage)
        self.seen: list[tuple[str, str | None]] = []

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        self.seen.append((text, ctx.message.content if ctx.message else None))
        return Verdict()


class StatefulRecordingFilter(RecordingFilter):
    def remember(self, text: str, verdict: Verdict, ctx: FilterContext) -> None:
        pass


@pytest.mark.parametrize("words", [2, 500])
async def test_when_a_text_is_long_then_its_spaced_reading_is_made_off_the_event_loop(
    make_guard: Callable[[str], Guard], monkeypatch: pytest.MonkeyPatch, words: int
) -> None:
    """The spaced reading of a text past LOOP_TEXT_CHARS is made on the executor: on the
    loop it held every other request; a short text's stays on the loop."""
    import guardrail.guard.guard as guard_module

    real = guard_module.spaced
    threads: list[int] = []

    def recording(text: str) -> str | None:
        threads.append(threading.get_ident())
        return real(text)

    monkeypatch.setattr(guard_module, "spaced", recording)
    guard = make_guard("- {id: a, type: script}\n")
    text = "pipe\u200bbomb " * words
    decision = await guard.check(Stage.INPUT, text, CTX)
    assert decision.action is Action.ALLOW
    assert [t == threading.get_ident() for t in threads] == [len(text) <= LOOP_TEXT_CHARS]


async def test_a_long_text_s_spaced_reading_waits_within_the_filter_s_time_limit(
    registry: PluginRegistry[FilterSpec],
) -> None:
    """The reading waited for a busy executor outside any time limit: with a model call
    still holding the only worker, a check of 1,100 characters took 5 s and said "ok"."""
    busy = ThreadPoolExecutor(1)
    release = threading.Event()
    busy.submit(release.wait, 5)  # a model call running on after its caller timed out
    try:
        policy = load_policy_text(
            'name: t\nversion: "1"\ntimeout_ms: 100\nfilters:\n  - {id: a, type: script}\n',
            "inline.yaml",
            registry,
        )
        guard = Guard.build(policy, registry, BuildContext(busy))
        short = await guard.check(Stage.INPUT, "x" * LOOP_TEXT_CHARS, CTX)
        long = await guard.check(Stage.INPUT, "x" * (LOOP_TEXT_CHARS + 100), CTX)
    finally:
        release.set()
        busy.shutdown()
    assert [o.status for o in short.outcomes] == ["ok"]
    assert [o.status for o in long.outcomes] == ["timeout"]
    assert long.action is Action.BLOCK  # on_error: block


async def test_a_text_with_invisible_characters_is_also_read_with_them_as_spaces(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor
) -> None:
    """Each filter also reads "pipe\\u200bbomb" as "pipe bomb", with its message reading
    the same in the context; a stateful filter (request state per text) reads it once."""
    registry.register("recording", FilterSpec("recording", RecordingConfig, RecordingFilter))
    registry.register("stateful", FilterSpec("stateful", RecordingConfig, StatefulRecordingFilter))
    policy = load_policy_text(
        'name: t\nversion: "1"\nfilters:\n  - {id: r, type: recording}\n'
        "  - {id: s, type: stateful}\n",
        "inline.yaml",
        registry,
    )
    guard = Guard.build(policy, registry, BuildContext(executor))
    text = "a pipe\u200bbomb"
    messages = (Message("user", "hello"), Message("user", text))
    await guard.check_messages(Stage.INPUT, messages, FilterContext("r", messages=messages))
    plain, stateful = (f for _, f in guard.filters)
    assert isinstance(plain, RecordingFilter)
    assert isinstance(stateful, RecordingFilter)
    assert sorted(plain.seen) == [("a pipe bomb",) * 2, (text, text), ("hello", "hello")]
    assert sorted(stateful.seen) == [(text, text), ("hello", "hello")]
    # A joiner inside an emoji sequence stands for no space: read once.
    family = "a family \U0001f468\u200d\U0001f469\u200d\U0001f467"
    await guard.check(Stage.INPUT, family, FilterContext("r"))
    assert [seen for seen, _ in plain.seen if "family" in seen] == [family]
