"""PNG plots of a pretraining run, drawn from its ``metrics.jsonl`` rows (matplotlib, no display)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.atomic import save_figure  # noqa: E402
from pretrain.spectrum import saturation_step  # noqa: E402


def plot_spectrum(rows: Sequence[dict], path: str | os.PathLike, max_curves: int = 5) -> Path | None:
    """Sorted covariance eigenvalues of the embedding (log scale) at a few steps, the last one bold.

    ``rows`` are metrics rows holding ``spectrum`` (a list of eigenvalues); returns None if there is none.
    """
    spectra = [r for r in rows if isinstance(r.get("spectrum"), list) and r["spectrum"]]
    if not spectra:
        return None
    picks = spectra if len(spectra) <= max_curves else [
        spectra[round(i * (len(spectra) - 1) / (max_curves - 1))] for i in range(max_curves)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in enumerate(picks):
        eigs = [max(float(e), 1e-12) for e in r["spectrum"]]
        last = k == len(picks) - 1
        label = f"step {r['step']}"
        if "effective_rank" in r and "lg_ioc" in r:
            label += f" (erank {r['effective_rank']:.1f}, lgIoC {r['lg_ioc']:.2f})"
        index = r.get("spectrum_index") or range(1, len(eigs) + 1)  # subsampled spectra carry their indices
        ax.plot(index, eigs, lw=2.2 if last else 1.0, alpha=1.0 if last else 0.6, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (sorted)")
    ax.set_ylabel("eigenvalue of the embedding covariance")
    ax.set_title("Spectrum of the projector output")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, bbox_inches="tight")


def plot_top_eigenvalues(rows: Sequence[dict], path: str | os.PathLike, k: int) -> Path | None:
    """Each of the top-k covariance eigenvalues against the step (log y; FroSSL's Figure 3), lambda_1 dark to
    lambda_k light, and the saturation step of lambda_k (``pretrain.spectrum.saturation_step``) as a dashed
    vertical line. ``rows`` are metrics rows holding ``top_eigenvalues``; returns None if there is none."""
    rows = [r for r in rows if isinstance(r.get("top_eigenvalues"), list) and r["top_eigenvalues"]]
    if not rows:
        return None
    n = min(k, max(len(r["top_eigenvalues"]) for r in rows))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i in range(n):
        pts = [(r["step"], max(float(r["top_eigenvalues"][i]), 1e-12)) for r in rows if len(r["top_eigenvalues"]) > i]
        label = f"lambda_{i + 1}" if i in (0, n - 1) else None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cmap(i / max(n - 1, 1)), lw=1.2, label=label,
                marker="." if len(pts) < 3 else None)
    sat = saturation_step(rows, n)
    if sat is not None:
        ax.axvline(sat, color="k", ls="--", lw=1.0, label=f"lambda_{n} saturated (step {sat})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue of the embedding covariance")
    title = f"Top-{n} eigenvalues"
    last = rows[-1]
    if isinstance(last.get("condition_topk"), (int, float)):
        title += f" (last: lambda_1/lambda_{n} = {last['condition_topk']:.3g})"
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, bbox_inches="tight")


def plot_loss(rows: Sequence[dict], path: str | os.PathLike,
              keys: Sequence[str] = ("loss", "align", "trace")) -> Path | None:
    """Loss (and its parts) against the step; returns None if no row has a loss."""
    rows = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for k in keys:
        if any(k in r for r in rows):
            ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k, lw=1.5 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Pretraining loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, bbox_inches="tight")


def plot_monitor(rows: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """``monitor.png``: the loss, the online probe's train / validation top-1 and the k-NN monitor's top-1
    against the epoch; returns None when no row has a probe or k-NN figure."""
    acc_keys = {"probe_train_top1": "probe, train (running)", "probe_val_top1": "probe, validation",
                "knn_top1": "k-NN (weighted), validation"}
    if not any(k in r for r in rows for k in acc_keys):
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    losses = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    ax_loss.plot([r["epoch"] for r in losses], [r["loss"] for r in losses], lw=1.5)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Pretraining loss")
    ax_loss.grid(alpha=0.3)
    for key, label in acc_keys.items():
        pts = [r for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            marker = None if key == "probe_train_top1" else "o"  # the running train figure: a line
            ax_acc.plot([r["epoch"] for r in pts], [r[key] for r in pts], marker=marker, ms=3, lw=1.2, label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 (%)")
    ax_acc.set_title("Monitor: online linear probe and k-NN")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    return save_figure(fig, path, bbox_inches="tight")
