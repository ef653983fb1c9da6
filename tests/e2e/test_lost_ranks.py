"""A collective that fails because another rank is gone names that rank (common.heartbeat), on local processes.

Two gloo processes do an all_reduce per step inside ``naming_lost_ranks()`` (as every task of ``submit`` does,
slurm/jobs.py), with a collective timeout of 0.05 min (3 s). Then rank 1 is stopped (SIGSTOP: its sockets stay
open and nothing tells rank 0, which is what a node that vanishes from the network looks like): rank 0 gives up
at the collective timeout, not gloo's 30-minute default, and names rank 1. The naming logic on its own (a rank
that failed with its own error, rank 0's early warning): tests/common/test_heartbeat.py; the two-node Slurm
version (a node killed): tests/e2e/test_slurm_two_nodes.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from stage_fixtures import free_port


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), INTL_COLLECTIVE_TIMEOUT_MIN="0.05")
    import torch
    import torch.distributed as dist

    from common.distributed import init_distributed
    from common.heartbeat import naming_lost_ranks

    torch.set_num_threads(1)
    init_distributed()
    try:
        with naming_lost_ranks():
            for step in range(10_000):
                t = torch.ones(4)
                dist.all_reduce(t)
                assert t[0].item() == 2
                if rank == 1 and step == 3:
                    Path(f"{out}.stopping").write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGSTOP)
                time.sleep(0.05)
    except Exception as e:  # noqa: BLE001 - what each rank ended with is the test's subject
        Path(f"{out}.rank{rank}").write_text(f"{type(e).__name__}: {e}")
        raise


def test_a_silent_rank_is_named_after_the_collective_timeout(tmp_path):
    ctx = mp.get_context("spawn")
    port, out = free_port(), str(tmp_path / "run")
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=120)
        assert procs[0].exitcode == 1, "rank 0 hung past the collective timeout"
    finally:
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
                p.join()
    ended = Path(f"{out}.rank0").read_text()
    assert ended.startswith("LostRanksError: rank 0 (host ") and "stopped: rank 1 (host " in ended, ended
    assert "stopped answering (no heartbeat for 6 s" in ended, ended
    assert "Timed out waiting 3000ms" in ended, ended  # INTL_COLLECTIVE_TIMEOUT_MIN=0.05, not 30 min
    assert not Path(f"{out}.rank1").exists()  # rank 1 never ended by itself: stopped, then killed here
    print(ended)
