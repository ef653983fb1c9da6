"""The demo's report: outputs/demo/report.md, results.json and PNG plots, from the stages' own outputs."""

from __future__ import annotations

import math
from pathlib import Path

from common.atomic import atomic_write_text, save_figure, write_json
from common.runlog import read_metrics

INITS = ("pretrained", "random")
PRETRAIN_RUNS = {"resnet18": "demo", "resnet50": "demo-r50"}


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}f}"


def _get(d: dict, *keys, default=None):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return default
    return d


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(metric, pretrained, random init, backbone) rows of the report's table."""
    rows = []

    def add(label: str, backbone: str, *path: str) -> None:
        rows.append((label, *(_fmt(_get(results, path[0], i, *path[1:])) for i in INITS), backbone))

    add("k-NN top-1 (k=5)", "ResNet-18", "knn", "top1")
    if _get(results, "knn", "pretrained", "weighted_top1") is not None:
        add("k-NN top-1 (weighted, k=20)", "ResNet-18", "knn", "weighted_top1")
    add("linear top-1", "ResNet-18", "linear", "top1")
    add("linear top-5", "ResNet-18", "linear", "top5")
    add("semi-supervised (10%) top-1", "ResNet-18", "semi", "top1")
    add("k-NN top-1 (k=5)", "ResNet-50", "knn_resnet50", "top1")
    for task in ("bbox", "segm"):
        for m in ("AP", "AP50", "AP75"):
            add(f"Mask R-CNN C4 {task} {m}", "ResNet-50", "detection", "mean", task, m)
    return rows


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_pretrain(outputs: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    runs = {arch: read_metrics(outputs / "pretrain" / name) for arch, name in PRETRAIN_RUNS.items()}
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for arch, rows in runs.items():
        losses = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
        if losses:
            ax.plot(*zip(*losses), label=arch)
    if ax.lines:
        ax.set(xlabel="step", ylabel="INTL loss", title="pretraining loss (embedded set)")
        ax.legend()
        _save(fig, out / "pretrain_loss.png")
        made.append("pretrain_loss.png")
    else:
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))  # the pretraining monitor: online probe and k-NN on the val split
    for arch, rows in runs.items():
        for key, what in (("probe_val_top1", "online probe"), ("knn_top1", "k-NN monitor")):
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{arch}, {what}")
    if ax.lines:
        ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="during pretraining (chance 10%)")
        ax.legend(fontsize=7)
        _save(fig, out / "pretrain_monitor.png")
        made.append("pretrain_monitor.png")
    else:
        plt.close(fig)
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.4), squeeze=False)
    drawn = False
    for ax, (arch, rows) in zip(axes[0], runs.items()):
        spectra = [r for r in rows if isinstance(r.get("spectrum"), list)]
        for r, label in ((spectra[0], "start"), (spectra[-1], "end")) if spectra else ():
            eig = [max(e, 1e-12) for e in r["spectrum"]]
            ax.semilogy(r.get("spectrum_index") or range(1, len(eig) + 1), eig, label=f"{label} (step {r['step']})")
            drawn = True
        ax.set(xlabel="index", ylabel="eigenvalue", title=f"embedding spectrum, {arch}")
        if spectra:
            ax.legend()
    if drawn:
        _save(fig, out / "spectrum_start_end.png")
        made.append("spectrum_start_end.png")
    else:
        plt.close(fig)
    return made


def plot_detection(outputs: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for init in INITS:
        for seed_dir in sorted((outputs / "detection" / f"demo-{init}").glob("seed*")):
            # metrics.jsonl: one row per iteration (detectron2's own metrics.json has one per 20)
            pts = [(r["step"], r["total_loss"]) for r in read_metrics(seed_dir) if "total_loss" in r]
            if pts:
                ax.plot(*zip(*pts), label=f"{init} ({seed_dir.name})", lw=1)
    if not ax.lines:
        plt.close(fig)
        return []
    ax.set(xlabel="iteration", ylabel="total loss", title="Mask R-CNN R50-C4 fine-tuning")
    ax.legend()
    _save(fig, out / "detection_loss.png")
    return ["detection_loss.png"]


def write_report(demo_dir: Path, results: dict, commands: dict, times: dict, total_seconds: float) -> Path:
    """``demo_dir`` is ``<outputs>/demo``; the stages' run folders are ``<outputs>/<stage>/demo*``."""
    demo_dir.mkdir(parents=True, exist_ok=True)
    outputs = demo_dir.parent
    plots = plot_pretrain(outputs, demo_dir) + plot_detection(outputs, demo_dir)
    write_json(demo_dir / "results.json", {**results, "wall_time_seconds": {**times, "total": round(total_seconds, 1)}})
    rows = table_rows(results)
    table = ["| metric | backbone | INTL pretrained | random init |", "|---|---|---:|---:|"]
    table += [f"| {m} | {arch} | {a} | {b} |" for m, a, b, arch in rows]
    lines = [
        "# INTL demo report",
        "",
        "Produced by `make demo` on the embedded synthetic data (2 CPU processes per stage). Accuracies in %",
        "on the 250 validation images (10 classes, chance 10%); AP in COCO points on the 24 validation images",
        "of the embedded COCO-format set (mean over seeds). Random init: the same architecture, same",
        "evaluation, no pretraining. The ResNet-50 is pretrained only because the R50-C4 detector needs it;",
        "its k-NN row shows how little a few CPU minutes teach it.",
        "",
        *table,
        "",
    ]
    for arch, p in results.get("pretrain", {}).items():
        lines.append(f"- Pretraining {arch}: {p.get('steps')} steps, loss {_fmt(p.get('loss_first'), 3)} -> "
                     f"{_fmt(p.get('loss_last'), 3)}"
                     + (f", effective rank {_fmt(p.get('eff_rank_first'))} -> {_fmt(p.get('eff_rank_last'))}"
                        if p.get("eff_rank_last") is not None else "")
                     + (f"; during the run, online probe val top-1 {_fmt(p.get('probe_val_top1_last'))}, k-NN monitor "
                        f"{_fmt(p.get('knn_top1_last'))}" if p.get("probe_val_top1_last") is not None else "") + ".")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()] + [f"| total | {total_seconds:.0f} |"]
    lines += ["", "## Commands", ""]
    for stage, cmds in commands.items():
        lines += [f"{stage}:", "", "```bash", *cmds, "```", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = atomic_write_text(demo_dir / "report.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(table))
    print(f"\n[demo] report: {path}\n[demo] results: {demo_dir / 'results.json'}\n[demo] plots: "
          f"{', '.join(str(demo_dir / p) for p in plots)}")
    return path
