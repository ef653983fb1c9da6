"""Run folders and metrics logging shared by every stage.

Each run writes into ``outputs/<stage>/<name>/``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON
object per line, always with ``step``), TensorBoard events under ``tb/``, and for evaluations
``results.json``. A run is complete when ``results.json`` (evaluations) or the final checkpoint marked
``finished`` (pretraining) exists; ``COMPLETE`` is written as a marker in both cases.
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

from common.atomic import atomic_write_text, jsonable

COMPLETE_MARKER = "COMPLETE"


def save_config(run_dir: str | os.PathLike, cfg: Any) -> Path:
    """Writes the resolved config as ``config.yaml`` (OmegaConf DictConfig or plain dict)."""
    conf = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    return atomic_write_text(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(conf, resolve=True))


def is_complete(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / COMPLETE_MARKER).exists()


def mark_complete(run_dir: str | os.PathLike, summary: dict | None = None) -> None:
    atomic_write_text(Path(run_dir) / COMPLETE_MARKER, json.dumps(summary or {}, default=jsonable) + "\n")


def previous_results(run_dir: str | os.PathLike) -> dict:
    """What a complete run reported: its ``results.json`` (evaluations), else the ``COMPLETE`` summary."""
    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    if results.exists():
        return json.loads(results.read_text())
    return json.loads((run_dir / COMPLETE_MARKER).read_text() or "{}")


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; a no-op when ``enabled`` is False."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
