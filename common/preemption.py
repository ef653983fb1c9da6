"""The time-out / preemption signal, handled at a step boundary instead of wherever it lands.

Slurm sends the requeue signal (``--signal=USR2@<delay>``) before a job's time limit; submitit's handler
then calls the job's ``checkpoint()`` and requeues it at once, so a training loop loses the steps since
its last periodic checkpoint. ``DeferredSignal`` wraps the handler installed for that signal: on arrival
it only records that the signal came; the loop asks ``pending`` at each step boundary, writes its
checkpoint, and calls ``deliver()``, which runs the wrapped handler (submitit's) as if the signal had just
come. Without a handler (the signal's default action: a plain ``python -m ...`` run) ``deliver()`` returns
False and the caller ends the run itself.

The signal is submitit's (``SUBMITIT_PREEMPT_SIGNAL``, default ``USR2``). Installing is a no-op outside the
main thread (Python runs signal handlers there only), for an ignored signal, or for a handler not set from
Python (nothing that could be called later).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

REQUEUE_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own variable; it defaults to USR2 as well


def requeue_signal() -> signal.Signals:
    """The signal submitit treats as "time-out / preempted: checkpoint and requeue"."""
    name = os.environ.get(REQUEUE_SIGNAL_ENV, "USR2")
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


class DeferredSignal:
    """Records the requeue signal instead of acting on it; ``deliver()`` later runs the handler it replaced.

    ``with DeferredSignal(where=...) as deferred:`` installs on entry and restores the previous handler on
    exit. ``where()`` (optional) says where the program is, for the log line written on arrival.
    """

    def __init__(self, signum: int | None = None, where: Callable[[], str] | None = None):
        self.signum = signal.Signals(signum) if signum is not None else requeue_signal()
        self.where = where
        self.pending = False
        self.installed = False
        self._original: Any = None

    def install(self) -> bool:
        """Replaces the current handler of the signal by the recorder; False (nothing changed) where it cannot."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self.installed
        original = signal.getsignal(self.signum)
        if original is None or original == signal.SIG_IGN:
            return False
        self._original = original
        signal.signal(self.signum, self._record)
        self.installed = True
        return True

    def restore(self) -> None:
        """Puts the replaced handler back. A signal still pending is dropped, and said so."""
        if not self.installed:
            return
        signal.signal(self.signum, self._original)
        self.installed = False
        if self.pending:
            log.warning("%s came at or after the last step; the run ended without acting on it",
                        self.signum.name)
            self.pending = False

    @property
    def has_handler(self) -> bool:
        """True when ``deliver()`` has a handler to call (submitit's), False for the default action."""
        return callable(self._original)

    def deliver(self) -> bool:
        """Clears the pending signal and calls the replaced handler now, as if the signal had just come (it may
        exit or raise: submitit's does on rank 0). False when there is no handler to call (default action)."""
        self.pending = False
        if not self.has_handler:
            return False
        self._original(self.signum, None)
        return True

    def _record(self, signum: int, frame: Any) -> None:
        self.pending = True
        where = f" during {self.where()}" if self.where is not None else ""
        log.warning("%s received%s: deferred to the step boundary where the checkpoint is written",
                    self.signum.name, where)

    def __enter__(self) -> DeferredSignal:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
