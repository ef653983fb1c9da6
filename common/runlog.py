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
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.atomic import atomic_write_text, jsonable, write_json
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


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; a no-op when ``enabled`` is False.

    ``purge_step``: a resumed run logs again from this step; TensorBoard hides the events the earlier
    attempt wrote at this step and later (``SummaryWriter(purge_step=...)``), so no step appears twice.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / METRICS_NAME, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, prefix: str = "", **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            v = v.item() if hasattr(v, "item") else v
            row[f"{prefix}{k}"] = v
            if self._tb is not None and isinstance(v, (int, float)) and math.isfinite(float(v)):
                self._tb.add_scalar(f"{prefix}{k}", v, int(step))
        self._file.write(json.dumps(row, default=jsonable) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


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
