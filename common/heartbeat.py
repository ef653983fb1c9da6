"""Which ranks are still there: a heartbeat of every process through the rendezvous store.

A collective that waits for a rank that is gone fails only after the collective timeout, and with a
message about a socket (gloo: "Connection closed by peer [10.0.0.12]:...", "Timed out waiting 1800000ms
for recv operation"), never naming the rank. So every process of a job started by ``init_distributed``
runs a ``Heartbeat``: a daemon thread that bumps a counter of its own in the rendezvous store (the TCPStore
that rank 0 serves at ``MASTER_ADDR:MASTER_PORT``) every ``BEAT_S`` seconds, and records how the process
ended (``finished``, or ``failed`` with its error and the time; nothing when it was killed or its node went
away).

- Rank 0's thread also watches the others: a rank whose counter stops for ``MISSED`` beats without an
  ending recorded gets one warning line in rank 0's log at once (before any collective times out; also
  where the NCCL watchdog would end the process without a Python exception).
- ``naming_lost_ranks()`` wraps a stage's run (``slurm.jobs``): when it raises while the process group is up,
  the counters are read twice, ``MISSED`` beats apart, and the error is re-raised as ``LostRanksError``
  naming the ranks (and their hosts) that are gone, or else the rank that failed first and its error (the
  others' errors are its echoes); when every rank is alive and well, the original error goes on unchanged.

Keys (under ``intl/heartbeat/``): ``beat/<rank>`` (counter), ``host/<rank>``, ``end/<rank>`` (JSON).
"""

from __future__ import annotations

import atexit
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch.distributed as dist

from common.errors import UserError

BEAT_S = 2.0
MISSED = 3  # beats without news before a rank counts as gone
PREFIX = "intl/heartbeat/"
STORE_TIMEOUT_S = 10.0


class LostRanksError(RuntimeError):
    """A collective failed because other ranks are gone (killed, node down or unreachable) or failed."""


def _key(kind: str, rank: int) -> str:
    return f"{PREFIX}{kind}/{rank}"


def _connect(host: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                         wait_for_workers=False)


def _text(store: dist.TCPStore, key: str) -> str | None:
    return store.get(key).decode(errors="replace") if store.check([key]) else None


class Heartbeat:
    """This process's heartbeat (see the module docstring); ``stop()`` ends it."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int):
        self.rank, self.world_size = rank, world_size
        self.addr, self.port = master_addr, int(master_port)
        self.host = socket.gethostname()
        self._store = _connect(self.addr, self.port)
        self._store.set(_key("host", rank), self.host)
        self._store.add(_key("beat", rank), 1)
        self._lock = threading.Lock()  # the thread's store connection, shared with end()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="intl-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.end, None)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        last: dict[int, tuple[int, float]] = {}  # rank 0: rank -> (count, when it last changed)
        warned: set[int] = set()
        failures = 0
        while not self._stop.wait(BEAT_S):
            try:
                with self._lock:
                    self._store.add(_key("beat", self.rank), 1)
                    if self.rank == 0:
                        self._watch(last, warned)
                failures = 0
            except Exception:  # noqa: BLE001 - a slow store once; three times in a row: it is gone (rank 0 ended)
                failures += 1
                if failures >= 3:
                    return

    def _watch(self, last: dict[int, tuple[int, float]], warned: set[int]) -> None:
        now = time.monotonic()
        for r in range(1, self.world_size):
            count = self._store.add(_key("beat", r), 0)
            if r not in last or last[r][0] != count:
                last[r] = (count, now)
                continue
            if r in warned or now - last[r][1] < MISSED * BEAT_S or self._store.check([_key("end", r)]):
                continue
            warned.add(r)
            host = _text(self._store, _key("host", r)) or "?"
            print(f"[heartbeat] rank {r} (host {host}) has sent no heartbeat for {now - last[r][1]:.0f} s and "
                  "recorded no end: its process was killed or its node is down or unreachable; collectives "
                  "waiting for it fail when the collective timeout runs out", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ endings
    def end(self, error: str | None) -> None:
        """Records how this process ends: finished (``error`` None) or failed with ``error``; the first record
        stays."""
        record = {"failed": error is not None, "error": (error or "")[:500], "time": time.time()}
        try:
            with self._lock:
                self._store.set_timeout(timedelta(seconds=3))
                if not self._store.check([_key("end", self.rank)]):  # (compare_set on a missing key crashes torch 2.3)
                    self._store.set(_key("end", self.rank), json.dumps(record))
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass

    def stop(self) -> None:
        """The process leaves the group in order (common.distributed.cleanup): ``finished``, no more beats."""
        self.end(None)
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)
        atexit.unregister(self.end)

    # ------------------------------------------------------------------ after a failure
    def missing_ranks(self) -> tuple[dict[int, str], dict[int, str]]:
        """({rank: host} of the ranks gone silent, {rank: "host: its error"} of the rank(s) that failed first),
        read from the store over ``MISSED`` beats. A store that cannot be reached means rank 0 is gone."""
        try:
            store = _connect(self.addr, self.port)
            ranks = [r for r in range(self.world_size) if r != self.rank]
            before = {r: store.add(_key("beat", r), 0) for r in ranks}
            time.sleep(MISSED * BEAT_S)
            after = {r: store.add(_key("beat", r), 0) for r in ranks}
            hosts = {r: _text(store, _key("host", r)) or "?" for r in range(self.world_size)}
            ends = {r: _text(store, _key("end", r)) for r in range(self.world_size)}  # this rank's too
        except Exception:  # noqa: BLE001 - rank 0's process (the store) is gone with its node or on its own
            return {0: f"{self.addr}, the rendezvous store, which no longer answers"}, {}
        silent = {r: hosts[r] for r in ranks if after[r] == before[r] and not ends[r]}
        records = {r: json.loads(end) for r, end in ends.items() if end}
        failed = {r: rec for r, rec in records.items() if rec.get("failed")}
        first = min((rec["time"] for rec in failed.values()), default=None)
        return silent, {r: f"{hosts[r]}: {rec['error']}" for r, rec in failed.items() if rec["time"] == first}


_CURRENT: Heartbeat | None = None


def start(rank: int, world_size: int, master_addr: str, master_port: int) -> Heartbeat | None:
    """Starts this process's heartbeat (once); None when the store cannot be reached (then no naming)."""
    global _CURRENT
    if _CURRENT is None:
        try:
            _CURRENT = Heartbeat(rank, world_size, master_addr, master_port)
        except Exception as e:  # noqa: BLE001 - a missing heartbeat must not stop a job that can run
            print(f"[heartbeat] not started ({type(e).__name__}: {e}); a lost rank will not be named",
                  file=sys.stderr, flush=True)
    return _CURRENT


def stop() -> None:
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.stop()
        _CURRENT = None


def _ranks(ranks: dict[int, str]) -> str:
    by_host: dict[str, list[int]] = {}
    for r, host in sorted(ranks.items()):
        by_host.setdefault(host, []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} (host {h})"
                     for h, rs in by_host.items())


@contextmanager
def naming_lost_ranks() -> Iterator[None]:
    """Re-raises an error of the wrapped code as ``LostRanksError`` when other ranks are gone or failed (see the
    module docstring); records this process's own ending for the others."""
    try:
        yield
    except Exception as e:
        hb = _CURRENT
        first = (str(e).strip().splitlines() or [""])[0]
        if hb is not None:
            hb.end(f"{type(e).__name__}: {first}")
        # Collective failures are RuntimeErrors (gloo's, torch.distributed.DistError); another exception, or a
        # UserError, is this rank's own: it goes on at once (the others then name this rank).
        if hb is None or not isinstance(e, RuntimeError) or isinstance(e, UserError) or not dist.is_initialized():
            raise
        print(f"[heartbeat] rank {hb.rank}: {type(e).__name__}: {first}; checking which ranks are still there "
              f"({MISSED * BEAT_S:.0f} s)", file=sys.stderr, flush=True)
        silent, failed = hb.missing_ranks()
        if not silent and not failed:
            raise
        if silent:  # the cause; the other survivors' errors are its echoes
            why = (f"{_ranks(silent)} stopped answering (no heartbeat for {MISSED * BEAT_S:.0f} s and no end recorded: "
                   "killed, or the node is down or unreachable)")
        else:
            why = "; ".join(f"rank {r} failed first (host {text})" for r, text in sorted(failed.items()))
            if hb.rank in failed:  # this rank's own error came first: it is the cause
                raise
        raise LostRanksError(f"rank {hb.rank} (host {hb.host}) stopped: {why}. The failed operation here: "
                             f"{type(e).__name__}: {first}") from e
    else:
        if _CURRENT is not None:
            _CURRENT.end(None)
