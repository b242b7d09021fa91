"""One typed settings object, read from an optional YAML file and ``GUARDRAIL_*`` variables.

Precedence, lowest first: field defaults, the YAML file (``--config``), environment
variables, command-line flags. Every environment variable is the field name in
upper case with the ``GUARDRAIL_`` prefix (``GUARDRAIL_PORT=9000``); list fields take
comma-separated values (``GUARDRAIL_BACKEND_URLS=http://a:8000/v1,http://b:8000/v1``).

Two variables are not field names, for containers and quick starts (README: Security and
reliability):
``GUARDRAIL_API_KEYS="key1=tenant1,key2=tenant2"`` and ``GUARDRAIL_ADMIN_KEY``. Their keys
are hashed (sha256) as they are read; only the hashes are kept in :class:`Settings`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import yaml

from guardrail.docs import doc as _doc
from guardrail.errors import ConfigError
from guardrail.observability.drift import MAX_BASELINE_RATIO, baseline_fits

DEFAULT_POLICY = "policies/default.yaml"


def shipped_policy(name: str = "default.yaml") -> Path | None:
    """A policy shipped with Guardrail: inside the installed package (a wheel carries
    ``policies/`` as ``guardrail/policies/``) or in the source checkout it runs from."""
    package = Path(__file__).resolve().parent
    for folder in (package / "policies", package.parent / "policies"):
        if (folder / name).is_file():
            return folder / name
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guardrail"


NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$(?!\n)")]
BearerToken = Annotated[str, msgspec.Meta(pattern=r"^[!-~]+$(?!\n)")]


def key_digest(key: str) -> str:
    """The sha256 hex digest an API key is stored and compared as."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_PRINTABLE_ASCII = re.compile(r"[ -~]+")


def key_problem(key: str) -> str | None:
    """Why no client could ever present ``key`` (a stripped API or admin key), or None.

    A key is compared as the sha256 of its UTF-8, a presented one is read from a header,
    which carries bytes: a character outside printable ASCII (an accented letter, a
    control character) is either refused by HTTP clients and servers or read back as
    something else, so the key would be accepted here and never authenticate anyone.
    Never names the key or the character (the message may be logged).
    """
    if _PRINTABLE_ASCII.fullmatch(key):
        return None
    return (
        "holds a character other than printable ASCII (letters, digits, punctuation, "
        "spaces): a request header does not carry it as the key's UTF-8, so no client "
        "could ever present the key"
    )


def redis_url_problem(url: str) -> str | None:
    """What in a ``rate_limit_redis_url`` redis-py would refuse (after the model loaded:
    a traceback) or silently ignore (a database that is not a number is database 0),
    or None. Never echoes the URL: it may hold a password."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "is not a redis://, rediss:// or unix:// URL (the schemes redis-py takes)"
    try:
        parts = urlsplit(url)
        port = parts.port
        query = parse_qs(parts.query)
    except ValueError:
        return "cannot be read: its port is not a number from 1 to 65535, or its host is malformed"
    databases = [*query.get("db", [])]
    if parts.scheme == "unix":
        if not parts.path:
            return "needs the socket's path after unix:// (unix:///run/redis.sock)"
    else:
        if port == 0:
            return "has port 0; give the server's port (redis://host:6379/0)"
        path = unquote(parts.path).replace("/", "")
        if path and not databases:  # redis-py reads the path only without ?db=
            databases.append(path)
    for db in databases:
        if not db.strip().isdigit() or not db.strip().isascii():
            return "names a database (its path, or ?db=) that is not a number (redis://host:6379/0)"
    try:
        from redis.connection import parse_url
    except ImportError:  # the redis extra is checked when the limiter is built
        return None
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        return "has a query parameter whose value redis-py cannot read"
    return None


# The longest time setting: a finite bound, so "inf" (which parses as a float) is refused
# rather than turning a time limit off.
_DAY_S = 86_400.0


class ApiKeyEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One API key, bound to a tenant: its sha256 (hex), or an environment variable holding it."""

    tenant: Annotated[str, _doc("The tenant this key acts for."), msgspec.Meta(min_length=1)]
    key_sha256: Annotated[
        Sha256Hex | None, _doc("sha256 of the key, lower-case hex (`sha256sum`).")
    ] = None
    key_env: Annotated[
        str | None, _doc("Name of an environment variable that holds the key itself.")
    ] = None

    def __post_init__(self) -> None:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("an api_keys entry needs exactly one of key_sha256 or key_env")


class TenantConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one tenant may do. Unset fields fall back to the gateway-wide settings."""

    policy: Annotated[
        str | None, _doc("Policy file for this tenant's requests (default: `policy`).")
    ] = None
    models: Annotated[list[str], _doc("Models this tenant may use; empty: every served model.")] = (
        msgspec.field(default_factory=list)
    )
    requests_per_minute: Annotated[
        NonNegative | None,
        _doc("Requests per minute per key (default: rate_limit_requests_per_minute; 0: no limit)."),
    ] = None
    tokens_per_minute: Annotated[
        NonNegative | None,
        _doc("Tokens per minute per key (default: rate_limit_tokens_per_minute; 0: no limit)."),
    ] = None


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Gateway settings. Each field is documented; see the README for examples."""

    host: Annotated[str, _doc("Address to listen on.")] = "127.0.0.1"
    # Not 0: the system would pick a port no client is told (the startup line said 0).
    port: Annotated[int, _doc("Port to listen on."), msgspec.Meta(ge=1, le=65535)] = 8080
    policy: Annotated[
        str,
        _doc(
            "Path of the policy YAML file in force. The default, policies/default.yaml, "
            "is read from the current folder when it is there, else the copy shipped "
            "with the package is used."
        ),
    ] = DEFAULT_POLICY
    shadow_policy: Annotated[
        str | None,
        _doc(
            "A candidate policy file checked on live traffic without being enforced; its "
            "decisions are compared with the active policy's (guardrail_shadow_decisions_total)."
        ),
    ] = None
    shadow_max_in_flight: Annotated[
        int,
        _doc("Most shadow checks running at once; past this they are dropped and counted."),
        msgspec.Meta(ge=1, le=100_000),
    ] = 64
    backend: Annotated[
        str, _doc("Backend type: 'local' (transformers), 'remote' (OpenAI-compatible HTTP).")
    ] = "local"
    backend_urls: Annotated[
        list[str],
        _doc(
            "Remote backend base URLs (ending in /v1), tried in this order: the first "
            "that answers serves the request."
        ),
    ] = msgspec.field(default_factory=list)
    backend_api_key: Annotated[
        BearerToken | None,
        _doc(
            "Bearer token sent to the remote backend, if it needs one: visible ASCII, no "
            "spaces (a line break would be refused by the HTTP client at every call)."
        ),
    ] = None
    backend_timeout_s: Annotated[
        float,
        _doc(
            "Seconds to wait for a remote backend's whole answer, or in a stream for the "
            "next frame with text, tool-call data, a finish or the usage."
        ),
        msgspec.Meta(gt=0, le=_DAY_S),
    ] = 120.0
    backend_connect_timeout_s: Annotated[
        float,
        _doc("Seconds to wait for a TCP connection to a remote backend."),
        msgspec.Meta(gt=0, le=_DAY_S),
    ] = 5.0
    backend_retries: Annotated[
        int,
        _doc("Retries per URL on connection errors and 5xx answers (non-streaming calls)."),
        msgspec.Meta(ge=0, le=10),
    ] = 2
    backend_retry_backoff_s: Annotated[
        float,
        _doc("First retry delay in seconds; doubles on each retry."),
        msgspec.Meta(ge=0, le=_DAY_S),
    ] = 0.2
    models: Annotated[
        list[str],
        _doc(
            "Model names clients may ask for. Empty: the local model's name, or what the "
            "remote backend lists at /v1/models."
        ),
    ] = msgspec.field(default_factory=list)
    model: Annotated[
        str | None,
        _doc(
            "Local backend: a model folder, a .gguf file, or a hub id (online machines "
            "only). Empty: the embedded SmolLM2-135M-Instruct, prepared in cache_dir."
        ),
    ] = None
    model_name: Annotated[
        str | None, _doc("Name under which the local model is served (default: folder name).")
    ] = None
    chat_template: Annotated[
        Literal["llama-2"] | None,
        _doc(
            "Local backend: a built-in chat format to use instead of the tokenizer's "
            "template. Empty: the tokenizer's; a Llama 2 chat model without one gets "
            "llama-2 (<s>[INST] <<SYS>>...)."
        ),
    ] = None
    dtype: Annotated[
        Literal["auto", "fp32", "bf16", "fp16"],
        _doc("Local backend weight dtype; auto is fp32 on CPU, bf16 on CUDA."),
    ] = "auto"
    device: Annotated[str, _doc("Local backend device: auto, cpu, cuda, cuda:N.")] = "auto"
    device_map: Annotated[
        str | None,
        _doc(
            "Local backend, CUDA only: spread the model's layers over several GPUs "
            "(auto, balanced, balanced_low_0, sequential; needs accelerate)."
        ),
    ] = None
    kv_cache_entries: Annotated[
        int,
        _doc(
            "Local backend: KV caches of recent conversations kept for reuse when the next "
            "turn resends them (0: off). Each holds one conversation's keys and values."
        ),
        msgspec.Meta(ge=0, le=1024),
    ] = 4
    kv_cache_mib: Annotated[
        int,
        _doc(
            "Local backend: most memory, in MiB, the reused KV caches may hold together "
            "(least recently used go first)."
        ),
        msgspec.Meta(ge=0),
    ] = 512
    batch_max_size: Annotated[
        int,
        _doc(
            "Local backend: requests generated together (continuous batching: they join "
            "and leave between decoding steps). 1: one at a time."
        ),
        msgspec.Meta(ge=1, le=1024),
    ] = 8
    batch_max_wait_ms: Annotated[
        float,
        _doc("Local backend: how long an idle engine waits for more requests to batch with."),
        msgspec.Meta(ge=0, le=10_000),
    ] = 5.0
    engine_queue_size: Annotated[
        int,
        _doc(
            "Local backend: requests that may wait for a place in the batch; more get 429 "
            "with Retry-After."
        ),
        msgspec.Meta(ge=0),
    ] = 64
    quantization: Annotated[
        Literal["none", "int8", "int4"],
        _doc(
            "Local backend weight quantization: int8 (CPU: torchao int8 weight-only; CUDA: "
            "bitsandbytes 8-bit) or int4 (CUDA only: bitsandbytes nf4; refused on CPU)."
        ),
    ] = "none"
    default_max_tokens: Annotated[
        int,
        _doc("Token limit for requests that set none (see default_max_tokens_field)."),
        msgspec.Meta(ge=1),
    ] = 512
    default_max_tokens_field: Annotated[
        Literal["max_tokens", "max_completion_tokens"],
        _doc(
            "The name a remote chat is sent default_max_tokens under: max_tokens (vLLM, "
            "TGI, Ollama) or max_completion_tokens (OpenAI's reasoning models refuse "
            "max_tokens). Legacy completions always get max_tokens."
        ),
    ] = "max_tokens"
    cache_dir: Annotated[
        str | None, _doc("Folder for prepared models (default: $XDG_CACHE_HOME/guardrail).")
    ] = None
    allow_downloads: Annotated[
        bool, _doc("Whether models may be fetched from a hub (off: everything loads locally).")
    ] = False
    embedding_precision: Annotated[
        Literal["auto", "fp32", "bf16"],
        _doc(
            "Arithmetic of the shared sentence encoder (toxicity, semantic rules, "
            "groundedness): bf16 (torch autocast) or fp32; auto picks bf16 where the CPU "
            "has native bf16 instructions (AVX512-BF16 or AMX), else fp32."
        ),
    ] = "auto"
    max_body_bytes: Annotated[
        int, _doc("Largest request body accepted, in bytes."), msgspec.Meta(ge=1024)
    ] = 4 * 1024 * 1024
    max_messages: Annotated[
        int, _doc("Most messages accepted in one chat request."), msgspec.Meta(ge=1)
    ] = 512
    verdict_cache_entries: Annotated[
        int,
        _doc(
            "Verdicts kept per process so unchanged conversation turns are not checked "
            "again (LRU; 0 turns the cache off)."
        ),
        msgspec.Meta(ge=0),
    ] = 50_000
    filter_workers: Annotated[
        int,
        _doc(
            "Threads in the shared pool that runs blocking filter work; also how many "
            "inputs of one /v1/moderations list, and how many uncached messages of one "
            "conversation, are checked at a time."
        ),
        msgspec.Meta(ge=1),
    ] = 4
    max_tokens_limit: Annotated[
        int,
        _doc("Largest max_tokens (or max_completion_tokens) a request may ask for; more: 400."),
        msgspec.Meta(ge=1),
    ] = 32_768
    api_keys: Annotated[
        list[ApiKeyEntry],
        _doc(
            "API keys, each bound to a tenant (env: GUARDRAIL_API_KEYS=key=tenant,...). "
            "Empty: the API routes are open to anyone (logged loudly at startup)."
        ),
    ] = msgspec.field(default_factory=list)
    tenants: Annotated[
        dict[str, TenantConfig],
        _doc("Per-tenant policy, allowed models and rate limits; other tenants get the defaults."),
    ] = msgspec.field(default_factory=dict)
    admin_key_sha256: Annotated[
        Sha256Hex | None,
        _doc("sha256 of the key for /admin routes (env: GUARDRAIL_ADMIN_KEY, the key itself)."),
    ] = None
    metrics_require_admin_key: Annotated[
        bool, _doc("Whether GET /metrics needs the admin key (default: open, for scrapers).")
    ] = False
    rate_limit_requests_per_minute: Annotated[
        int,
        _doc("Requests per minute per API key, unless its tenant says (0: no limit)."),
        msgspec.Meta(ge=0),
    ] = 0
    rate_limit_tokens_per_minute: Annotated[
        int,
        _doc("Tokens (prompt estimate + max_tokens) per minute per API key (0: no limit)."),
        msgspec.Meta(ge=0),
    ] = 0
    rate_limit_redis_url: Annotated[
        str | None,
        _doc("redis:// URL: rate limits shared by every replica (default: in this process)."),
    ] = None
    cors_origins: Annotated[
        list[str], _doc("Origins allowed by CORS (empty: CORS off; '*' for any).")
    ] = msgspec.field(default_factory=list)
    max_concurrency: Annotated[
        int, _doc("Model requests served at once; more wait in a queue."), msgspec.Meta(ge=1)
    ] = 256
    max_queue: Annotated[
        int, _doc("Requests that may wait for a slot; more get 503 at once."), msgspec.Meta(ge=0)
    ] = 1024
    queue_timeout_s: Annotated[
        float, _doc("Longest wait for a slot before a 503."), msgspec.Meta(gt=0, le=_DAY_S)
    ] = 30.0
    breaker_failures: Annotated[
        int,
        _doc("Consecutive failures that open a remote backend URL's circuit (0: no breaker)."),
        msgspec.Meta(ge=0),
    ] = 5
    breaker_reset_s: Annotated[
        float,
        _doc("Seconds an open circuit waits before one trial request."),
        msgspec.Meta(gt=0, le=_DAY_S),
    ] = 30.0
    shutdown_timeout_s: Annotated[
        float,
        _doc("On SIGTERM, seconds open requests and streams get to finish."),
        msgspec.Meta(ge=0, le=_DAY_S),
    ] = 30.0
    audit_dsn: Annotated[
        str | None,
        _doc(
            "Audit log database: sqlite:////abs/path.db, a file path, postgresql://..., or "
            "off. Empty: SQLite at $XDG_DATA_HOME/guardrail/audit.db."
        ),
    ] = None
    audit_queue_size: Annotated[
        int,
        _doc("Audit rows that may wait for the database before one is dropped (and logged)."),
        msgspec.Meta(ge=1),
    ] = 100_000
    audit_queue_bytes: Annotated[
        int,
        _doc(
            "Bytes of text and JSON (findings, filters) that waiting audit rows may hold in "
            "memory before one is dropped (and logged)."
        ),
        msgspec.Meta(ge=1),
    ] = 256 * 1024 * 1024
    audit_batch_size: Annotated[
        int, _doc("Most audit rows written in one transaction."), msgspec.Meta(ge=1)
    ] = 500
    audit_flush_interval_ms: Annotated[
        int, _doc("Longest an audit row waits for its batch to fill."), msgspec.Meta(ge=0)
    ] = 200
    audit_text: Annotated[
        Literal["none", "redacted"],
        _doc("Text kept in the audit log: none, or the redacted text of the exchange."),
    ] = "none"
    feedback_comments: Annotated[
        Literal["none", "redacted"],
        _doc(
            "Comments sent with POST /v1/feedback: none (accepted, never stored), or "
            "redacted (stored after the tenant policy's input filters; a blocked comment "
            "is not stored). Never logged either way."
        ),
    ] = "none"
    feedback_comment_max_chars: Annotated[
        int,
        _doc("Longest feedback comment accepted, in characters; longer: 400."),
        msgspec.Meta(ge=0, le=100_000),
    ] = 2000
    group_lexicon: Annotated[
        str | None,
        _doc(
            "Demographic group lexicon (YAML) for the per-group metrics, counterfactual "
            "probes and the audit log's groups column. Empty: the shipped "
            "guardrail/observability/data/groups.yaml; off: no group detection."
        ),
    ] = None
    counterfactual_sample_rate: Annotated[
        float,
        _doc(
            "Share of prompts that mention a group whose input stage is re-run off the "
            "request path with the group swapped for its counterpart (0: probes off)."
        ),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.0
    counterfactual_max_in_flight: Annotated[
        int,
        _doc("Most counterfactual probes running at once; past this they are dropped and counted."),
        msgspec.Meta(ge=1, le=10_000),
    ] = 4
    consistency_sample_rate: Annotated[
        float,
        _doc(
            "Share of chat/completion requests whose answer is checked for self-consistency "
            "against extra samples from the backend (0: off; each check costs "
            "consistency_samples generations)."
        ),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.0
    consistency_samples: Annotated[
        int, _doc("Extra samples drawn per consistency check."), msgspec.Meta(ge=1, le=20)
    ] = 3
    consistency_mode: Annotated[
        Literal["background", "inline"],
        _doc(
            "background: score after the answer is sent (users never wait); inline: score "
            "before a non-streamed answer returns and flag it 'inconsistent' below the "
            "threshold."
        ),
    ] = "background"
    consistency_threshold: Annotated[
        float,
        _doc("Inline mode: answers scoring below this get an 'inconsistent' flag."),
        msgspec.Meta(ge=0.0, le=1.0),
    ] = 0.5
    consistency_temperature: Annotated[
        float, _doc("Sampling temperature of the extra samples."), msgspec.Meta(ge=0.0, le=2.0)
    ] = 1.0
    consistency_max_in_flight: Annotated[
        int,
        _doc("Most background consistency checks at once; past this they are skipped and counted."),
        msgspec.Meta(ge=1, le=10_000),
    ] = 4
    harmful_rate_recent_s: Annotated[
        float,
        _doc("Recent window of the in-process harmful-content rate (guardrail_harmful_rate)."),
        msgspec.Meta(gt=0, le=_DAY_S),
    ] = 900.0
    harmful_rate_baseline_s: Annotated[
        float,
        _doc(
            "Baseline window, just before the recent one, that the recent harmful-content "
            "rate is compared with (guardrail_harmful_rate_drift); at most 6666 recent windows."
        ),
        msgspec.Meta(gt=0, le=30 * _DAY_S),
    ] = 86_400.0
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], _doc("Lowest level logged.")
    ] = "info"
    log_format: Annotated[
        Literal["json", "console"], _doc("json for machines, console for people.")
    ] = "json"
    log_text: Annotated[
        bool,
        _doc(
            "Log prompt and completion text (debugging only; off by default, and "
            "nothing else ever logs user text)."
        ),
    ] = False

    def __post_init__(self) -> None:
        # Checked as the settings are read, so a bad combination stops startup (exit 2)
        # before any model loads. Each message starts with the key it is about (and so
        # names its source, see _invalid), never with a value that may be secret.
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is larger than "
                f"max_tokens_limit ({self.max_tokens_limit}): a request that sets no "
                "max_tokens would be sent more than any request may ask for; lower "
                "default_max_tokens or raise max_tokens_limit"
            )
        if self.rate_limit_redis_url:
            problem = redis_url_problem(self.rate_limit_redis_url)
            if problem:
                raise ValueError(f"rate_limit_redis_url {problem}")
        if not baseline_fits(self.harmful_rate_recent_s, self.harmful_rate_baseline_s):
            # The drift monitor refused it as the app was built: after the model loaded,
            # naming no setting.
            raise ValueError(
                f"harmful_rate_baseline_s ({self.harmful_rate_baseline_s:.10g}) may be at "
                f"most {MAX_BASELINE_RATIO} times harmful_rate_recent_s "
                f"({self.harmful_rate_recent_s:.10g}); shorten the baseline or lengthen "
                "the recent window"
            )
        for name in _REQUIRED_TEXT:
            # A blank line in an env file sets the variable to "": an empty host was
            # handed to uvicorn, which listens on every interface for it.
            if not getattr(self, name).strip():
                default = _FIELDS[name].default
                raise ValueError(
                    f"{name} is empty; set it, or leave it unset for the default ({default})"
                )

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


_FIELDS: dict[str, Any] = {f.name: f for f in msgspec.structs.fields(Settings)}
# Settings that always take a value: empty or blank is never what was meant.
_REQUIRED_TEXT = ("host", "policy", "backend", "device")
ENV_PREFIX = "GUARDRAIL_"
# Fields that no GUARDRAIL_<NAME> variable sets: structured, or set by their own variable.
_NOT_FROM_ENV = {"api_keys", "tenants"}


def _unset_when_blank(kind: Any) -> bool:
    """Whether ``kind`` is an optional text setting (``str | None``, or a choice of
    strings or None) whose None is a default of its own ("the embedded model").

    An env file's blank line (``GUARDRAIL_MODEL=``) set it to "": the working folder was
    loaded as a model. Blank means unset there. Keys (a pattern-checked ``str``) are not
    among them: a blank key is an error that names it.
    """
    if typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    members = typing.get_args(kind)
    if type(None) not in members:
        return False
    return all(m is str or typing.get_origin(m) is Literal for m in members if m is not type(None))


# Optional text settings a blank GUARDRAIL_<NAME> leaves unset.
_BLANK_IS_UNSET = frozenset(n for n, f in _FIELDS.items() if _unset_when_blank(f.type))


def _blank_optional(name: object, value: object) -> bool:
    """An optional text setting given as empty or blank: unset, whatever its source."""
    return name in _BLANK_IS_UNSET and isinstance(value, str) and not value.strip()


def parse_api_keys(raw: str) -> list[dict[str, str]]:
    """``key1=tenant1,key2=tenant2`` as api_keys entries, the keys hashed at once.

    A value with no entry at all (blank, only commas) is an error, not "no keys": it
    would replace the config file's keys and leave the gateway open to everyone.
    """
    entries = []
    for n, part in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not part:
            continue
        key, sep, tenant = part.rpartition("=")
        if not sep or not key.strip() or not tenant.strip():
            # Never echo the entry: it holds a key.
            raise ConfigError(f"GUARDRAIL_API_KEYS entry {n} is not KEY=TENANT")
        problem = key_problem(key.strip())
        if problem:
            raise ConfigError(f"GUARDRAIL_API_KEYS entry {n}: the key {problem}")
        entries.append({"key_sha256": key_digest(key.strip()), "tenant": tenant.strip()})
    if not entries:
        raise ConfigError(
            "GUARDRAIL_API_KEYS is set but holds no KEY=TENANT entry; unset it to use the "
            "config file's api_keys (or to run open)"
        )
    return entries


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ENV_PREFIX + "TENANTS" in environ:
        # Ignored, it left its operator believing per-tenant limits were in force.
        raise ConfigError(
            "GUARDRAIL_TENANTS cannot be set from the environment; set tenants in the "
            "config file (--config)"
        )
    if ENV_PREFIX + "API_KEYS" in environ:
        out["api_keys"] = parse_api_keys(environ[ENV_PREFIX + "API_KEYS"])
    if ENV_PREFIX + "ADMIN_KEY" in environ:
        if ENV_PREFIX + "ADMIN_KEY_SHA256" in environ:
            # One of them silently won: say which key is meant.
            raise ConfigError(
                "GUARDRAIL_ADMIN_KEY and GUARDRAIL_ADMIN_KEY_SHA256 are both set; set one"
            )
        # Stripped like every key source (a secret file often ends in a line break).
        admin = environ[ENV_PREFIX + "ADMIN_KEY"].strip()
        if not admin:
            raise ConfigError("GUARDRAIL_ADMIN_KEY is set but empty; unset it or give the key")
        problem = key_problem(admin)
        if problem:
            raise ConfigError(f"GUARDRAIL_ADMIN_KEY: the key {problem}")
        out["admin_key_sha256"] = key_digest(admin)
    for name, f in _FIELDS.items():
        if name in _NOT_FROM_ENV:
            continue
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None or (name in _BLANK_IS_UNSET and not raw.strip()):
            continue
        if "list[" in str(f.type):
            out[name] = [part.strip() for part in raw.split(",") if part.strip()]
        elif name == "backend_api_key":
            out[name] = raw.strip()  # like every key source: a secret file's line break
        else:
            out[name] = raw
    return out


def misspelt_env(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``GUARDRAIL_*`` variables that set nothing but look like one that does, each with
    that one: ``GUARDRAIL_API_KEY`` leaves the gateway open while its operator believes
    keys are on. Only near misses count, since a policy's ``key_env`` or
    ``encrypt_key_env`` may name a variable of this prefix on purpose."""
    known = [ENV_PREFIX + n.upper() for n in _FIELDS if n not in _NOT_FROM_ENV]
    known += [ENV_PREFIX + "API_KEYS", ENV_PREFIX + "ADMIN_KEY"]
    out = []
    for name in sorted(environ):
        # GUARDRAIL_TEST_*: this project's own test run settings (GUARDRAIL_TEST_DEVICE).
        if name.startswith(ENV_PREFIX) and name not in known and "_TEST_" not in name:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                out.append((name, close[0]))
    return out


class _SettingsLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML keeps the last:
    which of the two the operator meant is unknown)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults": merged (and overridden) by the base class
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            try:
                first = seen.get(key)
                seen[key] = mark.line + 1
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise ConfigError(
                    f"{self.name}:{mark.line + 1}:{mark.column + 1}: {key} is given twice "
                    f"(first at line {first})"
                )
        return super().construct_mapping(node, deep=deep)


def _flag(name: str) -> str:
    return "--backend-url" if name == "backend_urls" else "--" + name.replace("_", "-")


def _env_name(name: str, environ: Mapping[str, str]) -> str:
    if name == "admin_key_sha256" and ENV_PREFIX + "ADMIN_KEY" in environ:
        return ENV_PREFIX + "ADMIN_KEY"
    return ENV_PREFIX + name.upper()


def _invalid(
    error: msgspec.ValidationError,
    *,
    config_file: str | Path | None,
    file_keys: set[Any],
    env_keys: set[str],
    environ: Mapping[str, str],
    flag_keys: set[str],
) -> ConfigError:
    """The settings error naming the field and the one source it came from (the flag, the
    variable or the file, by precedence). Never the value: it may be a key."""
    text = _ENUM_VALUE.sub("Invalid enum value", str(error))
    found = re.search(r" - at `\$\.(\w+)", text) or re.match(
        r"Object contains unknown field `([^`]*)`$", text
    )
    # A check of Settings.__post_init__ has no path: its message begins with the key it
    # is about, and writes another it involves as "key (value)". Of those, the first one
    # some source gave is named.
    named: list[str] = []
    if found:
        named.append(found.group(1))
    else:
        head = text.split(":", 1)[0]
        first = re.match(r"\w+", head)
        if first and first.group(0) in _FIELDS:
            named.append(first.group(0))
        named += [w for w in re.findall(r"(\w+) \(", head) if w in _FIELDS and w not in named]
    given = [n for n in named if n in flag_keys | env_keys | file_keys]
    name = (given or named)[0] if named else None
    if name is not None and name in flag_keys:
        where = f"{name} (command-line flag {_flag(name)})"
    elif name is not None and name in env_keys:
        where = f"{name} (environment variable {_env_name(name, environ)})"
    elif config_file is not None and (name is None or name in file_keys):
        where = f"{name} (in {config_file})" if name else f"in {config_file}"
    else:
        where = "environment or flags"
    choices = _choices(name) if text.startswith("Invalid enum value") else ()
    if choices:
        text = text.replace("Invalid enum value", f"not one of {', '.join(choices)}", 1)
    return ConfigError(f"invalid settings: {where}: {text}")


def _with_entry_key(
    error: msgspec.ValidationError, merged: Mapping[str, Any]
) -> msgspec.ValidationError:
    """``error`` with the entry of a mapping setting it is about named: msgspec writes
    every key of a ``dict`` as ``[...]`` ("at `$.tenants[...]`"), which left an operator
    to guess which of the tenants held the typo."""
    found = re.search(r"`\$\.(\w+)\[\.\.\.\]", str(error))
    field = _FIELDS.get(found.group(1)) if found else None
    entries = merged.get(found.group(1)) if found else None
    if field is None or not isinstance(entries, Mapping):
        return error
    kinds = [k for k in typing.get_args(field.type) if typing.get_origin(k) is dict]
    if typing.get_origin(field.type) is dict:
        kinds.append(field.type)
    if not kinds:
        return error
    value_type = typing.get_args(kinds[0])[1]
    for key, value in entries.items():
        try:
            msgspec.convert(value, value_type, strict=False)
        except msgspec.ValidationError:
            named = str(error).replace("[...]", f"[{json.dumps(str(key))}]", 1)
            return msgspec.ValidationError(named)
    return error


# msgspec quotes the value it refused ("Invalid enum value 'sk-...'"): a key pasted into
# the wrong variable would be printed. The message keeps the field and the choices.
_ENUM_VALUE = re.compile(r"Invalid enum value '(?:[^'\\]|\\.)*'")


def _choices(name: str | None) -> tuple[str, ...]:
    """The values a choice setting takes (a ``Literal``), for its error message."""
    field = _FIELDS.get(name or "")
    if field is None:
        return ()
    kinds = [field.type, *typing.get_args(field.type)]
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            return tuple(str(v) for v in typing.get_args(kind))
        for inner in typing.get_args(kind):
            if typing.get_origin(inner) is typing.Literal:
                return tuple(str(v) for v in typing.get_args(inner))
    return ()


# String settings that `off` switches off; in a YAML file a bare `off` is a boolean.
_OFF_SWITCHES = ("audit_dsn", "group_lexicon")


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return type(e).__name__


def load_settings(
    config_file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from a YAML file, the environment and explicit overrides."""
    merged: dict[str, Any] = {}
    file_keys: set[Any] = set()
    if config_file is not None:
        try:
            text = Path(config_file).read_text(encoding="utf-8")
            loader = _SettingsLoader(text)
            loader.name = str(config_file)
            try:
                loaded = loader.get_single_data()
            finally:
                loader.dispose()
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {config_file} is not UTF-8 text "
                f"(byte {e.object[e.start]:#04x} at offset {e.start})"
            ) from e
        except yaml.YAMLError as e:
            # The problem and where, never the parser's quote of the line (it may hold a key).
            raise ConfigError(
                f"config file {config_file} is not valid YAML: {_yaml_problem(e)}"
            ) from e
        except ValueError as e:  # an integer of more digits than Python converts
            raise ConfigError(f"config file {config_file} holds a value out of range: {e}") from e
        except RecursionError as e:
            raise ConfigError(
                f"config file {config_file} nests lists or mappings too deeply to be read"
            ) from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must be a mapping of settings")
        for name in _OFF_SWITCHES:
            # YAML 1.1 reads a bare `off` (the README's own spelling) as false.
            if loaded.get(name) is False:
                loaded[name] = "off"
        # As a blank variable (below): `model: ""` had loaded the working folder as a
        # model, and `device_map: ""` went to transformers as a device map.
        loaded = {k: v for k, v in loaded.items() if not _blank_optional(k, v)}
        merged.update(loaded)
        file_keys = set(loaded)
    environ = os.environ if environ is None else environ
    env = _from_env(environ)
    merged.update(env)
    flags = {
        k: v for k, v in (overrides or {}).items() if v is not None and not _blank_optional(k, v)
    }
    merged.update(flags)
    try:
        # str_values: environment values arrive as strings and are converted here.
        settings = msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise _invalid(
            _with_entry_key(e, merged),
            config_file=config_file,
            file_keys=file_keys,
            env_keys=set(env),
            environ=environ,
            flag_keys=set(flags),
        ) from e
    if settings.policy == DEFAULT_POLICY and not Path(DEFAULT_POLICY).is_file():
        # Started outside a checkout (an installed wheel, a service's working folder):
        # the default policy is the one that ships with the package.
        shipped = shipped_policy()
        if shipped is not None:
            settings = msgspec.structs.replace(settings, policy=str(shipped))
    return settings
