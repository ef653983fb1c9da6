"""Local jobs (``--cluster local``) detached from the terminal, as a Slurm job is.

submitit's ``LocalExecutor`` starts a controller process (``python -m submitit.local._local <folder>``) that
starts the tasks, in the terminal's process group and writing to the terminal's stderr. A Ctrl-C of
``submit --wait`` then also reached the controller and every task at once: each printed its
``KeyboardInterrupt`` traceback, and ``submit``'s own cancel (a second SIGINT) could cut the controller's
clean-up short (SIGINT to the tasks, SIGKILL after a second). ``DetachedLocalExecutor`` starts the same
controller, with the same environment, in a session of its own (no terminal: a Ctrl-C reaches ``submit``
only), stdin from /dev/null and its output in ``<folder>/<job id>_controller.log``; ``submit`` stops the job
(``job.cancel()``: SIGINT to the controller, which stops its tasks) and prints one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import submitit
from submitit.local.local import LocalJob

CONTROLLER_LOG = "{job_id}_controller.log"


class DetachedLocalExecutor(submitit.LocalExecutor):
    """``submitit.LocalExecutor`` whose job controller runs in its own session (see the module docstring)."""

    def _submit_command(self, command: str) -> LocalJob:
        ntasks = int(self.parameters.get("tasks_per_node", 1))
        gpus = range(int(self.parameters.get("gpus_per_node", 0)))
        # What submitit.local.local.start_controller passes to the Controller (submitit 1.5.4, pinned).
        env = dict(os.environ,
                   SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
                   SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
                   SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                   SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                   SUBMITIT_STDERR_TO_STDOUT="1" if self.parameters.get("stderr_to_stdout", False) else "",
                   SUBMITIT_EXECUTOR="local", CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus),
                   SUBMITIT_LOCAL_WITH_SHELL="")
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pending = folder / f".controller.{os.getpid()}.log"  # renamed once the job id (its pid) is known
        with open(pending, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(folder)], env=env,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        pending.replace(folder / CONTROLLER_LOG.format(job_id=process.pid))
        return LocalJob(folder=folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))

