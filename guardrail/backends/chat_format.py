"""Prompt formats for checkpoints whose tokenizer carries no chat template.

Most checkpoints ship a chat template with their tokenizer, and the local backend uses
it. Older Llama 2 chat conversions (many GGUF files among them) do not; without a
format the gateway would have to refuse chat requests for them. The Llama 2 chat
format, as Meta's model card and reference code describe it, is built here in token
ids:

- each user turn and the answer to it form one exchange:
  ``<s>[INST] {user} [/INST] {answer} </s>``, where ``<s>`` and ``</s>`` are the BOS
  and EOS *tokens* (never the literal text, which a user could otherwise type);
- a system prompt goes inside the first ``[INST]``, wrapped as
  ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`` before the user's text. As in the reference
  code, the block is there whenever a system message is, even an empty one, and the
  system text goes in as written: only each turn's whole text (the first one's with its
  system block) is stripped of surrounding whitespace;
- the conversation ends with an open ``[INST] ... [/INST]`` for the model to answer.

Roles must alternate user/assistant after an optional system message; anything else is
rejected with a clear error, as Meta's reference code does. Tool messages are not part
of the format.

Example::

    ids = llama2_chat_ids(tokenizer, [Message("system", "Be brief."), Message("user", "Hi")])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from guardrail.chat import Message
from guardrail.errors import BackendError, ConfigError

__all__ = ["CHAT_FORMATS", "ChatFormat", "chat_format", "llama2_chat_ids"]

ChatFormat = Callable[[Any, Sequence[Message]], list[int]]
"""``(tokenizer, messages) -> prompt token ids``, ending where the model answers."""

_B_INST: Final = "[INST]"
_E_INST: Final = "[/INST]"
_B_SYS: Final = "<<SYS>>\n"
_E_SYS: Final = "\n<</SYS>>\n\n"


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    # split_special_tokens: "<s>" typed by a user stays text, never the BOS token.
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [int(i) for i in ids]


# The format's turn markers are plain text, not special tokens: typed in a message they
# give the very ids the format builds, so a user could open a system block or forge a
# whole answered turn. Meta's reference refuses such messages; so does this format.
LLAMA2_TAGS: Final = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def refuse_tags(messages: Sequence[Message], tags: Sequence[str], format_name: str) -> None:
    """A 400 for the first message holding one of ``tags`` (a prompt format's markers)."""
    for index, message in enumerate(messages):
        for tag in tags:
            if tag in message.content:
                raise BackendError(
                    f"messages[{index}] contains {tag!r}, a turn marker of {format_name}; "
                    "it cannot be sent as message text (it would change the conversation's "
                    "structure)",
                    status=400,
                )


def llama2_chat_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The Llama 2 chat prompt for ``messages``, as token ids (see the module doc)."""
    refuse_tags(messages, LLAMA2_TAGS, "the Llama 2 chat format")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise BackendError(
            "the Llama 2 chat format needs BOS and EOS tokens; this tokenizer has none",
            status=400,
        )
    turns = list(messages)
    system: str | None = None
    if turns and turns[0].role in ("system", "developer"):
        system = turns.pop(0).content
    roles = [m.role for m in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or roles != expected or roles[-1] != "user":
        raise BackendError(
            "the Llama 2 chat format takes an optional system message, then user and "
            "assistant messages in turn, ending with a user message; got roles "
            f"{', '.join(m.role for m in messages) or 'none'}",
            status=400,
        )
    ids: list[int] = []
    for i in range(0, len(turns), 2):
        user = turns[i].content
        if i == 0 and system is not None:
            # Meta's reference joins first and strips the result, so a blank system
            # prompt still leaves its (empty) block, and whitespace inside it stays.
            user = f"{_B_SYS}{system}{_E_SYS}{user}"
        exchange = f"{_B_INST} {user.strip()} {_E_INST}"
        answered = i + 1 < len(turns)
        if answered:
            exchange += f" {turns[i + 1].content.strip()} "
        # One piece of text per exchange, so the tokenizer sees it whole.
        ids.append(int(bos))
        ids.extend(_text_ids(tokenizer, exchange))
        if answered:
            ids.append(int(eos))
    return ids


CHAT_FORMATS: Final[dict[str, ChatFormat]] = {"llama-2": llama2_chat_ids}


def chat_format(name: str | None, *, checkpoint: str, has_template: bool) -> ChatFormat | None:
    """The format to use instead of the tokenizer's template, or ``None`` to use that.

    ``name`` is the ``chat_template`` setting: a format name forces that format. Unset,
    a tokenizer without a template falls back to Llama 2's format when the checkpoint's
    own name (its folder, file stem or hub id; never the name it is served under, which
    ``model_name`` may set to anything) says it is a Llama 2 chat model
    (``llama-2-7b-chat``, ``Llama-2-13B-chat.Q4_K_M``...).
    """
    if name is not None:
        try:
            return CHAT_FORMATS[name]
        except KeyError:
            raise ConfigError(
                f"chat_template {name!r} is not one of {', '.join(sorted(CHAT_FORMATS))}"
            ) from None
    lowered = checkpoint.lower().replace("_", "-")
    if not has_template and "llama-2" in lowered and "chat" in lowered:
        return llama2_chat_ids
    return None
