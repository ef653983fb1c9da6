"""Run folders as the launcher sees them: new, resumed or complete; writable; jobs still active.

Every job gets ``outputs/<stage>/<name>/`` (the stage's ``run_dir``) holding the resolved config, the
submitit scripts and logs under ``submitit/``, a ``submissions.jsonl`` record of every submission, and
the stage's own outputs. Submitting into an existing folder resumes that run; ``--new`` picks the next
free name (``<name>_2``, ``<name>_3``, ...) so nothing already there is touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from common.atomic import atomic_write_text
from common.checkpoint import LAST_NAME, resume_candidates
from common.runlog import is_complete

SUBMITIT_DIR = "submitit"
SUBMISSIONS = "submissions.jsonl"
LOCK = ".submit.lock"  # flock'ed around "is a job active? submit, record it" (not part of the run's content)

NEW = "new"
RESUME = "resume"
COMPLETE = "complete"
DETECTRON2_LAST = "last_checkpoint"  # detectron2's pointer to its newest checkpoint, in each seed<k>/


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the stage in ``run_dir`` has a checkpoint to resume: ``last.pth`` (pretrain, linear, semi) or
    what a resume falls back to (``last.prev.pth``, pretraining snapshots), or detectron2's
    ``seed<k>/last_checkpoint``."""
    return bool(resume_candidates(run_dir / LAST_NAME)) or any(run_dir.glob(f"seed*/{DETECTRON2_LAST}"))


@dataclass(frozen=True)
class RunState:
    run_dir: Path
    state: str  # NEW, RESUME or COMPLETE
    why_complete: str = ""

    def describe(self) -> str:
        if self.state == NEW:
            return f"new run in {self.run_dir}"
        if self.state == RESUME and has_checkpoint(self.run_dir):
            return (f"run folder {self.run_dir} exists: resuming that run from its last checkpoint "
                    "(pass --new to start a fresh run under another name)")
        if self.state == RESUME:
            return (f"run folder {self.run_dir} exists but holds no checkpoint (an earlier attempt stopped before "
                    "writing one): the run starts from the beginning in that folder "
                    "(pass --new to start a fresh run under another name)")
        why = self.why_complete or f"{self.run_dir / 'COMPLETE'} exists"
        return (f"run {self.run_dir} is already complete ({why}); nothing to do "
                "(pass --new to start a fresh run under another name)")


def run_state(run_dir: Path) -> RunState:
    if is_complete(run_dir):
        return RunState(run_dir, COMPLETE)
    if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()):
        return RunState(run_dir, RESUME)
    return RunState(run_dir, NEW)


def next_free_dir(run_dir: Path) -> Path:
    """``run_dir`` itself when it does not exist, else the first free ``<run_dir>_<k>`` (k >= 2)."""
    if not run_dir.exists():
        return run_dir
    k = 2
    while (candidate := run_dir.with_name(f"{run_dir.name}_{k}")).exists():
        k += 1
    return candidate


_HELD: set[Path] = set()  # run locks this process holds (flock is per open file: re-taking one would block)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the run folder (created if missing) across processes and hosts sharing it: one
    ``submit`` at a time checks for a live job, submits and records; others wait, then see that job."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK).resolve()
    if path in _HELD:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)  # closing the file releases the lock


def record_submission(run_dir: Path, record: dict) -> None:
    """Appends one line to ``submissions.jsonl`` (under the run lock, rewritten atomically: no line is lost
    to a concurrent append, none is half-written)."""
    path = run_dir / SUBMISSIONS
    with run_lock(run_dir):
        old = path.read_text() if path.exists() else ""
        atomic_write_text(path, old + json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")


def read_submissions(run_dir: Path) -> list[dict]:
    path = run_dir / SUBMISSIONS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class ActiveJob:
    job_id: str
    state: str
    record: dict   # the submissions.jsonl line that queued it

    def __str__(self) -> str:
        return f"{self.job_id} ({self.state})"


def active_jobs(run_dir: Path) -> list[ActiveJob]:
    """Jobs recorded for this run that are still queued or running (Slurm: squeue; local: the pid)."""
    active = []
    for rec in read_submissions(run_dir)[-3:]:
        for job_id in rec.get("job_ids", []):
            if rec.get("cluster") == "slurm" and shutil.which("squeue"):
                try:
                    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                                         text=True, timeout=30).stdout.strip()
                except (OSError, subprocess.TimeoutExpired):
                    out = ""
                if out:
                    active.append(ActiveJob(str(job_id), out.splitlines()[0], rec))
            elif rec.get("cluster") == "local" and rec.get("host") == socket.gethostname():
                if _pid_alive(int(job_id)):
                    active.append(ActiveJob(str(job_id), "local process running", rec))
    return active


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (finished child not yet reaped) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True
