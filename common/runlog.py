"""Run folders and metrics logging shared by every stage.

Each run writes into ``outputs/<stage>/<name>/``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON
object per line, always with ``step``), TensorBoard events under ``tb/``, and for evaluations
``results.json``, and ``provenance.json`` (common/provenance.py: code, packages, hardware, command of every
attempt). A run is complete when ``results.json`` (evaluations) or the final checkpoint marked ``finished``
(pretraining) exists; ``COMPLETE`` is written as a marker in both cases. ``COMPLETE`` and ``results.json``
are written only here (``mark_complete``, ``write_results``), both with the run's ``"provenance"``.
Only rank 0 writes; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.atomic import WriteError, atomic_write_text, jsonable, write_errors_named, write_json
from common.errors import UserError
from common.provenance import run_summary

COMPLETE_MARKER = "COMPLETE"
RESULTS_NAME = "results.json"
METRICS_NAME = "metrics.jsonl"


class MetricsFileError(UserError, ValueError):
    """A ``metrics.jsonl`` line that is not JSON (other than a torn last line, which is dropped)."""


def save_config(run_dir: str | os.PathLike, cfg: Any) -> Path:
    """Writes the resolved config as ``config.yaml`` (OmegaConf DictConfig or plain dict)."""
    conf = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    return atomic_write_text(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(conf, resolve=True))


def is_complete(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / COMPLETE_MARKER).exists()


def _with_provenance(run_dir: str | os.PathLike, record: dict | None, given: dict | None) -> dict:
    record = dict(record or {})
    if "provenance" not in record:
        record["provenance"] = given if given is not None else run_summary(run_dir)
    return record


def mark_complete(run_dir: str | os.PathLike, summary: dict | None = None, provenance: dict | None = None) -> dict:
    """Writes ``COMPLETE`` with ``summary`` plus ``"provenance"`` (``provenance`` if given, else the run's
    ``provenance.run_summary``: None when it has no provenance.json); returns what was written."""
    summary = _with_provenance(run_dir, summary, provenance)
    atomic_write_text(Path(run_dir) / COMPLETE_MARKER, json.dumps(summary, default=jsonable) + "\n")
    return summary


def write_results(run_dir: str | os.PathLike, results: dict, provenance: dict | None = None) -> dict:
    """Writes ``results.json`` (atomically) with ``"provenance"`` added as in ``mark_complete``; returns it."""
    results = _with_provenance(run_dir, results, provenance)
    write_json(Path(run_dir) / RESULTS_NAME, results)
    return results


def previous_results(run_dir: str | os.PathLike) -> dict:
    """What a complete run reported: its ``results.json`` (evaluations), else the ``COMPLETE`` summary."""
    run_dir = Path(run_dir)
    results = run_dir / RESULTS_NAME
    if results.exists():
        return json.loads(results.read_text())
    return json.loads((run_dir / COMPLETE_MARKER).read_text() or "{}")


def _quiet_tensorboard_write_errors() -> None:
    """TensorBoard writes its events in a thread that, when the disk is full, stores the OSError for the
    logging thread (which gets it at its next call: a WriteError here) and also prints it as an uncaught
    thread exception; this hook (installed once) drops that second, traceback-only copy."""
    previous = threading.excepthook
    if getattr(previous, "_intl_quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._intl_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; a no-op when ``enabled`` is False.

    ``purge_step``: a resumed run logs again from this step; TensorBoard hides the events the earlier
    attempt wrote at this step and later (``SummaryWriter(purge_step=...)``), so no step appears twice.
    A write that fails (a full disk) raises a ``WriteError`` naming the file and the disk.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self.enabled = enabled
        self._tb = None
        if enabled:
            with write_errors_named(self.path):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_tensorboard_write_errors()
                with write_errors_named(self.run_dir / "tb"):
                    self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, prefix: str = "", **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            row[f"{prefix}{k}"] = v.item() if hasattr(v, "item") else v
        with write_errors_named(self.path):  # first: the row is the record, TensorBoard's events a view of it
            self._file.write(json.dumps(row, default=jsonable) + "\n")
        if self._tb is None:
            return
        with write_errors_named(self.run_dir / "tb"):
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, v, int(step))

    def close(self, quiet: bool = False) -> None:
        """Closes the file and TensorBoard; ``quiet``: a write error is dropped (the caller is already failing,
        e.g. for the same full disk), else the first one is raised after both are closed."""
        if not self.enabled:
            return
        errors = []
        for what, close in ((self.path, self._file.close), (self.run_dir / "tb", getattr(self._tb, "close", None))):
            if close is None:
                continue
            try:
                with write_errors_named(what):
                    close()
            except WriteError as e:
                errors.append(e)
        self.enabled = False
        if errors and not quiet:
            raise errors[0]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl``. A last line without its newline that is not JSON is what a
    kill during a write leaves: it is dropped. Any other line that is not JSON raises MetricsFileError."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")  # the last item is "" when the file ends with a newline, else the torn row
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: a partial row
                break
            raise MetricsFileError(f"{path} line {number} is not JSON ({e}); fix: delete that line (or the file, "
                                   "losing the run's metric history)") from None
    return rows


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drops the rows of ``metrics.jsonl`` after ``step`` (the steps a resumed run trains again) and a torn last
    line (a kill mid-write); the file is rewritten atomically, and only when that changes it."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if path.read_text() != text:
        atomic_write_text(path, text)
