"""Reading shipped model weights: plain ``.npz`` arrays, never pickles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from guardrail.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def read_arrays(path: Path, what: str, version: int) -> dict[str, npt.NDArray[np.generic]]:
    """Every array of the ``.npz`` at ``path``; refuse a ``feature_version`` other than ``version``.

    ``what`` names the weights in errors ("toxicity weights"). A missing or corrupt file
    and weights built for other features are :class:`ConfigError`, so a bad file stops
    the policy from loading instead of scoring garbage.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        found = int(arrays["feature_version"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e
    if found != version:
        raise ConfigError(
            f"{what} {path} use feature version {found}, this code builds version {version}: "
            "retrain them"
        )
    return arrays


def all_finite(*values: float | npt.NDArray[np.floating]) -> bool:
    """Every number of ``values`` is finite: a NaN or infinite weight loads without
    complaint and then scores every text NaN, which no threshold comparison catches."""
    import numpy as np

    return all(bool(np.all(np.isfinite(v))) for v in values)


def file_stamp(path: Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of the file at ``path``, for keys of models shared across reloads.

    Models are kept per process by key (``BuildContext.resources``); a key of the path
    alone kept serving the old weights after new ones were written over the file and the
    policy reloaded. With the stamp, changed weights are read again and unchanged ones
    stay shared. A file that cannot be read stamps ``(-1, -1)``: loading it reports why.
    """
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def file_key(path: Path) -> str:
    """``path`` made absolute with its symlinks kept, for keys of models shared across
    reloads (the version is :func:`file_stamp`'s).

    Not ``path.resolve()``: a Kubernetes ConfigMap volume reaches its files through a
    ``..data`` symlink the kubelet points at a new timestamped folder on every update, so
    the resolved path changed each time and every reload added a copy under a new key
    that nothing dropped. The path as the policy names it stays one key; its stamp says
    when the bytes behind it changed.
    """
    return os.path.abspath(path)
