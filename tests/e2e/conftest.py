"""End-to-end tests: they train, convert and evaluate for real (a few minutes on 2 CPU cores). Every
test in this folder is marked ``slow`` here, once (``make test-fast`` leaves them out); the ones that need
the localhost Slurm are marked ``slurm`` in their own files."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in item.path.as_posix():
            item.add_marker(pytest.mark.slow)
