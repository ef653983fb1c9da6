"""Mean +- std over seeds of a detection experiment, in the paper's Table 3 column order.

    python -m transfer.detection.aggregate outputs/detection/<name>

reads every ``seed*/results.json`` under the folder and writes ``results.json`` (per-seed values, mean,
sample standard deviation, each seed's provenance under ``provenance.per_seed``) and ``results.md`` (a
markdown table: AP50 AP AP75 for bbox, then segm).
Seed folders without results (still running, failed) are listed and left out; none at all is an error.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.runlog import write_results
from transfer.detection.config import DetectionSetupError
from transfer.detection.report import TABLE_METRICS, TABLE_TASKS

_SEED_DIR = re.compile(r"^seed(\d+)$")


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    """The folder of one seed of an experiment (``outputs/detection/<name>/seed<k>``)."""
    return Path(run_dir) / f"seed{int(seed)}"


def seed_runs(run_dir: str | Path, n_seeds: int, first_seed: int = 0) -> list[tuple[Path, list[str]]]:
    """The (output_dir, extra detectron2 overrides) of each of ``n_seeds`` independent runs."""
    if n_seeds < 1:
        raise DetectionSetupError(f"--seeds must be at least 1, got {n_seeds}")
    return [(seed_dir(run_dir, k), ["SEED", str(k)]) for k in range(first_seed, first_seed + n_seeds)]


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def aggregate(run_dir: str | Path) -> dict:
    """Aggregates ``run_dir/seed*/results.json`` into ``run_dir/results.json`` and ``run_dir/results.md``."""
    run_dir = Path(run_dir)
    seed_dirs = sorted((p for p in run_dir.glob("seed*") if p.is_dir() and _SEED_DIR.match(p.name)),
                       key=lambda p: int(_SEED_DIR.match(p.name).group(1)))
    per_seed, incomplete = {}, []
    for d in seed_dirs:
        path = d / "results.json"
        if path.is_file():
            per_seed[d.name] = json.loads(path.read_text())
        else:
            incomplete.append(d.name)
    if not per_seed:
        raise DetectionSetupError(f"no seed*/results.json under {run_dir} "
                                  f"(seed folders: {[d.name for d in seed_dirs]}); "
                                  "fix: run `submit detection ... --seeds N` first, or pass the experiment folder "
                                  "outputs/detection/<name>")
    tasks = [t for t in TABLE_TASKS if all(t in r for r in per_seed.values())]
    mean, std = {}, {}
    for task in tasks:
        mean[task], std[task] = {}, {}
        for metric in TABLE_METRICS:
            values = [r[task].get(metric) for r in per_seed.values()]
            values = [float(v) for v in values if v is not None]
            mean[task][metric] = statistics.fmean(values) if values else None
            std[task][metric] = statistics.stdev(values) if len(values) > 1 else None
    summary = {
        "name": run_dir.name, "n_seeds": len(per_seed), "seeds": [int(_SEED_DIR.match(s).group(1)) for s in per_seed],
        "incomplete": incomplete, "columns": [f"{t} {m}" for t in tasks for m in TABLE_METRICS],
        "mean": mean, "std": std,
        "per_seed": {s: {t: {m: r[t].get(m) for m in TABLE_METRICS} for t in tasks} for s, r in per_seed.items()},
        "std_kind": "sample standard deviation over seeds (n-1)",
    }
    # Each seed ran as its own job: the aggregate records every seed's provenance (None for a seed without one).
    summary = write_results(run_dir, summary,
                            provenance={"per_seed": {s: r.get("provenance") for s, r in per_seed.items()}})
    atomic_write_text(run_dir / "results.md", format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    cols = summary["columns"]
    tasks = list(summary["mean"])
    header = "| run | seeds | " + " | ".join(cols) + " |"
    lines = [f"# Detection: {summary['name']}", "",
             f"Mean ± std over {summary['n_seeds']} seed(s) ({summary['std_kind']}); columns in the order of the "
             "paper's Table 3.", "", header, "|" + "---|" * (len(cols) + 2)]
    cells = [_fmt(summary["mean"][t][m], summary["std"][t][m]) for t in tasks for m in TABLE_METRICS]
    lines.append(f"| {summary['name']} | {summary['n_seeds']} | " + " | ".join(cells) + " |")
    for seed, r in summary["per_seed"].items():
        cells = [_fmt(r[t][m], None) for t in tasks for m in TABLE_METRICS]
        lines.append(f"| {seed} | 1 | " + " | ".join(cells) + " |")
    if summary["incomplete"]:
        lines += ["", f"Left out (no results.json yet): {', '.join(summary['incomplete'])}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.detection.aggregate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the experiment folder holding seed*/ (outputs/detection/<name>)")
    args = p.parse_args(argv)
    try:
        summary = aggregate(args.run_dir)
    except DetectionSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary), end="")
    print(f"written: {Path(args.run_dir) / 'results.json'}, {Path(args.run_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
