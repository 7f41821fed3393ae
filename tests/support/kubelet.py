"""A ConfigMap volume as the kubelet lays it out and updates it, on a local directory.

The kubelet's atomic writer (pkg/volume/util/atomic_writer.go) keeps each version of the
ConfigMap's files in a timestamped directory and points ``..data`` at the current one; each
key is a symlink through ``..data``:

    ..2026_01_01_00_00_00.123/sidecar.yml
    ..data -> ..2026_01_01_00_00_00.123
    sidecar.yml -> ..data/sidecar.yml

An update writes the new version into a new timestamped directory, creates ``..data_tmp``
pointing at it, renames that over ``..data`` (one atomic rename: a reader sees the old files
or the new ones, never a mix), then removes the old directory. The path the container opens
never changes; only what it resolves to does.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path

DATA = "..data"
DATA_TMP = "..data_tmp"
# Fixed, not the wall clock: a run is reproducible, and the names sort as the kubelet's do.
EPOCH = datetime(2026, 1, 1)


class ConfigMapVolume:
    def __init__(self, root: Path, data: dict[str, str]) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)
        self.update(data)

    def _stamp(self) -> str:
        moment = EPOCH + timedelta(seconds=self.version, milliseconds=123 * (self.version % 8 + 1))
        return moment.strftime("..%Y_%m_%d_%H_%M_%S.") + f"{moment.microsecond // 1000:03d}"

    @property
    def current(self) -> str:
        """The timestamped directory ``..data`` points at."""
        return os.readlink(self.root / DATA)

    def update(self, data: dict[str, str]) -> None:
        old = self.current if (self.root / DATA).is_symlink() else None
        stamp = self._stamp()
        self.version += 1
        version_dir = self.root / stamp
        version_dir.mkdir(mode=0o755)
        for key, text in data.items():
            (version_dir / key).write_text(text, encoding="utf-8")
            (version_dir / key).chmod(0o644)
        tmp = self.root / DATA_TMP
        tmp.symlink_to(stamp)  # relative, as the kubelet's
        os.rename(tmp, self.root / DATA)
        for key in data:
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"{DATA}/{key}")
        for link in self.root.iterdir():  # keys the ConfigMap no longer has
            if link.is_symlink() and not link.name.startswith("..") and link.name not in data:
                link.unlink()
        if old is not None:
            shutil.rmtree(self.root / old)
