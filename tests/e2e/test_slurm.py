"""`submit` against a real single-node Slurm on localhost (slurm/localhost/up.sh), started once per pytest
session by the ``localhost_slurm`` fixture of tests/e2e/conftest.py.

The fixture installs the Debian packages when they are missing (apt, as root), starts munged,
MariaDB + slurmdbd, slurmctld and slurmd in a private folder with two fake GPUs, and tears everything
down at the end. Measured here: install about 13 s, start about 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import stage_fixtures
from slurm import stages
from slurm.submit import main
from stage_fixtures import wait_for_step

pytestmark = pytest.mark.slurm

TESTS = Path(__file__).resolve().parents[1]  # tests/: stage_fixtures lives there
ROOT = TESTS.parent


@pytest.fixture
def counter_env(localhost_slurm, tmp_path, monkeypatch):
    cfg_dir = stage_fixtures.write_counter_config(tmp_path / "cfgs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, stage_fixtures.extra_stages_env(cfg_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    return tmp_path / "outputs" / "counter" / "counter"


def _job_id(run: Path) -> str:
    return json.loads((run / "submissions.jsonl").read_text().splitlines()[-1])["job_ids"][0]


def test_two_tasks_requeued_after_a_timeout_signal_resume(localhost_slurm, counter_env, capsys):
    """2 tasks x 2 fake GPUs through sbatch, interrupted by the signal Slurm sends (`--signal=USR2@<delay>`)
    before the time limit: submitit calls the job's checkpoint() and requeues it. (Preemption, where Slurm
    itself requeues the job, is tested with the real pretraining below.)"""
    run = counter_env
    # Refused before anything is queued: more GPUs than the node has, an unknown partition.
    assert main(["counter", "--cluster", "slurm", "--gpus", "4"]) == 2
    assert "offer at most 2 GPU" in capsys.readouterr().err
    assert main(["counter", "--cluster", "slurm", "--gpus", "2", "--partition", "nope"]) == 2
    assert "Slurm has no partition 'nope'" in capsys.readouterr().err
    assert not run.exists()

    argv = ["counter", "--cluster", "slurm", "--gpus", "2", "--time", "10", "steps=10", "step_seconds=0.4"]
    assert main(argv) == 0
    job = _job_id(run)
    reached = wait_for_step(run, 2)
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "gres/gpu=2" in shown and "NumTasks=2" in shown, shown  # the allocation Slurm made
    script = next((run / "submitit").glob("*.sh")).read_text()
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --ntasks-per-node=2" in script

    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    capsys.readouterr()
    # The same command with --wait attaches to the queued job instead of submitting another.
    assert main(argv + ["--wait"]) == 0
    out = capsys.readouterr().out
    assert "waiting for them instead of submitting another" in out and "rank 0 of world size 2" in out
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 10 and results["world_size"] == 2
    assert results["resumed_from"] >= reached  # resumed from its checkpoint, not from scratch
    log = (run / "submitit" / f"{job}_0_log.out").read_text()
    assert f"counter: resumed from step {results['resumed_from']}" in log and "counter: step 10/10" in log
    assert "Calling checkpoint method" in log and "time-out or preemption signal; requeueing" in log
    assert torch.load(run / "last.pth")["step"] == 10
    envs = [json.loads((run / f"env_rank{r}.json").read_text()) for r in (0, 1)]
    assert {e["RANK"] for e in envs} == {"0", "1"} and all(e["WORLD_SIZE"] == "2" for e in envs)
    assert all(e["SLURM_NTASKS"] == "2" and e["SLURM_JOB_ID"] == job and e["SLURM_RESTART_COUNT"] == "1"
               for e in envs)
    if all((localhost_slurm / "dev" / f"nvidia{i}").is_char_device() for i in (0, 1)):
        assert all(e["CUDA_VISIBLE_DEVICES"] for e in envs)  # the fake gres was bound to the tasks
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in shown and "Restarts=1" in shown, shown  # --wait returned once Slurm was done
    tres = subprocess.run(["sacct", "-j", job, "-n", "-X", "-o", "AllocTRES%80"], capture_output=True,
                          text=True).stdout
    assert "gres/gpu=2" in tres, tres  # and what accounting recorded
    # Finished: the same command again does nothing and says so.
    assert main(argv + ["--wait"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_pretrain_through_sbatch_preempted_resumes_to_the_same_step(localhost_slurm, tiny_synthetic, tmp_path,
                                                                    monkeypatch, capsys):
    """The real pretraining stage, 2 tasks x 2 GPU slots via sbatch; Slurm requeues it mid-run (as on
    preemption) and it resumes from last.pth to the same final step count."""
    from common.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    # Slurm's requeue sends SIGTERM and kills the tasks only KillWait (5 s on the localhost cluster) later;
    # submitit lets the tasks run on through SIGTERM, so the run must have clearly more than 5 s of steps
    # (about 1 s each here) left when it is requeued, or it finishes before the kill (seen with 6 steps).
    steps = 16
    argv = ["pretrain", "--nodes", "1", "--gpus", "2", "--cluster", "slurm", "--time", "15", "--name", "tiny",
            *stage_fixtures.tiny_pretrain_overrides(tiny_synthetic / "classification", steps=steps, ckpt_every=1)]
    assert main(argv) == 0
    run = tmp_path / "outputs" / "pretrain" / "tiny"
    job = _job_id(run)
    reached = wait_for_step(run, 2, timeout=150)
    assert reached <= steps - 10, "the run got too close to its end before it could be interrupted"
    subprocess.run(["scontrol", "requeue", job], check=True)
    capsys.readouterr()
    assert main(argv + ["--wait"]) == 0
    log = (run / "submitit" / f"{job}_0_log.out").read_text()
    assert "rank 0 of world size 2" in log and "restart 1" in log
    assert "resuming from step" in log
    resumed = int(log.split("resuming from step")[1].split()[0])
    assert reached <= resumed < steps
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == steps and ckpt["finished"] is True
    script = next((run / "submitit").glob("*.sh")).read_text()
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --ntasks-per-node=2" in script


def test_pretrain_time_out_signal_checkpoints_at_that_step_and_resumes_there(localhost_slurm, tiny_synthetic,
                                                                             tmp_path, monkeypatch, capsys):
    """`scancel --signal=USR2` (what Slurm's `--signal=USR2@<delay>` sends before the time limit) mid-epoch, with
    no periodic checkpoint: last.pth is written at the next step boundary, submitit requeues, and the job resumes
    at exactly that step; its losses equal those of the same run as local processes, never interrupted."""
    from common.runlog import read_metrics

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    steps, per_epoch = 10, 7  # 120 tiny images / batch 16
    overrides = stage_fixtures.tiny_pretrain_overrides(tiny_synthetic / "classification", steps=steps,
                                                       ckpt_every=1000)
    losses = {}
    for name in ("uninterrupted", "signalled"):
        losses[name] = lambda name=name: {r["step"]: r["loss"] for r in read_metrics(
            tmp_path / "outputs" / "pretrain" / name) if "loss" in r}
    t0 = time.time()
    assert main(["pretrain", "--gpus", "2", "--cluster", "local", "--name", "uninterrupted", "--wait", *overrides]) == 0
    want = losses["uninterrupted"]()
    assert sorted(want) == list(range(1, steps + 1))

    argv = ["pretrain", "--nodes", "1", "--gpus", "2", "--cluster", "slurm", "--time", "15", "--name", "signalled",
            *overrides]
    assert main(argv) == 0
    run = tmp_path / "outputs" / "pretrain" / "signalled"
    job = _job_id(run)
    end = time.time() + 150
    while max(losses["signalled"](), default=0) < 2:
        assert time.time() < end, "the job logged no step 2 in 150 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    capsys.readouterr()
    assert main(argv + ["--wait"]) == 0
    log = (run / "submitit" / f"{job}_0_log.out").read_text()
    assert "time-out signal (SIGUSR2) at step " in log, log[-3000:]
    stop = int(log.split("time-out signal (SIGUSR2) at step ")[1].split(":")[0])
    assert 2 <= stop < steps and stop % per_epoch != 0, stop  # mid-epoch: no epoch-end checkpoint there
    assert "Calling checkpoint method" in log and "restart 1" in log
    assert log.count("resuming from step") == 1 and f"resuming from step {stop} " in log
    assert losses["signalled"]() == want  # every row, before and after the requeue, bit for bit
    print(f"USR2 after step 2 was logged: checkpoint at step {stop}, requeued, resumed at step {stop}; "
          f"{steps} losses equal to the local uninterrupted run's; {time.time() - t0:.1f} s")


def test_example_sbatch_script_runs_a_stage_without_the_cli(counter_env, tmp_path):
    """slurm/examples/pretrain.sbatch (plain sbatch + srun + python -m slurm.run_stage), resources overridden
    on the sbatch command line to fit the localhost node."""
    import sys

    script = ROOT / "slurm" / "examples" / "pretrain.sbatch"
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1])}
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--ntasks-per-node=2",
                           "--gpus-per-node=2", "--cpus-per-task=1", "--mem-per-gpu=1G", "--time=5",
                           f"--output={tmp_path}/ex-%j.out", str(script), "counter", "steps=2", "step_seconds=0.1"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    end = time.time() + 120  # (sbatch --wait polls too slowly: up to 30 s late)
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < end, "the example job did not finish in 120 s"
        time.sleep(0.5)
    out = (tmp_path / f"ex-{job}.out").read_text()
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state, state + out
    assert "job " in out and ": counter on 1 node(s), 2 task(s)" in out
    assert "rank 0 of world size 2" in out and "rank 1 of world size 2" in out and "counter: step 2/2" in out
    assert json.loads((counter_env / "results.json").read_text())["world_size"] == 2


def test_wait_reports_a_job_killed_without_results(counter_env, capsys):
    import submitit

    from slurm.submit import wait_for

    run = counter_env
    assert main(["counter", "--cluster", "slurm", "--gpus", "2", "--time", "10", "steps=60", "step_seconds=0.5"]) == 0
    job = _job_id(run)
    wait_for_step(run, 1)
    subprocess.run(["scancel", job], check=True)
    assert wait_for([submitit.SlurmJob(folder=run / "submitit", job_id=job, tasks=[0, 1])]) == 1
    err = capsys.readouterr().err
    assert f"job {job} FAILED" in err and "ended without a result" in err
