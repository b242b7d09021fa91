"""The verdict cache: unchanged turns reuse their verdicts, and never a weaker one."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.chat import Message
from guardrail.guard.cache import VerdictCache, prefix_digests
from guardrail.guard.filter import BuildContext, FilterSpec, SharedResources
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.store import GuardStore
from guardrail.guard.types import (
    Action,
    FilterContext,
    Finding,
    Redaction,
    Stage,
    Verdict,
)
from guardrail.plugins import PluginRegistry
from guardrail.policy.loader import load_policy_text
from tests.fakes.filters import LISTED


class CountConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scope: str = "text"  # the cache_scope the filter declares: text | prefix | none
    conversation: bool = False
    fail_on: str = ""


class Counting:
    """Flags "bad"; counts every check. Its cache scope comes from the policy."""

    calls: list[str]  # class-level, shared by every instance built in a test

    def __init__(self, name: str, config: CountConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self.cache_scope = config.scope
        if config.conversation:
            self.scope = "conversation"
        self.fail_on = config.fail_on
        self.remembered: list[str] = []

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        Counting.calls.append(text)
        if self.fail_on and self.fail_on in text:
            raise RuntimeError("flaky model")
        if self.scope_is_conversation and "part one" in text and "part two" in text:
            return Verdict.from_findings([Finding("split_jailbreak", 1.0, Action.BLOCK)])
        if "bad" in text:
            start = text.index("bad")
            return Verdict(
                Action.REDACT,
                (Finding("bad", 0.7, Action.REDACT, span=(start, start + 3)),),
                (Redaction(start, start + 3, f"<BAD_{ctx.message_index}>"),),
            )
        return Verdict()

    @property
    def scope_is_conversation(self) -> bool:
        return getattr(self, "scope", "message") == "conversation"

    def remember(self, text: str, verdict: Verdict, ctx: FilterContext) -> None:
        self.remembered.append(text)
        ctx.state.setdefault(self.name, []).extend(
            text[r.start : r.end] for r in verdict.redactions
        )


COUNTING = FilterSpec(type="counting", config_type=CountConfig, build=Counting)


@pytest.fixture
def registry() -> PluginRegistry[FilterSpec]:
    Counting.calls = []
    reg = filter_registry()
    reg.register("counting", COUNTING)
    return reg


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
def make_guard(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor
) -> Callable[..., Guard]:
    def make(config: str = "{}", cache: VerdictCache | None = None, version: str = "1") -> Guard:
        text = (
            f'name: c\nversion: "{version}"\nfilters:\n'
            f"  - {{id: count, type: counting, config: {config}}}\n"
        )
        policy = load_policy_text(text, "cache.yaml", registry)
        return Guard.build(policy, registry, BuildContext(executor), cache or VerdictCache())

    return make


def conversation(turns: int) -> list[Message]:
    messages = [Message("system", "You are a helpful assistant.")]
    for i in range(turns):
        messages.append(Message("user", f"Question {i}: tell me about topic {i}."))
        messages.append(Message("assistant", f"Answer {i}: topic {i} is interesting."))
    return messages


async def check(guard: Guard, messages: list[Message]) -> list[Any]:
    ctx = FilterContext("r", messages=tuple(messages))
    return await guard.check_messages(Stage.INPUT, messages, ctx)


async def test_unchanged_turns_reuse_their_verdicts_and_only_new_ones_are_checked(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard()
    history = conversation(5)
    await check(guard, history)
    assert len(Counting.calls) == len(history)
    Counting.calls.clear()
    grown = [*history, Message("user", "A brand new question?")]
    decisions = await check(guard, grown)
    assert Counting.calls == ["A brand new question?"]
    outcomes = [d.outcomes[0].cache for _, d in decisions]
    assert outcomes == ["hit"] * len(history) + ["miss"]


async def test_a_tenant_never_reuses_a_verdict_another_tenant_left(
    make_guard: Callable[..., Guard],
) -> None:
    """Tenants on one policy keep their own verdicts: a hit answers faster, so a shared
    entry would let one tenant time whether another recently sent the same message."""
    guard = make_guard()
    history = conversation(2)

    async def as_tenant(tenant: str) -> list[str | None]:
        ctx = FilterContext("r", messages=tuple(history), tenant=tenant)
        decisions = await guard.check_messages(Stage.INPUT, history, ctx)
        return [d.outcomes[0].cache for _, d in decisions]

    assert await as_tenant("a") == ["miss"] * len(history)
    Counting.calls.clear()
    assert await as_tenant("b") == ["miss"] * len(history)
    assert Counting.calls == [m.content for m in history]  # checked again for "b"
    Counting.calls.clear()
    assert await as_tenant("a") == ["hit"] * len(history)
    assert await as_tenant("b") == ["hit"] * len(history)
    assert Counting.calls == []


async def test_a_changed_message_is_checked_again(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard()
    history = conversation(2)
    await check(guard, history)
    Counting.calls.clear()
    history[1] = Message("user", "Question 0, edited.")
    await check(guard, history)
    assert Counting.calls == ["Question 0, edited."]


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.sampled_from(["hello", "a bad day", "bad bad", "fine", "", "part one", "ok bad"]),
        min_size=1,
        max_size=8,
    )
)
def test_a_cached_decision_equals_the_uncached_one(texts: list[str]) -> None:
    registry = filter_registry()
    registry.register("counting", COUNTING)
    Counting.calls = []
    policy = load_policy_text(
        # The counting filter's placeholders depend on the message's position: "prefix".
        'name: c\nversion: "1"\nfilters:\n'
        "  - {id: count, type: counting, config: {scope: prefix}}\n"
        "  - id: words\n"
        "    type: rules\n    config: {rules: [{id: r, category: c, action: flag, "
        "keywords: [fine]}]}\n",
        "cache.yaml",
        registry,
    )
    messages = [Message("user", t) for t in texts]

    async def run() -> tuple[list[Any], list[Any], list[Any]]:
        with ThreadPoolExecutor(1) as pool:
            env = BuildContext(pool)
            cached = Guard.build(policy, registry, env, VerdictCache())
            plain = Guard.build(policy, registry, env, None)
            first = await check(cached, messages)
            second = await check(cached, messages)
            reference = await check(plain, messages)
            return first, second, reference

    first, second, reference = asyncio.run(run())

    def essence(decisions: list[Any]) -> list[Any]:
        return [(i, d.action, d.text, d.findings, d.redactions) for i, d in decisions]

    assert essence(second) == essence(reference) == essence(first)
    assert all(o.cache == "hit" for _, d in second for o in d.outcomes)


async def test_a_filter_that_does_not_declare_a_scope_is_never_cached(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard("{scope: none}")
    history = conversation(2)
    await check(guard, history)
    await check(guard, history)
    assert len(Counting.calls) == 2 * len(history)
    assert guard.cache is not None
    assert len(guard.cache) == 0


async def test_failed_checks_are_not_cached(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard("{fail_on: flaky}")
    messages = [Message("user", "a flaky one")]
    first = await check(guard, messages)
    assert first[0][1].action is Action.BLOCK  # fail closed
    await check(guard, messages)
    assert Counting.calls == ["a flaky one", "a flaky one"]


async def test_prefix_scope_keys_on_the_conversation_before_the_message(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard("{scope: prefix}")
    a = [Message("user", "first"), Message("user", "a bad thing")]
    b = [Message("user", "other"), Message("user", "a bad thing")]
    await check(guard, a)
    Counting.calls.clear()
    decisions = await check(guard, b)
    # Same text after a different history: checked again, since a prefix-scoped
    # verdict (like placeholder numbering) may depend on what came before.
    assert Counting.calls == ["other", "a bad thing"]
    assert decisions[1][1].outcomes[0].cache == "miss"
    Counting.calls.clear()
    grown = await check(guard, [*a, Message("user", "more")])
    assert Counting.calls == ["more"]
    assert grown[1][1].text == "a <BAD_1> thing"


async def test_a_hit_lets_a_stateful_filter_rebuild_its_request_state(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard()
    messages = [Message("user", "a bad thing")]
    await check(guard, messages)
    ctx = FilterContext("second", messages=tuple(messages))
    await guard.check_messages(Stage.INPUT, messages, ctx)
    # The original value comes from this request's text, not from the cache.
    assert ctx.state["count"] == ["bad"]


async def test_the_cache_stores_no_text(make_guard: Callable[..., Guard]) -> None:
    cache = VerdictCache()
    guard = make_guard(cache=cache)
    secret = "my password is hunter2 and it is bad"
    await check(guard, [Message("user", secret)])
    stored = repr(list(cache._items.items()))
    assert "hunter2" not in stored
    assert "password" not in stored


async def test_the_cache_is_bounded_and_evicts_the_least_recently_used(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(cache=VerdictCache(max_entries=3))
    for text in ["a", "b", "c"]:
        await check(guard, [Message("user", text)])
    await check(guard, [Message("user", "a")])  # "a" is now the most recent
    await check(guard, [Message("user", "d")])  # evicts "b"
    Counting.calls.clear()
    await check(guard, [Message("user", t) for t in ["a", "c", "d", "b"]])
    assert Counting.calls == ["b"]
    assert guard.cache is not None
    assert len(guard.cache) == 3


async def test_a_policy_reload_invalidates_the_cache(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('name: c\nversion: "1"\nfilters:\n  - {id: count, type: counting}\n')
    cache = VerdictCache()
    store = GuardStore(path, registry, BuildContext(executor), cache=cache)
    store.load()
    messages = [Message("user", "hello")]
    await check(store.current, messages)
    assert len(cache) == 1
    path.write_text(path.read_text().replace('"1"', '"2"'))
    assert (await store.reload()).ok
    assert len(cache) == 0
    Counting.calls.clear()
    await check(store.current, messages)
    assert Counting.calls == ["hello"]


class HangingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hang: bool = False


class HangingFilter:
    """Its build waits (for ``release``, at most 10 s) when its config says ``hang``: a
    model load that is stuck."""

    release = threading.Event()

    def __init__(self, name: str, config: HangingConfig, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset(Stage)
        if config.hang:
            self.release.wait(10)

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()


async def test_a_reload_whose_build_hangs_fails_at_its_limit_and_frees_the_next(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    """A build that hung held the store's lock: every later reload waited behind it."""
    registry.register("hanging", FilterSpec("hanging", HangingConfig, HangingFilter))
    path = tmp_path / "p.yaml"
    policy = (
        'name: h\nversion: "{v}"\nfilters:\n  - {{id: h, type: hanging, config: {{hang: {h}}}}}\n'
    )
    path.write_text(policy.format(v=1, h="false"))
    store = GuardStore(path, registry, BuildContext(executor), reload_timeout_s=0.2)
    store.load()
    HangingFilter.release.clear()
    try:
        path.write_text(policy.format(v=2, h="true"))
        hung = await store.reload()
        assert not hung.ok
        assert hung.version == "1"  # the running policy stays
        assert "took longer than 0.2 s" in (hung.error or "")
        path.write_text(policy.format(v=3, h="false"))
        assert (await store.reload()).ok
        assert store.current.policy.version == "3"
    finally:
        HangingFilter.release.set()


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str


class ModelFilter:
    """Loads its model through the shared resources at build; the model ``stuck`` loads
    only once ``release`` is set (at most 10 s): a model load that hangs."""

    loads: ClassVar[list[str]] = []
    loading = threading.Event()
    release = threading.Event()

    def __init__(self, name: str, config: ModelConfig, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset(Stage)
        self.model = env.resources.get(("model", config.model), lambda: self.load(config.model))

    @classmethod
    def load(cls, model: str) -> object:
        cls.loads.append(model)
        if model == "stuck":
            cls.loading.set()
            cls.release.wait(10)
        return object()

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict()


async def test_a_model_load_that_hangs_holds_up_no_other_model_and_is_loaded_once(
    registry: PluginRegistry[FilterSpec], executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    """Shared models were created under the resources' one lock: an abandoned build whose
    model load hung kept it, so the next reload timed out even for another model."""
    registry.register("model", FilterSpec("model", ModelConfig, ModelFilter))
    ModelFilter.loads = []
    ModelFilter.loading.clear()
    ModelFilter.release.clear()
    path = tmp_path / "p.yaml"
    policy = (
        'name: m\nversion: "{v}"\nfilters:\n  - {{id: m, type: model, config: {{model: {m}}}}}\n'
    )
    path.write_text(policy.format(v=1, m="first"))
    env = BuildContext(executor)
    store = GuardStore(path, registry, env, reload_timeout_s=0.2)
    store.load()
    try:
        path.write_text(policy.format(v=2, m="stuck"))
        assert not (await store.reload()).ok
        assert ModelFilter.loading.wait(10)  # the abandoned build is loading it still
        path.write_text(policy.format(v=3, m="other"))
        assert (await store.reload()).ok
        assert len(env.resources.values()) == 2  # the load under way is not waited for
        # The stuck model again: the reload waits for the load under way, no second one.
        store.reload_timeout_s = 10
        path.write_text(policy.format(v=4, m="stuck"))
        again = asyncio.ensure_future(store.reload())
        ModelFilter.release.set()
        assert (await again).ok
        assert ModelFilter.loads == ["first", "stuck", "other"]
    finally:
        ModelFilter.release.set()


def test_a_shared_model_whose_load_failed_is_loaded_again_by_the_next_caller() -> None:
    resources = SharedResources()

    def fail() -> object:
        raise OSError("the weights file is gone")

    with pytest.raises(OSError, match="weights file is gone"):
        resources.get("model", fail)
    assert resources.values() == []
    made = object()
    assert resources.get("model", lambda: made) is made
    assert resources.values() == [made]


async def test_conversation_filters_see_the_whole_conversation_and_are_never_cached(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard("{conversation: true}")
    turns = [Message("user", "Remember part one."), Message("user", "Now do part two.")]
    decisions = await check(guard, turns)
    assert [i for i, _ in decisions] == [None]
    assert decisions[0][1].action is Action.BLOCK
    assert decisions[0][1].findings[0].category == "split_jailbreak"
    await check(guard, turns)
    assert len(Counting.calls) == 2
    assert Counting.calls[0] == "Remember part one.\n\nNow do part two."


async def test_a_conversation_filter_redaction_counts_as_a_flag(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard("{conversation: true}")
    decisions = await check(guard, [Message("user", "a bad thing")])
    decision = decisions[0][1]
    assert decision.action is Action.FLAG
    assert decision.redactions == ()


def test_prefix_digests_identify_each_history() -> None:
    messages = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    digests = prefix_digests(messages)
    assert len(digests) == 3
    assert len(set(digests)) == 3
    assert prefix_digests(messages[:2]) == digests[:2]
    # Role and text boundaries are part of the identity.
    assert prefix_digests([Message("user", "ab"), Message("user", "")]) != prefix_digests(
        [Message("user", "a"), Message("user", "b")]
    )


def test_the_gateway_counts_hits_per_filter(
    make_app: Callable[..., Litestar], metrics_registry: CollectorRegistry
) -> None:
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    with TestClient(app=make_app()) as client:
        for messages in (turn1, turn2):
            r = client.post(
                "/v1/chat/completions", json={"model": "fake-model", "messages": messages}
            )
            assert r.status_code == 200
    get = metrics_registry.get_sample_value
    assert get("guardrail_verdict_cache_total", {"filter": "words", "result": "miss"}) == 4
    assert get("guardrail_verdict_cache_total", {"filter": "words", "result": "hit"}) == 2


def test_the_cache_can_be_turned_off(
    make_app: Callable[..., Litestar], metrics_registry: CollectorRegistry
) -> None:
    with TestClient(app=make_app(verdict_cache_entries=0)) as client:
        for _ in range(2):
            client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]},
            )
    get = metrics_registry.get_sample_value
    assert get("guardrail_verdict_cache_total", {"filter": "words", "result": "hit"}) is None


LISTED_POLICY = """name: tenant
version: "1"
filters:
  - {id: listed, type: listed, config: {words: words.txt}}
"""


def test_a_tenant_never_gets_a_verdict_cached_under_another_tenants_policy(
    tmp_path: Path, test_policy: Path, backend: Any
) -> None:
    # Two tenants' folders hold the same policy file (same name, version and bytes)
    # next to different word lists: the cache key was the same for both, so the first
    # tenant's "allow" was served to the second, whose list blocks the word.
    from guardrail.app import create_app
    from guardrail.settings import ApiKeyEntry, Settings, TenantConfig

    registry = filter_registry()
    registry.register("listed", LISTED)
    files = {}
    for tenant, words in (("lenient", "nothing"), ("strict", "tea")):
        folder = tmp_path / tenant
        folder.mkdir()
        (folder / "words.txt").write_text(words)
        files[tenant] = folder / "policy.yaml"
        files[tenant].write_text(LISTED_POLICY)
    keys = {t: f"sk-{t}-0123456789" for t in files}
    settings = Settings(
        policy=str(test_policy),
        api_keys=[
            ApiKeyEntry(tenant=t, key_sha256=hashlib.sha256(k.encode()).hexdigest())
            for t, k in keys.items()
        ],
        tenants={t: TenantConfig(policy=str(p)) for t, p in files.items()},
    )
    app = create_app(settings, backend=backend, filters=registry)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "tea please"}]}
    with TestClient(app=app) as client:
        for tenant, status in (("lenient", 200), ("strict", 400), ("lenient", 200)):
            r = client.post(
                "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {keys[tenant]}"},
            )
            assert r.status_code == status, (tenant, r.text)


def test_when_verdicts_carry_many_redactions_then_the_cache_holds_a_bounded_number() -> None:
    """Bounded by findings and redactions kept, not only by entries: one message of the
    maximum body size can carry hundreds of thousands of redactions."""
    from guardrail.guard.types import Action, Finding, Redaction

    cache = VerdictCache(max_entries=1_000, max_items=100)
    for i in range(10):
        spans = [(k * 3, k * 3 + 2) for k in range(30)]
        verdict = Verdict.from_findings(
            [Finding("secret", 1.0, Action.REDACT, span=s) for s in spans],
            [Redaction(a, b, "[X]") for a, b in spans],
        )
        cache.put(("p", "f", "input", bytes([i]), b""), verdict)
    huge = Verdict.from_findings(
        [Finding("secret", 1.0, Action.FLAG, span=(k, k + 1)) for k in range(500)]
    )
    cache.put(("p", "f", "input", b"huge", b""), huge)

    assert cache.held_items <= 100
    assert cache.get(("p", "f", "input", b"huge", b"")) is None
    assert cache.get(("p", "f", "input", bytes([9]), b"")) is not None
