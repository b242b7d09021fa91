"""One typed settings object, read from an optional YAML file and ``GUARDRAIL_*`` variables.

Precedence, lowest first: field defaults, the YAML file (``--config``), environment
variables, command-line flags. Every environment variable is the field name in
upper case with the ``GUARDRAIL_`` prefix (``GUARDRAIL_PORT=9000``); list fields take
comma-separated values (``GUARDRAIL_BACKEND_URLS=http://a:8000/v1,http://b:8000/v1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from guardrail.errors import ConfigError


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guardrail"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Gateway settings. Each field is documented; see the README for examples."""

    host: Annotated[str, _doc("Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, _doc("Port to listen on."), msgspec.Meta(ge=0, le=65535)] = 8080
    policy: Annotated[str, _doc("Path of the policy YAML file in force.")] = "policies/default.yaml"
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
        str | None, _doc("Bearer token sent to the remote backend, if it needs one.")
    ] = None
    backend_timeout_s: Annotated[
        float,
        _doc("Seconds to wait for a remote backend's whole answer (or next chunk)."),
        msgspec.Meta(gt=0),
    ] = 120.0
    backend_connect_timeout_s: Annotated[
        float,
        _doc("Seconds to wait for a TCP connection to a remote backend."),
        msgspec.Meta(gt=0),
    ] = 5.0
    backend_retries: Annotated[
        int,
        _doc("Retries per URL on connection errors and 5xx answers (non-streaming calls)."),
        msgspec.Meta(ge=0, le=10),
    ] = 2
    backend_retry_backoff_s: Annotated[
        float, _doc("First retry delay in seconds; doubles on each retry."), msgspec.Meta(ge=0)
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
    dtype: Annotated[
        Literal["auto", "fp32", "bf16", "fp16"],
        _doc("Local backend weight dtype; auto is fp32 on CPU, bf16 on CUDA."),
    ] = "auto"
    device: Annotated[str, _doc("Local backend device: auto, cpu, cuda, cuda:N.")] = "auto"
    default_max_tokens: Annotated[
        int, _doc("max_tokens for requests that do not set it."), msgspec.Meta(ge=1)
    ] = 512
    cache_dir: Annotated[
        str | None, _doc("Folder for prepared models (default: $XDG_CACHE_HOME/guardrail).")
    ] = None
    allow_downloads: Annotated[
        bool, _doc("Whether models may be fetched from a hub (off: everything loads locally).")
    ] = False
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
        int, _doc("Threads in the shared pool that runs blocking filter work."), msgspec.Meta(ge=1)
    ] = 4
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

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


_FIELDS: dict[str, Any] = {f.name: f for f in msgspec.structs.fields(Settings)}
ENV_PREFIX = "GUARDRAIL_"


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if "list[" in str(f.type):
            out[name] = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            out[name] = raw
    return out


def load_settings(
    config_file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from a YAML file, the environment and explicit overrides."""
    merged: dict[str, Any] = {}
    source = "settings"
    if config_file is not None:
        source = str(config_file)
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must be a mapping of settings")
        merged.update(loaded)
    env = _from_env(os.environ if environ is None else environ)
    merged.update(env)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        # str_values: environment values arrive as strings and are converted here.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid settings ({source}, environment or flags): {e}") from e
