"""The local backend: a transformers causal LM running inside the gateway process.

It serves any checkpoint ``AutoModelForCausalLM`` loads (Llama architecture first of
all): a model folder, a ``.gguf`` file (dequantized on load), or a hub id on machines
that may download. With no model configured it serves the embedded
SmolLM2-135M-Instruct (:mod:`guardrail.backends.embedded`).

Why it is built this way:

- Generation never runs on the event loop. Each backend owns one worker thread
  (``ThreadPoolExecutor(max_workers=1)``); requests queue for it. Batching comes later.
- One hook, a ``StoppingCriteria``, sees every generated token. It decodes the whole
  generated sequence (so multi-byte characters and SentencePiece spaces come out
  right), hands safe text deltas to the caller, and halts generation when a stop
  string appears or the consumer has gone away. Text that could still turn into a
  stop string, or that ends in a half character (U+FFFD), is held back until it is
  resolved, so a stop string never leaks, not even in a stream.
- ``generate`` and ``stream`` share that hook, so a stream's chunks join to exactly
  the text ``generate`` returns for the same greedy request.
- torch and transformers are imported lazily: ``import guardrail`` stays light.

Example::

    model, tokenizer = load_local_model("/models/llama-2-7b-chat", dtype="auto",
                                        device="auto", allow_downloads=False,
                                        cache_dir=None)
    backend = LocalBackend(model, tokenizer, model_name="llama-2-7b-chat")
    completion = await backend.generate(request)
    await backend.aclose()

Request fields this backend ignores: ``presence_penalty`` and ``frequency_penalty``
(transformers has no equivalent). ``params.extra`` may carry ``top_k`` and
``repetition_penalty``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from guardrail.backends.base import (
    BackendSpec,
    Chunk,
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)
from guardrail.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    GuardrailError,
    MissingDependencyError,
)
from guardrail.observability.logging import get_logger

if TYPE_CHECKING:
    from guardrail.settings import Settings

__all__ = [
    "SPEC",
    "LocalBackend",
    "from_settings",
    "load_local_model",
    "quiet_transformers",
    "served_model_name",
]

DType = Literal["auto", "fp32", "bf16", "fp16"]
Quantization = Literal["none", "int8", "int4"]

log = get_logger(__name__)

# Chat templates know system/user/assistant(/tool); OpenAI's newer "developer" role is
# a system message by another name.
_ROLE_ALIASES: Final[Mapping[str, str]] = {"developer": "system"}
_REPLACEMENT_CHAR: Final = "\ufffd"


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


def _resolve_device(device: str, torch: Any) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available")
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
        raise MissingDependencyError("bitsandbytes", "local") from e
    config: Any = _import_transformers().BitsAndBytesConfig
    if quantization == "int8":
        return config(load_in_8bit=True)
    return config(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _quantize_cpu(model: Any) -> None:
    """int8 weight-only quantization of every linear layer, in place (torchao)."""
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
    quantize_(model, Int8WeightOnlyConfig())


def load_local_model(
    source: str,
    *,
    dtype: DType = "auto",
    device: str = "auto",
    allow_downloads: bool = False,
    cache_dir: Path | None = None,
    quantization: Quantization = "none",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a folder, a ``.gguf`` file or (if allowed) a hub id.

    ``dtype`` auto is fp32 on CPU and bf16 on CUDA; ``device`` auto is CUDA when there
    is one. Hub downloads go to ``cache_dir/hub``. Remote code is never trusted.
    ``quantization``: ``int8`` is torchao int8 weight-only on CPU and bitsandbytes 8-bit
    on CUDA; ``int4`` is bitsandbytes nf4 on CUDA and refused on CPU.
    Raises :class:`ConfigError` when the model cannot be found or loaded, or the
    quantization cannot run on the device.
    """
    torch = _import_torch()
    transformers = _import_transformers()
    resolved_device = _resolve_device(device, torch)
    torch_dtype = _resolve_dtype(dtype, resolved_device, torch)
    quantization_config = _quantization_config(quantization, resolved_device, torch)

    path = Path(source).expanduser()
    kwargs: dict[str, Any] = {"local_files_only": not allow_downloads}
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
        model_kwargs["device_map"] = resolved_device
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    try:
        with quiet_transformers(swallow_stderr=gguf):
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, **kwargs, **model_kwargs
            )
    except ImportError as e:
        raise MissingDependencyError("gguf" if gguf else "transformers", "local") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"cannot load model {source}: {e}") from e
    if quantization != "none" and resolved_device == "cpu":
        if gguf:  # the GGUF loader marks the dequantized model as quantized
            model.hf_quantizer = None
        _quantize_cpu(model)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------ generation


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or ``None``."""
    found = [i for s in stops if (i := text.find(s)) != -1]
    return min(found) if found else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent: not a tail that may grow into a stop string,
    nor a trailing half character (decoded as U+FFFD until its other bytes arrive)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    end = len(text) - hold
    while end > 0 and text[end - 1] == _REPLACEMENT_CHAR:
        end -= 1
    return end


class _TextTracker:
    """Turns the growing list of generated ids into text deltas; decides when to halt.

    ``update`` is called once per generated token (from the generation thread) with
    every id generated so far. It returns ``True`` when generation should stop: a stop
    string appeared (``stopped``) or ``cancelled`` is set.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._emit = emit
        self._cancelled = cancelled
        self._decoded = ""
        self.text = ""
        """What has been emitted so far."""
        self.stopped = False
        """Whether a stop string ended the text."""

    def update(self, ids: list[int]) -> bool:
        if self.stopped:
            return True
        self._decoded = self._decode(ids)
        cut = _stop_index(self._decoded, self._stops)
        if cut is not None:
            self.stopped = True
            self._send(cut)
            return True
        self._send(_safe_end(self._decoded, self._stops))
        return self._cancelled.is_set()

    def finish(self) -> str:
        """Send what was held back (generation ended without a stop string); the whole text."""
        if not self.stopped:
            self._send(len(self._decoded))
        return self.text

    def _send(self, end: int) -> None:
        if end > len(self.text):
            delta = self._decoded[len(self.text) : end]
            self.text += delta
            self._emit(delta)


@cache
def _hook_class() -> type[Any]:
    """A ``StoppingCriteria`` that feeds a :class:`_TextTracker` (built lazily: transformers)."""
    torch = _import_torch()
    from transformers import StoppingCriteria

    class TrackerHook(StoppingCriteria):
        def __init__(self, tracker: _TextTracker, prompt_len: int) -> None:
            self.tracker = tracker
            self.prompt_len = prompt_len

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            halt = self.tracker.update(input_ids[0, self.prompt_len :].tolist())
            return torch.full(
                (input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device
            )

    return TrackerHook


@dataclass(frozen=True, slots=True)
class _Outcome:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def _ids_of(encoded: Any) -> list[int]:
    """Token ids from what a tokenizer call returns (BatchEncoding, list, tensor, batch of one)."""
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _discard(_delta: str) -> None:
    pass


class PrefixCache:
    """KV caches of recent sequences, reused when a new prompt starts with one of them.

    A chat client resends the whole conversation every turn. The cache of the last
    turn's prompt and answer covers most of the next prompt, so only the new tokens are
    computed. A prompt takes the entry sharing its longest prefix (at least
    ``min_tokens``); the entry is cropped to that prefix and handed to ``generate``,
    which extends it, and the result is stored again. Entries are taken out while in
    use, so a cache is never shared by two generations; the least recently used entry
    goes when more than ``entries`` are kept. ``reused_tokens`` counts what was saved.
    The chat template may tokenize an earlier answer differently from how it was
    generated: the common prefix then simply ends there.
    """

    def __init__(self, entries: int = 8, min_tokens: int = 16) -> None:
        self.entries = entries
        self.min_tokens = min_tokens
        self._items: list[tuple[list[int], Any]] = []  # most recently used last
        self.reused_tokens = 0
        self.hits = 0

    def take(self, ids: list[int]) -> tuple[Any, int]:
        """The cache to start ``ids`` from (cropped), and how many tokens it covers."""
        best, best_len = -1, 0
        for i, (cached, _) in enumerate(self._items):
            n = _common_prefix(cached, ids)
            if n > best_len:
                best, best_len = i, n
        # At least one prompt token must be computed: it yields the first logits.
        best_len = min(best_len, len(ids) - 1)
        if best < 0 or best_len < self.min_tokens:
            return None, 0
        _, cache = self._items.pop(best)
        extra = int(cache.get_seq_length()) - best_len
        if extra > 0:
            cache.crop(-extra)  # transformers 5: a negative count of tokens to drop
        self.hits += 1
        self.reused_tokens += best_len
        return cache, best_len

    def put(self, ids: list[int], cache: Any) -> None:
        if self.entries <= 0 or cache is None:
            return
        length = int(cache.get_seq_length())
        self._items.append((ids[:length], cache))
        while len(self._items) > self.entries:
            self._items.pop(0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LocalBackend:
    """Generates with a transformers model on one dedicated worker thread.

    ``model`` and ``tokenizer`` come from :func:`load_local_model`; ``model_name`` is
    the one name :meth:`models` lists. ``default_max_tokens`` applies to requests that
    do not set ``max_tokens``.
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
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.model_name = model_name
        self._default_max_tokens = default_max_tokens
        generation_config = model.generation_config
        self._eos_ids = _token_ids(generation_config.eos_token_id) | _token_ids(
            tokenizer.eos_token_id
        )
        pad = generation_config.pad_token_id
        if pad is None:
            pad = tokenizer.pad_token_id
        if pad is None and self._eos_ids:
            pad = min(self._eos_ids)
        self._pad_id: int | None = pad
        # Unset in the model's generation config: OpenAI semantics, no top-k cut.
        self._default_top_k: int | None = 0 if generation_config.top_k is None else None
        self._context: int | None = getattr(model.config, "max_position_embeddings", None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrail-local")
        self._in_flight: set[threading.Event] = set()
        self._closed = False
        # KV-cache reuse across turns: the worker thread alone touches this.
        self.prefix_cache = PrefixCache(prefix_cache_entries)

    # -- protocol

    async def generate(self, request: GenerationRequest) -> Completion:
        cancelled = threading.Event()
        try:
            outcome = await self._submit(request, _discard, cancelled)
        finally:
            cancelled.set()
            self._in_flight.discard(cancelled)
        return Completion(
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(delta: str) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
            except RuntimeError:  # the event loop is gone: nobody is listening
                cancelled.set()

        def on_done(done: asyncio.Future[_Outcome]) -> None:
            # Retrieve the error here too, so an abandoned stream logs no
            # "exception was never retrieved".
            if not done.cancelled():
                done.exception()
            deltas.put_nowait(None)

        try:
            future = self._submit(request, emit, cancelled)
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
            # Closed early (client gone) or done: either way the worker stops here.
            cancelled.set()
            self._in_flight.discard(cancelled)

    async def health(self) -> bool:
        return not self._closed

    async def models(self) -> list[str]:
        return [self.model_name]

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the running generation, fail queued ones, and wait for the worker to exit."""
        self._closed = True
        for cancelled in list(self._in_flight):
            cancelled.set()
        self._executor.shutdown(wait=True)

    # -- internals

    def _submit(
        self,
        request: GenerationRequest,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> asyncio.Future[_Outcome]:
        if self._closed:
            raise BackendUnavailable("the local backend is closed")
        self._in_flight.add(cancelled)
        loop = asyncio.get_running_loop()
        try:
            return loop.run_in_executor(self._executor, self._work, request, emit, cancelled)
        except RuntimeError as e:  # the executor was shut down meanwhile
            raise BackendUnavailable("the local backend is closed") from e

    def _work(
        self,
        request: GenerationRequest,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> _Outcome:
        """Runs on the worker thread."""
        try:
            return self._generate_sync(request, emit, cancelled)
        except GuardrailError:
            raise
        except Exception as e:
            raise BackendError(f"the local model failed: {type(e).__name__}: {e}") from e

    def _generate_sync(
        self,
        request: GenerationRequest,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> _Outcome:
        if self._closed:
            raise BackendUnavailable("the local backend is closed")
        if cancelled.is_set():  # the caller left while this request waited its turn
            return _Outcome("", "stop", 0, 0)
        torch = _import_torch()
        started = time.perf_counter()
        ids = self._encode(request)
        prompt_tokens = len(ids)
        params = request.params
        max_new = params.max_tokens if params.max_tokens is not None else self._default_max_tokens
        if self._context is not None:
            room = self._context - prompt_tokens
            if room <= 0:
                raise BackendError(
                    f"the prompt has {prompt_tokens} tokens; the model's context is "
                    f"{self._context}",
                    status=400,
                )
            max_new = min(max_new, room)
        if max_new <= 0:
            return _Outcome("", "length", prompt_tokens, 0)

        tracker = _TextTracker(self._decode, params.stop, emit, cancelled)
        hook = _hook_class()(tracker, prompt_tokens)
        from transformers import StoppingCriteriaList

        input_ids = torch.tensor([ids], device=self._model.device)
        cache, reused = self.prefix_cache.take(ids)
        with torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new,
                pad_token_id=self._pad_id,
                stopping_criteria=StoppingCriteriaList([hook]),
                return_dict_in_generate=True,
                **({"past_key_values": cache} if cache is not None else {}),
                **self._sampling_kwargs(params),
            )
        sequence: list[int] = output.sequences[0].tolist()
        generated = sequence[prompt_tokens:]
        self.prefix_cache.put(sequence, output.past_key_values)
        text = tracker.finish()
        if self._closed:
            raise BackendUnavailable("the local backend was closed during generation")

        finish: FinishReason
        if tracker.stopped or (generated and generated[-1] in self._eos_ids):
            finish = "stop"
        elif len(generated) >= max_new:
            finish = "length"
        else:
            finish = "stop"  # cancelled: nobody reads this
        log.debug(
            "local generation finished",
            request_id=request.request_id,
            prompt_tokens=prompt_tokens,
            reused_tokens=reused,
            completion_tokens=len(generated),
            finish_reason=finish,
            cancelled=cancelled.is_set(),
            seconds=round(time.perf_counter() - started, 3),
        )
        return _Outcome(text, finish, prompt_tokens, len(generated))

    def _encode(self, request: GenerationRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is not None:
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

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _sampling_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if "repetition_penalty" in params.extra:
            kwargs["repetition_penalty"] = float(params.extra["repetition_penalty"])
        if not params.temperature:  # None or 0: greedy
            kwargs["do_sample"] = False
            return kwargs
        kwargs["do_sample"] = True
        kwargs["temperature"] = params.temperature
        if params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if "top_k" in params.extra:
            kwargs["top_k"] = int(params.extra["top_k"])
        elif self._default_top_k is not None:
            kwargs["top_k"] = self._default_top_k
        return kwargs


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
    )


SPEC = BackendSpec(
    type="local",
    build=from_settings,
    description=(
        "A transformers causal LM in this process: a model folder, a .gguf file, or the "
        "embedded SmolLM2-135M-Instruct."
    ),
)
