"""`submit` under concurrency and interrupts, against real local jobs of the test-only `counter` stage:
simultaneous submits of one run queue exactly one job; SIGINT to `submit --wait` (`kill -INT`, or Ctrl-C in its
terminal) does not orphan its job and prints one line, no traceback."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pty
import re
import select
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
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err  # the job's own tracebacks: in its logs


def _processes_naming(folder: Path) -> list[int]:
    """The pids of the processes whose command line names ``folder`` (a local job's controller and tasks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_ctrl_c_in_the_terminal_stops_the_local_job_with_one_line(counter_env):
    """A real terminal (a pty): Ctrl-C sends SIGINT to the terminal's foreground process group. Before, the
    job's controller and tasks were in that group too: each got the signal and the controller's
    KeyboardInterrupt traceback reached the terminal."""
    run = counter_env / "outputs" / "counter" / "counter"
    folder = run / "submitit"
    master, slave = pty.openpty()

    def controlling_terminal():  # the child leads a new session whose terminal is the pty, as a shell's job
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    import termios

    proc = subprocess.Popen([sys.executable, "-m", "slurm.submit", "counter", "--cluster", "local", "--wait", "--gpus",
                             "2", *LONG_RUN], stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal)
    os.close(slave)
    screen, job = b"", []

    def read(seconds: float) -> None:
        nonlocal screen
        end = time.time() + seconds
        while time.time() < end:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:  # the terminal's last writer is gone
                    return

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (len(job) >= 3 and b"counter: step 3/" in screen):
            read(0.3)
            job = _processes_naming(folder)  # the controller and its 2 tasks
        assert len(job) >= 3, screen.decode(errors="replace")
        os.write(master, b"\x03")  # Ctrl-C, as typed
        while proc.poll() is None and time.time() < deadline:
            read(0.3)
        read(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    left = [pid for pid in job if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    text = screen.decode(errors="replace").replace("\r\n", "\n")
    after = text[text.index("^C"):] if "^C" in text else text
    lines = [ln for ln in after.splitlines() if ln.strip() and ln.strip() != "^C"]
    print(f"Ctrl-C: submit exit {proc.returncode}; {len(job)} job processes before, {len(left)} after; printed after "
          f"the ^C: {lines}")
    assert proc.returncode == 130 and left == []
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert len(lines) == 1 and lines[0].startswith("submit: interrupted: cancelled the local job(s)"), lines
    assert "(stopped, 2 process(es)); `submit counter --cluster local --wait --gpus 2 steps=100000" in lines[0]
