"""Llama Guard as a classifier engine: the policy's categories in the prompt, verdict parsed.

Llama Guard checkpoints answer a fixed question layout: a list of unsafe-content
categories with codes, the conversation, and a request for a verdict; the first line of
the answer is ``safe`` or ``unsafe`` and, when unsafe, the second lists the violated
codes. The categories come from the policy: every label that a rule's ``classifier``
condition asks of this engine becomes one code, described by that rule's description
(or ``descriptions`` in the engine settings), so policy authors change the taxonomy in
YAML.

Scores: ``unsafe`` is the probability the model gives the first answer token (past
any leading whitespace tokens) ``unsafe`` against ``safe`` (from the logits, so
thresholds work); a category label scores that probability when the answer lists its
code, else 0. An ``unsafe`` answer that lists none of the taxonomy's codes (none at
all, or only codes it was not shown) gives every category that probability: the
verdict still reaches the category rules instead of matching none. An answer that is
neither ``safe`` nor ``unsafe`` is an error, so the guard fails closed on it.

Only the template's control tokens are special tokens: the conversation's texts are
tokenized as text, so a user who types ``<|eot_id|>`` cannot close their own turn and
write the model's verdict after it.

A text longer than ``max_chars`` is assessed in overlapping windows of that size, one
model call each (see :func:`windows`), and each score is its highest over the windows;
a text that needs more than ``max_windows`` of them is a filter error, not read in part.

The model loads through the local backend's loader (folder, GGUF file, or a hub id
when downloads are allowed) and runs on the shared executor.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guardrail.errors import ConfigError
from guardrail.guard.types import Stage

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.filters.classifiers import LlamaGuardSettings
    from guardrail.guard.types import FilterContext


@dataclass(frozen=True, slots=True)
class Category:
    """One entry of the taxonomy shown to the model."""

    code: str
    label: str
    description: str


def taxonomy(
    labels: Sequence[tuple[str, str]], template: str, overrides: dict[str, str]
) -> tuple[Category, ...]:
    """Codes for ``(label, description)`` pairs in order: O1.. for template 1, S1.. else."""
    prefix = "O" if template == "llama-guard-1" else "S"
    out: list[Category] = []
    for i, (label, description) in enumerate(labels, start=1):
        text = overrides.get(label, description).strip() or label.replace("_", " ")
        out.append(Category(f"{prefix}{i}", label, text))
    return tuple(out)


def _title(label: str) -> str:
    return label.replace("_", " ").replace("-", " ").strip().capitalize()


def build_body(categories: Sequence[Category], conversation: Sequence[tuple[str, str]]) -> str:
    """The prompt's text between the template's control tokens, for ``conversation``
    (``(role, text)`` pairs, role user or agent).

    The last turn is the one assessed: the user's prompt at the input stage, the
    model's answer at the output stage.
    """
    assessed = "Agent" if conversation and conversation[-1][0] == "agent" else "User"
    lines = [
        f"Task: Check if there is unsafe content in '{assessed}' messages in conversations "
        "according to our safety policy with the below categories.",
        "",
        "<BEGIN UNSAFE CONTENT CATEGORIES>",
    ]
    for c in categories:
        lines.append(f"{c.code}: {_title(c.label)}.")
        lines.append(c.description)
    lines += ["<END UNSAFE CONTENT CATEGORIES>", "", "<BEGIN CONVERSATION>", ""]
    for role, text in conversation:
        lines += [f"{'Agent' if role == 'agent' else 'User'}: {text}", ""]
    lines += [
        "<END CONVERSATION>",
        "",
        f"Provide your safety assessment for ONLY THE LAST {assessed} message in the above "
        "conversation:",
        "- First line must read 'safe' or 'unsafe'.",
        "- If unsafe, a second line must include a comma-separated list of violated categories.",
    ]
    return "\n".join(lines)


# Llama Guard 3's header format around the body; these control tokens are the template's.
_LLAMA3_HEAD = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
_LLAMA3_TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def build_prompt(
    template: str,
    categories: Sequence[Category],
    conversation: Sequence[tuple[str, str]],
) -> str:
    """The full prompt as text, to read; the model is given :func:`prompt_ids`."""
    body = build_body(categories, conversation)
    if template == "llama-guard-3":
        return f"{_LLAMA3_HEAD}\n\n{body}{_LLAMA3_TAIL}"
    return f"[INST] {body} [/INST]"


def _ids(tokenizer: Any, text: str, *, add_special_tokens: bool, split_special: bool) -> list[int]:
    ids = tokenizer(
        text, add_special_tokens=add_special_tokens, split_special_tokens=split_special
    )["input_ids"]
    return [int(i) for i in ids]


def prompt_ids(tokenizer: Any, template: str, body: str) -> list[int]:
    """The prompt's token ids: the template's control tokens are special tokens, and
    nothing in ``body`` is. The body holds the user's and the model's words; a
    ``<|eot_id|>`` typed there, tokenized as the control token, would end the user's
    turn and let the text forge the rest of the conversation (an answer of 'safe')."""
    if template == "llama-guard-3":
        # The tokenizer splits a text at its special tokens and tokenizes the pieces
        # apart anyway, so these three calls give the ids one call on the whole prompt
        # gives when the body holds no control token.
        return [
            *_ids(tokenizer, _LLAMA3_HEAD, add_special_tokens=False, split_special=False),
            *_ids(tokenizer, f"\n\n{body}", add_special_tokens=False, split_special=True),
            *_ids(tokenizer, _LLAMA3_TAIL, add_special_tokens=False, split_special=False),
        ]
    # [INST] is text in Llama 2's vocabulary; the tokenizer adds the BOS token.
    return _ids(tokenizer, f"[INST] {body} [/INST]", add_special_tokens=True, split_special=True)


_CONTROL = re.compile(r"<\|[a-z_]+\|>")


def _check_control_tokens(tokenizer: Any) -> None:
    """Refuse a tokenizer that does not hold Llama Guard 3's control tokens as special
    tokens of its own: a Llama Guard 1 or 2 checkpoint (Llama 2's vocabulary) read them
    as text ("<", "|", "begin", ...), and its verdicts were those of a prompt it never
    learnt, silently."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    missing = []
    for token in dict.fromkeys(_CONTROL.findall(_LLAMA3_HEAD + _LLAMA3_TAIL)):
        ids = _ids(tokenizer, token, add_special_tokens=False, split_special=False)
        if len(ids) != 1 or (special and ids[0] not in special):
            missing.append(token)
    if missing:
        raise ConfigError(
            f"template llama-guard-3 needs {', '.join(missing)} as special tokens of the "
            "model's tokenizer, and this one reads them as text: a Llama Guard 1 or 2 "
            "checkpoint takes template llama-guard-1 or llama-guard-2"
        )


_CODE = re.compile(r"\b([OS]\d{1,2})\b")


@dataclass(frozen=True, slots=True)
class Answer:
    """A parsed verdict: ``unsafe`` is None when the answer is neither safe nor unsafe."""

    unsafe: bool | None
    codes: tuple[str, ...] = ()


def parse_answer(text: str) -> Answer:
    """Read the model's answer: first line safe/unsafe, second line the violated codes."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return Answer(None)
    first = lines[0].lower().strip(" .:")
    if first == "safe":
        return Answer(False)
    if first.startswith("unsafe"):
        # The codes belong on the second line, but a model may wrap them ("S1,\nS2") or
        # put one per line: every code after the verdict counts.
        rest = " ".join([first[len("unsafe") :], *lines[1:]]).upper()
        return Answer(True, tuple(dict.fromkeys(_CODE.findall(rest))))
    return Answer(None)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[...]\n{text[-half:]}"


_CUT = "[...]"


def windows(text: str, size: int) -> list[str]:
    """``text`` in windows of ``size`` characters, each overlapping the next by a
    quarter of ``size`` at least, so that any passage of that length is whole in one
    window; a cut edge is marked ``[...]``. A text of ``size`` or fewer is one window."""
    if len(text) <= size:
        return [text]
    stride = size - size // 4
    last = len(text) - size
    out = []
    for start in [*range(0, last, stride), last]:
        head = f"{_CUT} " if start > 0 else ""
        tail = f" {_CUT}" if start < last else ""
        out.append(f"{head}{text[start : start + size]}{tail}")
    return out


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the model said: probability of ``unsafe`` first, the raw answer, its parse."""

    p_unsafe: float
    raw: str
    answer: Answer


class LlamaGuardEngine:
    """Runs a Llama Guard checkpoint; see the module doc for how scores are defined."""

    uses_embeddings = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: LlamaGuardSettings,
        categories: Sequence[Category],
        executor: Executor,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._settings = settings
        self.categories = tuple(categories)
        self._by_code = {c.code: c.label for c in self.categories}
        self.labels = frozenset(c.label for c in self.categories) | {"unsafe"}
        self._executor = executor
        if settings.template == "llama-guard-3":
            _check_control_tokens(tokenizer)
        self._safe_ids = self._first_ids("safe")
        self._unsafe_ids = self._first_ids("unsafe") - self._safe_ids

    def _first_ids(self, word: str) -> set[int]:
        ids: set[int] = set()
        for variant in (word, f" {word}", f"\n{word}"):
            encoded = self._tokenizer.encode(variant, add_special_tokens=False)
            # A leading "\n" or space may be its own token: take the first word piece.
            for tok in encoded:
                piece = self._tokenizer.decode([tok]).strip()
                if piece:
                    ids.add(int(tok))
                    break
        return ids

    def conversation(self, text: str, ctx: FilterContext) -> list[tuple[str, str]]:
        """The turns shown to the model: at output, the last user message and the answer;
        at input, an earlier assistant turn likewise (the user message before it and the
        turn), any other message as the user's. The last turn, the one assessed, is
        ``text`` whole; the user message before an answer, only context, is clipped to
        ``max_chars`` (its start and end)."""
        limit = self._settings.max_chars
        messages = ctx.messages
        if ctx.stage is Stage.OUTPUT:
            before = len(messages)
        else:
            index = ctx.message_index
            if (
                index is None
                or not 0 <= index < len(messages)
                or messages[index].role != "assistant"
                or messages[index].content != text
            ):
                return [("user", text)]
            before = index
        users = [m.content for m in messages[:before] if m.role == "user"]
        turns = [("user", _clip(users[-1], limit))] if users else []
        return [*turns, ("agent", text)]

    def prompts(self, text: str, ctx: FilterContext) -> list[str]:
        """The prompt bodies for ``text`` (see :func:`build_body`), one per window of
        ``max_chars`` (see :func:`windows`).

        Raises ``ValueError`` (a filter error: the policy's ``on_error`` applies) when
        ``text`` needs more than ``max_windows`` windows: each window is one model call,
        and a text the guard cannot read whole must not pass unread.
        """
        *context, (role, assessed) = self.conversation(text, ctx)
        limit, most = self._settings.max_chars, self._settings.max_windows
        parts = windows(assessed, limit)
        if len(parts) > most:
            raise ValueError(
                f"the text has {len(assessed)} characters: more than max_windows ({most}) "
                f"windows of max_chars ({limit}) for the Llama Guard model"
            )
        return [build_body(self.categories, [*context, (role, part)]) for part in parts]

    def assess_sync(self, body: str) -> Assessment:
        """Run the model once on the prompt around ``body`` (blocking): greedy answer
        and the safe/unsafe probability."""
        import torch

        ids = prompt_ids(self._tokenizer, self._settings.template, body)
        device = next(self._model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = self._model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self._settings.max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
            )
        generated = out.sequences[0][len(ids) :]
        # The verdict word's step: an answer may open with whitespace tokens ("\n\nsafe"),
        # and the safe/unsafe odds at a newline's step say nothing about the verdict.
        step = next(
            (
                i
                for i, tok in enumerate(generated[: len(out.scores)].tolist())
                if self._tokenizer.decode([int(tok)]).strip()
            ),
            0,
        )
        first = torch.log_softmax(out.scores[step][0].float(), dim=-1)
        safe = torch.logsumexp(first[sorted(self._safe_ids)], dim=0)
        unsafe = torch.logsumexp(first[sorted(self._unsafe_ids)], dim=0)
        p_unsafe = float(torch.sigmoid(unsafe - safe))
        raw = self._tokenizer.decode(generated, skip_special_tokens=True)
        return Assessment(p_unsafe, raw, parse_answer(raw))

    async def assess(self, text: str, ctx: FilterContext) -> list[Assessment]:
        """One assessment per window of ``text``, in order."""
        loop = asyncio.get_running_loop()
        out = []
        # One window at a time: a check that timed out stops before the next model call.
        for body in self.prompts(text, ctx):
            out.append(await loop.run_in_executor(self._executor, self.assess_sync, body))
        return out

    async def scores(
        self, text: str, ctx: FilterContext, embeddings: npt.NDArray[np.float32] | None
    ) -> dict[str, float]:
        """Each label's score is its highest over the windows: the worst window wins."""
        out = dict.fromkeys(self.labels, 0.0)
        for result in await self.assess(text, ctx):
            if result.answer.unsafe is None:
                raise ValueError("the Llama Guard model answered neither 'safe' nor 'unsafe'")
            out["unsafe"] = max(out["unsafe"], result.p_unsafe)
            labels = [self._by_code[c] for c in result.answer.codes if c in self._by_code]
            if result.answer.unsafe and not labels:
                # Unsafe, but no code of the taxonomy named (a bare 'unsafe', or a code
                # from the model's own training): any category may be the one, and a
                # verdict that reaches no rule would let the text through.
                labels = [c.label for c in self.categories]
            for label in labels:
                out[label] = max(out[label], result.p_unsafe)
        return out
