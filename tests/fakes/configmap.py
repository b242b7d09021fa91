"""A Kubernetes ConfigMap volume, as the kubelet lays it out on disk (``ConfigMapVolume``).

Each file of the volume is a symlink ``name -> ..data/name``; ``..data`` is a symlink to
a timestamped folder holding the real files. An update writes a new folder, swaps
``..data`` to it in one rename, then deletes the old folder: the paths the gateway was
given stay, what they resolve to moves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class ConfigMapVolume:
    """The volume mounted at ``root``; :meth:`publish` is one ConfigMap update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._updates = 0

    def publish(self, files: dict[str, bytes]) -> None:
        """Write ``files`` (names to contents) as the kubelet applies an update."""
        self._updates += 1
        folder = self.root / f"..2026_11_24_{self._updates:02d}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        staged = self.root / "..data_tmp"
        staged.symlink_to(folder.name)
        os.replace(staged, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if self._updates > 1:
            shutil.rmtree(self.root / f"..2026_11_24_{self._updates - 1:02d}")
