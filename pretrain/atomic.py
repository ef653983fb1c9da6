"""Atomic file output: write to a temporary file in the target's folder, fsync, rename over the target.

A crash (or Ctrl-C, or a Slurm kill) at any point leaves either the previous file or the new one, never a
torn one. Every writer of checkpoints, configs, results and plots goes through ``atomic_path``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    The temporary name keeps the target's suffix (some writers, e.g. matplotlib, pick the format by it).
    The file gets the usual umask-based permissions (mkstemp alone would make it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
