"""The backend interface: one small protocol, like an httpx transport.

A backend turns a :class:`GenerationRequest` (already moderated, already in the
gateway's own types) into a :class:`Completion` or a stream of :class:`Chunk`.
Backends raise :class:`~guardrail.errors.BackendError` subclasses, whose ``status``
is what the gateway answers with. Example::

    class EchoBackend:
        name = "echo"

        async def generate(self, request: GenerationRequest) -> Completion:
            return Completion(text=request.messages[-1].content, finish_reason="stop")

        async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
            yield Chunk(text=request.messages[-1].content, finish_reason="stop")

        async def health(self) -> bool:
            return True

        async def models(self) -> list[str]:
            return ["echo"]

        async def aclose(self) -> None:
            pass
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from guardrail.chat import Message, ToolCall

if TYPE_CHECKING:
    from guardrail.settings import Settings

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling parameters, ``None`` meaning the backend's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Backend-specific knobs accepted by the gateway (top_k, repetition_penalty).
    extra: Mapping[str, Any] = field(default_factory=dict)
    max_tokens_field: str = "max_tokens"
    """The name a remote backend is sent ``max_tokens`` under: the client's own
    (``max_completion_tokens`` for OpenAI's newer models, which refuse the old name),
    and on a chat that set no limit, the ``default_max_tokens_field`` setting's."""
    max_tokens_is_default: bool = False
    """``max_tokens`` is the gateway's default (``default_max_tokens``), not a limit the
    client set. A backend may lower a default to the room the model's context leaves
    after the prompt; a client's own limit that does not fit is refused (400
    ``context_length_exceeded``), as OpenAI and vLLM refuse it."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat (``messages``) or a plain completion (``prompt``) request; exactly one is set.

    ``cache_scope`` says who may reuse what this request computes (the tenant): a backend
    that keeps state across requests, as the local engine's KV cache, shares it only
    within one scope. Shared across tenants, a cache's speed-up tells one tenant whether
    another recently sent the same prompt start (a system prompt, a document).
    """

    model: str
    request_id: str
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_scope: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion. Token counts are ``None`` when the backend did not report them.

    ``refusal``: ``text`` is the model's refusal (OpenAI's ``refusal`` field, as a
    structured-output request gets), not an answer; it is moderated like any answer and
    returned in the same field. ``tool_calls``: the functions the model called (a remote
    backend's, with ``tools`` in the request's ``params.extra``), moderated as the text is.
    """

    text: str
    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    refusal: bool = False
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a streamed completion; the last one carries ``finish_reason``.
    ``refusal``: the piece is of the model's refusal (see :class:`Completion`).

    ``tool_calls`` come whole, on the last chunk only: a backend assembles a stream's
    pieces of them itself, since no piece may reach a client before all of a call is
    checked (see :class:`Completion`)."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    refusal: bool = False
    tool_calls: tuple[ToolCall, ...] = ()


@runtime_checkable
class Backend(Protocol):
    """Generates completions. ``name`` is a bounded label (``local``, ``remote``)."""

    name: str

    async def generate(self, request: GenerationRequest) -> Completion: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def health(self) -> bool: ...

    async def models(self) -> list[str]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend type: registered under ``type``; ``settings.backend`` names it."""

    type: str
    build: Callable[[Settings], Backend]
    description: str = ""
