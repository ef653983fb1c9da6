"""From the CLI's resource options to a submitit executor (Slurm or local processes).

One task per GPU on every node (``ntasks_per_node = gpus_per_node = --gpus``). Without CUDA each GPU
slot is one CPU process and the stages fall back to gloo. ``slurm_parameters`` is the single mapping
from the options to ``SlurmExecutor`` parameters: ``--dry-run`` prints the sbatch script rendered from
it and a real submission passes the same dict to the executor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.cpu_env import export_cpu_env
from common.distributed import TIMEOUT_ENV

from .errors import SubmitError
from .local import DetachedLocalExecutor

SLURM = "slurm"
LOCAL = "local"
AUTO = "auto"
CLUSTERS = (AUTO, SLURM, LOCAL)

DEFAULT_TIME_MIN = 24 * 60
DEFAULT_SIGNAL_DELAY_S = 120
# Time-outs a run may requeue itself through (preemptions do not count): a long pretraining on a
# 24 h limit needs many.
MAX_NUM_TIMEOUT = 50


@dataclass(frozen=True)
class Resources:
    cluster: str                # SLURM or LOCAL (resolved)
    nodes: int = 1
    gpus: int = 1               # per node; one task per GPU
    time_min: int = DEFAULT_TIME_MIN
    job_name: str = "intl"
    partition: str | None = None
    cpus_per_gpu: int | None = None
    mem_per_gpu: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # exported in every task first (task_env)
    # Slurm --dependency (e.g. "afterok:12:13"; `submit protocol` chains its jobs with it); a job whose
    # dependency can never be met (an afterok job failed) is cancelled by Slurm (--kill-on-invalid-dep=yes),
    # not left pending forever.
    dependency: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus


# Set by the launcher in every task (slurm.jobs); --env may not replace them.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES", "INTL_COMMAND_LINE")


def task_env(items: list[str], collective_timeout_min: float | None) -> tuple[tuple[str, str], ...]:
    """The environment every task exports before the process group starts: ``--env KEY=VALUE`` (NCCL_* /
    GLOO_* / anything), plus ``$INTL_COLLECTIVE_TIMEOUT_MIN`` from ``--collective-timeout``."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SubmitError(f"--env {item!r} is not KEY=VALUE with a variable name as KEY; fix: e.g. "
                              "--env NCCL_SOCKET_IFNAME=ib0 (one --env per variable)")
        if key in LAUNCHER_ENV or key.startswith(("SLURM_", "SUBMITIT_")):
            raise SubmitError(f"--env {key}=...: {key} is set by the launcher (or Slurm) in every task; fix: drop it")
        if key == TIMEOUT_ENV:
            raise SubmitError(f"--env {key}=...: fix: use --collective-timeout {value or 'MIN'}")
        if key in env and env[key] != value:
            raise SubmitError(f"--env {key} is given twice ({env[key]!r} and {value!r}); fix: keep one")
        env[key] = value
    if collective_timeout_min is not None:
        if not collective_timeout_min > 0:
            raise SubmitError(f"--collective-timeout must be a positive number of minutes, got "
                              f"{collective_timeout_min}")
        env[TIMEOUT_ENV] = f"{collective_timeout_min:g}"
    return tuple(env.items())


def resolve_cluster(choice: str) -> str:
    """``auto`` means Slurm when ``sbatch`` is on PATH, else local processes."""
    if choice not in CLUSTERS:
        raise SubmitError(f"--cluster {choice!r} is not one of {', '.join(CLUSTERS)}")
    if choice == AUTO:
        return SLURM if shutil.which("sbatch") else LOCAL
    return choice


def validate(res: Resources) -> None:
    if res.nodes < 1:
        raise SubmitError(f"--nodes must be at least 1, got {res.nodes}")
    if res.gpus < 1:
        raise SubmitError(f"--gpus (per node) must be at least 1, got {res.gpus}; without GPUs each slot "
                          "runs as one CPU process, so --gpus 2 on a CPU machine means 2 processes")
    if res.time_min < 1:
        raise SubmitError(f"--time must be at least 1 minute, got {res.time_min}")
    if res.cpus_per_gpu is not None and res.cpus_per_gpu < 1:
        raise SubmitError(f"--cpus-per-gpu must be at least 1, got {res.cpus_per_gpu}")
    if res.mem_per_gpu is not None and not re.fullmatch(r"\d+[KMGT]?B?", res.mem_per_gpu, re.IGNORECASE):
        raise SubmitError(f"--mem-per-gpu {res.mem_per_gpu!r} is not a Slurm memory size; fix: e.g. 32G")
    if res.cluster == LOCAL:
        if res.nodes != 1:
            raise SubmitError(f"--cluster local runs processes on this machine only: --nodes must be 1 "
                              f"(got {res.nodes}); fix: --nodes 1, or submit to Slurm with --cluster slurm")
        import torch

        if torch.cuda.is_available() and res.gpus > torch.cuda.device_count():
            raise SubmitError(f"--gpus {res.gpus} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s); fix: --gpus {torch.cuda.device_count()}")


# ----------------------------------------------------------------------------------------------- Slurm
def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_slurm_reachable() -> None:
    """A clear error when Slurm's client tools are missing or no controller answers."""
    for tool in ("sbatch", "sinfo", "srun"):
        if shutil.which(tool) is None:
            raise SubmitError(f"--cluster slurm needs Slurm's {tool} on PATH, and it is not; fix: run on a "
                              "Slurm login node, or use --cluster local to run processes on this machine")
    try:
        proc = _run(["sinfo", "-h", "-o", "%P"])
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        detail = "timed out" if proc is None else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SubmitError(f"Slurm's sbatch is on PATH but no Slurm controller answers (sinfo: {detail}); "
                          "fix: check SLURM_CONF / the cluster, or use --cluster local")


def parse_gres_gpus(gres: str) -> int:
    """GPU count of one node's ``sinfo %G`` field: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``(null)`` ..."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres):
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts and parts[0] == "gpu":
            count = parts[-1] if len(parts) > 1 else "1"
            total += int(count) if count.isdigit() else 0
    return total


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    nodes: int
    max_gpus_per_node: int


def partition_info(partition: str | None) -> PartitionInfo | None:
    """Nodes and GPUs per node of the partition (the default one when None); None when unknown."""
    try:
        proc = _run(["sinfo", "-h", "-N", "-o", "%N|%G|%P"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    nodes: dict[str, int] = {}
    name = partition
    for line in proc.stdout.splitlines():
        try:
            node, gres, part = line.strip().split("|")
        except ValueError:
            continue
        is_default = part.endswith("*")
        part = part.rstrip("*")
        if (partition is None and is_default) or part == partition:
            name = part
            nodes[node] = max(nodes.get(node, 0), parse_gres_gpus(gres))
    if not nodes:
        if partition is not None:
            known = sorted({ln.split("|")[-1].rstrip("*") for ln in proc.stdout.splitlines() if "|" in ln})
            raise SubmitError(f"Slurm has no partition {partition!r}; fix: --partition one of {', '.join(known)}")
        return None
    return PartitionInfo(name or "?", len(nodes), max(nodes.values()))


def check_against_partition(res: Resources, info: PartitionInfo | None) -> None:
    if info is None:
        return
    if info.max_gpus_per_node == 0:
        raise SubmitError(f"the nodes of partition {info.name!r} have no GPUs (no gpu gres), and submit asks for "
                          f"{res.gpus} per node; fix: --partition <a GPU partition> (sinfo -o '%P %G' lists them)")
    if res.gpus > info.max_gpus_per_node:
        raise SubmitError(f"--gpus {res.gpus} per node, but the nodes of partition {info.name!r} offer at most "
                          f"{info.max_gpus_per_node} GPU(s); fix: --gpus {max(info.max_gpus_per_node, 1)} "
                          "and more --nodes, or another --partition")
    if res.nodes > info.nodes:
        raise SubmitError(f"--nodes {res.nodes}, but partition {info.name!r} has {info.nodes} node(s); "
                          f"fix: --nodes {info.nodes} or another --partition")


def slurm_parameters(res: Resources) -> dict:
    """SlurmExecutor parameters (sbatch options) for the request."""
    params: dict = {
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": max(1, res.gpus),  # gpus=0: one CPU task (submit protocol's conversion and report)
        "time": res.time_min,
        "signal_delay_s": min(DEFAULT_SIGNAL_DELAY_S, max(10, res.time_min * 60 // 4)),
        # Preemption: let Slurm requeue the job (Slurm's default depends on JobRequeue in slurm.conf).
        "additional_parameters": {"requeue": True},
        "stderr_to_stdout": False,
    }
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.dependency:
        params["dependency"] = res.dependency
        params["additional_parameters"]["kill_on_invalid_dep"] = "yes"
    for key, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos),
                       ("constraint", res.constraint), ("mem_per_gpu", res.mem_per_gpu)):
        if value is not None:
            params[key] = value
    if res.cpus_per_gpu is not None:
        params["cpus_per_task"] = res.cpus_per_gpu
        # Slurm >= 23.11: srun no longer inherits --cpus-per-task from sbatch; pass it to the step.
        params["srun_args"] = [f"--cpus-per-task={res.cpus_per_gpu}"]
    return params


def local_parameters(res: Resources) -> dict:
    import torch

    return {
        "tasks_per_node": max(1, res.gpus),
        # CUDA_VISIBLE_DEVICES is set from gpus_per_node: 0 on a machine without CUDA (CPU processes).
        "gpus_per_node": res.gpus if torch.cuda.is_available() else 0,
        "timeout_min": res.time_min,
    }


def local_cpu_env() -> dict[str, str]:
    """The variables local processes get on top of this environment: on a machine without CUDA, the settings of
    CPU runs (``common.cpu_env.CPU_ENV``: malloc, OpenMP waiting) that the user did not set; nothing with CUDA."""
    import torch

    return {} if torch.cuda.is_available() else export_cpu_env(dict(os.environ))


def submitit_command(folder: Path) -> str:
    """The command submitit puts in the sbatch script (for --dry-run)."""
    import shlex

    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_sbatch(res: Resources, folder: Path) -> str:
    """The sbatch script a Slurm submission would write (submitit's own renderer)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function SlurmExecutor itself calls

    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **slurm_parameters(res))


def make_executor(res: Resources, folder: Path, array_parallelism: int | None = None):
    """A submitit executor writing its scripts, pickles and logs under ``folder``."""
    import submitit

    if res.cluster == SLURM:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_NUM_TIMEOUT)
        params = slurm_parameters(res)
        if array_parallelism is not None:
            params["array_parallelism"] = array_parallelism
        executor.update_parameters(**params)
    else:
        os.environ.update(local_cpu_env())  # the LocalExecutor's processes inherit this environment
        # the job in a session of its own (slurm/local.py): a Ctrl-C in the terminal reaches submit only
        executor = DetachedLocalExecutor(folder=folder, max_num_timeout=MAX_NUM_TIMEOUT)
        executor.update_parameters(**local_parameters(res))
    return executor
