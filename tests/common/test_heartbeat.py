"""common.heartbeat in one process: three ranks' heartbeats on one TCPStore, one of them going silent or failing,
with beats of 0.3 s. (With real processes and the collective timeout: tests/e2e/test_lost_ranks.py; with a node
killed under Slurm: tests/e2e/test_slurm_two_nodes.py.)"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from common import heartbeat
from common.heartbeat import Heartbeat, LostRanksError, naming_lost_ranks

HOST = socket.gethostname()


@pytest.fixture
def beats(monkeypatch):
    monkeypatch.setattr(heartbeat, "BEAT_S", 0.3)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    ranks = [Heartbeat(r, 3, "127.0.0.1", store.port) for r in range(3)]
    yield ranks
    for hb in ranks:
        hb.stop()
    del store


def _silence(hb: Heartbeat) -> None:
    """The process is gone without a word: its beats stop, no end is recorded (SIGKILL, a dead node)."""
    hb._stop.set()
    hb._thread.join()


def test_a_silent_rank_is_named_and_rank_0_warns_at_once(beats, capsys):
    assert beats[0].missing_ranks() == ({}, {})  # all beating
    _silence(beats[2])
    assert beats[0].missing_ranks() == ({2: HOST}, {})
    assert beats[1].missing_ranks() == ({2: HOST}, {})
    err, end = "", time.time() + 30
    while "rank 2" not in err and time.time() < end:  # rank 0's watcher thread, whenever it runs
        time.sleep(0.1)
        err += capsys.readouterr().err
    time.sleep(1)
    err += capsys.readouterr().err
    assert err.count(f"[heartbeat] rank 2 (host {HOST}) has sent no heartbeat for") == 1  # rank 0's watcher, once
    assert "rank 1" not in err


def test_the_rank_that_failed_first_is_named_with_its_error(beats, capsys):
    beats[2].end("ValueError: a bad batch")
    beats[1].end("RuntimeError: Connection closed by peer")  # an echo, later
    assert beats[0].missing_ranks() == ({}, {2: f"{HOST}: ValueError: a bad batch"})
    beats[0].end(None)  # a rank that finished is neither silent nor failed, and gets no warning
    _silence(beats[0])
    assert beats[1].missing_ranks()[0] == {}
    assert "no heartbeat" not in capsys.readouterr().err


def test_naming_lost_ranks_turns_a_collective_error_into_one_naming_the_rank(beats, monkeypatch):
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(heartbeat, "_CURRENT", beats[0])
        _silence(beats[2])
        with pytest.raises(LostRanksError, match=rf"rank 0 \(host {HOST}\) stopped: rank 2 \(host {HOST}\) stopped "
                                                 r"answering .*The failed operation here: RuntimeError: Timed out"):
            with naming_lost_ranks():
                raise RuntimeError("Timed out waiting 6000ms for recv operation to complete")
        with pytest.raises(KeyError):  # not a collective's failure: this rank's own error, at once and unchanged
            with naming_lost_ranks():
                raise KeyError("mine")
    finally:
        dist.destroy_process_group()
