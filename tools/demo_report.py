"""The demo's report: outputs/demo/report.md, results.json and PNG plots, from the stages' own outputs."""

from __future__ import annotations

import math
import statistics
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


# (label, backbone, stage key in results, path inside one seed's results.json); detection rows are added below
CLASSIFICATION_ROWS = (
    ("k-NN top-1 (k=5)", "ResNet-18", "knn", ("top1",)),
    ("k-NN top-1 (weighted, k=20)", "ResNet-18", "knn", ("weighted", "top1")),
    ("linear top-1", "ResNet-18", "linear", ("top1",)),
    ("linear top-5", "ResNet-18", "linear", ("top5",)),
    ("semi-supervised (10%) top-1", "ResNet-18", "semi", ("top1",)),
    ("k-NN top-1 (k=5)", "ResNet-50", "knn_resnet50", ("top1",)),
    ("linear top-1", "ResNet-50", "linear_resnet50", ("top1",)),
)


def seed_values(results: dict, stage: str, init: str, path: tuple) -> dict[str, float]:
    """{seed name: value} of one metric; classification stages hold one results.json per seed, detection the
    aggregate of transfer.detection.aggregate (its ``per_seed``)."""
    runs = _get(results, stage, init, "per_seed") if stage == "detection" else _get(results, stage, init)
    out = {}
    for seed, r in (runs or {}).items():
        v = _get(r, *path)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[seed] = float(v)
    return out


def compare(pre: dict[str, float], rnd: dict[str, float]) -> dict:
    """Pretrained minus random init, paired by seed: the mean difference and its spread (sample std of the
    per-seed differences; None with one seed), and whether the difference is larger than the spread."""
    seeds = sorted(set(pre) & set(rnd))
    row = {"pretrained": statistics.fmean(pre.values()) if pre else None,
           "random": statistics.fmean(rnd.values()) if rnd else None,
           "pretrained_std": statistics.stdev(pre.values()) if len(pre) > 1 else None,
           "random_std": statistics.stdev(rnd.values()) if len(rnd) > 1 else None,
           "n_seeds": len(seeds), "difference": None, "spread": None, "beats_random": None}
    if not seeds:
        return row
    diffs = [pre[s] - rnd[s] for s in seeds]
    row["difference"] = statistics.fmean(diffs)
    row["spread"] = statistics.stdev(diffs) if len(diffs) > 1 else None
    # beats random init: better on average and by more than the seed-to-seed spread of the difference
    row["beats_random"] = row["difference"] > (row["spread"] if row["spread"] is not None else 0.0)
    return row


def comparison_rows(results: dict) -> list[dict]:
    """One dict per row of the report's table (label, backbone, and compare()'s numbers)."""
    specs = [(label, arch, stage, path) for label, arch, stage, path in CLASSIFICATION_ROWS]
    specs += [(f"Mask R-CNN C4 {task} {m}", "ResNet-50", "detection", (task, m))
              for task in ("bbox", "segm") for m in ("AP50", "AP", "AP75")]
    rows = []
    for label, arch, stage, path in specs:
        pre, rnd = (seed_values(results, stage, init, path) for init in INITS)
        if not pre and not rnd:
            continue  # a stage this run did not have (e.g. no weighted k-NN)
        rows.append({"metric": label, "backbone": arch, **compare(pre, rnd)})
    return rows


def _mean_std(mean, std) -> str:
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"


def _verdict(row: dict) -> str:
    if row["difference"] is None:
        return "n/a"
    if row["spread"] is None:
        return ("yes" if row["beats_random"] else "no") + " (1 seed: no spread)"
    return "yes" if row["beats_random"] else "no"


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| metric | backbone | INTL pretrained | random init | pretrained − random (± spread) | "
             "larger than the spread? |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        diff = "n/a" if r["difference"] is None else (
            f"{r['difference']:+.1f}" + ("" if r["spread"] is None else f" ± {r['spread']:.1f}"))
        lines.append(f"| {r['metric']} | {r['backbone']} | {_mean_std(r['pretrained'], r['pretrained_std'])} | "
                     f"{_mean_std(r['random'], r['random_std'])} | {diff} | {_verdict(r)} |")
    return lines


def verdict_line(rows: list[dict]) -> str:
    """The one line that says whether pretraining beats random init by more than the spread, row by row."""
    losing = [f"{r['metric']} ({r['backbone']})" for r in rows if not r["beats_random"]]
    seeds = sorted({r["n_seeds"] for r in rows})
    if not losing:
        return (f"Pretrained minus random init is larger than its spread over seeds on all {len(rows)} rows "
                f"({'/'.join(map(str, seeds))} seeds per row).")
    return (f"Pretrained minus random init is larger than its spread over seeds on {len(rows) - len(losing)} of "
            f"{len(rows)} rows; not on: {', '.join(losing)}.")


def detection_loss_halves(outputs: Path) -> dict:
    """Mean total loss over the second half of the detection iterations, per init (mean over seeds)."""
    out = {}
    for init in INITS:
        means = []
        for seed_dir in sorted((outputs / "detection" / f"demo-{init}").glob("seed*")):
            losses = [r["total_loss"] for r in read_metrics(seed_dir) if "total_loss" in r]
            if losses:
                means.append(statistics.fmean(losses[len(losses) // 2:]))
        out[init] = statistics.fmean(means) if means else None
    return out


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
    rows = comparison_rows(results)
    halves = detection_loss_halves(outputs)
    write_json(demo_dir / "results.json", {**results, "comparison": rows, "detection_loss_second_half": halves,
                                           "wall_time_seconds": {**times, "total": round(total_seconds, 1)}})
    table = table_lines(rows)
    verdict = verdict_line(rows)
    lines = [
        "# INTL demo report",
        "",
        "Produced by `make demo` on the embedded synthetic data (2 CPU processes per stage). Accuracies in %",
        "on the 250 validation images (10 classes, chance 10%); AP in COCO points on the 24 validation images",
        "of the embedded COCO-format set. Random init: the same architecture, same evaluation, no pretraining.",
        "Each cell is the mean over the evaluation seeds (± their sample std); the difference is paired by seed",
        "(seed k of the pretrained run against seed k of random init), its spread the sample std of the per-seed",
        "differences. One pretraining per backbone (its seed is not repeated).",
        "",
        *table,
        "",
        verdict,
        "",
    ]
    if halves.get("pretrained") is not None and halves.get("random") is not None:
        below = halves["pretrained"] <= halves["random"]
        lines += [f"Detection loss over the second half of training (mean over seeds): pretrained "
                  f"{halves['pretrained']:.3f}, random init {halves['random']:.3f} "
                  f"({'at or below' if below else 'ABOVE'} random init's; curves in detection_loss.png).", ""]
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
    print("\n" + "\n".join(table) + "\n\n" + verdict)
    print(f"\n[demo] report: {path}\n[demo] results: {demo_dir / 'results.json'}\n[demo] plots: "
          f"{', '.join(str(demo_dir / p) for p in plots)}")
    return path
