"""The settings of processes that compute on the CPU, defined in one place: glibc's malloc kept from handing
large blocks back to the kernel between steps, and OpenMP threads that sleep instead of spinning.

malloc: with glibc's defaults a block above the mmap threshold (at most 32 MiB) is a fresh ``mmap`` and goes
back to the kernel when freed, and the top of the heap is trimmed above 128 KiB of free space; a training step
allocates and frees its activations and gradients every step, so every step faults all of them in again
(611,000 page faults and 1.2 s of kernel time per ResNet-50 step here). ``MALLOC_MMAP_MAX_=0`` (no mmap'ed
blocks: everything on the heaps) and no trimming keep the pages: about a tenth of the page faults once the
heap has its shape (after a couple of steps), for the price of keeping the process at its peak RSS (higher than
glibc's: the freed blocks coalesce only after a few steps). ``python -m benchmarks --only allocator`` measures
this against glibc's defaults, jemalloc and tcmalloc (Debian's libjemalloc2 / libtcmalloc-minimal4 by
``LD_PRELOAD``): ``benchmarks/results/2026-12-03-allocator.md`` (1.22x by ``mallopt``, 1.11x from the
environment, tcmalloc 1.13x, jemalloc 0.90x). These settings were chosen: as fast as tcmalloc, nothing to
install, and a process can apply them itself.

OpenMP: torch's OpenMP threads spin after each parallel region; on cores shared with gloo's threads, other
processes or other jobs, the spinning takes the cores from the work (``python -m benchmarks --only threads``:
2 processes x 2 threads on 2 cores ran 5x slower than 2 x 1 spinning and as fast passive, one process with 2
threads 2.8x slower spinning than with ``OMP_WAIT_POLICY=PASSIVE``: ``benchmarks/results/2026-12-03-threads.md``).
libgomp reads it when it loads, so it only acts from a process's environment.

How the settings reach the processes:
- ``CPU_ENV`` (both, as environment variables): the Makefile starts ``make demo``, ``make test`` and
  ``make bench`` with it (``python -m common.cpu_env --env``), and ``submit --cluster local`` on a machine
  without CUDA passes it to its processes (``export_cpu_env``; a value the user set wins).
- ``tune_cpu_allocator(device)``: the malloc settings by ``mallopt`` at run time, in every process that
  computes on the CPU (``common.distributed.init_distributed``: every stage, the detection task; the
  benchmarks), however it was started: a Slurm job on a node without CUDA, a plain ``python -m pretrain.train``.
  DataLoader workers fork from it and keep them.
``INTL_MALLOC=default`` keeps glibc's defaults; an ``LD_PRELOAD``ed allocator or the user's own ``MALLOC_*`` /
``GLIBC_TUNABLES`` malloc settings are left alone.
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

OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
CPU_ENV = {**MALLOC_ENV, **OMP_ENV}

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


def another_malloc_chosen(environ) -> bool:
    """The environment asks for other malloc settings than ours: ``INTL_MALLOC=default``, an allocator in
    ``LD_PRELOAD``, ``glibc.malloc`` tunables, other values of ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``."""
    return (environ.get(OPT_OUT_ENV) == "default" or "malloc" in environ.get("LD_PRELOAD", "")
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")
            or any(k in environ and environ[k] != v for k, v in MALLOC_ENV.items()))


def tune_malloc() -> bool:
    """Applies the settings of ``MALLOC_ENV`` to this process's glibc malloc (``mallopt``). Returns False and
    changes nothing when the C library is not glibc, or when the user chose otherwise: ``INTL_MALLOC=default``,
    another allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc), malloc settings of their own (other values of
    ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc`` in ``GLIBC_TUNABLES``)."""
    global _TUNED_PID
    if another_malloc_chosen(os.environ):
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


def export_cpu_env(environ: dict | None = None) -> dict[str, str]:
    """Puts ``CPU_ENV`` into ``environ`` (default ``os.environ``: the processes started from here inherit it),
    keeping every variable the user set, and the malloc ones when the user chose another allocator (see
    ``tune_malloc``). Returns what it set."""
    environ = os.environ if environ is None else environ
    keep_malloc = another_malloc_chosen(environ)
    added = {k: v for k, v in CPU_ENV.items() if k not in environ and not (keep_malloc and k in MALLOC_ENV)}
    environ.update(added)
    return added


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.cpu_env",
                                description="prints the settings of CPU runs as shell `export` lines")
    p.add_argument("--env", action="store_true", help="one line of KEY=VALUE pairs instead (for `env`: the Makefile)")
    args = p.parse_args(argv)
    if args.env:
        print(" ".join(f"{k}={v}" for k, v in CPU_ENV.items()))
    else:
        for key, value in CPU_ENV.items():
            print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
