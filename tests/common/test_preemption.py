"""common.preemption: the requeue signal is recorded, handed to the handler it replaced only when asked, and
the handler is put back at the end."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from common.preemption import DeferredSignal, requeue_signal


@pytest.fixture
def usr2_handler():
    """A stand-in for submitit's USR2 handler, installed for the test (the previous one restored after)."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    before = signal.signal(signal.SIGUSR2, handler)
    yield handler, calls
    signal.signal(signal.SIGUSR2, before)


def test_the_signal_is_recorded_and_the_replaced_handler_runs_only_when_delivered(usr2_handler):
    handler, calls = usr2_handler
    where = iter(["step 3", "step 9"])
    with DeferredSignal(signal.SIGUSR2, where=lambda: next(where)) as deferred:
        assert deferred.installed and signal.getsignal(signal.SIGUSR2) == deferred._record
        os.kill(os.getpid(), signal.SIGUSR2)
        assert deferred.pending and calls == []  # recorded, not acted on
        assert deferred.deliver() is True
        assert calls == [signal.SIGUSR2] and not deferred.pending
        os.kill(os.getpid(), signal.SIGUSR2)  # still deferred after a delivery
        assert deferred.pending and calls == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2) is handler  # restored
    assert not deferred.pending and calls == [signal.SIGUSR2]  # the one pending at the end is dropped


def test_default_action_has_no_handler_to_deliver_and_is_restored():
    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with DeferredSignal(signal.SIGUSR2) as deferred:
            assert deferred.installed and not deferred.has_handler
            os.kill(os.getpid(), signal.SIGUSR2)  # would end the process without the deferral
            assert deferred.pending
            assert deferred.deliver() is False and not deferred.pending
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_no_op_for_an_ignored_signal_and_outside_the_main_thread(usr2_handler):
    handler, _ = usr2_handler
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    with DeferredSignal(signal.SIGUSR2) as deferred:
        assert not deferred.installed and signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    signal.signal(signal.SIGUSR2, handler)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(DeferredSignal(signal.SIGUSR2).install()))
    thread.start()
    thread.join()
    assert seen == [False] and signal.getsignal(signal.SIGUSR2) is handler


def test_the_signal_is_submitits(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert requeue_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert requeue_signal() == signal.SIGUSR1 and DeferredSignal().signum == signal.SIGUSR1
