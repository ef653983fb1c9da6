"""torch.distributed set-up shared by every stage, and collectives that degrade to the identity.

The launcher (``submit``: submitit on Slurm, or local processes) exports the standard variables
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. Without them the code runs as a
single process. The backend is nccl when CUDA is available, gloo otherwise (each "GPU" slot is then a
CPU process).

The collective timeout (how long a collective, the rendezvous included, waits for a rank before it fails)
is ``$INTL_COLLECTIVE_TIMEOUT_MIN`` minutes (``submit --collective-timeout MIN`` sets it in every task),
default ``DEFAULT_TIMEOUT_MIN``. Every process of a group also starts its ``common.heartbeat``, so that a
rank that is gone is named when a collective fails.
"""

from __future__ import annotations

import datetime
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from common import heartbeat
from common.cpu_env import tune_cpu_allocator
from common.errors import ConfigError

TIMEOUT_ENV = "INTL_COLLECTIVE_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def collective_timeout_min() -> float:
    """The collective timeout in minutes: ``$INTL_COLLECTIVE_TIMEOUT_MIN``, else ``DEFAULT_TIMEOUT_MIN``."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_MIN
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a positive number of minutes; fix: e.g. "
                          f"{TIMEOUT_ENV}=30 (submit --collective-timeout 30), or unset it for {DEFAULT_TIMEOUT_MIN:g}")
    return value


def init_distributed(timeout_minutes: float | None = None) -> DistInfo:
    """Initialises the default process group from the environment (idempotent), with the collective timeout
    ``timeout_minutes`` (None: ``collective_timeout_min()``), and starts this process's heartbeat. A process that
    computes on the CPU also gets the malloc settings of ``common.cpu_env`` here (the one start every stage shares)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    tune_cpu_allocator(device)
    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            minutes = collective_timeout_min() if timeout_minutes is None else timeout_minutes
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(minutes=minutes))
            if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
                heartbeat.start(rank, world_size, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` (batch dim 0) across ranks, passing gradients back; identity in one process.

    All ranks must pass the same per-rank batch size.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (no gradient, a new tensor); a copy in one process."""
    y = x.detach().clone()
    if is_dist():
        dist.all_reduce(y)
    return y


def all_reduce_sum_start(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Starts summing ``x`` over ranks in place without waiting (``async_op``); the returned function waits and
    returns ``x`` (the sum). Nothing to wait for in one process. The read of the result is the caller's."""
    if not is_dist():
        return lambda: x
    work = dist.all_reduce(x, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return x
    return wait


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (no gradient); identity in one process."""
    if not is_dist():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """all_gather of tensors whose first dimension differs between ranks (rank order kept, no gradient);
    identity in one process."""
    if not is_dist() or get_world_size() == 1:
        return x
    world = get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def limit_cpu_threads(threads: int | None) -> None:
    """At most ``threads`` torch threads in this process when it computes on the CPU (no CUDA)."""
    if threads and not torch.cuda.is_available() and torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


def cpu_threads_per_process(info: DistInfo) -> None:
    """On CPU, several processes of one job share the machine: give each its share of the cores (torch
    would start one thread per core in every process and oversubscribe them)."""
    if info.device.type != "cpu" or info.world_size == 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    limit_cpu_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def cleanup() -> None:
    """Leaves the process group: every rank at a barrier, then destroyed.

    torch 2.3's gloo backend can deadlock in ``destroy_process_group``: the group's destructor joins its worker
    thread while holding the GIL, and that thread may still be releasing a finished collective whose tensors
    need the GIL to be freed (seen: a two-process test stuck in ``~ProcessGroupGloo`` / ``AsyncBarrierWork``).
    So after the barrier the GIL is given up for a moment (the worker drops its finished work) and the
    collected garbage goes before the destructor runs."""
    if not is_dist():
        return
    dist.barrier()
    heartbeat.stop()
    gc.collect()
    time.sleep(0.2)
    dist.destroy_process_group()
