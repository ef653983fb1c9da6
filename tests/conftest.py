import os
import signal
from pathlib import Path

import pytest
import torch

import stage_fixtures
from slurm import stages
from stage_fixtures import ROOT

TESTS = ROOT / "tests"

# Two cores shared by the test process and the ranks it spawns: one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("INTL_TEST_THREADS", "1")))

# The Ctrl-C tests start processes that must get SIGINT as from a terminal, and a process inherits an ignored
# SIGINT: a non-interactive shell ignores it in the commands it starts in the background (`make test &`, nohup),
# and Python then never raises KeyboardInterrupt. The test process (each pytest-xdist worker too) takes Python's
# default handler back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves os.environ as it found it. Code under test may export RANK/WORLD_SIZE/MASTER_* (the
    launcher does, for its task); a leftover WORLD_SIZE makes a later in-process run wait forever for ranks
    that never come (monkeypatch.delenv of an absent key does not undo a later set)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def one_thread():
    """torch computes with one thread during the test (its numbers do not depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_root() -> Path:
    """The default embedded datasets (built by `make data`, regenerated here if missing)."""
    from filelock import FileLock

    from common.synthetic import SyntheticSpec, generate

    root = ROOT / "data" / "synthetic"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / ".synthetic.lock"):  # pytest-xdist workers: one generates, the others wait
        generate(root, SyntheticSpec())
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A very small copy of the embedded datasets for fast end-to-end tests."""
    from common.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("tiny_synthetic")
    generate(root, SyntheticSpec(cls_size=32, cls_train_per_class=12, cls_val_per_class=4,
                                 det_size=96, det_train_images=8, det_val_images=4))
    return root


@pytest.fixture
def counter_env(tmp_path, monkeypatch):
    """For the launcher tests: cwd = a fresh folder; the test-only `counter` stage registered
    (stage_fixtures); job processes can import stage_fixtures."""
    cfg_dir = stage_fixtures.write_counter_config(tmp_path / "cfgs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, stage_fixtures.extra_stages_env(cfg_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("INTL_SUBMIT_POLL_S", "0.5")
    return tmp_path


@pytest.fixture
def fakedet_env(counter_env, monkeypatch):
    """counter_env plus a detection-like test stage (`fakedet`) and its one-line config file."""
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, "fakedet=stage_fixtures:run_seed@detectron2")
    cfg = counter_env / "det.yaml"
    cfg.write_text("MODEL:\n  WEIGHTS: ''\n")
    return cfg
