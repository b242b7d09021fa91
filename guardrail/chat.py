"""Conversation messages, shared by the guard pipeline and the backends.

The HTTP layer turns OpenAI wire messages into these; nothing below the HTTP layer
sees wire formats.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made: ``arguments`` is JSON text as the model wrote it
    (not parsed: what is checked, and sent, is the text itself)."""

    id: str
    name: str
    arguments: str

    @property
    def chars(self) -> int:
        return len(self.id) + len(self.name) + len(self.arguments)


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation: ``role`` is system, developer, user, assistant or tool."""

    role: str
    content: str
    tool_call_id: str | None = None
    """For a ``tool`` message: the call it answers (passed on to a remote backend)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """For an ``assistant`` message: the calls the model made in that turn."""
    name: str | None = None
    """For a ``tool`` message: the function whose result it is (passed on to a remote
    backend, whose chat template may write it into the prompt)."""
