"""The policy in force, and reloading it without ever running on a half-built one.

``reload()`` loads and builds the new policy completely (off the event loop: filters
may load models), then swaps it in with one assignment. Any error keeps the running
policy and is returned to the caller, who reports it. Requests that started before a
swap finish under the guard they started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from guardrail.errors import GuardrailError
from guardrail.guard.cache import VerdictCache
from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.guard import Guard
from guardrail.plugins import PluginRegistry
from guardrail.policy.loader import load_policy

log = structlog.get_logger("guardrail.policy")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    name: str
    version: str
    digest: str
    error: str | None = None
    partial: bool = False
    """The default policy reloaded (``name`` ``version`` is in force), another did not."""
    warnings: tuple[str, ...] = ()
    """The new policy's warnings (see ``Policy.warnings``), ``file:line:column: key: ...``."""


# How long a reload may take to build its policy (model filters load models: minutes on a
# CPU). A build that hangs (a stuck model load) otherwise held the store's lock, and every
# later reload waited behind it for ever.
RELOAD_TIMEOUT_S = 600.0


class GuardStore:
    """Holds the current :class:`Guard`; ``on_swap`` is told about each new one.

    The verdict cache is shared by successive guards (and by the tenant stores) and
    cleared on every swap; its keys also name the guard that decided each verdict, so
    no verdict outlives its guard nor reaches another store's.
    """

    def __init__(
        self,
        path: str | Path,
        registry: PluginRegistry[FilterSpec],
        env: BuildContext,
        on_swap: Callable[[Guard], None] | None = None,
        cache: VerdictCache | None = None,
        *,
        reload_timeout_s: float = RELOAD_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.reload_timeout_s = reload_timeout_s
        self._registry = registry
        self._env = env
        self._on_swap = on_swap
        self.cache = cache
        self._guard: Guard | None = None
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._guard is not None

    @property
    def current(self) -> Guard:
        if self._guard is None:
            raise RuntimeError("no policy loaded yet")
        return self._guard

    def build(self) -> Guard:
        """Load and build the policy file; raises PolicyError (or RegistryError) on problems."""
        policy = load_policy(self.path, self._registry)
        return Guard.build(policy, self._registry, self._env, self.cache)

    def load(self) -> Guard:
        """First load, at startup: errors propagate and stop the gateway."""
        self._swap(self.build())
        return self.current

    async def reload(self) -> ReloadResult:
        """Load the file again; on any error keep the running policy and say why."""
        async with self._lock:
            try:
                # The build's thread cannot be stopped: past the limit it is left to end
                # on its own, and what it builds is dropped.
                guard = await asyncio.wait_for(asyncio.to_thread(self.build), self.reload_timeout_s)
            except TimeoutError:
                return self._kept(
                    f"the policy took longer than {self.reload_timeout_s:g} s to build "
                    "(a model load that hangs?); the build was abandoned"
                )
            except Exception as e:  # anything, even a filter's model failing to load
                return self._kept(
                    str(e) if isinstance(e, GuardrailError) else f"{type(e).__name__}: {e}"
                )
            self._swap(guard)
            p = guard.policy
            return ReloadResult(
                ok=True,
                name=p.name,
                version=p.version,
                digest=p.digest,
                warnings=tuple(str(w) for w in p.warnings),
            )

    def _kept(self, error: str) -> ReloadResult:
        """A failed reload's result: the running policy, and why the new one is not."""
        old = self._guard
        return ReloadResult(
            ok=False,
            name=old.policy.name if old else "",
            version=old.policy.version if old else "",
            digest=old.policy.digest if old else "",
            error=error,
        )

    def _swap(self, guard: Guard) -> None:
        self._guard = guard
        for warning in guard.policy.warnings:  # at startup and on each reload
            log.warning(
                "policy_warning", file=warning.file, line=warning.line, message=str(warning)
            )
        if self.cache is not None:
            self.cache.clear()
        if self._on_swap is not None:
            self._on_swap(guard)
