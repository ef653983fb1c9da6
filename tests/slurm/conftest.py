"""The launcher's unit tests run as on a login node whose controller does not answer: the dry runs print what
they would submit without checking partitions. The session's localhost Slurm (tests/e2e/conftest.py) may be up
when they run, so `sinfo` is shadowed here by one that fails, as it does with no controller (partition_info()
then returns None). Tests that need a cluster are e2e tests marked `slurm`."""

import os

import pytest


@pytest.fixture(autouse=True)
def _no_slurm_controller(tmp_path_factory, monkeypatch):
    shims = tmp_path_factory.getbasetemp() / "no-slurm-controller"
    sinfo = shims / "sinfo"
    if not sinfo.exists():
        shims.mkdir(exist_ok=True)
        sinfo.write_text("#!/bin/sh\necho 'sinfo: error: no controller answers (tests/slurm/conftest.py)' >&2\n"
                         "exit 1\n")
        sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ.get('PATH', '')}")
