"""`submit` under concurrency and interrupts, against real local jobs of the test-only `counter` stage:
simultaneous submits of one run queue exactly one job; SIGINT to `submit --wait` does not orphan its job."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from slurm.runs import read_submissions
from slurm.submit import main

ROUNDS = 6
SUBMITTERS = 3
LONG_RUN = ["steps=100000", "step_seconds=0.05"]  # runs until stopped


def _submit_after(barrier, argv, out_path) -> None:
    barrier.wait()
    sys.stdout = sys.stderr = open(out_path, "w")  # the parent's capture is not shared with the child
    code = main(argv)
    sys.stdout.flush()
    os._exit(code)


def _stop(pid: int) -> None:
    """Stops a local job started by a test (submitit's controller: SIGINT stops its tasks) and waits."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_simultaneous_submits_of_one_run_queue_exactly_one_job(counter_env):
    ctx = multiprocessing.get_context("fork")  # the children share this process's imports: they start together
    doubled, counts = 0, []
    for k in range(ROUNDS):
        barrier = ctx.Barrier(SUBMITTERS)
        argv = ["counter", "--cluster", "local", f"name=race{k}", *LONG_RUN]
        procs = [ctx.Process(target=_submit_after, args=(barrier, argv, counter_env / f"race{k}_{i}.log"))
                 for i in range(SUBMITTERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        run = counter_env / "outputs" / "counter" / f"race{k}"
        logs = [(counter_env / f"race{k}_{i}.log").read_text() for i in range(SUBMITTERS)]
        records = read_submissions(run)
        deadline = time.time() + 60  # a controller interrupted while it starts its task would orphan the task
        while not (run / "last.pth").exists() and time.time() < deadline:
            time.sleep(0.1)
        # every job queued, recorded or not (an unsafe append can lose a record)
        for pid in {int(m) for text in logs for m in re.findall(r"stop with `kill -INT (\d+)`", text)}:
            _stop(pid)
        queued = sum(p.exitcode == 0 for p in procs)
        refused = sum(p.exitcode == 2 and "already has a job queued or running" in t for p, t in zip(procs, logs))
        counts.append((queued, refused, len(records)))
        doubled += queued > 1 or len(records) > 1
    print(f"race: {ROUNDS} rounds of {SUBMITTERS} simultaneous submits; (queued, refused, records) per round: "
          f"{counts}; rounds with more than one job: {doubled}")
    assert doubled == 0
    assert counts == [(1, SUBMITTERS - 1, 1)] * ROUNDS


def test_sigint_to_submit_wait_cancels_its_local_job(counter_env):
    run = counter_env / "outputs" / "counter" / "counter"
    log = counter_env / "submit.log"  # a file, not a pipe: an orphaned job would hold a pipe open
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "slurm.submit", "counter", "--cluster", "local", "--wait",
                                 *LONG_RUN], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "last.pth").exists() and read_submissions(run)):
            time.sleep(0.2)
        [record] = read_submissions(run)
        [job_pid] = [int(p) for p in record["job_ids"]]
        assert _alive(job_pid), "the counter job should be running before the interrupt"
        proc.send_signal(signal.SIGINT)  # `kill -INT <submit>`: the job's processes do not get it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        deadline = time.time() + 10
        while _alive(job_pid) and time.time() < deadline:
            time.sleep(0.1)
        still_running = _alive(job_pid)
    finally:
        _stop(job_pid)
    err = log.read_text()
    print(f"interrupt: submit exit {proc.returncode}, local job {job_pid} still running: {still_running}")
    assert proc.returncode == 130, err
    assert not still_running, f"the local job {job_pid} kept running after `submit --wait` was interrupted: {err}"
    assert f"cancelled the local job(s) {job_pid} (stopped" in err
