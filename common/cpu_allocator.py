"""How processes that compute on the CPU allocate memory: glibc's malloc kept from handing large blocks
back to the kernel between steps. The one place that defines the settings.

With glibc's defaults a block above the mmap threshold (at most 32 MiB) is a fresh ``mmap`` and goes back
to the kernel when freed, and the top of the heap is trimmed above 128 KiB of free space; a training step
allocates and frees its activations and gradients every step, so every step faults all of them in again
(620,000 page faults, about 1 s of kernel time, in a 2.5 s ResNet-50 step here). ``MALLOC_MMAP_MAX_=0``
(no mmap'ed blocks: everything on the heaps) and a trim threshold above any step's churn keep the pages:
no page faults after the first step, for the price of keeping the process at its peak RSS.

``python -m benchmarks --only allocator`` measures these settings against glibc's defaults, jemalloc and
tcmalloc (Debian's libjemalloc2 / libtcmalloc-minimal4 through ``LD_PRELOAD``), each in its own process:
the numbers and the choice are in ``benchmarks/results/2026-12-03-allocator.md``. The settings won (no
package to install, and they can be applied by the process itself):

- ``tune_cpu_allocator(device)`` applies them with ``mallopt`` at run time in a process that computes on
  the CPU (``common.stage.begin`` for every Hydra stage, the detection task, the benchmarks), so they hold
  however the process was started: ``make demo`` / ``make test``, ``submit --cluster local``, a Slurm job
  on a node without CUDA, a plain ``python -m pretrain.train``. DataLoader workers fork from it and keep them.
- ``MALLOC_ENV`` is the same as environment variables, read by glibc when a process starts (the
  benchmark's candidate; ``python -m common.cpu_allocator`` prints them for a shell or a job script).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys

MMAP_MAX = 0  # no mmap'ed blocks: every block comes from a heap and is reused
# Never trim the heaps (mallopt: -1 "disables trimming completely"; glibc reads the variable as a size_t).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": str(MMAP_MAX), "MALLOC_TRIM_THRESHOLD_": str(2**63 - 1)}

# INTL_MALLOC=default keeps glibc's defaults in every process (comparisons: the allocator benchmark's baseline).
OPT_OUT_ENV = "INTL_MALLOC"

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_TUNED_PID: int | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl or another C library: nothing to tune
    return libc


def tune_malloc() -> bool:
    """Applies the settings of ``MALLOC_ENV`` to this process's glibc malloc (``mallopt``). Returns False and
    changes nothing when the C library is not glibc, or when the user chose otherwise: ``INTL_MALLOC=default``,
    another allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc), malloc settings of their own (other values of
    ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc`` in ``GLIBC_TUNABLES``)."""
    global _TUNED_PID
    env = os.environ
    if (env.get(OPT_OUT_ENV) == "default" or "malloc" in env.get("LD_PRELOAD", "")
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
            or any(k in env and env[k] != v for k, v in MALLOC_ENV.items())):
        return False
    if _TUNED_PID == os.getpid():
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_MAX, MMAP_MAX) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok
    if ok:
        _TUNED_PID = os.getpid()
    return ok


def tune_cpu_allocator(device) -> bool:
    """``tune_malloc()`` in a process whose compute device (a ``torch.device`` or its name) is the CPU; GPU
    processes are left as they are."""
    if str(device).split(":")[0] != "cpu":
        return False
    return tune_malloc()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.cpu_allocator",
                                description="prints the malloc settings of CPU runs as shell `export` lines")
    p.add_argument("--env", action="store_true", help="one line of KEY=VALUE pairs instead (for `env`: the Makefile)")
    args = p.parse_args(argv)
    if args.env:
        print(" ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()))
    else:
        for key, value in MALLOC_ENV.items():
            print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
