"""The real engine step for the benchmarks, and the child processes that time it.

``build_engine(overrides)`` is a ``pretrain.engine.PretrainEngine`` built from a composed pretraining config
(as ``python -m pretrain.train`` builds it: DDP, global batch norm, the objective, the optimiser, amp,
channels_last), ``step_timer(engine, image)`` runs ``pretrain.engine.train_step`` on random views of the
configured number and size (no loader: the step alone), synchronising CUDA around each step.

The allocator and thread benchmarks run each candidate in its own processes, with its own environment
(``MALLOC_*``, ``LD_PRELOAD``, ``OMP_*`` act when a process starts): ``run_children`` starts them and reads
the JSON result that rank 0 prints (``child_main``: ``python -m benchmarks.engine_step '<json spec>'``).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from benchmarks.bench_pipeline import bench_imagefolder
from common.config import compose_config
from common.distributed import DistInfo, cpu_threads_per_process, init_distributed
from pretrain.engine import PretrainEngine, train_step
from pretrain.train import validate_config

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
# What the benchmarks leave out of the engine: the monitor (no validation split here) and loader workers.
ENGINE_OVERRIDES = ("train.online_probe=false", "train.knn_every=0", "data.val_split=null")


def build_engine(overrides: Sequence[str], info: DistInfo | None = None, images: int = 64) -> PretrainEngine:
    """A PretrainEngine of ``overrides`` over the benchmark's ImageNet-like JPEG folder (``images`` files)."""
    info = info or init_distributed()
    root = bench_imagefolder(images)
    run_dir = Path(tempfile.gettempdir()) / "intl-bench-run"
    cfg = compose_config("pretrain", [f"data.root={root.parent}", f"data.split={root.name}", f"run_dir={run_dir}",
                                      *ENGINE_OVERRIDES, *overrides])
    return PretrainEngine(validate_config(cfg, world_size=info.world_size), info)


def random_views(engine: PretrainEngine, image: int | None = None) -> list[torch.Tensor]:
    """The engine's number of views, ``image`` px (None: the configured view sizes), per-process batch."""
    sizes = engine.dataset.transform.sizes
    g = torch.Generator().manual_seed(0)
    return [torch.randn(engine.local_batch, 3, image or s, image or s, generator=g)
            .to(engine.device, memory_format=engine.memory_format) for s in sizes]


def step_timer(engine: PretrainEngine, views: list[torch.Tensor], model: torch.nn.Module | None = None
               ) -> Callable[[], float]:
    """A function that runs one engine step (``train_step``) and returns its seconds; ``model`` replaces the
    engine's (e.g. a ``torch.compile`` of it)."""
    model = model or engine.model
    cuda = engine.device.type == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        res = train_step(model, engine.objective, engine.optimizer, views, engine.target, engine.scaler,
                         engine.amp_dtype)
        if cuda:
            torch.cuda.synchronize(engine.device)
        if not res.finite:
            raise RuntimeError("the benchmark step's loss is not finite")
        return time.perf_counter() - t0
    return step


# ------------------------------------------------------------------------------------- child processes
def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "utime": ru.ru_utime, "stime": ru.ru_stime}


def child_main(spec: dict) -> dict:
    """One process of a candidate: build the engine of ``spec["overrides"]``, time ``spec["steps"]`` steps
    after ``spec["warmup"]``; page faults and CPU times over the timed steps, the process's peak RSS.
    (``init_distributed`` applies ``common.cpu_env``'s settings unless the environment says otherwise.)"""
    info = init_distributed()
    cpu_threads_per_process(info)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    engine = build_engine(spec["overrides"], info, images=int(spec.get("images", 64)))
    step = step_timer(engine, random_views(engine, spec.get("image")))
    for _ in range(int(spec["warmup"])):
        step()
    before = _usage()
    times = [step() for _ in range(int(spec["steps"]))]
    after = _usage()
    n = len(times)
    return {"times": times, "threads": torch.get_num_threads(), "world_size": info.world_size,
            "page_faults_per_step": (after["minflt"] - before["minflt"] + after["majflt"] - before["majflt"]) / n,
            "user_s_per_step": (after["utime"] - before["utime"]) / n,
            "sys_s_per_step": (after["stime"] - before["stime"]) / n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(spec: dict, env: dict[str, str], world: int = 1, timeout: float = 1800) -> dict:
    """Runs ``world`` processes of ``child_main(spec)`` (a gloo group when world > 1) with ``env`` added to
    this environment (keys whose value is None are removed); rank 0's result."""
    base = {k: v for k, v in os.environ.items() if k not in env or env[k] is not None}
    base.update({k: v for k, v in env.items() if v is not None})
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    port = str(free_port())
    procs = []
    for rank in range(world):
        penv = dict(base)
        if world > 1:
            penv.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.engine_step", json.dumps(spec)], cwd=ROOT,
                                      env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed (exit {p.returncode}) with {env}: {err[-2000:]}")
    lines = [ln for ln in outs[0][0].splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"benchmark child printed no result: {outs[0][0][-1000:]} {outs[0][1][-1000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


if __name__ == "__main__":
    result = child_main(json.loads(sys.argv[1]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
