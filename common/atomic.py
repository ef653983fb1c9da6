"""Atomic file output: write to a temporary file in the target's folder, fsync, rename over the target.

A crash (or Ctrl-C, or a Slurm kill) at any point leaves either the previous file or the new one, never a
torn one. Every file the project writes goes through ``atomic_path``; the writers below are the only
ones (text, JSON, torch, pickle, PNG).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pickle
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch

from common.errors import UserError


class WriteError(UserError, OSError):
    """A file could not be written (full disk, read-only or unwritable folder, a folder in the way); the
    message names the path and the fix. The temporary file is gone and the previous file is untouched."""


_NO_SPACE = "free space on that disk, or choose a folder on another disk"
_NOT_WRITABLE = "choose a writable folder (or make this one writable)"
_WRITE_FIXES = {
    errno.ENOSPC: ("no space left on the device", _NO_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _NO_SPACE),
    errno.EROFS: ("the folder is on a read-only file system", _NOT_WRITABLE),
    errno.EACCES: ("permission denied", _NOT_WRITABLE),
    errno.EPERM: ("operation not permitted", _NOT_WRITABLE),
    errno.EISDIR: ("a folder of that name is in the way", "name a file path, not a folder"),
    errno.ENOTDIR: ("a file is in the way of its folder", "choose another folder, or move that file away"),
    errno.EEXIST: ("a file is in the way of its folder", "choose another folder, or move that file away"),
}
# What torch.save's zip writer raises (a RuntimeError) when the disk fills up under it.
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _file_system(mount: Path) -> str:
    """The type and device of the file system mounted at ``mount`` (Linux /proc/mounts), or ""."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    found = ""
    for line in lines:  # "device mountpoint type options 0 0" (spaces in paths as \040); the last mount wins
        parts = line.split()
        if len(parts) >= 3 and parts[1].replace("\\040", " ") == str(mount):
            found = f"{parts[2]} {parts[0]}"
    return found


def describe_disk(path: str | os.PathLike) -> str:
    """The disk holding ``path``: its mount point, file system, and free / total bytes (``statvfs``)."""
    mount = _mount_point(Path(path))
    fs = _file_system(mount)
    try:
        usage = shutil.disk_usage(mount)
    except OSError:
        return f"the disk mounted at {mount}" + (f" ({fs})" if fs else "")
    return (f"the disk mounted at {mount}" + (f" ({fs})" if fs else "") + f" has {usage.free} bytes free "
            f"({_size(usage.free)} of {_size(usage.total)})")


_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def write_errors_named(path: str | os.PathLike) -> Iterator[None]:
    """Turns the OS / torch errors of writing ``path`` that the user can fix into a ``WriteError``; a full disk
    is named (``describe_disk``: mount point, free bytes)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.errno not in _WRITE_FIXES:
            raise
        problem, fix = _WRITE_FIXES[e.errno]
        disk = f"{_written(e)}; {describe_disk(path)}" if e.errno in _FULL else ""
        raise WriteError(f"cannot write {path}: {problem} ({e}){disk}; fix: {fix}") from e
    except RuntimeError as e:
        if not any(s in str(e) for s in _TORCH_WRITE_FAILURES):
            raise
        written = _written(e)
        raise WriteError(f"cannot write {path}: torch's file writer failed ({str(e).splitlines()[0]}), "
                         f"which means the disk is full or failing{written}; {describe_disk(path)}; "
                         f"fix: {_NO_SPACE}") from e


def _written(e: BaseException) -> str:
    """How much of the file ``_atomic_path`` had written when ``e`` came (its temporary is gone now). The
    finished frames of ``e``'s traceback are cleared first: a writer they hold (torch's) keeps the deleted
    temporary open, and its space taken, until they go."""
    seen: BaseException | None = e
    while seen is not None:  # torch's writer sits in the frames of the error the failed write raised first
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__context__
    n = getattr(e, "bytes_written", None)
    return f"; {n} bytes ({_size(n)}) of it were written before the error (deleted again)" if n else ""


def check_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """A ``WriteError`` now rather than at a run's first checkpoint: creates ``folder`` and a temporary file
    in it (removed at once); with ``create=False`` (``submit``, which writes nothing before queueing) the
    file goes into the nearest folder that exists. A real write: permission bits do not stop root."""
    folder = Path(folder)
    probe = folder
    if not create:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise WriteError(f"cannot create the folder {folder}: {probe} exists and is not a folder; "
                             "fix: choose another folder (run_dir= / --name)")
    with write_errors_named(folder):
        probe.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            if e.errno in _WRITE_FIXES:
                raise
            raise WriteError(f"cannot write in {probe} ({e}); fix: {_NOT_WRITABLE}") from e
    return folder


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """The prefix and suffix of ``atomic_path``'s temporary names for ``path`` (``.last.<random>.tmp.pth``)."""
    return f".{path.stem}.", f".tmp{path.suffix}"


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporaries of ``path`` that interrupted ``atomic_path`` writes left; returns them.

    Call it only when no write of ``path`` is under way (a run's start and end): a kill during a write
    leaves its temporary file behind, and a checkpoint's can be gigabytes.
    """
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    stale = sorted(path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``_atomic_path`` with a full disk, a read-only folder, ... raised as a ``WriteError`` naming ``path``."""
    with write_errors_named(path), _atomic_path(path) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    An exception inside the block removes the temporary file and leaves ``path`` as it was. The temporary
    name keeps the target's suffix (some writers, e.g. matplotlib, pick the format by it). The file gets
    the usual umask-based permissions (mkstemp alone would make it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):  # how far the write got, for write_errors_named's message
            e.bytes_written = tmp.stat().st_size  # type: ignore[union-attr]
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def jsonable(x: Any) -> Any:
    """``json.dumps(default=...)`` for tensors / numpy scalars (``.item()``) and paths."""
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` (torch's zip format) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_pickle_dump(obj: Any, path: str | os.PathLike) -> Path:
    """Plain ``pickle`` (what detectron2 reads for ``*.pkl`` weights) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110, bbox_inches: str | None = None) -> Path:
    """Writes a matplotlib figure as PNG atomically (never half a plot) and closes it."""
    import matplotlib.pyplot as plt  # only processes that plot pay for matplotlib

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches)
    finally:
        plt.close(fig)
    return path
