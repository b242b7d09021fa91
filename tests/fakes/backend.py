"""An in-process backend that follows a script: the Backend protocol, no network.

``FakeBackend(reply="...")`` answers every request with ``reply``; streams split it
into ``chunks`` (or the given list). ``requests`` records every request it received,
so a test can prove the backend was never called. ``error`` makes it raise a
BackendError; ``error_after`` makes a stream die after that many chunks.
``models_gate`` holds :meth:`models` until it is set, ``models_error`` makes it raise,
and ``models_calls`` counts its calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from guardrail.backends.base import Chunk, Completion, GenerationRequest
from guardrail.errors import BackendError


@dataclass
class FakeBackend:
    reply: str = "Hello! How can I help you today?"
    chunks: Sequence[str] | None = None
    chunk_size: int = 7
    error: BackendError | None = None
    error_after: int | None = None
    delay_s: float = 0.0
    model_names: list[str] = field(default_factory=lambda: ["fake-model"])
    requests: list[GenerationRequest] = field(default_factory=list)
    closed: bool = False
    stream_closed: int = 0
    name: str = "fake"
    reports_usage: bool = True  # False: token counts unknown, as from some upstreams
    models_gate: asyncio.Event | None = None
    models_error: BackendError | None = None
    models_calls: int = 0

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        n = self.chunk_size
        return [self.reply[i : i + n] for i in range(0, len(self.reply), n)]

    async def generate(self, request: GenerationRequest) -> Completion:
        self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        prompt, completion = self._usage(len(self.pieces()))
        return Completion(
            "".join(self.pieces()), "stop", prompt_tokens=prompt, completion_tokens=completion
        )

    def _usage(self, pieces: int) -> tuple[int | None, int | None]:
        return (5, pieces) if self.reports_usage else (None, None)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        try:
            if self.error is not None and self.error_after is None:
                raise self.error
            pieces = self.pieces()
            for i, piece in enumerate(pieces):
                if self.error is not None and self.error_after == i:
                    raise self.error
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield Chunk(piece)
            prompt, completion = self._usage(len(pieces))
            yield Chunk("", "stop", prompt_tokens=prompt, completion_tokens=completion)
        finally:
            self.stream_closed += 1

    async def health(self) -> bool:
        return not self.closed

    async def models(self) -> list[str]:
        self.models_calls += 1
        if self.models_gate is not None:
            await self.models_gate.wait()
        if self.models_error is not None:
            raise self.models_error
        return list(self.model_names)

    async def aclose(self) -> None:
        self.closed = True
