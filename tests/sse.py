"""Parse a server-sent-events body into the JSON frames it carried."""

from __future__ import annotations

import json
import re
from typing import Any


def frames(body: str) -> list[Any]:
    """Every ``data:`` payload, JSON-decoded; ``[DONE]`` is returned as the string."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        # SSE lines end at CR, LF or CRLF only (str.splitlines also cuts at U+2028, U+0085).
        for line in re.split(r"\r\n|\r|\n", block):
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
