"""`submit` with local processes, for real: a failing job exits 1, two-process pretraining leaves a
checkpoint, detection seeds run and aggregate, every registered method trains on two processes."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

import stage_fixtures
from slurm.submit import main


def test_local_failure_exits_non_zero(counter_env, capsys):
    assert main(["counter", "--cluster", "local", "--gpus", "1", "--wait", "fail=true"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "asked to fail" in captured.err


def test_submit_command_line_reaches_the_runs_provenance(counter_env):
    data = counter_env / "my data"  # a space: the recorded command must quote it
    data.mkdir()
    argv = ["counter", "--cluster", "local", "--gpus", "1", "--wait", "--name", "prov", "steps=1", "step_seconds=0",
            f"data.root={data}"]
    assert main(argv) == 0
    run = counter_env / "outputs" / "counter" / "prov"
    attempts = json.loads((run / "provenance.json").read_text())["attempts"]
    assert [a["command_line"] for a in attempts] == ["submit " + shlex.join(argv)]
    assert shlex.split(attempts[0]["command_line"]) == ["submit", *argv]
    results = json.loads((run / "results.json").read_text())
    assert results["provenance"]["world_size"] == 1 and results["provenance"]["attempts"] == 1


def test_doctor_with_local_processes_passes_and_saves_its_table(counter_env, tiny_synthetic, capsys):
    """`submit doctor --cluster local`, with --env and --collective-timeout: every task has them (the table's env
    column and header; that they are exported before the process group starts: tests/slurm/test_submit.py, and
    the timeout taking effect: tests/e2e/test_lost_ranks.py)."""
    import socket

    assert main(["doctor", "--cluster", "local", "--gpus", "2", "--wait", "--name", "ok", "--env", "NCCL_DEBUG=WARN",
                 "--env", "GLOO_SOCKET_IFNAME=lo", "--collective-timeout", "0.5",
                 f"data.root={tiny_synthetic / 'classification'}", "disk.min_free_gb=0"]) == 0
    run = counter_env / "outputs" / "doctor" / "ok"
    report = (run / "doctor.md").read_text()
    assert report.startswith("doctor: 2 rank(s) on 1 host(s), backend gloo, collective timeout 0.5 min")
    rows = [ln for ln in report.splitlines() if ln.startswith(("| 0 |", "| 1 |"))]
    host = socket.gethostname()
    assert len(rows) == 2 and all(f"| {host} | {r}/2 | cpu |" in rows[r] for r in (0, 1)), report
    assert all("| ok (" in row and "| ok | 8 files, " in row and "| shared |" in row for row in rows), report
    assert all(row.endswith("| GLOO_SOCKET_IFNAME=lo NCCL_DEBUG=WARN |") for row in rows), report
    assert report.rstrip().endswith("every check passed")
    record = json.loads((run / "submissions.jsonl").read_text())
    assert record["env"] == {"NCCL_DEBUG": "WARN", "GLOO_SOCKET_IFNAME": "lo", "INTL_COLLECTIVE_TIMEOUT_MIN": "0.5"}
    results = json.loads((run / "results.json").read_text())
    assert results["ok"] and results["world_size"] == 2 and results["problems"] == []
    assert (run / "COMPLETE").exists() and not (run / ".doctor_token").exists()
    assert "every check passed" in capsys.readouterr().out  # streamed from rank 0's log


def test_pretrain_two_local_processes_leave_a_checkpoint(tiny_synthetic, tmp_path, monkeypatch, capsys):
    from common.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    argv = ["pretrain", "--nodes", "1", "--gpus", "2", "--cluster", "local", "--wait", "--name", "tiny",
            *stage_fixtures.tiny_pretrain_overrides(tiny_synthetic / "classification", steps=3, ckpt_every=2)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rank 0 of world size 2" in out and "world size 2" in out
    run = tmp_path / "outputs" / "pretrain" / "tiny"
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == 3 and ckpt["finished"] is True
    assert (run / "COMPLETE").exists() and (run / "config.yaml").exists()
    assert "step 3/3" in out  # the rank-0 progress lines were streamed
    assert list((run / "submitit").glob("*_1_log.out"))  # rank 1 ran and logged in the run folder
    sub = [json.loads(x) for x in (run / "submissions.jsonl").read_text().splitlines()]
    assert len(sub) == 1 and sub[0]["cluster"] == "local" and sub[0]["gpus"] == 2
    # Provenance: the submit command (not the submitit worker's argv) and the world size, in COMPLETE too.
    attempts = json.loads((run / "provenance.json").read_text())["attempts"]
    assert len(attempts) == 1 and attempts[0]["command_line"] == sub[0]["command"] == "submit " + shlex.join(argv)
    complete = json.loads((run / "COMPLETE").read_text())
    assert complete["provenance"]["world_size"] == 2 and complete["provenance"]["command_line"] == sub[0]["command"]
    # Submitting the finished run again does nothing and says so.
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert len((run / "submissions.jsonl").read_text().splitlines()) == 1


def test_detection_seeds_run_and_aggregate(fakedet_env, capsys):
    argv = ["fakedet", "--cluster", "local", "--gpus", "1", "--seeds", "2", "--wait", "--name", "exp",
            "--config-file", str(fakedet_env), "SOLVER.MAX_ITER", "1"]
    assert main(argv) == 0
    run = fakedet_env.parent / "outputs" / "detection" / "exp"
    for k in (0, 1):
        seen = json.loads((run / f"seed{k}" / "opts.json").read_text())
        assert seen["opts"] == ["SOLVER.MAX_ITER", "1", "SEED", str(k)]
        # both seeds run at once on this machine: each gets its share of the cores, not all of them
        assert seen["torch_threads"] <= max(1, (os.cpu_count() or 1) // 2)
    summary = json.loads((run / "results.json").read_text())
    assert summary["n_seeds"] == 2 and summary["mean"]["bbox"]["AP"] == pytest.approx(10.5)
    assert "Detection: exp" in capsys.readouterr().out  # the aggregated table is printed
    assert main(argv) == 0  # every seed complete: nothing is submitted again
    assert "all 2 seed folders are COMPLETE" in capsys.readouterr().out


@pytest.mark.parametrize("method", sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "method")
                                           .glob("*.yaml") if p.stem != "intl"))
def test_every_registered_method_trains_through_submit_on_two_processes(method, tiny_synthetic, tmp_path, monkeypatch,
                                                                        capsys):
    """Issue 9: `submit pretrain method=<name> --cluster local` for each method beside INTL (INTL: above)."""
    import math

    from common.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    argv = ["pretrain", "--gpus", "2", "--cluster", "local", "--wait", "--name", method, f"method={method}",
            *stage_fixtures.tiny_pretrain_overrides(tiny_synthetic / "classification", steps=2, ckpt_every=2)]
    assert main(argv) == 0
    run = tmp_path / "outputs" / "pretrain" / method
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == 2 and ckpt["config"]["method"]["name"] == method
    summary = json.loads((run / "COMPLETE").read_text())
    assert math.isfinite(summary["final_loss"]) and summary["world_size"] == 2
