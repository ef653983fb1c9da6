"""End-to-end tests: they train, convert and evaluate for real (a few minutes on 2 CPU cores). Every
test in this folder is marked ``slow`` here, once (``make test-fast`` leaves them out); the ones that need
the localhost Slurm are marked ``slurm`` in their own files."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "slurm" / "localhost" / "up.sh"
DOWN = ROOT / "slurm" / "localhost" / "down.sh"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in item.path.as_posix():
            item.add_marker(pytest.mark.slow)


SLURM_NODES = 2  # the tests' cluster: two nodes (slurm/localhost/up.sh --nodes 2); 1-node jobs run on either


@pytest.fixture(scope="session")
def localhost_slurm():
    """One localhost Slurm for the whole session (every test file that needs it shares this bring-up): two nodes,
    each slurmd in its own network namespace with its own address and host name, 2 fake GPUs per node
    (``DIR/nodes.env`` names them). Yields the cluster folder; SLURM_CONF points at it meanwhile."""
    if os.geteuid() != 0:
        pytest.skip("the localhost Slurm cluster runs its daemons as root; run the suite as root (CI does)")
    folder = Path(tempfile.mkdtemp(prefix="intl-slurm-", dir="/tmp"))
    t0 = time.time()
    proc = subprocess.run(["bash", str(UP), "--install", "--nodes", str(SLURM_NODES), str(folder)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p}\n" + p.read_text()[-2000:] for p in sorted((folder / "log").glob("*.log")))
        subprocess.run(["bash", str(DOWN), "--purge", str(folder)], capture_output=True, timeout=120)
        pytest.fail(f"slurm/localhost/up.sh failed:\n{proc.stdout}\n{proc.stderr}{logs}")
    print(f"\nlocalhost Slurm up in {time.time() - t0:.1f} s: {proc.stdout.strip().splitlines()[-1]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "etc" / "slurm.conf")
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(["bash", str(DOWN), "--purge", str(folder)], capture_output=True, timeout=180)


@pytest.fixture(autouse=True)
def _no_slurm_jobs_left(request):
    """A Slurm test that fails (or stops waiting) leaves its jobs running on the session's cluster, where they
    would take the cores and GPU slots of the next tests: after every test that used the cluster, its jobs
    are cancelled and their end awaited."""
    yield
    if "localhost_slurm" not in request.fixturenames:
        return
    env = {**os.environ, "SLURM_CONF": str(request.getfixturevalue("localhost_slurm") / "etc" / "slurm.conf")}

    def queued():
        proc = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env, timeout=60)
        return proc.stdout.split()

    left = queued()
    if not left:
        return
    subprocess.run(["scancel", *left], capture_output=True, env=env, timeout=60)
    deadline = time.time() + 120
    while queued() and time.time() < deadline:
        time.sleep(1)
    print(f"\n{request.node.name}: cancelled the Slurm job(s) it left: {' '.join(left)}"
          + (f"; still queued after 120 s: {' '.join(queued())}" if queued() else ""))
