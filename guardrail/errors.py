"""The one exception root of the project.

::

    GuardrailError
    ├── ConfigError              settings that cannot be used (bad file, bad value)
    ├── PolicyError              a policy file that cannot be loaded; carries every problem found
    ├── RegistryError            an unknown or broken filter/backend plugin
    ├── MissingDependencyError   an optional dependency is not installed; names the extra
    ├── TextTooLongError         a text over a filter's documented bound (the filter fails)
    └── BackendError             the model backend failed; carries the HTTP status to answer with
        ├── BackendUnavailable   nothing could be reached (503)
        ├── BackendTimeout       the backend took too long (504)
        └── BackendBadResponse   the backend answered with an error or garbage (502, or its 4xx)

A block is never an exception: filters return a :class:`~guardrail.guard.types.Verdict`.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Final

# The error code OpenAI answers a prompt (or a prompt and max_tokens) over the model's
# context with: its SDKs and LangChain look for it to trim a conversation's history.
CONTEXT_LENGTH_EXCEEDED: Final = "context_length_exceeded"


class GuardrailError(Exception):
    """Root of every error Guardrail raises on purpose."""


class ConfigError(GuardrailError):
    """Settings that cannot be used."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a policy file, located as ``file:line:column``."""

    file: str
    line: int
    column: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f" {self.key}:" if self.key else ""
        return f"{self.file}:{self.line}:{self.column}:{where} {self.message}"


class PolicyError(GuardrailError):
    """A policy that cannot be loaded. ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RegistryError(GuardrailError):
    """An unknown filter or backend type, or a plugin that fails to import."""


class MissingDependencyError(GuardrailError):
    """An optional dependency is missing; the message names the extra to install, or
    the package itself when no extra holds it (``extra`` None)."""

    def __init__(self, package: str, extra: str | None) -> None:
        target = package if extra is None else f"'guardrail[{extra}]'"
        super().__init__(f"{package} is not installed; install it with: pip install {target}")
        self.package = package
        self.extra = extra


class TextTooLongError(GuardrailError):
    """A text longer than a filter's documented bound: the filter fails on it (so its
    ``on_error`` applies) rather than check part of it. The message gives sizes only."""


class BackendError(GuardrailError):
    """The model backend failed. ``status`` is the HTTP status the gateway answers with.

    The message is the gateway's own words. ``upstream_message`` is what the upstream
    itself said (its error message), kept apart: it is model-side text that may echo
    the prompt, so it is never logged, and a client sees it only once the policy's
    output filters passed it. ``code`` and ``param`` are the error's fields in the
    client's answer, where one more precise than the class's code helps the client:
    ``context_length_exceeded`` with ``param`` ``messages`` (or ``prompt``) is what
    OpenAI answers for a prompt the model cannot hold, and what its SDKs and LangChain
    look for to trim a conversation's history.
    """

    status = 502
    code = "backend_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        upstream_message: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        # When a retry can next succeed (an open circuit's next trial), for Retry-After.
        self.retry_after_s = retry_after_s
        self.upstream_message = upstream_message


class BackendUnavailable(BackendError):
    """No backend could be reached (connection refused, every URL down, circuit open)."""

    status = 503
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    """The backend did not answer in time."""

    status = 504
    code = "backend_timeout"


class BackendBadResponse(BackendError):
    """The backend answered with an error status or a body that is not a valid completion."""

    status = 502
    code = "backend_bad_response"


def where(exc: BaseException) -> str:
    """``file:line in function`` of the frame that raised, without the message (which
    may quote user text)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"
