"""OpenAI wire models for requests (validated by Litestar with msgspec).

Unknown fields are rejected with a message naming them: a gateway that silently
drops ``logprobs`` would change what the client asked for. Fields that would let
text bypass moderation (log-probabilities, ``n`` > 1, echo) are refused with a clear
reason rather than passed through unmoderated. Tool definitions and tool calls are
accepted in OpenAI's ``function`` shape only, so every word of them is text the
serving layer can put through the filters.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from guardrail.api.errors import APIError

Role = Literal["system", "developer", "user", "assistant", "tool"]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]


# A part of a message's content; only ``{"type": "text", "text": ...}`` is supported.
# Decoded as a plain object so that a part of another type gets a message naming its
# type, and a text part with any other key (an ``image_url`` riding along) is refused
# rather than silently dropped.
ContentPart = dict[str, Any]
# A cache breakpoint marks where a reusable prompt prefix ends, for OpenAI's prompt cache.
# The parts are joined into one text (below), so it cannot be kept: it is dropped, which
# costs a cache hit at most.
_TEXT_PART_KEYS = frozenset({"type", "text", "prompt_cache_breakpoint"})
_BREAKPOINT_KEYS = frozenset({"mode", "ttl"})


def _part_text(part: ContentPart, where: str) -> str:
    kind = part.get("type")
    if not isinstance(kind, str):
        raise APIError(
            400,
            "A content part needs a string 'type'; send text parts.",
            param=f"{where}.type",
            code="invalid_request",
        )
    if kind != "text":
        raise APIError(
            400,
            f"Content part of type '{kind}' is not supported; send text parts.",
            param=where,
            code="unsupported_content",
        )
    extra = sorted(set(part) - _TEXT_PART_KEYS)
    if extra:
        raise APIError(
            400,
            f"A text content part has only 'type', 'text' and 'prompt_cache_breakpoint'; "
            f"'{extra[0]}' is not supported.",
            param=f"{where}.{extra[0]}",
            code="unsupported_content",
        )
    breakpoint = part.get("prompt_cache_breakpoint")
    if breakpoint is not None and not (
        isinstance(breakpoint, dict)
        and set(breakpoint) <= _BREAKPOINT_KEYS
        and all(isinstance(v, str) and 0 < len(v) <= 64 for v in breakpoint.values())
    ):
        raise APIError(
            400,
            "A prompt_cache_breakpoint is an object of 'mode' and 'ttl' names.",
            param=f"{where}.prompt_cache_breakpoint",
            code="invalid_request",
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise APIError(
            400,
            "A text content part needs a string 'text'.",
            param=f"{where}.text",
            code="invalid_request",
        )
    return text


# An id, not text: some chat templates write it into the prompt, where free text would
# reach the model unmoderated. OpenAI's, vLLM's and Mistral's ids all fit.
ToolCallId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,256}$")]
# OpenAI's rule for a function's name.
_TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ToolName = Annotated[str, msgspec.Meta(pattern=_TOOL_NAME_PATTERN)]
_TOOL_NAME = re.compile(_TOOL_NAME_PATTERN)
MAX_TOOLS: Final = 128
# A turn's parallel calls: models make a handful; each is text to check.
MAX_TOOL_CALLS: Final = 128


class WireFunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: ToolName
    arguments: str  # JSON text, as the model wrote it
    # The openai SDK's stream helper adds its decoded copy of the arguments to the message
    # an agent sends back: accepted and dropped (the arguments are what is checked and sent).
    parsed_arguments: Any = None


class WireToolCall(msgspec.Struct, forbid_unknown_fields=True):
    """A call the model made in an earlier turn (an assistant message's ``tool_calls``)."""

    id: ToolCallId
    type: Literal["function"]
    function: WireFunctionCall
    # A stream delta's position of the call, kept by the openai SDK's stream helper on the
    # message it assembles: accepted and dropped (the list's order is the calls' order).
    index: int | None = None


class WireMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: ToolCallId | None = None
    tool_calls: Annotated[list[WireToolCall], msgspec.Meta(max_length=MAX_TOOL_CALLS)] | None = None
    # An earlier answer's fields, as the openai SDK's message object holds them: an agent
    # appends it to its messages as it came (its stream helper sets every one, most null).
    # A refusal is text the model reads: the message's text, after its content. ``parsed``
    # is the SDK's decoded copy of the content: dropped. The others are refused unless
    # empty (refuse_unmoderated): none is text this gateway reads or sends.
    refusal: str | None = None
    parsed: Any = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            where = f"messages[{index}].content"
            # Joined by line breaks, as vLLM does, and as /v1/moderations joins an input's
            # parts: one text gets one verdict on both routes, and two parts' words do not
            # fuse.
            text = "\n".join(
                _part_text(part, f"{where}[{i}]") for i, part in enumerate(self.content)
            )
        if not self.refusal:
            return text
        # What the model said in place of an answer: sent (and checked) as the content, on
        # a line of its own after any content (a stream blocked midway holds both).
        return f"{text}\n{self.refusal}" if text else self.refusal


class Document(msgspec.Struct, forbid_unknown_fields=True):
    """A source the answer should rest on: plain text with an optional title."""

    text: str
    title: str | None = None


# Sources for groundedness and citation checks: strings or {"text", "title"} objects.
Documents = Annotated[list[str | Document], msgspec.Meta(max_length=256)]


def document_texts(documents: list[str | Document] | None) -> tuple[str, ...]:
    if not documents:
        return ()
    out = []
    for d in documents:
        if isinstance(d, str):
            out.append(d)
        else:
            out.append(f"{d.title}\n{d.text}" if d.title else d.text)
    return tuple(out)


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


# Model ids are short (the longest common ones are under 100 characters); a longer
# "model" is not a model name, and it must not reach logs and audit rows.
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# A stop sequence is a few characters ("\n\n", "</answer>"); a user is an end-user id.
# Longer values are client mistakes (or padding), and a backend would get them whole.
StopSequence = Annotated[str, msgspec.Meta(max_length=256)]
EndUserId = Annotated[str, msgspec.Meta(max_length=256)]

# A token id (a string, as JSON keys are) and the bias added to its logit, within
# OpenAI's range; int or float, so the upstream gets the number as the client wrote it.
# 300 entries is OpenAI's own limit: more would only make a giant upstream body.
TokenId = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,10}$")]
Bias = (
    Annotated[int, msgspec.Meta(ge=-100, le=100)]
    | Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
)
LogitBias = Annotated[dict[TokenId, Bias], msgspec.Meta(max_length=300)]

# Labels for the client's own records, bounded as OpenAI bounds them.
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]
# A setting's value for the provider (a service tier: OpenAI's flex, Groq's on_demand; a
# reasoning effort: low, xhigh, max): a name, not text, so the pattern keeps a sentence
# out of a field nothing moderates. Not a list of today's values: OpenAI adds new ones
# (reasoning_effort gained none, xhigh and max), and each would break the clients that
# send it here first.
OptionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class PromptCacheOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """OpenAI's prompt caching options (``mode``: implicit or explicit; ``ttl``: 30m)."""

    mode: OptionName | None = None
    ttl: OptionName | None = None


class ModerationMode(msgspec.Struct, forbid_unknown_fields=True):
    mode: OptionName


class ModerationPolicy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    input: ModerationMode | None = None
    output: ModerationMode | None = None


class ProviderModeration(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """OpenAI's own moderation of a request (its model and policy): the provider's, on top
    of the gateway's; passed on as sent."""

    model: ModelName
    policy: ModerationPolicy | None = None


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelName
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: StopSequence | Annotated[list[StopSequence], msgspec.Meta(max_length=4)] | None = None
    # An int64 (within what torch's generators take): a larger seed is a client mistake.
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: EndUserId | None = None
    logit_bias: LogitBias | None = None
    # Extensions understood by vLLM, TGI and the local engine.
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    # Bounded: a penalty near 0 divides logits into overflow.
    repetition_penalty: Annotated[float, msgspec.Meta(ge=0.01, le=10.0)] | None = None
    # Gateway extension: the sources the answer should rest on (retrieved documents).
    # Read by the hallucination filter; never sent to the backend.
    documents: Documents | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = self.repetition_penalty
        if self.user is not None:
            out["user"] = self.user
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def refuse_unmoderated(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400,
                "stream_options is only allowed when stream is true.",
                param="stream_options",
                code="invalid_request",
            )
        if self.n not in (None, 1):
            raise APIError(
                400,
                "Only n=1 is supported: each choice would need its own moderation.",
                param="n",
                code="unsupported_parameter",
            )


# An earlier answer's fields that are accepted only null or empty (as the openai SDK
# sends them back on every message it assembled), and why one that holds something is not.
_ANSWER_FIELDS: Final = (
    (
        "annotations",
        "a web search's citations come from a search this gateway does not run; send the "
        "message without them.",
    ),
    ("audio", "spoken answers bypass the text filters, and this gateway does not make them."),
    ("function_call", "it is deprecated; send the call in 'tool_calls'."),
)


RESPONSE_FORMAT_TYPES: Final = frozenset({"text", "json_object", "json_schema"})

# Chat fields for the provider (storage, billing tier, caching, abuse tracking) or its
# reasoning models; the model reads none of them, so they go upstream unfiltered, as
# ``user`` does. The local engine ignores them.
_PASSED_ON: Final = (
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "modalities",
    "moderation",
)


class FunctionDefinition(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class FunctionTool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(msgspec.Struct, forbid_unknown_fields=True):
    name: ToolName


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _function_tool(tool: dict[str, Any], where: str) -> FunctionTool:
    """A tool definition, checked: OpenAI's ``function`` tools only. Decoded by hand, as a
    content part is, so that a tool of another type (``custom``, a hosted tool) gets a
    message naming its type, not "unknown field"."""
    kind = tool.get("type")
    if kind != "function":
        shown = f"'{kind}'" if isinstance(kind, str) else "no type"
        raise APIError(
            400,
            f"A tool of {shown} is not supported: only 'function' tools are.",
            param=f"{where}.type",
            code="unsupported_parameter",
        )
    try:
        return msgspec.convert(tool, FunctionTool)
    except msgspec.ValidationError as e:
        # "... - at `$.function.name`": the path, under the tool's own.
        message, _, path = str(e).partition(" - at `$")
        param = where + path.rstrip("`")
        raise APIError(
            400, f"Invalid tool: {message} (at '{param}').", param=param, code="invalid_request"
        ) from None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[WireMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Read by the provider, not by the model: passed on as sent (see _PASSED_ON).
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: OptionName | None = None
    reasoning_effort: OptionName | None = None
    verbosity: OptionName | None = None
    prompt_cache_key: EndUserId | None = None
    prompt_cache_retention: OptionName | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: EndUserId | None = None
    moderation: ProviderModeration | None = None
    modalities: (
        Annotated[list[Literal["text", "audio"]], msgspec.Meta(min_length=1, max_length=2)] | None
    ) = None
    # Decoded only to be refused by name (refuse_unmoderated says why).
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Objects, each checked by _function_tool (see there why not a typed list).
    # At least one, as OpenAI: an empty list is a client's mistake.
    tools: (
        Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1, max_length=MAX_TOOLS)] | None
    ) = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated names for tools: decoded only to be refused with a pointer.
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    def function_tools(self) -> list[FunctionTool]:
        """The request's tools, checked (400 on a tool that is not a function tool)."""
        return [_function_tool(t, f"tools[{i}]") for i, t in enumerate(self.tools or ())]

    def tool_calls(self) -> list[tuple[int, list[WireToolCall]]]:
        """The earlier turns' tool calls, by message index."""
        return [(i, m.tool_calls) for i, m in enumerate(self.messages) if m.tool_calls]

    def refuse_unmoderated(self) -> None:
        super().refuse_unmoderated()
        self._refuse_bad_tools()
        for i, message in enumerate(self.messages):
            if message.tool_calls is not None and message.role != "assistant":
                raise APIError(
                    400,
                    "'tool_calls' belongs to a message with role 'assistant' only.",
                    param=f"messages[{i}].tool_calls",
                    code="invalid_request",
                )
            if message.tool_call_id is not None and message.role != "tool":
                # It answers a tool call; on another role it is only a place for words.
                raise APIError(
                    400,
                    "'tool_call_id' belongs to a message with role 'tool' only.",
                    param=f"messages[{i}].tool_call_id",
                    code="invalid_request",
                )
            if message.refusal is not None and message.role != "assistant":
                raise APIError(
                    400,
                    "'refusal' belongs to a message with role 'assistant' only.",
                    param=f"messages[{i}].refusal",
                    code="invalid_request",
                )
            for name, why in _ANSWER_FIELDS:
                if getattr(message, name):  # null or empty: dropped
                    raise APIError(
                        400,
                        f"A message's '{name}' is not supported: {why}",
                        param=f"messages[{i}].{name}",
                        code="unsupported_parameter",
                    )
            if message.name is not None and message.role == "tool":
                # The function whose result it is (OpenAI's cookbook sends it): a name,
                # checked as an id is (serving), so it holds no sentence.
                if not _TOOL_NAME.fullmatch(message.name):
                    raise APIError(
                        400,
                        "A tool message's 'name' is a function's name: letters, digits, "
                        "'_' and '-', at most 64.",
                        param=f"messages[{i}].name",
                        code="invalid_request",
                    )
            elif message.name is not None:
                raise APIError(
                    400,
                    "Message names are not supported: a participant name would reach the "
                    "model without moderation; put it in the message content.",
                    param=f"messages[{i}].name",
                    code="unsupported_parameter",
                )
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if not isinstance(kind, str) or kind not in RESPONSE_FORMAT_TYPES:
                # Any other value went to the backend as written, unfiltered (the type
                # names a format; it is not read as text), and an upstream's "invalid
                # value" error echoed it back to the client.
                raise APIError(
                    400,
                    "response_format.type must be one of: "
                    + ", ".join(sorted(RESPONSE_FORMAT_TYPES))
                    + ".",
                    param="response_format.type",
                    code="invalid_request",
                )
        if self.logprobs or self.top_logprobs:
            raise APIError(
                400,
                "logprobs are not supported: token log-probabilities would bypass output "
                "moderation.",
                param="logprobs" if self.logprobs else "top_logprobs",
                code="unsupported_parameter",
            )
        speaks = self.modalities is not None and "audio" in self.modalities
        if speaks or self.audio is not None:
            raise APIError(
                400,
                "Audio output is not supported: spoken output would bypass the text filters; "
                "ask for modalities ['text'].",
                param="modalities" if speaks else "audio",
                code="unsupported_parameter",
            )
        if self.prediction is not None:
            raise APIError(
                400,
                "'prediction' is not supported: the predicted content is text the backend "
                "reads, and it would reach it without passing the input filters.",
                param="prediction",
                code="unsupported_parameter",
            )
        if self.web_search_options is not None:
            raise APIError(
                400,
                "'web_search_options' is not supported: the search results would reach the "
                "model without passing the input filters.",
                param="web_search_options",
                code="unsupported_parameter",
            )

    def _refuse_bad_tools(self) -> None:
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise APIError(
                    400,
                    f"'{name}' is deprecated and not supported by this gateway; use 'tools' "
                    "and 'tool_choice'.",
                    param=name,
                    code="unsupported_parameter",
                )
        tools = self.function_tools()
        choice = self.tool_choice
        if choice is not None and not tools:
            raise APIError(
                400,
                "'tool_choice' is only allowed when 'tools' are given.",
                param="tool_choice",
                code="invalid_request",
            )
        if isinstance(choice, NamedToolChoice):
            names = {t.function.name for t in tools}
            if choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice names the function '{choice.function.name}', which is not "
                    "one of 'tools'.",
                    param="tool_choice.function.name",
                    code="invalid_request",
                )
        if self.parallel_tool_calls is not None and not tools:
            raise APIError(
                400,
                "'parallel_tool_calls' is only allowed when 'tools' are given.",
                param="parallel_tool_calls",
                code="invalid_request",
            )

    def extra(self) -> dict[str, Any]:
        out = super().extra()
        if self.response_format is not None:
            out["response_format"] = self.response_format
        for name in _PASSED_ON:
            value = getattr(self, name)
            if value is not None:
                out[name] = msgspec.to_builtins(value)
        if self.tools:
            # As checked and re-encoded: what the filters read is what is sent.
            out["tools"] = msgspec.to_builtins(self.function_tools())
        if self.tool_choice is not None:
            out["tool_choice"] = msgspec.to_builtins(self.tool_choice)
        if self.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = self.parallel_tool_calls
        return out

    def wants_json(self) -> bool:
        """Whether the client asked for JSON (``json_object`` or ``json_schema``)."""
        fmt = self.response_format
        return fmt is not None and fmt.get("type") in ("json_object", "json_schema")


class CompletionRequest(_Sampling, kw_only=True):
    # OpenAI's shapes are all decoded (text, a batch of texts, token ids, batches of
    # those) so that each one the gateway does not serve gets an error that says why,
    # not a type mismatch; 2048 is the most OpenAI's API takes.
    prompt: str | Annotated[list[str | int | list[int]], msgspec.Meta(max_length=2048)]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        (text,) = self.prompt  # one string: refuse_unmoderated ran first
        assert isinstance(text, str)
        return text

    def refuse_unmoderated(self) -> None:
        super().refuse_unmoderated()
        if not isinstance(self.prompt, str):
            if any(not isinstance(p, str) for p in self.prompt):
                # Token ids are text the filters cannot read without the model's tokenizer.
                raise APIError(
                    400,
                    "A prompt of token ids is not supported by this gateway: send it as text.",
                    param="prompt",
                    code="unsupported_parameter",
                )
            if len(self.prompt) != 1:
                raise APIError(
                    400,
                    "'prompt' must be one text: a batch of prompts is not supported by this "
                    f"gateway (got {len(self.prompt)}); send one request per prompt.",
                    param="prompt",
                    code="unsupported_parameter",
                )
        unsupported = {
            "echo": bool(self.echo),
            "logprobs": self.logprobs is not None,
            "suffix": self.suffix is not None,
            "best_of": self.best_of not in (None, 1),
        }
        for name, used in unsupported.items():
            if used:
                raise APIError(
                    400,
                    f"'{name}' is not supported by this gateway.",
                    param=name,
                    code="unsupported_parameter",
                )


class ModerationRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A string, a list of strings (one result each), or, as OpenAI's omni-moderation
    # takes, a list of content parts: one input, one result. Text parts only: an image
    # part is refused by name (nothing here can judge an image, so it is not waved
    # through unjudged).
    input: str | Annotated[list[str | ContentPart], msgspec.Meta(min_length=1, max_length=256)]
    model: ModelName | None = None
    stage: Literal["input", "output"] = "input"
    # Score each input against these sources (groundedness), as the answer to ``prompt``.
    context: str | Documents | None = None
    prompt: str | None = None

    def inputs(self) -> list[str]:
        """The texts to judge, one per result."""
        if isinstance(self.input, str):
            return [self.input]
        texts = [i for i in self.input if isinstance(i, str)]
        if len(texts) == len(self.input):
            return texts
        if texts:
            raise APIError(
                400,
                "'input' is a list of strings or a list of content parts, not both.",
                param="input",
                code="invalid_request",
            )
        parts = [p for p in self.input if not isinstance(p, str)]
        return ["\n".join(_part_text(p, f"input[{i}]") for i, p in enumerate(parts))]

    def sources(self) -> tuple[str, ...]:
        if self.context is None:
            return ()
        return (self.context,) if isinstance(self.context, str) else document_texts(self.context)
