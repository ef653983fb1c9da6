"""The CPU allocator: the engine's ResNet-50 step under glibc's default malloc, the settings of
``common.cpu_env`` (as environment variables, and applied at run time by ``mallopt``), jemalloc and
tcmalloc (Debian's libjemalloc2 / libtcmalloc-minimal4 through ``LD_PRELOAD``; left out, with the apt line,
when not installed).

Each candidate runs in its own process (the environment acts when a process starts), one thread, the
candidates interleaved repeat by repeat (default, env, mallopt, jemalloc, tcmalloc, default, ...) so that load
from other processes hits them alike; per repeat the median of the timed steps. Reported: ms per step (ratio
against glibc's default of the same run), page faults and kernel (sys) time per timed step
(``resource.getrusage``), the process's peak RSS.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import Row
from benchmarks.engine_step import run_children
from common.cpu_env import MALLOC_ENV, OPT_OUT_ENV

NAME = "allocator"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
PRELOADS = {  # name: (library file, Debian package)
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}
BASELINE = "glibc malloc, defaults"


def find_library(filename: str) -> Path | None:
    for d in LIB_DIRS:
        p = Path(d) / filename
        if p.exists():
            return p
    return None


def candidates(log=print) -> dict[str, tuple[dict, dict]]:
    """name -> the child's environment (None: the variable removed); the preloads only when installed.

    The stages apply ``common.cpu_env``'s settings at run time unless told otherwise, so the baseline and the
    environment-variable candidate opt out of that (``INTL_MALLOC=default``); a preload opts out by itself."""
    off = {**dict.fromkeys(MALLOC_ENV), "LD_PRELOAD": None, "GLIBC_TUNABLES": None, OPT_OUT_ENV: None}
    out = {
        BASELINE: {**off, OPT_OUT_ENV: "default"},
        "glibc, common.cpu_env as env (" + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + ")":
            {**off, **MALLOC_ENV, OPT_OUT_ENV: "default"},
        "glibc, common.cpu_env by mallopt at run time (what the stages do)": off,
    }
    for name, (filename, package) in PRELOADS.items():
        lib = find_library(filename)
        if lib is None:
            log(f"[allocator] {name}: {filename} not found, left out (Debian/Ubuntu: apt-get install {package})")
            continue
        out[f"{name} (LD_PRELOAD={lib})"] = {**off, "LD_PRELOAD": str(lib)}
    return out


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, log=print, steps: int = 4) -> list[Row]:
    if quick:
        overrides, image, steps = ["pretrain/model=resnet18", "model.projector=[64,64]", "optim.batch_size=8"], 32, 1
        case = "resnet18 32px batch 8 x 2 views, projector 2x64"
    else:
        overrides, image = ["pretrain/preset=imagenet_100ep", "optim.batch_size=16"], 64
        case = "resnet50 64px batch 16 x 2 views, projector 3x8192, 1 thread"
    cands = candidates(log)
    if quick:  # the smoke test: the child processes and their measurements, not every candidate
        cands = {k: v for k, v in cands.items() if k == BASELINE or "run time" in k}
    # 2 warm-up steps at least: with the settings, the heap reaches its steady layout during the first steps
    spec = {"overrides": overrides, "image": image, "warmup": 1 if quick else max(warmup, 2), "steps": steps,
            "threads": 1}
    results: dict[str, list[dict]] = {name: [] for name in cands}
    log(f"[allocator] {case}: {len(cands)} candidates x {repeats} repeats, each a fresh process "
        f"({spec['warmup']} warm-up + {steps} timed steps)")
    for r in range(repeats):
        for name, env in cands.items():
            res = run_children(spec, env)
            results[name].append(res)
            log(f"[allocator] repeat {r + 1}/{repeats} {name}: {1000 * statistics.median(res['times']):.0f} ms/step, "
                f"{res['page_faults_per_step']:.0f} page faults/step, peak RSS {res['peak_rss_mb']:.0f} MiB")
    rows = []
    for name, runs in results.items():
        extra = {
            "page_faults_per_step": statistics.median(x["page_faults_per_step"] for x in runs),
            "sys_s_per_step": round(statistics.median(x["sys_s_per_step"] for x in runs), 3),
            "user_s_per_step": round(statistics.median(x["user_s_per_step"] for x in runs), 3),
            "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in runs), 1),
            "step_spread_pct": round(100 * statistics.median(
                (max(x["times"]) - min(x["times"])) / statistics.median(x["times"]) for x in runs), 1),
            "env": {k: v for k, v in cands[name].items() if v is not None},
        }
        rows.append(Row(NAME, case, name, "ms/step", [1000 * statistics.median(x["times"]) for x in runs],
                        baseline=None if name == BASELINE else BASELINE, extra=extra))
    return rows
