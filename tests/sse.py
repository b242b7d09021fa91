"""Parse a server-sent-events body into the JSON frames it carried."""

from __future__ import annotations

import json
from typing import Any


def frames(body: str) -> list[Any]:
    """Every ``data:`` payload, JSON-decoded; ``[DONE]`` is returned as the string."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def content(body: str) -> str:
    """The assistant text a client would show: every delta's content, joined."""
    text = []
    for frame in frames(body):
        if isinstance(frame, dict):
            for choice in frame.get("choices", []):
                text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(text)
