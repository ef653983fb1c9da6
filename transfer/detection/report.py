"""What one detection run leaves in its folder: results.json, metrics.jsonl and the loss-curve PNG.

detectron2's JSONWriter writes ``metrics.json`` (one smoothed row per 20 iterations); the trainer's
LossLog hook writes every iteration's losses to ``metrics.jsonl`` (the pipeline's format, with ``step``),
from which the loss curve and the first/last losses in results.json come.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from common.atomic import save_figure
from common.runlog import read_metrics, write_results

# Table 3 of the paper: AP50, AP, AP75 for bbox, then the same for segm.
TABLE_TASKS = ("bbox", "segm")
TABLE_METRICS = ("AP50", "AP", "AP75")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def eval_to_results(eval_results) -> dict:
    """detectron2's ``{task: {metric: value}}`` as plain JSON-able floats (NaN -> None)."""
    return {task: {k: _clean(float(v)) for k, v in metrics.items()} for task, metrics in (eval_results or {}).items()}


def training_losses(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, total_loss) from metrics.jsonl rows, the last entry of each step (a resume may repeat some)."""
    by_step = {int(r["step"]): float(r["total_loss"]) for r in rows if "total_loss" in r and "step" in r}
    return sorted(by_step.items())


def plot_loss_curve(output_dir: str | os.PathLike, rows: list[dict], title: str = "") -> Path | None:
    """loss_curve.png: the total loss and its parts against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = training_losses(rows)
    if not losses:
        return None
    parts = sorted({k for r in rows for k in r if k.startswith("loss_")})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*losses), label="total_loss", linewidth=2, color="black")
    for part in parts:
        pts = sorted({int(r["step"]): float(r[part]) for r in rows if part in r}.items())
        ax.plot(*zip(*pts), label=part, linewidth=1, alpha=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or "Mask R-CNN C4 fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(output_dir) / "loss_curve.png", dpi=100)


def write_run_outputs(output_dir: str | os.PathLike, eval_results, info: dict) -> dict:
    """Writes results.json (+ loss_curve.png from metrics.jsonl) for one finished run; returns the results
    as written (with the run's ``provenance``)."""
    rows = read_metrics(output_dir)
    losses = training_losses(rows)
    results = {**eval_to_results(eval_results), **info}
    if losses:
        results["first_total_loss"] = losses[0][1]
        results["last_total_loss"] = losses[-1][1]
    plot_loss_curve(output_dir, rows, title=f"{info.get('name', '')} seed {info.get('seed', '')}".strip())
    return write_results(output_dir, results)  # with the seed's provenance
