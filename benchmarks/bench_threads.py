"""CPU processes and threads: how to split the cores between gloo processes and their compute threads.

The engine's step in a 2-process gloo group (DDP, global batch norm, the objective's all-gather) with the
default split of ``common.distributed.cpu_threads_per_process`` (cores / processes threads each) against
more threads per process (OpenMP's threads spin-wait between parallel regions and take the cores from gloo's
threads and from the other process), with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead), and against
one process with every core (no gloo; the same global batch), spinning and passive. Settings of the demo's
pretraining (ResNet-18, 32-px views, global batch 64, projector 3 x 512); ``common.cpu_env``'s malloc
settings applied at run time in every process (what the stages run with). Each candidate in its own
processes, interleaved repeat by repeat; images/s of the whole group (global batch / step time).
"""

from __future__ import annotations

import os
import statistics

from benchmarks.common import Row
from benchmarks.engine_step import run_children
from common.cpu_env import MALLOC_ENV, OPT_OUT_ENV

NAME = "threads"


def candidates(cores: int) -> dict[str, tuple[int, int | None, dict]]:
    """name -> (processes, threads per process (None: the default of cpu_threads_per_process), extra env)."""
    procs = 2
    default = max(1, cores // procs)
    more = max(2, 2 * default)
    return {
        f"{procs} processes x {default} thread(s) (default: cores / processes)": (procs, None, {}),
        f"{procs} processes x {more} threads": (procs, more, {}),
        f"{procs} processes x {more} threads, OMP_WAIT_POLICY=PASSIVE": (procs, more, {"OMP_WAIT_POLICY": "PASSIVE"}),
        f"1 process x {cores} threads (no gloo)": (1, cores, {}),
        f"1 process x {cores} threads (no gloo), OMP_WAIT_POLICY=PASSIVE": (1, cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
    }


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, log=print, steps: int = 5) -> list[Row]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if quick:
        overrides, batch, steps = ["pretrain/model=resnet18", "model.projector=[64,64]"], 8, 1
        case = f"resnet18 32px global batch {batch}, projector 2x64, {cores} cores"
    else:
        overrides, batch = ["pretrain/preset=synthetic"], 64
        case = f"demo pretraining step (resnet18 32px, global batch {batch}, projector 3x512), {cores} cores"
    cands = candidates(cores)
    base = next(iter(cands))
    if quick:  # the smoke test: a gloo group of child processes and one process, not every split
        cands = {k: v for i, (k, v) in enumerate(cands.items()) if i in (0, 3)}
    times: dict[str, list[float]] = {name: [] for name in cands}
    threads_seen: dict[str, int] = {}
    log(f"[threads] {case}: {len(cands)} candidates x {repeats} repeats ({max(warmup, 1)} warm-up + {steps} steps)")
    for r in range(repeats):
        for name, (procs, threads, env) in cands.items():
            spec = {"overrides": [*overrides, f"optim.batch_size={batch}"], "image": 32, "warmup": max(warmup, 1),
                    "steps": steps, "threads": threads}
            res = run_children(spec, {"OMP_NUM_THREADS": str(threads) if threads else None, "OMP_WAIT_POLICY": None,
                                      **dict.fromkeys(MALLOC_ENV), OPT_OUT_ENV: None, **env}, world=procs)
            times[name].append(statistics.median(res["times"]))
            threads_seen[name] = res["threads"]
            log(f"[threads] repeat {r + 1}/{repeats} {name}: {batch / times[name][-1]:.1f} img/s "
                f"({res['threads']} thread(s) per process)")
    return [Row(NAME, case, name, "img/s (whole group)", [batch / t for t in ts],
                baseline=None if name == base else base, higher_is_better=True,
                extra={"processes": cands[name][0], "threads_per_process": threads_seen[name]})
            for name, ts in times.items()]
