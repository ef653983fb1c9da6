"""`submit` across two Slurm nodes on this machine (slurm/localhost/up.sh --nodes 2: each slurmd in its own
network, UTS and mount namespace with its own address on a private bridge), started once per session by the
``localhost_slurm`` fixture of tests/e2e/conftest.py.

- world size 4 over 2 nodes x 2 GPU slots: the pretraining's losses equal one process on the concatenated
  batch (float64, as tests/e2e/test_engine_distributed.py), only global rank 0 writes the run folder (the
  second node sees it read-only, except submitit's own log folder, and every file in it is accounted for),
  and a requeue mid-run (`scontrol requeue`) resumes on both nodes;
- a node killed mid-run (link cut, slurmd and its processes SIGKILLed): the survivors stop at the collective
  timeout with an error naming the lost ranks, Slurm requeues the job, and it resumes when the node is back;
- `submit doctor` on both nodes, one of them without the data.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import stage_fixtures
from slurm.submit import main

pytestmark = pytest.mark.slurm

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
NODE_SH = ROOT / "slurm" / "localhost" / "node.sh"


def _nodes(cluster: Path) -> list[str]:
    env = dict(line.split("=", 1) for line in (cluster / "nodes.env").read_text().splitlines() if "=" in line)
    return env["NODES"].strip("'\"").split()


def _job_id(run: Path) -> str:
    return json.loads((run / "submissions.jsonl").read_text().splitlines()[-1])["job_ids"][0]


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def _in_node(cluster: Path, node: str, *cmd: str) -> None:
    """Runs ``cmd`` in the node's mount namespace (that of its slurmd, which its job steps inherit)."""
    pid = (cluster / "run" / f"slurmd-{node}.pid").read_text().strip()
    subprocess.run(["nsenter", "-t", pid, "-m", "--", *cmd], check=True, capture_output=True, text=True)


@contextmanager
def _node_held(node: str):
    """A drained node takes no job: a two-node job pends until the block ends."""
    _scontrol("update", f"NodeName={node}", "State=DRAIN", "Reason=test set-up")
    try:
        yield
    finally:
        _scontrol("update", f"NodeName={node}", "State=RESUME")


def _wait_for(what: str, check, timeout: float = 180, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _steps_logged(run: Path) -> int:
    from common.runlog import read_metrics

    try:
        return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0)
    except OSError:
        return 0


def test_two_nodes_equal_one_process_only_rank0_writes_and_a_requeue_resumes_on_both(
        localhost_slurm, tiny_synthetic, tmp_path, monkeypatch, capsys):
    import torch

    from common.checkpoint import load_checkpoint
    from common.config import compose_config
    from common.runlog import read_metrics
    from pretrain.train import run as pretrain_run

    n1, n2 = _nodes(localhost_slurm)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    t0 = time.time()
    # float64 (as the 2-process engine test): one process on the concatenated batch must give the same numbers.
    steps = 12
    overrides = [*stage_fixtures.tiny_pretrain_overrides(tiny_synthetic / "classification", steps=steps, ckpt_every=1),
                 "++data.augment.views=[{size:16,min_scale:0.5},{size:16,min_scale:0.5}]", "train.dtype=float64",
                 "train.online_probe=false", "train.knn_every=0"]
    pretrain_run(compose_config("pretrain", [*overrides, f"run_dir={tmp_path / 'one'}"]))
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r}
    assert sorted(want) == list(range(1, steps + 1))
    t_one = time.time() - t0

    argv = ["pretrain", "--nodes", "2", "--gpus", "2", "--cluster", "slurm", "--time", "15", "--name", "two",
            *overrides]
    run = tmp_path / "outputs" / "pretrain" / "two"
    mounted = False
    try:
        with _node_held(n2):  # queued, not started, until the second node sees the run folder read-only
            assert main(argv) == 0
            job = _job_id(run)
            # On the second node the run folder is read-only, except submitit/ (each task's log and result):
            # a write by rank 2 or 3 (node 2's local ranks 0 and 1) anywhere else fails the job.
            _in_node(localhost_slurm, n2, "sh", "-c", f"mount --bind {run}/submitit {run}/submitit && "
                     f"mount --rbind {run} {run} && mount -o remount,bind,ro {run}")
            mounted = True
        reached = _wait_for("the two-node job logged step 2", lambda: _steps_logged(run) >= 2 and _steps_logged(run))
        assert reached <= steps - 6, "the run got too close to its end before it could be requeued"
        _scontrol("requeue", job)
        capsys.readouterr()
        assert main(argv + ["--wait"]) == 0
    finally:
        if mounted:
            _in_node(localhost_slurm, n2, "sh", "-c", f"umount -R {run}; umount {run}/submitit")
    out = capsys.readouterr().out

    # World size 4 across both nodes, in both attempts, rank 0 on the first node.
    logs = {r: (run / "submitit" / f"{job}_{r}_log.out").read_text() for r in range(4)}
    for r, host in ((0, n1), (1, n1), (2, n2), (3, n2)):
        for restart in (0, 1):
            line = f"[submit] {host}: rank {r} of world size 4 (local rank {r % 2} of 2), rendezvous {n1}:"
            said = "this rank writes the outputs" if r == 0 else "no outputs from this rank (rank 0 writes them)"
            assert re.search(re.escape(line) + r"\d+, restart " + str(restart) + "; " + re.escape(said), logs[r]), \
                (r, restart, logs[r][-2000:])
    assert "world size 4, global batch 16 (4 per process)" in logs[0]
    resumed = int(logs[0].split("resuming from step")[1].split()[0])
    assert reached <= resumed < steps
    assert "already complete" not in out and f"job {job} finished" in out

    # The losses of the world-4 run, before and after the requeue, equal the single process's (as logged: float32
    # roundings of float64 values), and so do the float64 weights and batch-norm statistics of the final checkpoints.
    got = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(got) == list(range(1, steps + 1))
    assert got == pytest.approx(want, rel=1e-6, abs=0), (got, want)
    one, two = (load_checkpoint(folder / "last.pth")["model"] for folder in (tmp_path / "one", run))
    assert one.keys() == two.keys()
    worst = 0.0
    for key, a in one.items():
        if not a.is_floating_point():
            assert torch.equal(a, two[key]), key
            continue
        assert a.dtype == torch.float64, key
        err = ((a - two[key]).abs().max() / a.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-7, (key, err)
        worst = max(worst, err)
    summary = json.loads((run / "COMPLETE").read_text())
    assert summary["world_size"] == 4 and summary["global_batch"] == 16 and summary["steps"] == steps

    # Only global rank 0 wrote: every file of the run folder is accounted for, TensorBoard's event files (one per
    # attempt, named after the writing host) come from the first node, provenance.json has rank 0's host.
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.parent.name != "submitit")
    events = [f for f in files if f.startswith("tb/")]
    assert [f for f in files if not f.startswith("tb/")] == sorted([
        ".submit.lock", "COMPLETE", "config.yaml", "last.pth", "last.prev.pth", "loss.png", "metrics.jsonl",
        "provenance.json", "spectrum.png", "spectrum_topk.png", "submissions.jsonl"]), files
    assert len(events) == 2 and all(f".{n1}." in f for f in events), events
    attempts = json.loads((run / "provenance.json").read_text())["attempts"]
    assert [a["hardware"]["hostname"] for a in attempts] == [n1, n1], attempts
    assert all(a["world_size"] == 4 for a in attempts), attempts
    task_files = sorted(p.name for p in (run / "submitit").iterdir())
    assert {f"{job}_{r}_log.out" for r in range(4)} <= set(task_files)
    print(f"two nodes x 2: {steps} losses equal to 1 process's, weights too (worst relative difference {worst:.1e}); "
          f"requeued at "
          f"step {reached}, resumed at {resumed} on {n1} + {n2}; node 2 saw the run folder read-only; "
          f"1 process {t_one:.0f} s, the two-node job {time.time() - t0 - t_one:.0f} s")


@pytest.fixture
def counter_run(localhost_slurm, counter_env, monkeypatch):
    """The test-only `counter` stage registered (tests/conftest.py counter_env); its run folder."""
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    return counter_env / "outputs" / "counter" / "counter"


def test_a_killed_node_is_named_by_the_survivors_and_the_job_resumes_when_it_is_back(localhost_slurm, counter_run,
                                                                                     capsys):
    """The second node dies (its link cut first, so no socket of it ever closes: the survivors learn nothing from
    the network and must give up at the collective timeout, 6 s here), then its slurmd and processes are
    SIGKILLed. Rank 0's log names the lost ranks; Slurm marks the node down and requeues the job; when the node
    is back, the job resumes from its checkpoint on both nodes."""
    n1, n2 = _nodes(localhost_slurm)
    run = counter_run
    t0 = time.time()
    argv = ["counter", "--nodes", "2", "--gpus", "2", "--cluster", "slurm", "--time", "10",
            "--collective-timeout", "0.1", "steps=20", "step_seconds=0.25"]
    assert main(argv) == 0
    job = _job_id(run)
    log0 = run / "submitit" / f"{job}_0_log.err"

    def step() -> int:
        import torch

        try:
            return int(torch.load(run / "last.pth")["step"])
        except (FileNotFoundError, EOFError, RuntimeError):
            return 0

    reached = _wait_for("the job reached step 3", lambda: step() >= 3 and step())
    try:
        subprocess.run(["bash", str(NODE_SH), str(localhost_slurm), "kill", n2], check=True, capture_output=True)
        t_kill = time.time()
        message = _wait_for("rank 0 named the lost ranks", lambda: log0.exists() and re.search(
            r"LostRanksError: rank 0 \(host \S+\) stopped: .*", log0.read_text()), timeout=120)
        t_named = time.time()
        state = _wait_for("Slurm requeued or ended the job", lambda: (lambda s: s if re.search(
            r"Restarts=1|JobState=(FAILED|NODE_FAIL)", s) else None)(_scontrol("show", "job", job)), timeout=120)
    finally:
        subprocess.run(["bash", str(NODE_SH), str(localhost_slurm), "start", n2], check=True, capture_output=True)
    text = message.group(0)
    assert f"rank 0 (host {n1}) stopped: ranks 2, 3 (host {n2}) stopped answering" in text, text
    err = log0.read_text()
    assert f"[heartbeat] rank 2 (host {n2}) has sent no heartbeat" in err  # rank 0 told before the timeout ran out
    err1 = (run / "submitit" / f"{job}_1_log.err").read_text()
    assert f"LostRanksError: rank 1 (host {n1}) stopped: ranks 2, 3 (host {n2}) stopped answering" in err1
    # The survivor that waited on node 2 gave up at the collective timeout (0.1 min), not gloo's 30 min default
    # (the other one may stop first on its peer's exit: "Connection closed by peer").
    assert "Timed out waiting 6000ms" in err + err1
    assert "Restarts=1" in state, state  # Slurm requeued the job (node failure; the batch script has --requeue)

    capsys.readouterr()
    assert main(argv + ["--wait"]) == 0  # the node is back: the requeued job runs again and finishes
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 4 and results["steps"] == 20 and results["resumed_from"] >= reached
    log2 = (run / "submitit" / f"{job}_2_log.out").read_text()
    assert f"[submit] {n2}: rank 2 of world size 4 (local rank 0 of 2), rendezvous {n1}:" in log2
    assert re.search(r"restart 1\b", log2) and f"counter: resumed from step {results['resumed_from']}" in \
        (run / "submitit" / f"{job}_0_log.out").read_text()
    print(f"node {n2} killed at step {reached}: lost ranks named {t_named - t_kill:.0f} s later "
          f"(collective timeout 6 s + 6 s heartbeat check); requeued, resumed from step {results['resumed_from']} "
          f"when the node was back; {time.time() - t0:.0f} s in all")


def test_doctor_on_two_nodes_finds_the_node_without_the_data(localhost_slurm, tiny_synthetic, tmp_path, monkeypatch,
                                                             capsys):
    """`submit doctor --nodes 2 --gpus 2`: every rank meets, the all_reduce / all_gather values are right, the run
    folder is shared; the data folder is hidden on the second node (an empty file system mounted over it there),
    which the table shows and the job's failure names."""
    n1, n2 = _nodes(localhost_slurm)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
    data = tiny_synthetic / "classification"
    _in_node(localhost_slurm, n2, "mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(data))
    try:
        status = main(["doctor", "--nodes", "2", "--gpus", "2", "--cluster", "slurm", "--wait", "--name", "check",
                       "--env", "GLOO_SOCKET_IFNAME=eth0", f"data.root={data}", "disk.min_free_gb=0.1"])
    finally:
        _in_node(localhost_slurm, n2, "umount", str(data))
    captured = capsys.readouterr()
    assert status == 1
    report = (tmp_path / "outputs" / "doctor" / "check" / "doctor.md").read_text()
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d) \| .*$", report, re.M)}
    assert sorted(rows) == [0, 1, 2, 3], report
    for r in range(4):
        host, local = (n1, r) if r < 2 else (n2, r - 2)
        assert f"| {r} | {host} | {local}/2 | cpu | " in rows[r], rows[r]
        assert "| ok (" in rows[r] and "| ok |" in rows[r], rows[r]  # all_reduce, all_gather
        assert "| shared | GLOO_SOCKET_IFNAME=eth0 |" in rows[r], rows[r]
        assert (" files, " in rows[r]) == (r < 2) and ("FAILED: no file under" in rows[r]) == (r >= 2), rows[r]
    assert "doctor: 4 rank(s) on 2 host(s), backend gloo" in report
    assert f"ranks 2, 3 ({n2}): data.root unreadable: no file under {data}" in captured.err, captured.err
    assert "| 2 | " in captured.out  # the table is in the streamed rank-0 log
    print(report)
