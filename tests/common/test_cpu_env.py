"""The settings of CPU runs: the malloc settings stop the page faults of a training step's large blocks, every
stage gets them (init_distributed), the Makefile starts the demo, the tests and the benchmarks with all of them,
`submit --cluster local` passes them to its processes on a machine without CUDA, and a user's own choice is
left alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import cpu_env
from common.cpu_env import CPU_ENV, MALLOC_ENV, OMP_ENV, OPT_OUT_ENV, export_cpu_env, tune_cpu_allocator, tune_malloc
from slurm.executor import LOCAL, Resources, make_executor

ROOT = Path(__file__).resolve().parents[2]

# Allocates and frees a 64 MiB tensor (a large activation) 10 times after 15 warm-ups, as a training step
# does every step, and prints the page faults of those 10 rounds. (With the settings, the first rounds still
# grow the heap: the freed block is a little too small for the next aligned request until the freed blocks
# coalesce, after about 6 rounds; a training step gets there within its first steps.)
CHURN = """
import json, resource, sys, torch
from common.distributed import init_distributed
if sys.argv[1] == "stage":
    init_distributed()
def faults():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt + ru.ru_majflt
for i in range(25):
    if i == 15:
        before = faults()
    x = torch.empty(16 * 2**20).fill_(1.0)
    del x
print(json.dumps({"faults": faults() - before}))
"""


def _faults(mode: str, env: dict) -> int:
    base = {k: v for k, v in os.environ.items()
            if k not in (*MALLOC_ENV, OPT_OUT_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**base, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and its page-fault counts: Linux")
def test_the_settings_stop_the_page_faults_of_large_blocks_in_every_stage_process():
    pages = 64 * 2**20 // 4096  # one round faults in every page of the block under glibc's defaults
    default = _faults("stage", {OPT_OUT_ENV: "default"})
    stage = _faults("stage", {})  # init_distributed applies the settings by mallopt
    from_env = _faults("plain", dict(MALLOC_ENV))  # the Makefile's way: the environment at start
    print(f"page faults over 10 rounds of a 64 MiB block: glibc defaults {default}, stage (mallopt) {stage}, "
          f"environment {from_env}")
    assert default > 5 * pages
    assert stage < pages / 10 and from_env < pages / 10


def test_a_users_own_allocator_choice_is_left_alone(monkeypatch):
    for key in (*MALLOC_ENV, OPT_OUT_ENV, "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in [(OPT_OUT_ENV, "default"), ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                       ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=4"), ("MALLOC_MMAP_MAX_", "65536")]:
        with monkeypatch.context() as m:
            m.setenv(key, value)
            assert tune_malloc() is False, key
    monkeypatch.setenv("MALLOC_MMAP_MAX_", MALLOC_ENV["MALLOC_MMAP_MAX_"])  # our own value: nothing to respect
    assert tune_malloc() is sys.platform.startswith("linux")
    assert tune_cpu_allocator("cuda:0") is False and tune_cpu_allocator("cpu") is tune_malloc()


def test_the_makefile_starts_demo_test_and_bench_with_the_settings():
    line = subprocess.run([sys.executable, "-m", "common.cpu_env", "--env"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()
    assert dict(kv.split("=", 1) for kv in line) == CPU_ENV
    dry = subprocess.run(["make", "-n", "-o", "venv", "-o", "data", "-o", "lint", "-o", ".venv/.intl-stamp",
                          "demo", "test", "test-fast", "bench"], cwd=ROOT, capture_output=True, text=True, check=True)
    commands = [c for c in dry.stdout.splitlines()
                if any(k in c for k in ("tools/demo.py", "-m pytest", "tools/run-tests.sh", "-m benchmarks"))]
    assert len(commands) == 4
    assert all(c.startswith("env $(.venv/bin/python -m common.cpu_env --env) ") for c in commands), commands
    assert cpu_env.main(["--env"]) == 0


def test_local_processes_get_the_settings_the_user_did_not_set(monkeypatch, tmp_path):
    for key in (*CPU_ENV, OPT_OUT_ENV, "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.setenv(key, "")  # recorded, so that the teardown restores the test process's environment
        monkeypatch.delenv(key)
    assert export_cpu_env({"OMP_WAIT_POLICY": "ACTIVE"}) == MALLOC_ENV  # the user's value wins
    jemalloc = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert export_cpu_env(jemalloc) == OMP_ENV and "MALLOC_MMAP_MAX_" not in jemalloc
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_executor(Resources(cluster=LOCAL, gpus=2), tmp_path)  # submit --cluster local on a CPU machine
    assert {k: os.environ.get(k) for k in CPU_ENV} == CPU_ENV  # what the LocalExecutor's processes inherit
