"""The time-out signal (USR2) is acted on at the next step boundary: last.pth of exactly that step, then the
handler it replaced (submitit's) runs; resuming gives the loss rows of the uninterrupted run, bit for bit.

The signal is sent by the process to itself right after step ``SIGNAL_AFTER`` is logged (a patched
``PretrainEngine._log``), so it arrives before step ``SIGNAL_AFTER + 1``'s collective: the stop step is
``SIGNAL_AFTER + 1``. ``train.ckpt_every_steps`` is beyond the run, so no periodic checkpoint hides the effect.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch.multiprocessing as mp

from common.checkpoint import LAST_NAME, load_checkpoint
from common.runlog import read_metrics
from stage_fixtures import compose_pretrain, free_port, tiny_overrides

SIGNAL_AFTER = 4
NO_PERIODIC = "train.ckpt_every_steps=1000"


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _signal_after_step(monkeypatch, step: int) -> None:
    from pretrain.engine import PretrainEngine

    log = PretrainEngine._log

    def log_then_signal(self, *args, **kwargs):
        log(self, *args, **kwargs)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(PretrainEngine, "_log", log_then_signal)


class Requeued(Exception):
    """What the stand-in for submitit's handler raises (submitit's own exits after requeueing)."""


def test_usr2_mid_epoch_checkpoints_the_next_step_then_calls_the_handler(tiny_synthetic, tmp_path, monkeypatch):
    from pretrain.train import run

    t0 = time.time()
    common = ("optim.epochs=2", NO_PERIODIC)  # 7 steps per epoch, 14 in all
    run(compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "ref", *common)))
    want = _losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, 15))

    cut = tmp_path / "cut"
    calls = []

    def submitit_stand_in(signum, frame):  # what it sees when it finally runs
        calls.append((signum, load_checkpoint(cut / LAST_NAME)["step"], max(_losses(cut))))
        raise Requeued

    before = signal.signal(signal.SIGUSR2, submitit_stand_in)
    try:
        with monkeypatch.context() as m:
            _signal_after_step(m, SIGNAL_AFTER)
            with pytest.raises(Requeued):
                run(compose_pretrain(tiny_overrides(tiny_synthetic, cut, *common)))
        assert signal.getsignal(signal.SIGUSR2) is submitit_stand_in  # restored when fit ended
    finally:
        signal.signal(signal.SIGUSR2, before)
    stop = SIGNAL_AFTER + 1
    assert calls == [(signal.SIGUSR2, stop, stop)]  # once, after last.pth of the stop step, no step beyond it
    ckpt = load_checkpoint(cut / LAST_NAME)
    assert ckpt["step"] == stop and not ckpt["finished"] and not (cut / "COMPLETE").exists()

    summary = run(compose_pretrain(tiny_overrides(tiny_synthetic, cut, *common)))
    assert summary["steps"] == 14
    got = _losses(cut)
    assert got == want  # every row, before and after the stop, bit for bit
    print(f"USR2 after step {SIGNAL_AFTER}: last.pth at step {ckpt['step']}, handler called then; resumed to 14, "
          f"14 losses identical (final {got[14]:.6f}); {time.time() - t0:.1f} s")


# ------------------------------------------------------------------ two processes, no handler (plain python)
def _worker(rank: int, world: int, port: int, folder: str, data_root: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    from pretrain.engine import PretrainEngine, RunInterrupted
    from pretrain.train import run

    root, common = Path(folder), ("optim.epochs=1", NO_PERIODIC)  # 7 steps
    run(compose_pretrain(tiny_overrides(Path(data_root), root / "ref", *common)))
    cut = compose_pretrain(tiny_overrides(Path(data_root), root / "cut", *common))
    log = PretrainEngine._log
    if rank == 1:  # the signal reaches rank 1 only: rank 0 must stop at the same step, and write last.pth
        def log_then_signal(self, *args, **kwargs):
            log(self, *args, **kwargs)
            if self.step == SIGNAL_AFTER:
                os.kill(os.getpid(), signal.SIGUSR2)

        PretrainEngine._log = log_then_signal
    try:
        run(cut)
        message = "not interrupted"
    except RunInterrupted as e:
        message = str(e)
    saved = load_checkpoint(root / "cut" / LAST_NAME)["step"]  # rank 0 wrote it before the barrier
    (root / f"message{rank}.txt").write_text(f"{message}\nlast.pth step {saved}")
    PretrainEngine._log = log
    run(cut)


def test_two_processes_stop_at_the_same_step_without_a_handler_and_resume_exactly(tiny_synthetic, tmp_path):
    t0 = time.time()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), str(tiny_synthetic)), nprocs=2, join=True)
    stop = SIGNAL_AFTER + 1
    for rank in (0, 1):
        message = (tmp_path / f"message{rank}.txt").read_text()
        assert f"stopped by SIGUSR2 at step {stop}/7" in message and f"resumes from step {stop}" in message, message
        assert message.endswith(f"last.pth step {stop}"), message
    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "cut")
    assert sorted(want) == list(range(1, 8)) and got == want
    ckpt = load_checkpoint(tmp_path / "cut" / LAST_NAME)
    assert ckpt["finished"] and ckpt["step"] == 7
    print(f"2 processes, USR2 to rank 1 after step {SIGNAL_AFTER}: both stopped at step {stop}; resumed, "
          f"7 losses identical to the uninterrupted 2-process run; {time.time() - t0:.1f} s")
