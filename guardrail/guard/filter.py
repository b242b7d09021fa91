"""The filter interface, and how a filter type declares itself to the registry.

A filter family is one :class:`FilterSpec`: its type name, its typed config (a
``msgspec.Struct`` whose fields carry descriptions, validated when the policy loads
and exported to ``policies/schema.json``), and a ``build`` function. Example::

    class ShoutConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        max_upper_ratio: Annotated[float, msgspec.Meta(description="...")] = 0.8

    class ShoutFilter:
        def __init__(self, name: str, config: ShoutConfig, env: BuildContext) -> None:
            self.name, self.stages, self._config = name, frozenset(Stage), config

        async def check(self, text: str, ctx: FilterContext) -> Verdict:
            upper = sum(c.isupper() for c in text) / max(1, len(text))
            if upper > self._config.max_upper_ratio:
                return Verdict.from_findings([Finding("shouting", upper)])
            return ALLOW

    SPEC = FilterSpec(type="shout", config_type=ShoutConfig, build=ShoutFilter)
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

from guardrail.guard.types import FilterContext, Stage, Verdict

T = TypeVar("T")
P = ParamSpec("P")

# Passes over a whole text (normalisation, the spaced reading, date scans) cost about
# 3 µs of CPU a character: normalize() took 0.8-5.5 ms on 1,000 characters and 1.5-8.6 ms
# on 2,000 (prose, spelled-out letters, zero-width characters, look-alikes, upside-down
# text; best of 5 on one core of the 2-core dev machine), a thread hop about 0.2 ms.
# Up to this many characters a pass runs on the event loop (a few ms; a rules check makes
# at most three); a longer text's runs on the executor. On the loop, a 1 MB prompt held
# every request, /healthz too, for seconds, and outlived its filter's time limit, which
# cannot interrupt code that never yields.
LOOP_TEXT_CHARS = 1000


async def text_pass(
    executor: Executor | None, chars: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``fn(*args, **kwargs)``, a pass over a text of ``chars`` characters: here when
    the text is short (:data:`LOOP_TEXT_CHARS`), else on ``executor`` (``None``: the
    loop's default one).

    A caller that stops waiting (its time limit, a cancelled request) returns at once;
    the pass itself runs on in its thread to its end, as a model call does.
    """
    if chars <= LOOP_TEXT_CHARS:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))


@runtime_checkable
class Filter(Protocol):
    """Checks one text. Returns a verdict; a block is a value, never an exception.

    ``name`` is the policy's id for this filter instance. Heavy work (model calls)
    must run off the event loop, through ``BuildContext.executor``.
    """

    name: str
    stages: frozenset[Stage]

    async def check(self, text: str, ctx: FilterContext) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class _Held:
    """One object of :class:`SharedResources`: the version asked for, and the object once
    its ``create()`` returned (or the error it raised)."""

    version: Hashable
    made: Future[Any]


class SharedResources:
    """Heavy objects (models, micro-batchers) shared by every filter of the process.

    A policy reload builds new filters; ``get`` hands them the model the old ones
    used, so a process holds one instance of each model however often it reloads.
    """

    def __init__(self) -> None:
        self._items: dict[Hashable, _Held] = {}
        # Guards the table only, never a create(): held for a model load, it made every
        # other load wait (a reload's new model behind an abandoned one that hung, for
        # ever) and every /metrics scrape (values()) with it.
        self._lock = threading.Lock()

    def get(self, key: Hashable, create: Callable[[], T], *, version: Hashable = None) -> T:
        """The object stored under ``key``, created by ``create()`` the first time.

        ``version`` says which state of its source the object reflects (a weights
        file's size and mtime): asked for another version, ``get`` creates the object
        again and keeps only the new one. Filters built before still hold the old one
        until they go; the store never keeps two, however often the file changes.

        A caller that asks for an object another thread is creating waits for that one
        (its reload's time limit still bounds the reload), even if the build that started
        it was abandoned: a second load of the same model beside a stuck one would double
        its memory and most likely get stuck the same way. A ``create()`` that fails is
        not kept: the next caller tries again.
        """
        with self._lock:
            held = self._items.get(key)
            mine = held is None or held.version != version
            if mine:
                held = self._items[key] = _Held(version, Future())
        assert held is not None
        if not mine:
            item: T = held.made.result()
            return item
        try:
            item = create()
        except BaseException as e:
            with self._lock:
                if self._items.get(key) is held:
                    del self._items[key]
            held.made.set_exception(e)
            raise
        held.made.set_result(item)
        return item

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[Any]:
        """The objects held now, those still being created left out (a copy: for
        metrics, read at each scrape, which must never wait for a model load)."""
        with self._lock:
            made = [held.made for held in self._items.values()]
        return [f.result() for f in made if f.done() and f.exception() is None]


def policy_folder(path: str | Path) -> Path:
    """The folder of the policy file at ``path``, the ``base_dir`` its relative paths
    (weights files) are read from: made absolute, symlinks kept.

    Not ``resolve()``: a Kubernetes ConfigMap volume reaches its files through a
    ``..data`` symlink the kubelet points at a new timestamped folder on each update,
    then deletes the old one. The resolved folder of startup was gone after the first
    update, and every reload that read weights from it failed.
    """
    return Path(os.path.abspath(path)).parent


@dataclass(frozen=True, slots=True)
class BuildContext:
    """Shared resources handed to every filter when a policy is built.

    ``base_dir`` is the policy file's folder, for relative paths in filter configs.
    ``executor`` is the process-wide pool for blocking model calls (never one per request).
    ``resources`` keeps one instance of each model per process, across reloads.
    ``allow_downloads`` is false unless the settings say the machine may fetch models.
    ``incremental`` says whether filters may reuse per-text results across requests
    (their own analysis caches); it follows the verdict cache setting.
    ``embedding_precision`` is the shared sentence encoder's (``auto``, ``fp32``, ``bf16``).
    ``regexes_off_loop`` runs the policy's own regexes (the rules filter's) on
    ``executor`` rather than the event loop, on short texts too (a long text's always
    run there, see ``rules.LOOP_REGEX_CHARS``): a shadow policy's, whose checks share the
    live loop, where a candidate's regex that backtracks to its time limit held every
    live request.
    ``parallel_checks`` bounds how many messages of one conversation are checked at a
    time (0: all at once). A filter's time limit runs from the start of its check, so
    with every message of a long conversation started at once the last ones waited for
    the CPU behind the others and timed out (a harmless history blocked as a filter
    error); the gateway sets it to the filter pool's size.
    """

    executor: Executor
    base_dir: Path = field(default_factory=Path.cwd)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "guardrail")
    allow_downloads: bool = False
    resources: SharedResources = field(default_factory=SharedResources)
    incremental: bool = True
    embedding_precision: str = "auto"
    regexes_off_loop: bool = False
    parallel_checks: int = 0

    def model_source(self, source: str) -> str:
        """A model setting (folder, file, hub id or package name) as the loaders take it.

        A relative path is read from ``base_dir``, as every other path in a policy. A
        name that is no file or folder there and is not written as a path (a hub id
        ``org/name``, a spaCy package) stays as written, for the loader to look up,
        unless it names one under the working directory: the loader would take that
        folder (the policy's meaning then hung on where ``serve`` started), so it is read
        from ``base_dir``, where its absence is reported.
        """
        path = Path(source).expanduser()
        if path.is_absolute():
            return str(path)
        local = self.base_dir / path
        written_as_path = (
            source.startswith((".", "\\"))
            or source.lower().endswith(".gguf")
            or source.count("/") > 1
        )
        return str(local) if written_as_path or local.exists() or path.exists() else source


@runtime_checkable
class HoldsBack(Protocol):
    """Optional: a filter that needs streamed text held back past a window's cut.

    ``holdback(text)`` returns how many trailing characters of ``text`` must not be
    released yet, e.g. a PII filter holding ``"<PERSO"`` until the placeholder is whole.
    """

    def holdback(self, text: str) -> int: ...


@runtime_checkable
class Stateful(Protocol):
    """Optional: a filter whose check also fills request state (``ctx.state``).

    When a cached verdict answers for the filter, the guard calls ``remember`` so the
    filter can rebuild that state from the text and the verdict (for example the
    placeholder-to-value map of a reversible redaction), without the cache ever
    holding the values.
    """

    def remember(self, text: str, verdict: Verdict, ctx: FilterContext) -> None: ...


Grounder = Callable[[str, Sequence[str], "str | None", "str | None"], Awaitable[dict[str, Any]]]
"""Scores ``text`` against ``sources`` as the answer to a question (text, sources,
question, scope: the tenant, whose cached embeddings alone it reuses): the groundedness
report."""


@runtime_checkable
class Grounds(Protocol):
    """Optional: a filter that can score any text against any sources (groundedness).

    The moderation endpoint asks the policy's grounding filter, so its weights, judge
    and threshold apply to ``context`` requests too. ``scope`` is the tenant asking:
    what is cached for one tenant never answers another (a hit answers faster).
    """

    async def groundedness(
        self, text: str, sources: Sequence[str], question: str | None, *, scope: str | None = None
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """A semantic problem in a filter config; ``path`` is relative to the filter's ``config``.

    ``warning``: the config works but likely not as its author means; the policy loads
    and the problem is shown (``policy validate``, the startup and reload logs)."""

    path: tuple[str | int, ...]
    message: str
    warning: bool = False


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """A filter type: registered under ``type``; policies name it in ``filters[].type``.

    ``validate`` runs after the config matched its schema, for what a schema cannot
    say (a regex that does not compile, duplicate rule ids); the policy loader turns
    each issue into a ``file:line:column`` error.
    """

    type: str
    config_type: builtins.type[Any]
    build: Callable[[str, Any, BuildContext], Filter]
    stages: frozenset[Stage] = frozenset(Stage)
    description: str = ""
    validate: Callable[[Any], Iterable[ConfigIssue]] | None = None
