"""common.distributed without processes: the collective timeout setting."""

from __future__ import annotations

import pytest

from common.distributed import DEFAULT_TIMEOUT_MIN, TIMEOUT_ENV, collective_timeout_min
from common.errors import ConfigError


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout_min() == DEFAULT_TIMEOUT_MIN == 30
    monkeypatch.setenv(TIMEOUT_ENV, "0.25")
    assert collective_timeout_min() == 0.25
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"{TIMEOUT_ENV}='{bad}' is not a positive number of minutes"):
            collective_timeout_min()
