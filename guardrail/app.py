"""``create_app(settings) -> Litestar``: the one place that wires the parts together.

Startup order: logging, metrics, the policy (a bad policy raises here and the
gateway never starts), then the backend (given, or built in the background so
``/healthz`` answers while a large model loads; ``/readyz`` says when it is ready).

Shutdown (SIGTERM; uvicorn first stops accepting and lets open connections finish
within ``shutdown_timeout_s``): wait until no request holds a slot (streams included),
await every ``gateway.on_shutdown`` callable in order (the audit log's flush), then
close the rate limiter, the backend and the filter pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from litestar import Litestar, Response, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from prometheus_client import CollectorRegistry

from guardrail import __version__
from guardrail.api.auth import (
    AuthMiddleware,
    KeyRing,
    Tenants,
    open_mode_warning,
    unmatched_scope_tenants,
    unused_tenants,
)
from guardrail.api.consistency import ConsistencyChecker
from guardrail.api.errors import make_exception_handler
from guardrail.api.feedback import ROUTES as FEEDBACK_ROUTES
from guardrail.api.oversight import build_oversight
from guardrail.api.ratelimit import RateLimiter, RedisRateLimiter, build_rate_limiter
from guardrail.api.review import ROUTES as REVIEW_ROUTES
from guardrail.api.routes import ROUTES, RequestIdMiddleware
from guardrail.api.serving import Gateway, Serving
from guardrail.backends.base import Backend
from guardrail.backends.engine import EngineObserver
from guardrail.backends.registry import backend_registry
from guardrail.filters.grounding import GroundingScorer
from guardrail.filters.hallucination import default_grounder, shared_scorer
from guardrail.guard.cache import VerdictCache
from guardrail.guard.filter import BuildContext, FilterSpec, SharedResources, policy_folder
from guardrail.guard.guard import Guard
from guardrail.guard.registry import filter_registry
from guardrail.guard.shadow import ShadowPolicy
from guardrail.guard.store import GuardStore
from guardrail.observability.audit import CLOSE_TIMEOUT_S as AUDIT_CLOSE_TIMEOUT_S
from guardrail.observability.audit import audit_from_settings, check_store
from guardrail.observability.metrics import CacheStats, GatewayMetrics
from guardrail.observability.monitoring import monitor_from_settings
from guardrail.plugins import PluginRegistry
from guardrail.settings import Settings, misspelt_env
from guardrail.signals import ignore_sighup

log = structlog.get_logger("guardrail.app")
_T = TypeVar("_T")
_background: set[asyncio.Task[object]] = set()


def build_backend(settings: Settings) -> Backend:
    """Build the configured backend (blocking: a local model loads here)."""
    return backend_registry().get(settings.backend).build(settings)


def check_settings(settings: Settings) -> None:
    """Raise what :func:`create_app` raises about the settings alone, and name the
    ``GUARDRAIL_*`` variables that look misspelt, without loading a model: an audit DSN
    it cannot use (or whose extra is missing) or whose database cannot be opened, a group
    lexicon it cannot read, a redis URL without the redis extra. ``guardrail serve``
    calls it once logging is set up, before the backend, which may take minutes to load
    (or fail for the misspelling). What it builds is thrown away; the audit database is
    opened (its tables created) and closed again. Not for a running event loop."""
    for name, meant in misspelt_env(os.environ):  # names only: values may be secrets
        log.warning("unknown_setting_variable", variable=name, did_you_mean=meant)
    build_rate_limiter(settings.rate_limit_redis_url)
    audit = audit_from_settings(settings)
    if audit is not None:
        # The app's startup opens it too, after the model loaded: a database that could
        # not be opened then was reported by serve as a port it could not listen on.
        asyncio.run(check_store(audit.store))
    monitor_from_settings(settings, CollectorRegistry())


def consistency_from_settings(
    settings: Settings, env: BuildContext, metrics: GatewayMetrics
) -> ConsistencyChecker | None:
    """The self-consistency checker, or ``None`` when ``consistency_sample_rate`` is 0."""
    if settings.consistency_sample_rate <= 0:
        return None

    async def scorer() -> GroundingScorer:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(env.executor, shared_scorer, env)

    return ConsistencyChecker(
        scorer,
        metrics.consistency,
        rate=settings.consistency_sample_rate,
        samples=settings.consistency_samples,
        mode=settings.consistency_mode,
        threshold=settings.consistency_threshold,
        temperature=settings.consistency_temperature,
        max_in_flight=settings.consistency_max_in_flight,
        count=metrics.consistency_check,
    )


def check_scopes(ring: KeyRing, tenants: Tenants, policy: str | None) -> Callable[[Guard], None]:
    """A store's ``on_swap`` (startup and each reload) that warns about every tenant
    pattern of a rule's ``scope`` matching none of the tenants the policy file serves
    (``policy`` None: the shadow policy, which sees every tenant's traffic): such a rule
    applies to nobody, and a block rule meant for a tenant blocks nothing. Only with API
    keys: in open mode every request is tenant ``default``."""
    served = {t for t in ring.tenants if policy is None or tenants.get(t).policy == policy}

    def check(guard: Guard) -> None:
        if not served:  # no key's tenant uses this policy
            return
        source = str(guard.policy.source or policy or "")
        for scoped, close in unmatched_scope_tenants(guard.policy, served):
            log.warning(
                "unmatched_scope_tenant",
                file=source,
                line=scoped.line,
                filter=scoped.filter_id,
                rule=scoped.rule_id,
                tenant=scoped.pattern,
                did_you_mean=close,
                message=f"{source}:{scoped.line}:{scoped.column}: rule {scoped.rule_id!r} is "
                f"scoped to tenants {scoped.pattern!r}, which matches no tenant a key acts "
                "for with this policy; the rule applies to nobody there",
            )

    return check


SHADOW_DRAIN_S = 10.0


def shutdown_budget_s(settings: Settings) -> float:
    """The longest ``guardrail serve`` may take to exit after SIGTERM, by the bounds the
    code sets, one after the other: uvicorn's wait for open connections and the
    lifespan's drain of requests still holding a slot (``shutdown_timeout_s`` each), the
    shadow policy's drain and the audit log's flush (counted whether or not it is on).

    A supervisor's grace period (compose's ``stop_grace_period``, Kubernetes'
    ``terminationGracePeriodSeconds`` less the preStop sleep) must be longer: its SIGKILL
    cut streams short and lost the audit rows still queued.
    """
    shadow = SHADOW_DRAIN_S if settings.shadow_policy else 0.0
    return 2 * settings.shutdown_timeout_s + shadow + AUDIT_CLOSE_TIMEOUT_S


def _bounded(
    hook: Callable[[], Awaitable[object]], seconds: float
) -> Callable[[], Awaitable[None]]:
    """``hook`` given at most ``seconds`` (a shutdown step that must not hang shutdown)."""

    async def run() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hook(), timeout=seconds)

    run.__name__ = getattr(hook, "__name__", "hook")
    return run


def create_app(
    settings: Settings,
    *,
    backend: Backend | None = None,
    metrics_registry: CollectorRegistry | None = None,
    filters: PluginRegistry[FilterSpec] | None = None,
    rate_limiter: RateLimiter | None = None,
) -> Litestar:
    """Build the gateway. ``backend``: use this one instead of building it from settings.

    ``rate_limiter``: use this one instead of the one the settings describe.
    """
    ring = KeyRing.from_settings(settings)  # a key_env that is not set stops startup here
    # Before any model loads: a missing redis extra stops startup at once (the URL was
    # checked with the settings). Nothing connects until the first request.
    limiter = (
        rate_limiter
        if rate_limiter is not None
        else build_rate_limiter(settings.rate_limit_redis_url)
    )
    audit = audit_from_settings(settings)  # a bad DSN or a missing extra stops startup here
    metrics = GatewayMetrics(
        metrics_registry if metrics_registry is not None else CollectorRegistry()
    )
    # Bias, probes and drift; a group lexicon that cannot be read stops startup here.
    monitor = monitor_from_settings(settings, metrics.registry)
    executor = ThreadPoolExecutor(settings.filter_workers, thread_name_prefix="guardrail-filter")
    env = BuildContext(
        executor=executor,
        base_dir=policy_folder(settings.policy),
        cache_dir=settings.cache_path,
        allow_downloads=settings.allow_downloads,
        embedding_precision=settings.embedding_precision,
        incremental=settings.verdict_cache_entries > 0,
        parallel_checks=settings.filter_workers,
    )
    registry = filters if filters is not None else filter_registry()
    tenants = Tenants(settings)

    def on_swap(guard: Guard) -> None:
        metrics.set_policy(guard.policy.name, guard.policy.version, guard.policy.digest)
        check_scopes(ring, tenants, settings.policy)(guard)

    store = GuardStore(
        settings.policy,
        registry,
        env,
        on_swap=on_swap,
        cache=VerdictCache(settings.verdict_cache_entries)
        if settings.verdict_cache_entries
        else None,
    )
    # One store per distinct tenant policy file; they share the pool and the verdict
    # cache (whose keys name the guard that decided each verdict).
    stores = {
        path: GuardStore(
            path,
            registry,
            dataclasses.replace(env, base_dir=policy_folder(path)),
            on_swap=check_scopes(ring, tenants, path),
            cache=store.cache,
        )
        for path in sorted(tenants.policies())
    }
    # The candidate policy gets its own filter threads: its checks, however slow, must
    # never queue ahead of the active policy's on a shared pool (answers never wait). It
    # gets its own models too: a model's lock (the PII analyzer's) or micro-batch shared
    # with it would make live checks wait for the candidate's. The cost is memory: each
    # model both policies use is loaded twice.
    shadow_executor = (
        ThreadPoolExecutor(
            max(1, settings.filter_workers // 2), thread_name_prefix="guardrail-shadow"
        )
        if settings.shadow_policy
        else None
    )
    shadow_store = (
        GuardStore(
            settings.shadow_policy,
            registry,
            dataclasses.replace(
                env,
                executor=shadow_executor or executor,
                base_dir=policy_folder(settings.shadow_policy),
                resources=SharedResources(),
                regexes_off_loop=True,
            ),
            on_swap=check_scopes(ring, tenants, None),
        )
        if settings.shadow_policy
        else None
    )

    def shutdown_executors(**kwargs: Any) -> None:
        for pool in (executor, shadow_executor):
            if pool is not None:
                pool.shutdown(**kwargs)

    def load_policies() -> None:
        store.load()
        for other in [*stores.values(), *([shadow_store] if shadow_store else [])]:
            other.load()

    try:
        # Built on a worker thread, as reloads are: the main thread runs no torch.
        off_main_thread(load_policies)
    except BaseException:
        shutdown_executors(wait=False)
        raise
    gateway = Gateway(
        settings=settings,
        store=store,
        metrics=metrics,
        backend=backend,
        tenants=tenants,
        stores=stores,
        limiter=limiter,
        audit=audit,
        shadow=ShadowPolicy(
            shadow_store, metrics.shadow_decision, max_in_flight=settings.shadow_max_in_flight
        )
        if shadow_store is not None
        else None,
        monitor=monitor,
        grounding=default_grounder(env),
        consistency=consistency_from_settings(settings, env, metrics),
    )
    if gateway.shadow is not None:
        # Comparisons still running are counted, not cancelled with the loop; bounded,
        # so a stuck candidate cannot hold shutdown.
        gateway.on_shutdown.append(_bounded(gateway.shadow.drain, SHADOW_DRAIN_S))
    gateway.on_shutdown.append(monitor.aclose)  # cancels running counterfactual probes
    if gateway.consistency is not None:
        gateway.on_shutdown.append(gateway.consistency.aclose)
    if audit is not None:
        # Runs after open requests finished: every exchange is in the queue by then.
        gateway.on_shutdown.append(audit.aclose)
        metrics.observe_audit(audit.stats)
    if backend is not None:
        _observe_circuits(backend, metrics)
    metrics.observe_caches(lambda: model_cache_stats(env.resources))
    if isinstance(limiter, RedisRateLimiter):
        metrics.observe_rate_limit_store(lambda: limiter.failures)
    for unused, close in unused_tenants(settings, ring):
        log.warning(
            "unused_tenant",
            tenant=unused,
            did_you_mean=close,
            message=f"tenants: {unused!r} is set but no API key acts for it; its policy, "
            "models and limits apply to nobody",
        )
    if len(ring.tenants) > 1 and not settings.metrics_require_admin_key:
        # The exposition counts per tenant (harmful_content_total{tenant}) and per topic
        # (group_mentions_total{group}): read by anyone between two requests, they tell
        # which tenant asked about what.
        log.warning(
            "metrics_open",
            tenants=len(ring.tenants),
            message="GET /metrics is open to anyone and counts per tenant and per topic; "
            "set metrics_require_admin_key where tenants must not see each other's counts",
        )
    warning = open_mode_warning(ring)
    if warning:
        log.warning("running_open", message=warning, admin_key=ring.has_admin)
    else:
        log.info("api_keys_loaded", **ring.describe())
    log.info(
        "policy_loaded",
        name=store.current.policy.name,
        version=store.current.policy.version,
        path=str(store.path),
    )

    oversight = build_oversight(gateway)  # feedback and review; None with the audit log off

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loading = None
        if gateway.backend is None:
            loading = asyncio.create_task(_load_backend(gateway))
        loop = asyncio.get_running_loop()
        if gateway.audit is not None:
            await gateway.audit.start()  # a database that cannot be opened stops startup
        hup = _install_sighup(loop, gateway)
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)  # which restores SIG_DFL: fatal
                ignore_sighup()  # during the drain, and after
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await _drain(gateway)
            # After the drain: requests still waiting on it get their answer first.
            await gateway.stop_fetching_models()
            for hook in gateway.on_shutdown:
                try:
                    await hook()
                except Exception as e:
                    log.error("shutdown_hook_failed", hook=_name(hook), error=type(e).__name__)
            await gateway.limiter.aclose()
            if gateway.backend is not None:
                await gateway.backend.aclose()
            shutdown_executors(wait=False, cancel_futures=True)

    return Litestar(
        route_handlers=[*ROUTES, *FEEDBACK_ROUTES, *REVIEW_ROUTES],
        state=State({"gateway": gateway, "serving": Serving(gateway), "oversight": oversight}),
        exception_handlers={
            Exception: make_exception_handler(settings.max_body_bytes, gateway.on_rejected)
        },
        middleware=[
            RequestIdMiddleware,
            DefineMiddleware(
                AuthMiddleware,
                ring=ring,
                metrics_need_admin=settings.metrics_require_admin_key,
                cors_origins=settings.cors_origins,
                on_rejected=gateway.on_rejected,
            ),
        ],
        cors_config=CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            # Any request header: the key is a header, never a cookie, so a header lets a
            # page do nothing its origin may not. A list missed the SDKs' own headers
            # (the OpenAI JavaScript SDK sends x-stainless-* on every call): their
            # preflights failed, and no browser app built on them could call the gateway.
            allow_headers=["*"],
            expose_headers=[
                "x-request-id",
                "x-guardrail-action",
                "x-guardrail-policy-version",
                # 429 and 503 say when to retry, or that retrying is useless (a request
                # over a minute's tokens); browsers hide unlisted headers.
                "retry-after",
                "x-should-retry",
            ],
        )
        if settings.cors_origins
        else None,
        lifespan=[lifespan],
        # Feedback and review read the audit database: opened after the audit log
        # (whose startup creates and migrates the tables), closed after it flushed.
        on_startup=[oversight.start] if oversight is not None else None,
        on_shutdown=[oversight.aclose] if oversight is not None else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Guardrail", version=__version__, openapi_router=_openapi_router()
        ),
        logging_config=None,
        debug=False,
    )


def _openapi_router() -> Router:
    """The router the OpenAPI plugin puts its pages under, at ``/openapi``.

    Litestar answers an unknown path under it (``/openapi/nope``) with its own HTML 404
    page, returned by a handler rather than raised, so the app's exception handler never
    sees it. The hook raises it instead: the answer is the gateway's JSON 404, in the
    OpenAI error shape, like every other unknown path.
    """

    async def no_html_404(response: Response[Any]) -> Response[Any]:
        if response.status_code == 404:
            raise NotFoundException
        return response

    return Router(
        "/openapi",
        route_handlers=[],
        include_in_schema=False,
        after_request=no_html_404,
    )


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Serve with the objects built so far (models, tokenizers, analyzers, policies:
    about 594,000 with the embedded model) left out of the garbage collector's scans.

    They live as long as the process, yet each full collection walked them all: 296 ms
    on the 2-core test machine (median of 5), with the GIL held, so every request and
    stream waited (the worker threads' allocations set collections off). Frozen, a full
    collection at rest took under 0.1 ms there. Objects built later (a reload's policy)
    are collected as before; the freeze ends with serving.
    """
    gc.collect()  # what startup left as garbage is freed, not frozen
    gc.freeze()
    log.info("heap_frozen", objects=gc.get_freeze_count())
    try:
        yield
    finally:
        gc.unfreeze()


def off_main_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (a model load, a policy build) on a one-off worker thread and wait.

    The gateway keeps torch off its main thread: torch work there slowed OpenMP work on
    other threads, the local engine's decoding steps among them, by a third or more on
    a 2-core machine (README, Measurements).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="guardrail-load") as loader:
        return loader.submit(fn).result()


async def _load_backend(gateway: Gateway) -> None:
    try:
        backend = await asyncio.to_thread(build_backend, gateway.settings)
    except Exception as e:
        gateway.backend_error = f"{type(e).__name__}: {e}"
        log.error(
            "backend_load_failed", backend=gateway.settings.backend, error=gateway.backend_error
        )
        return
    gateway.backend = backend
    _observe_circuits(backend, gateway.metrics)
    models = await gateway.served_models()
    log.info("backend_ready", backend=backend.name, models=models)


def model_cache_stats(resources: SharedResources) -> list[CacheStats]:
    """The process's model caches, for the metrics: the sentence encoder's embeddings (a
    text another thread was computing counts as a hit), the groundedness evidence, the
    groundedness probe's kept prefixes and the PII filters' analyses."""
    from guardrail.filters.embedder import CachingModel
    from guardrail.filters.grounding import GroundingScorer
    from guardrail.filters.pii import AnalysisLookups

    out: list[CacheStats] = []
    for item in resources.values():
        if isinstance(item, CachingModel):
            out.append(
                CacheStats("embeddings", item.hits + item.waits, item.computed, item.held_bytes)
            )
        elif isinstance(item, GroundingScorer):
            out.append(CacheStats("grounding_evidence", item.evidence_hits, item.evidence_misses))
            kept = item.kept_prefixes
            if kept is not None:
                out.append(
                    CacheStats("grounding_probe_prefixes", kept.hits, kept.misses, kept.bytes)
                )
        elif isinstance(item, AnalysisLookups):
            out.append(CacheStats("pii_analyses", item.hits, item.misses))
    return out


def _observe_circuits(backend: Backend, metrics: GatewayMetrics) -> None:
    """Backends with circuit breakers (remote) report their states as a gauge; the local
    engine reports its queue, batches, first tokens and KV-cache reuse."""
    states = getattr(backend, "circuit_states", None)
    if states is not None:
        metrics.observe_circuits(lambda: [(url, state.gauge) for url, state in states()])
    engine = getattr(backend, "observe", None)
    if engine is not None:
        observer: EngineObserver = metrics
        engine(observer)


async def _drain(gateway: Gateway) -> None:
    """Let requests that hold a slot (open streams) finish, within shutdown_timeout_s."""
    slots = gateway.slots
    if slots is None or not slots.active:
        return
    log.info("shutdown_draining", active=slots.active)
    try:
        async with asyncio.timeout(gateway.settings.shutdown_timeout_s):
            await slots.drained()
    except TimeoutError:
        log.warning("shutdown_drain_timeout", still_active=slots.active)


def _name(hook: object) -> str:
    return str(getattr(hook, "__qualname__", type(hook).__name__))


def _install_sighup(loop: asyncio.AbstractEventLoop, gateway: Gateway) -> bool:
    """SIGHUP reloads the policy, as daemons do; not available off the main thread."""

    def on_hup() -> None:
        task = loop.create_task(gateway.reload_policy(trigger="sighup"))
        _background.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(_background.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True
