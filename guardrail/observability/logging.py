"""Structured logs: one JSON object per line, for the gateway and everything it runs.

Why it is built this way:

- structlog builds the event (timestamp, level, logger name, the request's bound
  context) and the stdlib ``logging`` module only carries it to the handler. The one
  root handler formats with :class:`structlog.stdlib.ProcessorFormatter`, so lines from
  uvicorn, httpx and any other stdlib logger come out in the same JSON shape as ours
  and a log shipper parses one format only.
- Request context (``request_id``, tenant, route) lives in :mod:`contextvars`, bound
  once per request by :func:`bind_request`: every line logged while serving that
  request carries it, and concurrent requests never see each other's fields.
- User text stays out of logs. Code logs ids, scores, labels and lengths; as defence
  in depth, :func:`drop_text_fields` replaces any event key that usually holds text
  (:data:`TEXT_FIELDS`) with ``"<redacted len=N>"`` unless text logging was switched
  on for debugging (``configure_logging(log_text=True)``, the ``log_text`` setting).
  It looks at top-level keys only, and never at the event message itself, so a
  message must not quote user text.

Example::

    configure_logging(level="info", fmt="json")
    log = get_logger(__name__)
    bind_request("req-1", route="chat")
    log.info("request finished", status=200, prompt_chars=42)
    clear_request()
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sized
from typing import IO, Any, Final, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "TEXT_FIELDS",
    "bind_request",
    "clear_request",
    "configure_logging",
    "drop_text_fields",
    "get_logger",
]

LogFormat = Literal["json", "console"]

TEXT_FIELDS: Final = frozenset(
    {"prompt", "completion", "text", "content", "messages", "input", "output"}
)
"""Event keys that usually hold user text; :func:`drop_text_fields` redacts them."""

_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# uvicorn installs its own handlers when it configures logging; these loggers are
# cleared and made to propagate so their lines reach the one JSON handler on root.
_STDLIB_LOGGERS_TO_ROUTE: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")


def drop_text_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace each :data:`TEXT_FIELDS` key's value with ``"<redacted len=N>"``.

    ``N`` is the value's length: characters for a string, items for a collection,
    characters of ``str(value)`` otherwise. ``None`` is left as it is (nothing to hide).
    """
    for key in TEXT_FIELDS.intersection(event_dict):
        value = event_dict[key]
        if value is None:
            continue
        size = len(value) if isinstance(value, Sized) else len(str(value))
        event_dict[key] = f"<redacted len={size}>"
    return event_dict


def _shared_processors(*, log_text: bool, fmt: LogFormat) -> list[Processor]:
    """Processors run on every event, ours and stdlib's, before rendering."""
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        # The console renderer prints exceptions itself, and warns if they arrive preformatted.
        processors.append(structlog.processors.format_exc_info)
    if not log_text:
        # Last, so text bound through contextvars or passed by a stdlib caller is caught too.
        processors.append(drop_text_fields)
    return processors


def configure_logging(
    level: str = "info",
    fmt: LogFormat = "json",
    stream: IO[str] | None = None,
    *,
    log_text: bool = False,
) -> None:
    """Send every log line, structlog's and stdlib's, to ``stream`` in one format.

    ``level`` is debug, info, warning, error or critical. ``fmt`` is ``json`` (one
    object per line, for machines) or ``console`` (for people). ``stream`` defaults
    to ``sys.stderr``, leaving stdout to commands whose output is their result.
    ``log_text`` keeps :data:`TEXT_FIELDS` in events; leave it off outside debugging.

    Like ``logging.basicConfig(force=True)``, this replaces the root logger's
    handlers; calling it again reconfigures everything, including loggers obtained
    earlier with :func:`get_logger`.
    """
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}"
        ) from None
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'json' or 'console'")
    out = stream if stream is not None else sys.stderr

    shared = _shared_processors(log_text=log_text, fmt=fmt)
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # torchao warns at import, on every CPU-only machine, that its CUDA kernels do not
    # load; transformers imports it whenever it is installed. Only its errors matter.
    logging.getLogger("torchao").setLevel(max(numeric_level, logging.ERROR))
    # Importing torchao also makes torch warn that registering its enums is deprecated:
    # a note for torchao's authors, nothing an operator can act on.
    logging.getLogger("torch.utils._pytree").setLevel(max(numeric_level, logging.ERROR))
    # httpx logs every upstream call at info, with its full URL (a query string may hold
    # a key) and nothing the exchange's own line does not say: debug only. It cost about
    # a third of the gateway's logging time per request.
    upstream_calls = numeric_level if numeric_level <= logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric_level, upstream_calls))
    for name in _STDLIB_LOGGERS_TO_ROUTE:
        routed = logging.getLogger(name)
        routed.handlers.clear()
        routed.propagate = True
        # uvicorn sets its own levels; the gateway's level applies to them as well.
        routed.setLevel(logging.NOTSET)

    structlog.configure(
        processors=[
            # Skips building events the stdlib level would discard anyway.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so a second configure_logging() reaches loggers bound at import.
        cache_logger_on_first_use=False,
    )


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger named ``name`` (by convention the module's ``__name__``)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def bind_request(request_id: str, **fields: Any) -> None:
    """Start a request's log context: forget what was bound, then bind the given fields.

    ``request_id`` and ``fields`` appear on every line logged until
    :func:`clear_request` (or the next :func:`bind_request`). Fields are ids and
    bounded values (tenant, route, model), never user text.
    """
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, **fields)


def clear_request() -> None:
    """Forget the current request's log context."""
    structlog.contextvars.clear_contextvars()
