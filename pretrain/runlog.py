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

from pretrain.atomic import atomic_path

COMPLETE_MARKER = "COMPLETE"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_config(run_dir: str | os.PathLike, cfg: Any) -> Path:
    """Writes the resolved config as ``config.yaml`` (OmegaConf DictConfig or plain dict)."""
    from omegaconf import OmegaConf

    conf = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    return atomic_write_text(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(conf, resolve=True))


def is_complete(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / COMPLETE_MARKER).exists()


def mark_complete(run_dir: str | os.PathLike, summary: dict | None = None) -> None:
    atomic_write_text(Path(run_dir) / COMPLETE_MARKER, json.dumps(summary or {}, default=_jsonable) + "\n")


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
        self._file.write(json.dumps(row, default=_jsonable) + "\n")

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
