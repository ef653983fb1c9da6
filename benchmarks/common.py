"""Timing, memory and machine description shared by the benchmarks.

Every number is a ratio against a baseline measured in the same process on the same input: the
variants of one case are timed *interleaved* (baseline, candidate, baseline, candidate, ...) so that
load from other processes on a shared machine hits all of them alike; the median of the repeats is
reported with min and max.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from common.provenance import cpu_model


@dataclass
class Row:
    """One measured variant of one case. ``higher_is_better``: throughputs (img/s) vs times (ms)."""
    benchmark: str
    case: str
    variant: str
    unit: str
    values: list[float]
    baseline: str | None = None  # the variant this one is compared with (None: it is the baseline)
    higher_is_better: bool = False
    extra: dict = field(default_factory=dict)
    ratio: float | None = None  # speed-up vs the baseline's median (> 1 = better), filled by add_ratios

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(median=self.median, min=min(self.values), max=max(self.values))
        return d


def add_ratios(rows: list[Row]) -> list[Row]:
    """Fills ``ratio`` = speed-up of each row over its baseline (same benchmark and case)."""
    by_key = {(r.benchmark, r.case, r.variant): r for r in rows}
    for r in rows:
        if r.baseline is None:
            r.ratio = 1.0
            continue
        base = by_key[(r.benchmark, r.case, r.baseline)]
        r.ratio = (r.median / base.median) if r.higher_is_better else (base.median / r.median)
    return rows


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``repeats`` timed rounds,
    each round calling every function once in turn.

    Not ``torch.utils.benchmark.Timer``: it times one statement after the other, and on a machine shared
    with other jobs the load changes between them; alternating the variants round by round keeps the
    ratio fair. Wall-clock ``perf_counter`` is what Timer uses on CPU as well.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            done = time.perf_counter() - t_start
            progress(f"repeat {i + 1}/{repeats} ({done:.1f}s, ETA {done / (i + 1) * (repeats - i - 1):.0f}s)")
    return times


# ---------------------------------------------------------------------------------------------- memory
# The kernel's own high-water mark (VmHWM), resettable per variant; psutil has no portable peak RSS.
def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux: write 5 to clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since the last reset when resets work)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    import numpy
    import PIL
    import torchvision

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }
    try:
        import cv2

        info["opencv"] = cv2.__version__
    except ImportError:
        info["opencv"] = None
    try:
        from PIL import features

        info["libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception:  # noqa: BLE001 - informational only
        info["libjpeg_turbo"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def set_threads(n: int) -> None:
    """One knob for the compute threads of torch and OpenCV (per-core numbers use 1)."""
    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover
        pass
