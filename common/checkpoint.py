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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_torch_save
from common.errors import UserError

FORMAT = "intl-pretrain"
VERSION = 1
BACKBONE_PREFIX = "backbone."
LAST_NAME = "last.pth"
SNAPSHOT_PATTERN = "epoch_{epoch}.pth"  # kept every train.keep_every_epochs epochs; "snapshot": True inside


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


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Saves a pretraining checkpoint dict (adds format/version) atomically.

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
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Loads a checkpoint written by ``save_checkpoint``, checking its format and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; "
                              "fix: pass the path of a .pth file written by pretraining")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {e}); "
                              "fix: pass a .pth file written by torch.save") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an INTL pretraining checkpoint (no format={FORMAT!r} field)")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj['version']}, newer than this code's {VERSION}; "
                              "fix: update the intl-pipeline package")
    return obj


def is_pretrain_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT
