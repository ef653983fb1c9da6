"""Provenance of a run: which code, packages, hardware and command produced it.

``collect(world_size)`` returns a plain JSON-able record:

- ``git``: ``{commit, dirty, changed}`` of the repository holding this project's code (the folder above the
  ``common`` package), ``dirty`` from ``git status --porcelain`` (tracked changes and untracked files that
  are not gitignored; ``outputs/``, ``data/`` and ``.venv/`` are), ``changed`` the first of those paths; or
  ``{commit: None, dirty: None, reason}`` when the code is not a git checkout or git is missing. Never raises.
- ``packages``: the installed versions (``importlib.metadata``) of torch, torchvision, detectron2 (the
  ``detectron2`` distribution, else this environment's ``sal-detectron2`` build, named in
  ``detectron2_distribution``), submitit, hydra-core, omegaconf, fvcore, numpy, and python; None when missing.
- ``hardware``: CPU model, ``os.cpu_count()`` and the cores this process may use (affinity), the CUDA device
  names and count (empty on CPU), the host name.
- ``world_size``, ``command_line`` (what the user typed, shell-quoted: the ``submit ...`` command, which the
  launcher passes to its jobs in ``INTL_COMMAND_LINE``, else this process's own ``sys.orig_argv``),
  ``started`` (UTC, ISO 8601) and ``slurm_job_id`` (None outside Slurm).

``record_attempt(run_dir, world_size)`` (rank 0, at the start of every run) keeps them in
``<run_dir>/provenance.json`` as ``{"attempts": [first, ..., latest]}``: a resume (a requeue, a resubmission)
appends its record and never rewrites the first one, so the file says what started the run and everything
that continued it, including starts that stopped early. ``run_summary(run_dir)`` is what ``COMPLETE`` and
``results.json`` hold under ``"provenance"``: the latest attempt (the one that wrote the results), the
number of attempts, and which of git / packages / hardware / world_size / command_line differed between them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from common.atomic import write_json

PROVENANCE_NAME = "provenance.json"
COMMAND_LINE_ENV = "INTL_COMMAND_LINE"  # set by the `submit` job objects (slurm/jobs.py) in every task
PACKAGES = ("torch", "torchvision", "detectron2", "submitit", "hydra-core", "omegaconf", "fvcore", "numpy")
DETECTRON2_DISTRIBUTIONS = ("detectron2", "sal-detectron2")
COMPARED = ("git", "packages", "hardware", "world_size", "command_line")
_MAX_CHANGED = 20


def code_root() -> Path:
    """The folder that holds the project's packages (``common``'s parent)."""
    return Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)


def git_state(root: str | os.PathLike | None = None) -> dict:
    """``{commit, dirty, changed}`` of the checkout at ``root`` (default: ``code_root()``), or
    ``{commit: None, dirty: None, reason}`` when it is not the top of a git checkout or git fails."""
    root = Path(root) if root is not None else code_root()
    unknown = {"commit": None, "dirty": None}
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return {**unknown, "reason": f"{root} is not a git checkout ({top.stderr.strip() or 'git failed'})"}
        if Path(top.stdout.strip()).resolve() != root.resolve():
            return {**unknown, "reason": f"{root} is not the top of a git checkout (it is inside {top.stdout.strip()})"}
        head = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain")
    except FileNotFoundError:
        return {**unknown, "reason": "git is not installed (not on PATH)"}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {**unknown, "reason": f"git failed: {e}"}
    if head.returncode != 0:
        return {**unknown, "reason": f"git rev-parse HEAD failed in {root}: {head.stderr.strip()}"}
    if status.returncode != 0:
        return {"commit": head.stdout.strip(), "dirty": None,
                "reason": f"git status failed in {root}: {status.stderr.strip()}"}
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed[:_MAX_CHANGED]}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict:
    versions: dict[str, Any] = {}
    for name in PACKAGES:
        if name == "detectron2":
            found = next(((d, v) for d in DETECTRON2_DISTRIBUTIONS if (v := _version(d)) is not None), (None, None))
            versions["detectron2_distribution"], versions["detectron2"] = found
        else:
            versions[name] = _version(name)
    versions["python"] = platform.python_version()
    return versions


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable, "gpus": gpus,
            "gpu_count": len(gpus), "hostname": socket.gethostname()}


def command_line() -> str:
    """The command the user typed: the launcher's (``INTL_COMMAND_LINE``), else this process's, shell-quoted."""
    given = os.environ.get(COMMAND_LINE_ENV)
    if given:
        return given
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def collect(world_size: int, root: str | os.PathLike | None = None) -> dict:
    """The provenance record of this process (see the module docstring); ``root``: the checkout to describe."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line(),
        "world_size": int(world_size),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "git": git_state(root),
        "packages": package_versions(),
        "hardware": hardware(),
    }


def read_attempts(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/provenance.json`` ([] when there is none or it is unreadable)."""
    path = Path(run_dir) / PROVENANCE_NAME
    try:
        attempts = json.loads(path.read_text()).get("attempts")
    except (OSError, ValueError, AttributeError):
        return []
    return [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []


def record_attempt(run_dir: str | os.PathLike, world_size: int) -> dict:
    """Appends this start's ``collect(world_size)`` to ``<run_dir>/provenance.json`` (atomically; the earlier
    attempts stay as they were) and returns the record. Rank 0 only, at the start of a run."""
    path = Path(run_dir) / PROVENANCE_NAME
    earlier = read_attempts(run_dir)
    record = collect(world_size)
    if path.exists() and not earlier:
        record["note"] = f"the previous {PROVENANCE_NAME} was unreadable or empty and was replaced"
    write_json(path, {"attempts": [*earlier, record]})
    return record


def run_summary(run_dir: str | os.PathLike) -> dict | None:
    """What ``COMPLETE`` and ``results.json`` hold: the latest attempt's record plus ``attempts`` (how many
    there were) and ``differs_across_attempts`` (the keys of COMPARED whose values were not the same in all);
    None when the run folder has no provenance.json."""
    attempts = read_attempts(run_dir)
    if not attempts:
        return None
    differs = [k for k in COMPARED if any(a.get(k) != attempts[0].get(k) for a in attempts[1:])]
    return {**attempts[-1], "attempts": len(attempts), "differs_across_attempts": differs}
