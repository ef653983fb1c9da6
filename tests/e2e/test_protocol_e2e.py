"""`submit protocol` end to end: the tiny protocol (tests/stage_fixtures.py ``tiny_protocol_args``: a ResNet-50
pretrained for 14 steps on the tiny embedded set, every evaluation cut to a couple of steps, detection to 2
iterations) on the localhost Slurm with its pretraining requeued mid-run, then through local processes with a
failing evaluation that is reported, and re-run once fixed.

The local test reuses the Slurm test's pretraining (hard links into its own protocol folder: a complete job is
reused), so the session pretrains once; run alone (no Slurm), it pretrains itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slurm.submit import main
from stage_fixtures import tiny_protocol_args, wait_for_step

SHARED: dict[str, Path] = {}  # the Slurm test's pretraining, for the local test
STEPS = 14  # tiny_protocol_args: 2 epochs of 7 steps (120 images, batch 16)


def _finite_table(summary: dict) -> list[str]:
    """The rows of results.json with a cell that is not a finite number (none in a complete protocol)."""
    bad = []
    for row in summary["classification"] + summary["detection"]:
        for column, cell in row["cells"].items():
            if cell["state"] == "not run" and column != "last":
                continue  # an evaluation not asked for on a snapshot
            if cell["state"] != "done" or not isinstance(cell.get("value"), float) or not math.isfinite(cell["value"]):
                bad.append(f"{row['row']} @ {column}: {cell}")
    return bad


@pytest.mark.slurm
def test_protocol_on_slurm_holds_its_chain_through_a_requeued_pretraining(localhost_slurm, tiny_synthetic,
                                                                         tmp_path_factory, monkeypatch, capsys):
    tmp_path = tmp_path_factory.mktemp("protocol_on_slurm")  # kept for the session: the local test reuses it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    argv = ["protocol", "--cluster", "slurm", "--gpus", "2", "--eval-gpus", "1", "--time", "20", "--name", "tiny",
            "--snapshots", "1", "--snapshot-evals", "knn", *tiny_protocol_args(tiny_synthetic)]
    t0 = time.time()
    assert main(argv) == 0
    folder = tmp_path / "outputs" / "protocol" / "tiny"
    jobs = json.loads((folder / "submissions.jsonl").read_text().splitlines()[-1])["jobs"]
    assert list(jobs) == ["pretrain", "knn/epoch_1", "linear/last", "knn/last", "semi1/last", "semi10/last",
                          "convert/last", "detection/last/seed0", "report"]
    shown = subprocess.run(["scontrol", "show", "job", jobs["linear/last"]], capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{jobs['pretrain']}" in shown and "JobState=PENDING" in shown, shown
    shown = subprocess.run(["scontrol", "show", "job", jobs["detection/last/seed0"]], capture_output=True,
                           text=True).stdout
    assert f"Dependency=afterok:{jobs['convert/last']}" in shown, shown

    # Preempted mid-run: Slurm requeues the pretraining (same job id); its dependants keep waiting for it.
    reached = wait_for_step(folder / "pretrain", 2, timeout=600)
    assert reached <= STEPS - 6, "the pretraining got too close to its end before it could be requeued"
    subprocess.run(["scontrol", "requeue", jobs["pretrain"]], check=True)
    capsys.readouterr()
    # The same command with --wait waits for the queued jobs: nothing is submitted twice.
    assert main([*argv, "--wait"]) == 0
    out = capsys.readouterr().out
    wall = time.time() - t0
    assert "0 job(s) submitted, 9 waited for, 0 complete and reused" in out
    for key in jobs:
        assert len((folder / key / "submissions.jsonl").read_text().splitlines()) == 1, key
    log = (folder / "pretrain" / "submitit" / f"{jobs['pretrain']}_0_log.out").read_text()
    assert "restart 1" in log and "resuming from step" in log
    resumed = int(log.split("resuming from step")[1].split()[0])
    assert reached <= resumed < STEPS

    summary = json.loads((folder / "results.json").read_text())
    assert summary["complete"] and summary["failed"] == [] and _finite_table(summary) == []
    assert [r["row"] for r in summary["classification"]] == [
        "linear top-1", "linear top-5", "5-NN top-1", "semi-supervised 1% top-1", "semi-supervised 1% top-5",
        "semi-supervised 10% top-1", "semi-supervised 10% top-5"]
    assert len(summary["detection"]) == 6 and summary["column_labels"] == {"epoch_1": "epoch 1",
                                                                           "last": "final (epoch 2)"}
    # every evaluation read the checkpoint it names, written once the pretraining had finished (or its snapshot)
    for key in ("linear/last", "knn/last", "semi1/last", "semi10/last", "convert/last"):
        source = json.loads((folder / key / "results.json").read_text())["source"]
        assert (source["step"], source["finished"]) == (STEPS, True), key
    snap = json.loads((folder / "knn" / "epoch_1" / "results.json").read_text())["source"]
    assert (snap["step"], snap["snapshot"]) == (7, True)
    pretrain = next(j for j in summary["jobs"] if j["key"] == "pretrain")
    assert pretrain["attempts"] == 2 and pretrain["job_id"] == jobs["pretrain"] and pretrain["wall_time_s"] > 0
    md = (folder / "results.md").read_text()
    assert "| | epoch 1 | final (epoch 2) |" in md and "## Jobs" in md and "No reference column" in md
    assert main(["protocol", "--status", str(folder)]) == 0
    status = capsys.readouterr().out
    assert "8 jobs: 8 done" in status
    SHARED["pretrain"] = folder / "pretrain"
    print(f"Slurm protocol: 9 jobs, pretraining requeued after step {reached}, resumed at {resumed}; "
          f"{wall:.0f} s from submission to the table")


def test_protocol_local_reports_a_failing_evaluation_and_reruns_it(tiny_synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "0.5")
    folder = tmp_path / "outputs" / "protocol" / "tiny"
    if SHARED.get("pretrain"):  # the Slurm test's finished pretraining: reused, not run again
        shutil.copytree(SHARED["pretrain"], folder / "pretrain", copy_function=os.link)
    bad = tmp_path / "wrong_1percent.txt"
    bad.write_text("circle_99999.jpg\n")  # a subset list made for another dataset: fails in the job, not before
    argv = ["protocol", "--cluster", "local", "--name", "tiny", *tiny_protocol_args(tiny_synthetic)]
    t0 = time.time()
    assert main([*argv, f"semi1:subset.list={bad}", "semi1:subset.percent=null"]) == 1
    out = capsys.readouterr().out
    first = time.time() - t0
    assert "semi1/last: FAILED; the other jobs go on" in out
    if SHARED.get("pretrain"):
        assert "[1/7] pretrain: complete, reused" in out
    summary = json.loads((folder / "results.json").read_text())
    assert summary["failed"] == ["semi1/last"] and not summary["complete"]
    rows = {r["row"]: r["cells"]["last"] for r in summary["classification"]}
    cell = rows.pop("semi-supervised 1% top-1")
    assert cell["state"] == "failed" and "SubsetError: 1 of the 1 files of the subset list" in cell["detail"]
    assert Path(cell["log"]).is_file() and "SubsetError" in Path(cell["log"]).read_text()
    rows.pop("semi-supervised 1% top-5")
    assert all(c["state"] == "done" and math.isfinite(c["value"]) for c in rows.values()), rows
    assert "| semi-supervised 1% top-1 | FAILED (semi1/last) |" in (folder / "results.md").read_text()
    assert main(["protocol", "--status", str(folder)]) == 1
    status = capsys.readouterr().out
    assert "7 jobs: 6 done, 1 failed" in status.splitlines()[0]
    line = next(ln for ln in status.splitlines() if ln.strip().startswith("semi1/last"))
    assert "failed" in line and "local job" in line and "SubsetError" in line and cell["log"] in status

    # Fixed and submitted again: only the failed evaluation runs; the table is complete.
    t0 = time.time()
    assert main(argv) == 0
    out = capsys.readouterr().out
    second = time.time() - t0
    assert out.count(": complete, reused") == 6 and "[4/7] semi1/last: run folder" in out
    summary = json.loads((folder / "results.json").read_text())
    assert summary["complete"] and _finite_table(summary) == []
    assert json.loads((folder / "semi1" / "last" / "results.json").read_text())["subset"]["percent"] == 1
    print(f"local protocol: {first:.0f} s with the failing evaluation, {second:.0f} s to re-run it"
          + (" (pretraining reused from the Slurm test)" if SHARED.get("pretrain") else ""))
