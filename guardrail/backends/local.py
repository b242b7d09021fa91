"""The local backend: a transformers causal LM running inside the gateway process.

It serves any checkpoint ``AutoModelForCausalLM`` loads (Llama architecture first of
all): a model folder, a ``.gguf`` file (dequantized on load), or a hub id on machines
that may download. With no model configured it serves the embedded
SmolLM2-135M-Instruct (:mod:`guardrail.backends.embedded`).

Why it is built this way:

- Generation never runs on the event loop. A continuous-batching
  :class:`~guardrail.backends.engine.Engine` owns the model on its own thread:
  concurrent requests generate together, each with its own sampling parameters, and
  join or leave the batch between decoding steps. Its queue is bounded (429 past it).
- Every generated token goes through a text tracker that decodes the whole generated
  sequence (so multi-byte characters and SentencePiece spaces come out right), hands
  safe text deltas to the caller, and ends the sequence when a stop string appears or
  the consumer has gone away. Text that could still turn into a stop string, or that
  ends in a half character (U+FFFD), is held back until it is resolved, so a stop
  string never leaks, not even in a stream.
- ``generate`` and ``stream`` share that path, so a stream's chunks join to exactly
  the text ``generate`` returns for the same greedy request.
- The KV cache of each finished conversation is kept (bounded, LRU) and reused when the
  next turn resends the conversation.
- torch and transformers are imported lazily: ``import guardrail`` stays light.

Example::

    model, tokenizer = load_local_model("/models/llama-2-7b-chat", dtype="auto",
                                        device="auto", allow_downloads=False,
                                        cache_dir=None)
    backend = LocalBackend(model, tokenizer, model_name="llama-2-7b-chat")
    completion = await backend.generate(request)
    await backend.aclose()

Request fields this backend ignores: ``presence_penalty`` and ``frequency_penalty``
(transformers has no equivalent), and the fields meant for a hosted provider
(``store``, ``metadata``, ``service_tier``, ``reasoning_effort``, ``verbosity``,
``prompt_cache_key``, ``prompt_cache_retention``, ``safety_identifier``,
``modalities``). ``params.extra`` may carry
``top_k``, ``repetition_penalty`` and ``logit_bias`` (added to the logits, as OpenAI
does; a token id outside the vocabulary is refused, 400). A ``response_format`` other
than ``text`` is refused (400): the engine samples free text, and a client asking for
JSON must not get prose it takes for JSON.
So are ``tools`` and an earlier turn's tool calls (400 ``unsupported_parameter``):
the engine has no tool-call parser, and a small model's text read as calls would be a
guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from guardrail.backends.base import (
    BackendSpec,
    Chunk,
    Completion,
    GenerationRequest,
    SamplingParams,
)
from guardrail.backends.chat_format import LLAMA2_TAGS, chat_format
from guardrail.backends.engine import (
    Engine,
    EngineObserver,
    Outcome,
    PrefixCache,
    TextTracker,
    Work,
)
from guardrail.chat import Message
from guardrail.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    BackendError,
    ConfigError,
    MissingDependencyError,
)
from guardrail.observability.logging import get_logger

if TYPE_CHECKING:
    from guardrail.settings import Settings

__all__ = [
    "SPEC",
    "LocalBackend",
    "PrefixCache",
    "TextTracker",
    "from_settings",
    "load_local_model",
    "quiet_transformers",
    "resolve_device",
    "served_model_name",
]

DType = Literal["auto", "fp32", "bf16", "fp16"]
Quantization = Literal["none", "int8", "int4"]

log = get_logger(__name__)

# Chat templates know system/user/assistant(/tool); OpenAI's newer "developer" role is
# a system message by another name.
_ROLE_ALIASES: Final[Mapping[str, str]] = {"developer": "system"}

# A plain completion is decoded after this many of its prompt's last tokens, so its
# first token keeps the leading space a SentencePiece decode drops at a text's start
# (see ``Work.continues``); a few tokens, as vLLM's incremental detokenizer uses.
_COMPLETION_CONTEXT_TOKENS: Final = 5


# --------------------------------------------------------------------------- loading


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("torch", "local") from e
    return torch


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("transformers", "local") from e
    return transformers


@contextlib.contextmanager
def quiet_transformers(*, swallow_stderr: bool = False) -> Iterator[None]:
    """Silence transformers' progress bars and info logs for the duration, then restore them.

    ``swallow_stderr`` also drops what is written to ``sys.stderr`` meanwhile: the GGUF
    converter draws a tqdm bar of its own that no transformers switch turns off.
    """
    hf_logging = _import_transformers().utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with (
            contextlib.redirect_stderr(io.StringIO())
            if swallow_stderr
            else contextlib.nullcontext()
        ):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_device(device: str, torch: Any) -> str:
    """``device`` checked against this machine: auto is CUDA when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available")
        count = torch.cuda.device_count()
        if device != "cuda" and int(device[5:]) >= count:
            raise ConfigError(
                f"device {device!r} was asked for, but this machine has {count} CUDA "
                f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
            )
        return device
    raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def _resolve_dtype(dtype: DType, device: str, torch: Any) -> Any:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~", "\\"))
        or source.lower().endswith(".gguf")
        or source.count("/") > 1
    )


def served_model_name(source: str) -> str:
    """The name a model is served under by default.

    A folder's name or a file's stem, lowercased; a hub id as it is written.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve().name.lower()
    if path.is_file() or _looks_like_path(source):
        return path.stem.lower()
    return source


def _quantization_config(quantization: Quantization, device: str, torch: Any) -> Any:
    """The ``quantization_config`` for ``from_pretrained`` (CUDA: bitsandbytes), or None.

    On CPU, int8 is applied after loading (torchao, :func:`_quantize_cpu`); int4 has no
    working CPU path (torchao's int4 kernels need CUDA, quanto int4 gave garbage in
    ``../shared/OFFLINE.md``), so it is refused rather than serving bad text.
    """
    if quantization == "none":
        return None
    if device == "cpu":
        if quantization == "int4":
            raise ConfigError(
                "quantization int4 is not supported on CPU (no int4 kernel here gives "
                "usable output); use int8 on CPU, or int4 (bitsandbytes nf4) on a CUDA device"
            )
        return None
    try:
        import bitsandbytes  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError as e:
        # No extra holds it: it is built for CUDA machines only.
        raise MissingDependencyError("bitsandbytes", None) from e
    config: Any = _import_transformers().BitsAndBytesConfig
    if quantization == "int8":
        return config(load_in_8bit=True)
    return config(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _quantize_cpu(model: Any) -> None:
    """int8 weight-only quantization of the linear layers but the output head, in place
    (torchao, per-channel scales)."""
    import logging
    import warnings

    try:
        # torchao logs that its CUDA-only kernels do not load on a CPU build; harmless.
        logging.getLogger("torchao").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
                Int8WeightOnlyConfig,
                quantize_,
            )
    except ImportError as e:
        raise MissingDependencyError("torchao", "local") from e
    # The output projection stays as loaded: quantizing it costs the most accuracy (it
    # ranks the whole vocabulary), and where it shares its weight with the input
    # embedding (SmolLM2, TinyLlama) it would break the tie and add an int8 copy.
    head = model.get_output_embeddings()
    torch = _import_torch()

    def linear_but_head(module: Any, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=linear_but_head)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (google of google.protobuf) is missing
        return False


def _check_sentencepiece_only(folder: Path) -> None:
    """A tokenizer shipped only as SentencePiece's ``tokenizer.model`` (many Llama 2
    conversions) is converted on load, which needs sentencepiece and protobuf; without
    them transformers tried the file as tiktoken's and named tiktoken."""
    if (folder / "tokenizer.json").is_file() or not (folder / "tokenizer.model").is_file():
        return
    for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf")):
        if not _installed(module):
            raise MissingDependencyError(package, "local")


def _quant_method(transformers: Any, where: str, kwargs: Mapping[str, Any]) -> str | None:
    """The ``quant_method`` of a checkpoint's ``quantization_config``, if it reads."""
    try:
        config = transformers.AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, ImportError):
        return None
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, Mapping):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def load_local_model(
    source: str,
    *,
    dtype: DType = "auto",
    device: str = "auto",
    allow_downloads: bool = False,
    cache_dir: Path | None = None,
    quantization: Quantization = "none",
    device_map: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a folder, a ``.gguf`` file or (if allowed) a hub id.

    ``dtype`` auto is fp32 on CPU and bf16 on CUDA; ``device`` auto is CUDA when there
    is one. Hub downloads go to ``cache_dir/hub``. Remote code is never trusted.
    ``quantization``: ``int8`` is torchao int8 weight-only on CPU and bitsandbytes 8-bit
    on CUDA; ``int4`` is bitsandbytes nf4 on CUDA and refused on CPU. ``device_map``
    (``auto``, ``balanced``, ``sequential``...) spreads the layers over several GPUs
    through accelerate; it needs CUDA.
    Raises :class:`ConfigError` when the model cannot be found or loaded, or the
    quantization cannot run on the device.
    """
    torch = _import_torch()
    transformers = _import_transformers()
    from safetensors import SafetensorError  # a dependency of transformers

    resolved_device = resolve_device(device, torch)
    torch_dtype = _resolve_dtype(dtype, resolved_device, torch)
    quantization_config = _quantization_config(quantization, resolved_device, torch)
    if device_map is not None and resolved_device == "cpu":
        raise ConfigError(
            f"device_map {device_map!r} spreads a model over GPUs, and this machine runs it "
            "on the CPU; leave device_map unset"
        )

    path = Path(source).expanduser()
    # Remote code explicitly refused: left unset, transformers asks on the terminal
    # whether to run a checkpoint's own Python, and a "y" there would run it.
    kwargs: dict[str, Any] = {"local_files_only": not allow_downloads, "trust_remote_code": False}
    gguf = False
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(
                f"model file {source} is not a .gguf file; give a model folder or a .gguf file"
            )
        where = str(path.parent)
        kwargs["gguf_file"] = path.name
        gguf = True
    elif path.is_dir():
        where = str(path)
        _check_sentencepiece_only(path)
    elif not allow_downloads:
        raise ConfigError(
            f"model path {source} does not exist, and downloads are off "
            "(allow_downloads: false), so it is not looked up on a model hub"
        )
    elif _looks_like_path(source):
        raise ConfigError(f"model path {source} does not exist")
    else:
        where = source
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir / "hub")

    model_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if resolved_device != "cpu":
        model_kwargs["device_map"] = device_map or resolved_device
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    try:
        with quiet_transformers(swallow_stderr=gguf):
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, **kwargs, **model_kwargs
            )
    except ImportError as e:
        # transformers raises ImportError for what a checkpoint needs beyond it too
        # (optimum for GPTQ, bitsandbytes for a bitsandbytes-quantized model...): only a
        # missing transformers or gguf is this extra's to install.
        missing = (e.name or "").partition(".")[0]
        if missing == "transformers":
            raise MissingDependencyError("transformers", "local") from e
        if gguf and (missing == "gguf" or not _installed("gguf")):
            raise MissingDependencyError("gguf", "local") from e
        method = _quant_method(transformers, where, kwargs)
        quantized = f" (quantized with {method})" if method else ""
        raise ConfigError(f"cannot load model {source}{quantized}: {e}") from e
    # A corrupt or truncated weights file: safetensors' own error, no OSError.
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ConfigError(f"cannot load model {source}: {e}") from e
    if quantization != "none" and resolved_device == "cpu":
        if gguf:  # the GGUF loader marks the dequantized model as quantized
            model.hf_quantizer = None
        _quantize_cpu(model)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------ generation


def _refuse_unsupported(params: SamplingParams, vocabulary: int) -> None:
    bias = params.extra.get("logit_bias") or {}
    outside = sorted((t for t in bias if int(t) >= vocabulary), key=int)
    if outside:
        # An id past the logits would fail the sampling step: a 502 for a client mistake.
        raise BackendError(
            f"logit_bias names token {outside[0]}, but the model's vocabulary has "
            f"{vocabulary} tokens (ids 0 to {vocabulary - 1})",
            status=400,
            code="invalid_request",
            param="logit_bias",
        )
    fmt = params.extra.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind not in (None, "text"):
        # The type is one of the API's format names (checked with the request).
        raise BackendError(
            f"the local engine cannot keep its output to response_format {kind!r}: it "
            "samples free text; ask for JSON in the prompt, or use a backend with "
            "structured output (vLLM, an OpenAI-compatible API)",
            status=400,
        )


def _refuse_tools(request: GenerationRequest) -> None:
    """No tool calling here: the engine samples text and parses no calls out of it (a
    remote vLLM does, with ``--tool-call-parser``). Asked for tools, it would answer in
    prose a client waits on as a call, or write a call's JSON as the answer."""
    called = next((i for i, m in enumerate(request.messages or ()) if m.tool_calls), None)
    if "tools" not in request.params.extra and called is None:
        return
    raise BackendError(
        "the local engine does not parse tool calls: 'tools' and earlier turns' "
        "'tool_calls' need a remote backend with a tool-call parser (vLLM's "
        "--enable-auto-tool-choice --tool-call-parser, or an OpenAI-compatible API)",
        status=400,
        code="unsupported_parameter",
        param="tools" if called is None else f"messages[{called}].tool_calls",
    )


def _ids_of(encoded: Any) -> list[int]:
    """Token ids from what a tokenizer call returns (BatchEncoding, list, tensor, batch of one)."""
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _sampling_defaults(config: Any) -> dict[str, float]:
    """The sampling settings of a model's generation config that apply to requests that
    set none: nothing unless it samples (``do_sample``); its temperature (1.0 when it
    gives none), top_p and repetition penalty where it gives them. Its top_k is the
    engine's ``default_top_k``."""
    if not getattr(config, "do_sample", False):
        return {}
    temperature = getattr(config, "temperature", None)
    out = {"temperature": 1.0 if temperature is None else float(temperature)}
    for name in ("top_p", "repetition_penalty"):
        value = getattr(config, name, None)
        if value is not None:
            out[name] = float(value)
    return out


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _discard(_delta: str) -> None:
    pass


def _control_texts(tokenizer: Any) -> tuple[str, ...]:
    """The text of the tokenizer's special tokens (BOS, EOS, role markers...)."""
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts |= {token.content for token in added.values() if getattr(token, "special", False)}
    return tuple(sorted((t for t in texts if t), key=len, reverse=True))


class LocalBackend:
    """Serves a transformers model through a continuous-batching :class:`Engine`.

    ``model`` and ``tokenizer`` come from :func:`load_local_model`; ``model_name`` is
    the one name :meth:`models` lists. ``default_max_tokens`` applies to requests that
    do not set ``max_tokens``. ``chat_template`` names a built-in prompt format to use
    instead of the tokenizer's template (``llama-2``); unset, a Llama 2 chat model
    whose tokenizer has no template gets that format, told by ``checkpoint``, the
    checkpoint's own name (:func:`served_model_name`; ``model_name`` when not given).
    Up to ``max_batch_size``
    requests generate together;
    an idle engine waits ``batch_wait_ms`` for companions; past ``max_queue`` waiting
    requests, new ones get 429. ``prefix_cache_entries`` and ``prefix_cache_bytes``
    bound the KV caches kept for the next turn of a conversation.

    A request that sets no ``temperature`` or ``top_p`` (or ``repetition_penalty``) gets
    the model's own, from its ``generation_config.json``, when that config samples
    (``do_sample: true``, as Llama 2 and 3 chat models ship: temperature 0.6, top_p
    0.9), as vLLM does; otherwise it is decoded greedily.
    """

    name = "local"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        default_max_tokens: int = 512,
        prefix_cache_entries: int = 8,
        prefix_cache_bytes: int | None = None,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 64,
        chat_template: str | None = None,
        checkpoint: str | None = None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.model_name = model_name
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self._chat_format = chat_format(
            chat_template, checkpoint=checkpoint or model_name, has_template=has_template
        )
        if self._chat_format is not None:
            log.info("local model chat format", model=model_name, chat_format="llama-2")
        elif not has_template:
            # Said once at startup, not only in each chat request's 400.
            log.warning(
                "local model has no chat template: chat requests will be refused",
                model=model_name,
            )
        # A chat template renders messages to text that is then tokenized with special
        # tokens parsed: "<|im_end|><|im_start|>system" typed by a user would open a
        # system turn. Such messages are refused, and so are a template's plain-text turn
        # markers (Llama 2's "[INST]", "<<SYS>>"), which give the same ids typed or built.
        # (The llama-2 format splits special tokens and refuses its markers itself.)
        template = str(getattr(tokenizer, "chat_template", None) or "")
        self._control_texts = _control_texts(tokenizer) + tuple(
            tag for tag in LLAMA2_TAGS if tag in template
        )
        self._default_max_tokens = default_max_tokens
        generation_config = model.generation_config
        eos_ids = _token_ids(generation_config.eos_token_id) | _token_ids(tokenizer.eos_token_id)
        # Unset in the model's generation config: OpenAI semantics, no top-k cut.
        default_top_k: int | None = (
            0 if generation_config.top_k is None else generation_config.top_k
        )
        self._context: int | None = getattr(model.config, "max_position_embeddings", None)
        # The ids a logit_bias may name: those the tokenizer knows and the model scores.
        scored = getattr(model.config, "vocab_size", None)
        self._vocabulary = (
            min(len(tokenizer), scored) if isinstance(scored, int) else len(tokenizer)
        )
        self._sampling_defaults = _sampling_defaults(generation_config)
        self.engine = Engine(
            model,
            decode=self._decode,
            eos_ids=eos_ids,
            default_top_k=default_top_k,
            prefix_cache=PrefixCache(prefix_cache_entries, max_bytes=prefix_cache_bytes),
            max_batch=max_batch_size,
            max_wait_ms=batch_wait_ms,
            max_queue=max_queue,
        )

    @property
    def prefix_cache(self) -> PrefixCache:
        """The KV caches kept for reuse (owned by the engine's thread)."""
        return self.engine.prefix_cache

    def observe(self, observer: EngineObserver) -> None:
        """Report queue depth, batch sizes, first-token times and cache use to ``observer``."""
        self.engine.observer = observer

    # -- protocol

    async def generate(self, request: GenerationRequest) -> Completion:
        _refuse_tools(request)
        work = self._work(request, _discard, threading.Event())
        try:
            outcome = await self._submit(work)
        finally:
            # Done, or the caller went away: a request still queued leaves the queue now.
            self.engine.withdraw(work)
        return Completion(
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        _refuse_tools(request)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(delta: str) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
            except RuntimeError:  # the event loop is gone: nobody is listening
                cancelled.set()

        def on_done(done: asyncio.Future[Outcome]) -> None:
            # Retrieve the error here too, so an abandoned stream logs no
            # "exception was never retrieved".
            if not done.cancelled():
                done.exception()
            deltas.put_nowait(None)

        work = self._work(request, emit, cancelled)
        try:
            future = self._submit(work)
            future.add_done_callback(on_done)
            # Deltas are scheduled on the loop before the future completes, so the
            # None that on_done queues comes after the last of them.
            while (delta := await deltas.get()) is not None:
                yield Chunk(text=delta)
            outcome = await future
            yield Chunk(
                text="",
                finish_reason=outcome.finish_reason,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
            )
        finally:
            # Closed early (client gone) or done: either way the row leaves the batch, or
            # the queue if it still waits there.
            self.engine.withdraw(work)

    async def health(self) -> bool:
        return not self.engine.closed

    async def models(self) -> list[str]:
        return [self.model_name]

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Fail queued requests, stop the running batch, and wait for the engine to exit."""
        self.engine.close()

    # -- internals

    def _work(
        self,
        request: GenerationRequest,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Work:
        return Work(
            request_id=request.request_id,
            params=self._with_defaults(request.params),
            prepare=lambda: self._prepare(request),
            emit=emit,
            cancelled=cancelled,
            continues=_COMPLETION_CONTEXT_TOKENS if request.messages is None else 0,
            cache_scope=request.cache_scope,
        )

    def _submit(self, work: Work) -> asyncio.Future[Outcome]:
        self.engine.submit(work)
        return asyncio.wrap_future(work.future)

    def _with_defaults(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the model's sampling defaults where the request set none."""
        defaults = self._sampling_defaults
        if not defaults:
            return params
        extra = dict(params.extra)
        if "repetition_penalty" in defaults:
            extra.setdefault("repetition_penalty", defaults["repetition_penalty"])
        return replace(
            params,
            temperature=defaults.get("temperature")
            if params.temperature is None
            else params.temperature,
            top_p=defaults.get("top_p") if params.top_p is None else params.top_p,
            extra=extra,
        )

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the token budget (on the engine's thread).

        A prompt the context cannot hold, or a client's own ``max_tokens`` that does not
        fit after it, is refused (400 ``context_length_exceeded``, as OpenAI and vLLM
        answer): cut silently, the client's limit came back as an answer cut short
        (``length``) with nothing to say why. A limit the client did not set (the
        gateway's default, this backend's) is lowered to the room left instead.
        """
        ids = self._encode(request)
        prompt_tokens = len(ids)
        params = request.params
        own = params.max_tokens is not None and not params.max_tokens_is_default
        max_new = params.max_tokens if params.max_tokens is not None else self._default_max_tokens
        if self._context is not None:
            room = self._context - prompt_tokens
            param = "prompt" if request.messages is None else "messages"
            if room <= 0:
                raise BackendError(
                    f"the prompt has {prompt_tokens} tokens; the model's context is "
                    f"{self._context}",
                    status=400,
                    code=CONTEXT_LENGTH_EXCEEDED,
                    param=param,
                )
            if own and max_new > room:
                raise BackendError(
                    f"the prompt has {prompt_tokens} tokens and {params.max_tokens_field} "
                    f"asks for {max_new} more; the model's context is {self._context}, so at "
                    f"most {room} can follow this prompt",
                    status=400,
                    code=CONTEXT_LENGTH_EXCEEDED,
                    param=param,
                )
            max_new = min(max_new, room)
        return ids, max_new

    def _encode(self, request: GenerationRequest) -> list[int]:
        _refuse_unsupported(request.params, self._vocabulary)
        tokenizer = self._tokenizer
        if request.messages is not None and self._chat_format is not None:
            ids = self._chat_format(tokenizer, request.messages)
        elif request.messages is not None:
            self._refuse_control_tokens(request.messages)
            if not getattr(tokenizer, "chat_template", None):
                raise BackendError(
                    f"model {self.model_name} has no chat template, so it cannot serve chat "
                    "requests; send a plain prompt (completions) instead",
                    status=400,
                )
            messages = [
                {"role": _ROLE_ALIASES.get(m.role, m.role), "content": m.content}
                for m in request.messages
            ]
            try:
                encoded = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True
                )
            except Exception as e:  # jinja2 errors, raise_exception() in templates
                raise BackendError(
                    f"the chat template of model {self.model_name} rejected the conversation: {e}",
                    status=400,
                ) from e
            ids = _ids_of(encoded)
        else:
            ids = _ids_of(tokenizer(request.prompt or ""))
        if not ids:
            if tokenizer.bos_token_id is None:
                raise BackendError("the prompt is empty", status=400)
            ids = [int(tokenizer.bos_token_id)]
        return ids

    def _refuse_control_tokens(self, messages: Sequence[Message]) -> None:
        for index, message in enumerate(messages):
            for control in self._control_texts:
                if control in message.content:
                    raise BackendError(
                        f"messages[{index}] contains {control!r}, one of model "
                        f"{self.model_name}'s control tokens; it cannot be sent as message "
                        "text (it would change the conversation's structure)",
                        status=400,
                    )

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text


# ----------------------------------------------------------------------- settings


def from_settings(settings: Settings) -> LocalBackend:
    """Load the configured model (or prepare the embedded one) and build the backend.

    Blocks for the whole load (seconds to minutes): call it from a worker thread.
    """
    if settings.model is None:
        from guardrail.backends.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model

        def progress(message: str) -> None:
            log.info("embedded model", step=message)

        source = str(prepare_embedded_model(settings.cache_path, log=progress))
        default_name = EMBEDDED_MODEL_NAME
    else:
        source = settings.model
        default_name = served_model_name(source)
    started = time.perf_counter()
    model, tokenizer = load_local_model(
        source,
        dtype=settings.dtype,
        device=settings.device,
        allow_downloads=settings.allow_downloads,
        cache_dir=settings.cache_path,
        quantization=settings.quantization,
        device_map=settings.device_map,
    )
    name = settings.model_name or default_name
    log.info(
        "local model loaded",
        model=name,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        quantization=settings.quantization,
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=round(time.perf_counter() - started, 2),
    )
    return LocalBackend(
        model,
        tokenizer,
        model_name=name,
        default_max_tokens=settings.default_max_tokens,
        prefix_cache_entries=settings.kv_cache_entries,
        prefix_cache_bytes=settings.kv_cache_mib * 2**20,
        max_batch_size=settings.batch_max_size,
        batch_wait_ms=settings.batch_max_wait_ms,
        max_queue=settings.engine_queue_size,
        chat_template=settings.chat_template,
        checkpoint=default_name,
    )


SPEC = BackendSpec(
    type="local",
    build=from_settings,
    description=(
        "A transformers causal LM in this process: a model folder, a .gguf file, or the "
        "embedded SmolLM2-135M-Instruct."
    ),
)
