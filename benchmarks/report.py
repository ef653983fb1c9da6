"""Writes benchmark results: JSON (everything), a markdown table, a PNG of the ratios."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_whitening
from benchmarks.common import Row
from common.atomic import atomic_write_text, save_figure, write_json


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def markdown_table(rows: list[Row]) -> str:
    """Timing / throughput rows as one table; robustness rows (counts) as a second one."""
    timed = [r for r in rows if not r.benchmark.endswith(("robustness", "profile"))]
    counted = [r for r in rows if r.benchmark.endswith("robustness")]
    profiled = [r for r in rows if r.benchmark.endswith("profile")]
    lines = []
    if timed:
        lines += ["| benchmark | case | variant | unit | median | min | max | ratio to baseline |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for r in timed:
            ratio = "baseline" if r.baseline is None else f"**{r.ratio:.2f}x**"
            extra = f" (peak RSS {r.extra['peak_rss_mb']:.0f} MiB)" if "peak_rss_mb" in r.extra else ""
            if "page_faults_per_step" in r.extra:
                extra += (f"; per step {r.extra['page_faults_per_step']:,.0f} page faults, CPU time "
                          f"{r.extra['user_s_per_step'] + r.extra['sys_s_per_step']:.2f} s of which kernel "
                          f"{r.extra['sys_s_per_step']:.2f} s; steps within +-{r.extra['step_spread_pct'] / 2:.0f}%")
            if "compile_seconds" in r.extra:
                extra += f" (compiled in {r.extra['compile_seconds']:.0f} s, {r.extra['backend']})"
            if "overhead_pct_objective" in r.extra:
                extra += (f"; INTL overhead {r.extra['overhead_pct_objective']:+.2f}% of the step from the "
                          f"objectives alone, {r.extra['overhead_pct_steps']:+.2f}% from the full steps")
            lines.append(f"| {r.benchmark} | {r.case} | {r.variant}{extra} | {r.unit} | {_fmt(r.median)} | "
                         f"{_fmt(min(r.values))} | {_fmt(max(r.values))} | {ratio} |")
        lines.append("")
        lines.append("ratio = speed-up over the baseline of the same case (baseline time / time, or "
                     "throughput / baseline throughput); > 1 is faster.")
        lines += [f"- {r.benchmark}: {note}" for r in timed for note in r.extra.get("notes", [])]
    if counted:
        lines += ["", "| whitening robustness case | method | failed / trials | LinAlgError | non-finite output | "
                      "non-finite grad | median (max) of max abs grad (ok trials) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in counted:
            e = r.extra
            g, gmax = e.get("median_max_abs_grad"), e.get("max_max_abs_grad")
            grad = "-" if g is None else f"{g:.3g}" + (f" ({gmax:.3g})" if gmax is not None else "")
            lines.append(f"| {r.case} | {r.variant} | {int(r.values[0])} / {e['trials']} | {e['linalg_error']} | "
                         f"{e['nonfinite_output']} | {e['nonfinite_grad']} | {grad} |")
    if profiled:
        lines += ["", profile_table(profiled)]
    return "\n".join(lines) + "\n"


def profile_table(rows: list[Row]) -> str:
    """Per-operation profiles (``<variant>: <op>`` rows): a table per variant, ms per image and share."""
    variants = list(dict.fromkeys(r.variant.split(": ", 1)[0] for r in rows))
    lines = []
    for v in variants:
        mine = [r for r in rows if r.variant.startswith(v + ": ")]
        lines += [f"| {r0.case} profile, {v}: operation | ms per image (median) | min | max | share |"
                  for r0 in mine[:1]]
        lines.append("|---|---:|---:|---:|---:|")
        for r in mine:
            lines.append(f"| {r.variant.split(': ', 1)[1]} | {_fmt(r.median)} | {_fmt(min(r.values))} | "
                         f"{_fmt(max(r.values))} | {r.extra['share_pct']:.0f}% |")
        lines += [f"| **total** | **{_fmt(sum(r.median for r in mine))}** | | | |", ""]
    return "\n".join(lines)


def machine_block(machine: dict) -> str:
    keys = ("cpu", "logical_cpus", "cpus_usable", "load_average_1m", "mem_total_gib", "torch_threads", "cuda",
            "python", "torch", "torchvision", "numpy", "pillow", "opencv", "libjpeg_turbo", "platform")
    return "\n".join(f"- {k}: {machine.get(k)}" for k in keys if k in machine)


def plot_ratios(rows: list[Row], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(f"{r.benchmark}: {r.case}\n{r.variant}", r.ratio) for r in rows
            if r.baseline is not None and r.ratio is not None and not r.benchmark.endswith(("robustness", "profile"))]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(data) + 1.2))
    labels, ratios = zip(*data)
    colours = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
    ax.barh(range(len(data)), ratios, color=colours)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(data)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the baseline (median of repeats; 1 = same)")
    for i, x in enumerate(ratios):
        ax.text(x, i, f" {x:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def whitening_figure_name(stem: str) -> str:
    """``<stem>-whitening.png``, or ``<stem>-summary.png`` when the stem already names the benchmark
    (``--name <date>-whitening``), so that the word is not doubled."""
    return f"{stem}-summary.png" if stem.endswith("whitening") else f"{stem}-whitening.png"


def write_all(result: dict, rows: list[Row], out: Path, stem: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(out / f"{stem}.json", result)]
    md = (f"# Benchmarks {result['created_utc']}\n\n`{result['command']}`, settings {result['settings']}\n\n"
          + markdown_table(rows) + "\n" + bench_whitening.summary_markdown(rows)
          + "\n## Machine\n" + machine_block(result["machine"]) + "\n")
    paths.append(atomic_write_text(out / f"{stem}.md", md))
    whitening_png = bench_whitening.plot_summary(rows, out / whitening_figure_name(stem))
    for png in (plot_ratios(rows, out / f"{stem}.png"), whitening_png):
        if png is not None:
            paths.append(png)
    return paths
