"""What a protocol folder (``outputs/protocol/<name>/``, written by ``submit protocol``) holds: the state of
each of its jobs, and the paper's tables of its results.

    python -m slurm.protocol_report outputs/protocol/<name>      # = submit protocol --report <folder>

``job_states(folder)``: per job (``protocol.json``'s nodes) done / running / pending / failed / not run, with its
Slurm or local job id, its log files and, for a failed one, the last line of its error log.
``write_report(folder)``: ``results.json`` and ``results.md`` in the paper's layout: linear top-1 / top-5 and
5-NN top-1 (Tables 1 and 2), semi-supervised 1% and 10% top-1 / top-5 (Table 12), COCO bbox / segm AP50 / AP /
AP75 as mean +- std over the seeds (Table 3), one column per evaluated checkpoint (the snapshots, then the
final one), the paper's INTL numbers in a reference column when the pretraining is the preset they were
reported for (``configs/protocol/paper_reference.yaml``, with its source), and per job its state, commit,
config, wall time and attempts (from its ``provenance.json``). A failed or unfinished evaluation is a cell
that says so, never a number. ``ReportJob`` writes it as the protocol's last Slurm job.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from common.atomic import atomic_write_text, write_json
from common.config import config_dir
from common.errors import UserError
from common.provenance import read_attempts
from common.runlog import COMPLETE_MARKER, RESULTS_NAME, is_complete

from .errors import SubmitError
from .runs import SUBMITIT_DIR, active_jobs, read_submissions

PROTOCOL_FILE = "protocol.json"
REFERENCE_FILE = "protocol/paper_reference.yaml"  # under configs/
LAST = "last"  # the final checkpoint's column (snapshots: epoch_<N>)

DONE, RUNNING, PENDING, FAILED, NOT_RUN = "done", "running", "pending", "failed", "not run"
_RUNNING_SLURM = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING")

# (evaluation, results.json key, row label, reference key); the k of the k-NN row is read from its results
CLASSIFICATION_ROWS = (
    ("linear", "top1", "linear top-1", "linear_top1"),
    ("linear", "top5", "linear top-5", "linear_top5"),
    ("knn", "top1", "{k}-NN top-1", "knn_top1"),
    ("semi1", "top1", "semi-supervised 1% top-1", "semi1_top1"),
    ("semi1", "top5", "semi-supervised 1% top-5", "semi1_top5"),
    ("semi10", "top1", "semi-supervised 10% top-1", "semi10_top1"),
    ("semi10", "top5", "semi-supervised 10% top-5", "semi10_top5"),
)
DETECTION_TASKS = ("bbox", "segm")  # the paper's Table 3 order (transfer.detection.report has the same)
DETECTION_METRICS = ("AP50", "AP", "AP75")


# ------------------------------------------------------------------------------------------- reading
def read_protocol(folder: str | Path) -> dict:
    """``protocol.json`` of a protocol folder, or a SubmitError naming the fix."""
    path = Path(folder) / PROTOCOL_FILE
    if not path.is_file():
        raise SubmitError(f"{folder} is not a protocol folder (no {PROTOCOL_FILE}); fix: pass the folder "
                          "`submit protocol` printed, outputs/protocol/<name>")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SubmitError(f"{path} is not JSON ({e}); fix: submit the protocol again (it rewrites the file)") from None


@dataclass
class JobState:
    key: str
    state: str              # DONE, RUNNING, PENDING, FAILED, NOT_RUN
    run_dir: str
    job_id: str | None = None
    cluster: str | None = None
    detail: str = ""        # the scheduler's state, the error line, why it did not run
    log_out: str | None = None
    log_err: str | None = None

    def line(self) -> str:
        job = f"{self.cluster} job {self.job_id}" if self.job_id else "-"
        text = f"  {self.key:<28} {self.state:<8} {job:<18}"
        if self.detail:
            text += f" {self.detail}"
        if self.state != DONE and self.log_err:
            text += f"\n  {'':<28} logs: {self.log_out} | {self.log_err}"
        return text


def _log_paths(run_dir: Path, job_id: str) -> tuple[str, str]:
    from submitit.core.utils import JobPaths  # the names submitit gives its logs (<job>_<task>_log.out|err)

    paths = JobPaths(run_dir / SUBMITIT_DIR, job_id=job_id, task_id=0)
    return str(paths.stdout), str(paths.stderr)


def _last_error_line(path: str | None) -> str:
    """The last non-empty line of an error log (the exception of a traceback, Slurm's CANCELLED line ...)."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return ""
    return lines[-1][:300] if lines else ""


def job_state(key: str, run_dir: str | Path, blocked_by: Sequence[str] = (), driver: str | None = None) -> JobState:
    """The state of one job of the protocol, from its run folder: COMPLETE, its submissions.jsonl and whether
    that job is still queued (squeue) or running (a local pid). ``blocked_by``: jobs it needs that failed;
    ``driver``: the local driver running the graph (a job it has not started yet is pending)."""
    run_dir = Path(run_dir)
    records = read_submissions(run_dir)
    last = records[-1] if records else None
    job_id = str(last["job_ids"][-1]) if last and last.get("job_ids") else None
    state = JobState(key, NOT_RUN, str(run_dir), job_id, last.get("cluster") if last else None)
    if job_id:
        state.log_out, state.log_err = _log_paths(run_dir, job_id)
    if is_complete(run_dir):
        state.state = DONE
        state.detail = "" if last else "(complete before this protocol's submissions)"
        return state
    active = active_jobs(run_dir)
    if active:
        state.job_id = active[-1].job_id
        state.log_out, state.log_err = _log_paths(run_dir, state.job_id)
        scheduler = active[-1].state
        running = scheduler in _RUNNING_SLURM or scheduler.startswith("local process")
        state.state, state.detail = (RUNNING if running else PENDING), scheduler
        return state
    if last is None:
        if blocked_by:
            state.detail = f"{', '.join(blocked_by)} failed"
        elif driver:
            state.state, state.detail = PENDING, f"waits its turn in the local driver ({driver})"
        return state
    state.state = FAILED
    error = _last_error_line(state.log_err)
    if error:
        state.detail = error
    elif not Path(str(state.log_err)).exists():
        state.detail = "ended without a log: it never started (cancelled, or a job it needs failed)"
    else:
        state.detail = "ended without a result (killed, cancelled, out of memory or time?)"
    return state


def local_driver(folder: str | Path) -> str | None:
    """``pid <n> on <host>`` of the `submit protocol --cluster local` process running this protocol, if any (this
    process excepted: a driver that returned is not running, even when its caller goes on)."""
    for job in active_jobs(Path(folder)):
        if job.job_id != str(os.getpid()):
            return f"pid {job.job_id} on {job.record.get('host')}"
    return None


def job_states(folder: str | Path, protocol: dict | None = None) -> list[JobState]:
    """Every job of the protocol in graph order (the report job aside)."""
    protocol = protocol or read_protocol(folder)
    driver = local_driver(folder)
    states: dict[str, JobState] = {}
    broken: set[str] = set()  # failed, or not run because something it needs failed
    for node in protocol["nodes"]:
        if node["stage"] == "report":
            continue
        blocked = [d for d in node["deps"] if d in broken]
        state = states[node["key"]] = job_state(node["key"], node["run_dir"], blocked, driver)
        if state.state == FAILED or (state.state == NOT_RUN and blocked):
            broken.add(node["key"])
    return list(states.values())


# ------------------------------------------------------------------------------------------- figures
def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wall_time_s(run_dir: Path) -> float | None:
    """From the first attempt's start (provenance.json) to COMPLETE: requeue waits included."""
    attempts = read_attempts(run_dir)
    done = run_dir / COMPLETE_MARKER
    if not attempts or not done.exists():
        return None
    try:
        start = datetime.datetime.fromisoformat(attempts[0]["started"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    return round(done.stat().st_mtime - start, 1)


def _job_record(node: dict, state: JobState) -> dict:
    run_dir = Path(node["run_dir"])
    attempts = read_attempts(run_dir)
    git = (attempts[-1].get("git") or {}) if attempts else {}
    config = run_dir / "config.yaml"
    return {**asdict(state), "stage": node["stage"], "commit": git.get("commit"), "dirty": git.get("dirty"),
            "attempts": len(attempts), "wall_time_s": _wall_time_s(run_dir),
            "config": str(config) if config.exists() else None}


def _cell(state: JobState | None, value: float | None = None, **extra: Any) -> dict:
    if state is None:
        return {"state": NOT_RUN}
    if state.state == DONE:
        return {"state": DONE, "value": value, **extra}
    return {"state": state.state, "job": state.key, "log": state.log_err, "detail": state.detail}


def _reference_numbers(protocol: dict) -> tuple[dict, dict]:
    """(the numbers for this protocol's preset, {preset, source, note, applies, why_not})."""
    ref = protocol.get("reference") or {}
    preset = ref.get("preset")
    table = OmegaConf.to_container(OmegaConf.load(config_dir() / REFERENCE_FILE), resolve=True)
    numbers = (table.get("presets") or {}).get(preset) or {}
    info = {"preset": preset, "source": table.get("source"), "note": numbers.get("note"),
            "applies": bool(numbers) and not ref.get("why_not"), "why_not": ref.get("why_not"),
            "own_eval_settings": ref.get("own_eval_settings") or {}}
    if preset and not numbers and not ref.get("why_not"):
        info["why_not"] = f"the paper reference has no numbers for the preset {preset!r}"
    return (numbers if info["applies"] else {}), info


def collect(folder: str | Path) -> dict:
    """The report of a protocol folder (see the module docstring) as a plain dict."""
    folder = Path(folder)
    protocol = read_protocol(folder)
    states = {s.key: s for s in job_states(folder, protocol)}
    nodes = {n["key"]: n for n in protocol["nodes"]}
    columns = list(protocol["checkpoints"])
    done_file = Path(nodes["pretrain"]["run_dir"]) / COMPLETE_MARKER  # the pretraining's summary
    pretrain = json.loads(done_file.read_text() or "{}") if done_file.exists() else {}
    labels = {c: (f"epoch {c.split('_', 1)[1]}" if c != LAST else
                  "final" + (f" (epoch {pretrain['epochs']:g})" if _finite(pretrain.get("epochs")) else ""))
              for c in columns}
    reference, ref_info = _reference_numbers(protocol)
    own = ref_info["own_eval_settings"]

    classification = []
    for evaluation, metric, label, ref_key in CLASSIFICATION_ROWS:
        if evaluation not in protocol["evals"]:
            continue
        cells, k = {}, None
        for column in columns:
            state = states.get(f"{evaluation}/{column}")
            res = _results(state.run_dir) if state is not None and state.state == DONE else {}
            k = k or res.get("k")
            cells[column] = _cell(state, _finite(res.get(metric)))
        shown_ref = reference.get(ref_key) if evaluation not in own and (evaluation != "knn" or k in (None, 5)) \
            else None
        classification.append({"row": label.format(k=k or 5), "eval": evaluation, "metric": metric, "cells": cells,
                               "reference": shown_ref})

    detection, seeds = [], {}
    if "detection" in protocol["evals"]:
        per_column = {}
        for column in columns:
            keys = [k for k in nodes if k.startswith(f"detection/{column}/seed")]
            seed_states = [states[k] for k in keys]
            seeds[column] = len(keys)
            if not keys:
                per_column[column] = (None, None)
            elif all(s.state == DONE for s in seed_states):
                from transfer.detection.aggregate import aggregate  # detectron2: only when there is detection

                per_column[column] = (aggregate(Path(seed_states[0].run_dir).parent), None)
            else:
                worst = next((s for s in seed_states if s.state == FAILED), None) or \
                    next((s for s in seed_states if s.state != DONE))
                per_column[column] = (None, worst)
        ref = reference.get("detection") or {}
        for task in DETECTION_TASKS:
            for metric in DETECTION_METRICS:
                cells = {}
                for column in columns:
                    summary, state = per_column[column]
                    if summary is None:
                        cells[column] = _cell(state)
                        continue
                    mean = summary["mean"].get(task, {}).get(metric)
                    std = summary["std"].get(task, {}).get(metric)
                    cells[column] = {"state": DONE, "value": _finite(mean), "std": _finite(std),
                                     "n_seeds": summary["n_seeds"]}
                pair = (ref.get(task) or {}).get(metric) if "detection" not in own else None
                detection.append({"row": f"{task} {metric}", "eval": "detection", "task": task, "metric": metric,
                                  "cells": cells, "reference": {"mean": pair[0], "std": pair[1]} if pair else None})

    jobs = [_job_record(nodes[key], state) for key, state in states.items()]
    return {
        "name": protocol["name"], "folder": str(folder), "command": protocol.get("command"),
        "preset": protocol.get("reference", {}).get("preset"),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": all(j["state"] == DONE for j in jobs),
        "failed": [j["key"] for j in jobs if j["state"] == FAILED],
        "columns": columns, "column_labels": labels,
        "pretraining": {"run_dir": nodes["pretrain"]["run_dir"], "state": states["pretrain"].state,
                        "steps": pretrain.get("steps"), "epochs": pretrain.get("epochs")},
        "classification": classification, "detection": detection, "detection_seeds": seeds,
        "reference": ref_info, "jobs": jobs,
    }


# ------------------------------------------------------------------------------------------- markdown
def _fmt_cell(cell: dict, digits: int = 1) -> str:
    if cell.get("state") != DONE:
        return {FAILED: f"FAILED ({cell.get('job')})", NOT_RUN: "not run"}.get(cell["state"], cell["state"])
    if cell.get("value") is None:
        return "n/a"
    if cell.get("std") is not None:
        return f"{cell['value']:.{digits}f} ± {cell['std']:.{digits}f}"
    return f"{cell['value']:.{digits}f}"


def _fmt_reference(ref: Any) -> str:
    if ref is None:
        return ""
    if isinstance(ref, dict):
        return f"{ref['mean']:g} ± {ref['std']:g}"
    return f"{ref:g}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else (f"{m}m{s:02d}s" if m else f"{s}s")


def _table(rows: list[dict], summary: dict, ref_col: bool) -> list[str]:
    cols = summary["columns"]
    head = "| | " + " | ".join(summary["column_labels"][c] for c in cols) + (" | paper (INTL)" if ref_col else "")
    lines = [head + " |", "|---|" + "---:|" * (len(cols) + (1 if ref_col else 0))]
    for row in rows:
        cells = [_fmt_cell(row["cells"][c]) for c in cols] + ([_fmt_reference(row["reference"])] if ref_col else [])
        lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
    return lines


def format_markdown(summary: dict) -> str:
    ref = summary["reference"]
    ref_col = bool(ref["applies"])
    done = sum(j["state"] == DONE for j in summary["jobs"])
    lines = [f"# Protocol {summary['name']}", "",
             f"`{summary['command']}`" if summary.get("command") else "", "",
             f"{done} of {len(summary['jobs'])} jobs done"
             + (f"; FAILED: {', '.join(summary['failed'])} (logs in the Jobs table)" if summary["failed"] else "")
             + f". Written {summary['written']}. Accuracies in %, COCO AP in points.", ""]
    if summary["classification"]:
        lines += ["## Classification: linear and k-NN (Tables 1 and 2), semi-supervised (Table 12)", ""]
        lines += _table(summary["classification"], summary, ref_col) + [""]
    if summary["detection"]:
        seeds = max(summary["detection_seeds"].values(), default=0)
        lines += [f"## COCO detection and instance segmentation (Table 3): Mask R-CNN R50-C4, mean ± std over "
                  f"{seeds} seed(s)", ""]
        lines += _table(summary["detection"], summary, ref_col) + [""]
    if ref_col:
        lines.append(f"Reference (preset `{ref['preset']}`): {ref['note']}. Source: {ref['source']}. "
                     "An empty reference cell: no number for it in the source.")
        if ref["own_eval_settings"]:
            changed = "; ".join(f"{e}: {', '.join(keys)}" for e, keys in ref["own_eval_settings"].items())
            lines.append(f"No reference for evaluations run with their own settings ({changed}).")
    else:
        lines.append("No reference column: " + (ref.get("why_not") or "the pretraining names no preset "
                                                 "(pretrain/preset=...) the paper reports"))
    lines += ["", "## Jobs", "",
              "| job | state | job id | commit | wall time | attempts | config | log |",
              "|---|---|---|---|---:|---:|---|---|"]
    for j in summary["jobs"]:
        commit = (j["commit"] or "-")[:12] + (" (dirty)" if j.get("dirty") else "")
        state = j["state"] + (f": {j['detail']}" if j["state"] in (FAILED, NOT_RUN) and j["detail"] else "")
        job = f"{j['cluster']} {j['job_id']}" if j["job_id"] else "-"
        lines.append(f"| {j['key']} | {state} | {job} | {commit} | {_fmt_duration(j['wall_time_s'])} | "
                     f"{j['attempts']} | {j['config'] or '-'} | {j['log_err'] or '-'} |")
    lines.append("")
    lines.append("Wall time: from the first start of the job (provenance.json) to its COMPLETE, requeue waits "
                 "included.")
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path) -> dict:
    """Writes ``results.json`` and ``results.md`` into the protocol folder (atomically); returns the summary."""
    folder = Path(folder)
    summary = collect(folder)
    write_json(folder / "results.json", summary)
    atomic_write_text(folder / "results.md", format_markdown(summary))
    return summary


class ReportJob:
    """The protocol's last Slurm job (after every other one ended, whatever their state): writes the report."""

    def __init__(self, folder: str):
        self.folder = folder

    @property
    def config(self) -> dict:
        return {"protocol": self.folder}

    def __call__(self) -> dict:
        summary = write_report(self.folder)
        print((Path(self.folder) / "results.md").read_text(), flush=True)
        return {"complete": summary["complete"], "failed": summary["failed"]}

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.folder))

    def __repr__(self) -> str:
        return f"ReportJob({self.folder!r})"


def print_report(folder: str | Path) -> int:
    """Writes and prints the table; 1 when a job failed, else 0."""
    folder = Path(folder)
    summary = write_report(folder)
    print((folder / "results.md").read_text(), end="")
    print(f"written: {folder / 'results.md'} and {folder / 'results.json'}")
    return 1 if summary["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.protocol_report", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the protocol folder, outputs/protocol/<name>")
    args = p.parse_args(argv)
    try:
        return print_report(args.folder)
    except UserError as e:
        print(f"protocol report: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
