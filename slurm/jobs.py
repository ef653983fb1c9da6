"""The job objects submitit runs in every task, and the distributed environment they export.

The submitit pattern (dino / vicreg ``run_with_submitit.py``): a callable object whose ``__call__`` runs
the stage and whose ``checkpoint()`` returns a ``DelayedSubmission`` of a fresh copy of itself. submitit
calls ``checkpoint()`` on rank 0 when Slurm signals a time-out (``--signal=USR2@<delay>``), pickles the
returned submission and requeues the job (``scontrol requeue``). On preemption Slurm requeues the job
itself (the batch script has ``--requeue``). Either way the job starts again with the same arguments and
the stage resumes from the last checkpoint in its run folder (stages write ``last.pth`` every N steps and
every epoch, and return at once when the run is already complete; the pretraining engine holds the USR2 back
to its next step boundary and writes ``last.pth`` there before submitit's handler runs: ``common.preemption``).

``command_line`` (set by ``submit``, kept by a requeue) is the user's ``submit ...`` command: the task exports
it as ``INTL_COMMAND_LINE`` so the run's provenance.json records it rather than the submitit worker's argv.
``env`` (``submit --env KEY=VALUE``, ``--collective-timeout``; kept by a requeue) is exported in every task
before anything else runs, so NCCL_* / GLOO_* settings are in place when the process group starts.

The stage runs inside ``common.heartbeat.naming_lost_ranks()``: a collective that fails because another rank
is gone (killed, its node down) raises an error naming that rank and its host.
"""

from __future__ import annotations

import importlib
import os
import random
import socket
from pathlib import Path
from typing import Any, Sequence

from common.distributed import limit_cpu_threads
from common.heartbeat import naming_lost_ranks
from common.provenance import COMMAND_LINE_ENV, record_attempt
from common.runlog import is_complete, mark_complete, previous_results, write_results

from .stages import StageSpec

# Below Linux's default ephemeral range (ip_local_port_range 32768-60999): the client sockets of earlier gloo /
# TCPStore connections on the same host take ports from that range, and one of them (or its TIME_WAIT) on the
# chosen port made a rendezvous fail with "Address already in use" (seen once in the demo test).
_PORT_RANGE = (20000, 32767)


def _in_slurm_step() -> bool:
    return "SLURM_PROCID" in os.environ and "SLURM_JOB_ID" in os.environ


def export_distributed_env() -> dict[str, str]:
    """Exports MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for this task.

    Inside a submitit task (Slurm or local executor) and in a plain ``srun`` step (hand-written sbatch
    scripts), the values come from submitit's ``TorchDistributedEnvironment`` (Slurm: SLURM_PROCID,
    SLURM_LOCALID, SLURM_NTASKS, the first host of SLURM_JOB_NODELIST). Anywhere else (a plain
    ``python`` call, or torchrun, which sets the variables itself) nothing is changed. Returns what was
    exported ({} when nothing was).
    """
    if "SUBMITIT_EXECUTOR" not in os.environ:
        if not _in_slurm_step():
            return {}
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # lets submitit read the Slurm variables of a plain srun
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if "MASTER_PORT" not in os.environ:
        # Same on every task of one job run; a requeued run (SLURM_RESTART_COUNT) gets another port, so
        # a socket of the previous run still in TIME_WAIT cannot block the new rendezvous.
        job_env = JobEnvironment()
        seed = f"{job_env.job_id}:{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        os.environ["MASTER_PORT"] = str(random.Random(seed).randint(*_PORT_RANGE))
    # CUDA_VISIBLE_DEVICES is left as Slurm set it: init_distributed() picks cuda:LOCAL_RANK among the
    # visible devices, which is right whether Slurm binds one GPU per task or shows all of them.
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    exported = {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
                "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                "LOCAL_WORLD_SIZE": str(env.local_world_size)}
    print(f"[submit] {socket.gethostname()}: rank {env.rank} of world size {env.world_size} "
          f"(local rank {env.local_rank} of {env.local_world_size}), rendezvous "
          f"{env.master_addr}:{env.master_port}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}; "
          + ("this rank writes the outputs" if env.rank == 0 else "no outputs from this rank (rank 0 writes them)"),
          flush=True)
    return exported



def _prepare_task(job) -> None:
    """What every task does first: the job's environment, the distributed variables, the command line, the
    CPU threads of a local run."""
    os.environ.update(job.env or {})
    export_distributed_env()
    if job.command_line:
        os.environ[COMMAND_LINE_ENV] = job.command_line
    limit_cpu_threads(job.cpu_threads)


def _again(job, fresh):
    """A requeued copy keeps what ``submit`` set on the job."""
    fresh.cpu_threads, fresh.command_line, fresh.env = job.cpu_threads, job.command_line, dict(job.env or {})
    return fresh


class StageJob:
    """Runs a Hydra stage's ``run(cfg)`` in one task; resumable through submitit's checkpoint()."""

    cpu_threads: int | None = None  # torch threads per task of a local CPU run (see limit_cpu_threads)
    command_line: str | None = None  # the `submit ...` command that queued the job (see the module docstring)
    env: dict[str, str] | None = None  # exported in every task first (see the module docstring)

    def __init__(self, spec: StageSpec, config: dict[str, Any]):
        self.spec = spec
        self.config = config  # the resolved config as a plain dict (its run_dir is absolute)

    def __call__(self) -> Any:
        from omegaconf import OmegaConf

        _prepare_task(self)
        run = self.spec.load_entry_point()
        with naming_lost_ranks():
            return run(OmegaConf.create(self.config))

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        print(f"[submit] {self.spec.name}: time-out or preemption signal; requeueing, the run resumes from "
              f"the last checkpoint in {self.config.get('run_dir')}", flush=True)
        return submitit.helpers.DelayedSubmission(_again(self, type(self)(self.spec, self.config)))

    def __repr__(self) -> str:
        return f"StageJob({self.spec.name}, run_dir={self.config.get('run_dir')!r})"


class DetectionJob:
    """Runs ``transfer.detection.train_net.run_task`` for one seed; resumes from its OUTPUT_DIR."""

    cpu_threads: int | None = None  # as StageJob.cpu_threads
    command_line: str | None = None  # as StageJob.command_line
    env: dict[str, str] | None = None  # as StageJob.env

    def __init__(self, spec: StageSpec, config_file: str, opts: Sequence[str], output_dir: str):
        self.spec = spec
        self.config_file = config_file
        self.opts = list(opts)
        self.output_dir = output_dir

    def __call__(self) -> Any:
        _prepare_task(self)
        run_task = self.spec.load_entry_point()
        with naming_lost_ranks():
            return run_task(self.config_file, list(self.opts), self.output_dir, resume=True)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        print(f"[submit] detection: time-out or preemption signal; requeueing, detectron2 resumes from "
              f"{self.output_dir}", flush=True)
        again = type(self)(self.spec, self.config_file, self.opts, self.output_dir)
        return submitit.helpers.DelayedSubmission(_again(self, again))

    def __repr__(self) -> str:
        return f"DetectionJob(output_dir={self.output_dir!r})"


CONVERT_MODULE = "transfer.convert"  # imported by name, inside the job (ARCHITECTURE.md: slurm imports no stage)
DETECTRON2_WEIGHTS = "backbone.pkl"


class ConvertJob:
    """``intl-convert CHECKPOINT <run_dir>/backbone.pkl --check`` as a job (one CPU task), in a run folder of
    its own: provenance.json at the start, results.json (the source checkpoint's identity, the tensors converted,
    the check) and COMPLETE at the end; a complete run returns its results at once. ``submit protocol`` chains
    it between the pretraining and the detection seeds."""

    cpu_threads: int | None = None  # as StageJob.cpu_threads
    command_line: str | None = None  # as StageJob.command_line
    env: dict[str, str] | None = None  # as StageJob.env

    def __init__(self, source: str, run_dir: str, encoder: str = "online"):
        self.source = source  # the pretraining checkpoint (last.pth or a snapshot epoch_<N>.pth)
        self.run_dir = run_dir
        self.encoder = encoder

    @property
    def output(self) -> Path:
        return Path(self.run_dir) / DETECTRON2_WEIGHTS

    @property
    def config(self) -> dict:
        """What the job does, as the run's config.yaml records it."""
        return {"source": self.source, "output": str(self.output), "to": "detectron2", "encoder": self.encoder,
                "check": True, "run_dir": self.run_dir}

    def __call__(self) -> dict:
        os.environ.update(self.env or {})  # one process, no process group: no distributed variables
        if self.command_line:
            os.environ[COMMAND_LINE_ENV] = self.command_line
        limit_cpu_threads(self.cpu_threads)
        run_dir = Path(self.run_dir)
        if is_complete(run_dir):
            print(f"[submit] conversion {run_dir} is already complete", flush=True)
            return previous_results(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_attempt(run_dir, world_size=1)
        convert = importlib.import_module(CONVERT_MODULE).convert
        # force: an output left by an earlier attempt that stopped before COMPLETE is this job's own file
        # (intl-convert never replaces a training checkpoint, with or without it)
        result = convert(self.source, self.output, to="detectron2", encoder=self.encoder, check=True,
                         force=True, log=lambda line: print(line, flush=True))
        identity = result.weights.identity
        results = write_results(run_dir, {"weights": str(result.output), "format": result.fmt,
                                          "converted": result.converted, "arch": result.weights.arch,
                                          "encoder": self.encoder, "source": identity,
                                          "check": "passed" if result.check is not None else None})
        mark_complete(run_dir, results)
        return results

    def checkpoint(self, *args: Any, **kwargs: Any):  # a conversion is short: requeued, it starts over
        import submitit

        return submitit.helpers.DelayedSubmission(_again(self, type(self)(self.source, self.run_dir, self.encoder)))

    def __repr__(self) -> str:
        return f"ConvertJob({self.source!r} -> {str(self.output)!r})"
