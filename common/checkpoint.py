"""The pretraining checkpoint: one ``torch.save`` dict that names its format and version.

Layout (DESIGN.md, fixed)::

    {
      "format": "intl-pretrain", "version": 1,
      "model":     online network state_dict, backbone keys "backbone.<torchvision ResNet key>",
                   projector keys "projector.<...>",
      "ema_model": the momentum network's state_dict with the same key layout, or None,
      "optimizer": ..., "scaler": ... or None,
      "epoch": epochs completed, "step": optimisation steps completed,
      "rng": {"torch": ..., "numpy": ..., "python": ..., "cuda": [...]},
      "config": the resolved config as a plain dict,
      "finished": True once the schedule is complete,
    }

``save_checkpoint`` writes to a temporary file in the same folder, fsyncs it and renames it over the
target, so a crash never leaves a torn file and the previous checkpoint stays loadable.

A file can still become unreadable after it was written (a full or broken disk, a partial copy of the run
folder). So the file about to be replaced is kept as ``<name>.prev.pth`` when it can be read
(``keep_previous_file``: a hard link, no copy), and ``find_resume_point`` resumes from the newest readable one of
``last.pth``, ``last.prev.pth`` and the ``epoch_<N>.pth`` snapshots, saying which files it passed over and why.
"""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.atomic import atomic_path, atomic_torch_save
from common.errors import UserError

FORMAT = "intl-pretrain"
VERSION = 1
BACKBONE_PREFIX = "backbone."
LAST_NAME = "last.pth"
SNAPSHOT_PATTERN = "epoch_{epoch}.pth"  # kept every train.keep_every_epochs epochs; "snapshot": True inside


def previous_path(path: str | os.PathLike) -> Path:
    """Where ``keep_previous_file`` keeps the file ``path`` replaces: ``last.pth`` -> ``last.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def snapshot_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``epoch_<N>.pth`` snapshots of a pretraining run folder, oldest first, as (N, path)."""
    found = []
    for p in Path(run_dir).glob("epoch_*.pth"):
        tail = p.stem[len("epoch_"):]
        if tail.isdigit():
            found.append((int(tail), p))
    return sorted(found)


class CheckpointError(UserError, RuntimeError):
    """A file that is not a usable checkpoint; the message names the problem and the fix."""


def nonfinite_tensors(state_dict: dict | None) -> list[str]:
    """The keys of the floating-point tensors of ``state_dict`` that hold a NaN or an inf."""
    return [k for k, v in (state_dict or {}).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(state: dict, path: str | os.PathLike, keep_previous: bool = False) -> Path:
    """Saves a pretraining checkpoint dict (adds format/version) atomically; with ``keep_previous`` the file it
    replaces stays as ``previous_path(path)`` (``keep_previous_file``).

    Refuses (CheckpointError, the previous file kept) a state whose model or EMA model holds NaN/inf:
    conversion and evaluation would refuse it anyway, and it would replace the last good checkpoint.
    """
    missing = [k for k in ("model", "epoch", "step", "config") if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    bad = [f"{part}.{k}" for part in ("model", "ema_model") for k in nonfinite_tensors(state.get(part))]
    if bad:
        raise CheckpointError(
            f"not writing {path} at step {state['step']}: {len(bad)} tensor(s) hold NaN/inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the previous checkpoint (if any) is kept. Fix: the training "
            "diverged: lower optim.base_lr (or method.beta), or train.amp=bf16 or off, and resume or start over")
    if keep_previous:
        keep_previous_file(path)
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of ``path``; a file that is not there or cannot be unpickled is a CheckpointError.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check that the file is whole (a cut or
    garbage file has no zip directory at its end) that still gives the small entries (``step``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; "
                              "fix: pass the path of a .pth file written by pretraining")
    whole = zipfile.is_zipfile(path)  # torch.save's format ends with the zip directory: a cut file has none
    try:
        if not whole and mmap:
            raise RuntimeError("not a zip archive")
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        why = (f"not a whole torch.save file, {path.stat().st_size} bytes: no zip directory at its end, so it was cut "
               "short, left empty or overwritten") if not whole else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path} could not be read as a torch checkpoint ({why}); "
                              "fix: pass a .pth file written by torch.save") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Loads a checkpoint written by ``save_checkpoint``, checking its format and version."""
    path = Path(path)
    obj = read_torch_file(path, map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an INTL pretraining checkpoint (no format={FORMAT!r} field)")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj['version']}, newer than this code's {VERSION}; "
                              "fix: update the intl-pipeline package")
    return obj


def is_pretrain_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


# ------------------------------------------------------------------------------- the previous good file
def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``step`` of a checkpoint dict (pretraining or classifier), read without loading its tensors; a
    CheckpointError when the file cannot be read or holds no step."""
    obj = read_torch_file(path, mmap=True)
    step = obj.get("step") if isinstance(obj, dict) else None
    del obj  # drops the mapping of the file
    if not isinstance(step, int):
        raise CheckpointError(f"{path} is not a checkpoint of this pipeline (no integer 'step' entry)")
    return step


# Where a hard link cannot be made (a file system without them), the previous file is copied instead.
_NO_LINK = (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


def keep_previous_file(path: str | os.PathLike) -> Path | None:
    """Before ``path`` is replaced: makes it ``previous_path(path)`` too (returned), if it is readable.

    An unreadable ``path`` (cut, garbage) is left alone, so it never replaces a good previous file. The
    previous file is a hard link to ``path`` (no copy; a copy only where the file system has no hard links),
    made and renamed into place atomically before the new file is written: the old previous file's space is
    freed first, so the disk holds at most two checkpoints at any moment (the new one being written and the
    previous), one more than without it between writes. The caller then replaces ``path`` atomically
    (``common.atomic``), never rewrites it in place: until then both names are the same file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        checkpoint_step(path)
    except CheckpointError:
        return None
    previous = previous_path(path)
    with atomic_path(previous) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            shutil.copyfile(path, tmp)
    return previous


def resume_candidates(path: str | os.PathLike, snapshots: bool = True) -> list[Path]:
    """The files a run whose checkpoint is ``path`` could resume from, those that exist: ``path`` itself, its
    previous file, and (``snapshots``) the ``epoch_<N>.pth`` beside it, newest first."""
    path = Path(path)
    found = [p for p in (path, previous_path(path)) if p.is_file()]
    if snapshots:
        found += [p for _, p in reversed(snapshot_files(path.parent))]
    return found


def problem_of(e: Exception, path: Path | None = None) -> str:
    """A CheckpointError's message without its fix (for a caller that says what to do itself); ``path``
    written as its name (the caller names the folder)."""
    text = str(e).split("; fix:")[0]
    return text.replace(str(path), path.name) if path is not None else text


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from: ``state`` loaded from ``path``; ``passed_over``: the newer files that
    could not be used, with the reason (a sentence naming the file), in the order tried (empty when ``path`` is
    the run's own checkpoint)."""

    path: Path
    state: dict
    passed_over: tuple[tuple[Path, str], ...] = ()

    @property
    def step(self) -> int | None:
        step = self.state.get("step")
        return int(step) if step is not None else None

    @property
    def is_fallback(self) -> bool:
        return bool(self.passed_over)

    def describe(self) -> str:
        return (f"resuming from {self.path.name} (step {self.step}) instead: "
                f"{'; '.join(why for _, why in self.passed_over)}; the steps after {self.step} are trained again")

    def record(self) -> dict:
        """What ``metrics.jsonl`` and ``COMPLETE`` keep of a fallback."""
        return {"resumed_from": self.path.name, "step": self.step,
                "passed_over": {p.name: why for p, why in self.passed_over}}


def find_resume_point(path: str | os.PathLike, load: Callable[[Path], dict] = load_checkpoint,
                      snapshots: bool = True) -> ResumePoint | None:
    """The checkpoint to resume a run from: ``path`` if ``load`` reads it, else the newest (highest ``step``)
    readable one of ``resume_candidates``; None when there is none of them at all (a new run).

    Raises a CheckpointError naming every file and why it cannot be used when none can. ``load`` is the
    stage's own strict reader (``load_checkpoint``; the evaluations' classifier reader).
    """
    path = Path(path)
    candidates = resume_candidates(path, snapshots)
    if not candidates:
        return None
    passed_over: list[tuple[Path, str]] = []
    if path.is_file():
        try:
            return ResumePoint(path, load(path))
        except CheckpointError as e:
            if len(candidates) == 1:
                raise  # nothing to fall back to: the reader's own message and fix
            passed_over.append((path, problem_of(e, path)))
    else:
        passed_over.append((path, f"{path.name} does not exist"))
    steps = []
    for p in candidates:
        if p == path:
            continue
        try:
            steps.append((checkpoint_step(p), p))
        except CheckpointError as e:
            passed_over.append((p, problem_of(e, p)))
    for _, p in sorted(steps, key=lambda s: -s[0]):  # stable: the previous file before a snapshot of its step
        try:
            return ResumePoint(p, load(p), tuple(passed_over))
        except CheckpointError as e:
            passed_over.append((p, problem_of(e, p)))
    raise CheckpointError(
        f"no checkpoint in {path.parent} can be resumed from: {'; '.join(why for _, why in passed_over)}; fix: move "
        f"{', '.join(p.name for p, _ in passed_over if p.exists())} away to restart the run from step 0, or start "
        "a separate run (another name=, or submit --new)")
