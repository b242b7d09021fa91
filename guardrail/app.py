"""``create_app(settings) -> Litestar``: the one place that wires the parts together.

Startup order: logging, metrics, the policy (a bad policy raises here and the
gateway never starts), then the backend (given, or built in the background so
``/healthz`` answers while a large model loads; ``/readyz`` says when it is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from prometheus_client import CollectorRegistry

from guardrail import __version__
from guardrail.api.errors import make_exception_handler
from guardrail.api.routes import ROUTES, RequestIdMiddleware
from guardrail.api.serving import Gateway, Serving
from guardrail.backends.base import Backend
from guardrail.backends.registry import backend_registry
from guardrail.guard.cache import VerdictCache
from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.registry import filter_registry
from guardrail.guard.store import GuardStore
from guardrail.observability.metrics import GatewayMetrics
from guardrail.plugins import PluginRegistry
from guardrail.settings import Settings

log = structlog.get_logger("guardrail.app")
_background: set[asyncio.Task[object]] = set()


def build_backend(settings: Settings) -> Backend:
    """Build the configured backend (blocking: a local model loads here)."""
    return backend_registry().get(settings.backend).build(settings)


def create_app(
    settings: Settings,
    *,
    backend: Backend | None = None,
    metrics_registry: CollectorRegistry | None = None,
    filters: PluginRegistry[FilterSpec] | None = None,
) -> Litestar:
    """Build the gateway. ``backend``: use this one instead of building it from settings."""
    metrics = GatewayMetrics(
        metrics_registry if metrics_registry is not None else CollectorRegistry()
    )
    executor = ThreadPoolExecutor(settings.filter_workers, thread_name_prefix="guardrail-filter")
    env = BuildContext(
        executor=executor,
        base_dir=Path(settings.policy).resolve().parent,
        cache_dir=settings.cache_path,
        allow_downloads=settings.allow_downloads,
    )
    store = GuardStore(
        settings.policy,
        filters if filters is not None else filter_registry(),
        env,
        on_swap=lambda g: metrics.set_policy(g.policy.name, g.policy.version, g.policy.digest),
        cache=VerdictCache(settings.verdict_cache_entries)
        if settings.verdict_cache_entries
        else None,
    )
    try:
        store.load()
    except BaseException:
        executor.shutdown(wait=False)
        raise
    gateway = Gateway(settings=settings, store=store, metrics=metrics, backend=backend)
    log.info(
        "policy_loaded",
        name=store.current.policy.name,
        version=store.current.policy.version,
        path=str(store.path),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loading = None
        if gateway.backend is None:
            loading = asyncio.create_task(_load_backend(gateway))
        loop = asyncio.get_running_loop()
        hup = _install_sighup(loop, gateway)
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            if gateway.backend is not None:
                await gateway.backend.aclose()
            executor.shutdown(wait=False, cancel_futures=True)

    return Litestar(
        route_handlers=ROUTES,
        state=State({"gateway": gateway, "serving": Serving(gateway)}),
        exception_handlers={
            Exception: make_exception_handler(settings.max_body_bytes, gateway.on_rejected)
        },
        middleware=[RequestIdMiddleware],
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Guardrail", version=__version__, path="/openapi"),
        logging_config=None,
        debug=False,
    )


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
    models = await gateway.served_models()
    log.info("backend_ready", backend=backend.name, models=models)


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
