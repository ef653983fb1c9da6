"""`submit doctor` without processes: the verdict on gathered rows, the table, the data reading, the config.
(The real multi-process runs: tests/e2e/test_submit_local.py, tests/e2e/test_slurm_two_nodes.py.)"""

from __future__ import annotations

import copy
import re

import pytest

from common.config import compose_config
from common.errors import ConfigError
from slurm import doctor


def _row(rank: int, host: str, local: int, local_world: int = 2, address: str | None = None) -> dict:
    return {"rank": rank, "local_rank": local, "world_size": 4, "local_world_size": local_world, "host": host,
            "address": address or f"10.0.0.{11 + rank // 2}", "device": "cpu", "cuda_visible_devices": None,
            "pid": 100 + rank, "env": {"NCCL_SOCKET_IFNAME": "ib0"} if rank == 0 else {},
            "collectives": {"all_reduce": True, "all_gather": True, "all_reduce_ms": 2.5, "big_ok": True},
            "data": {"checked": True, "ok": True, "files": 8, "bytes": 8192},
            "run_folder": {"shared": True, "free_gb": 120.0}}


def _rows() -> list[dict]:
    return [_row(0, "n1", 0), _row(1, "n1", 1), _row(2, "n2", 0), _row(3, "n2", 1)]


def test_a_good_set_up_has_no_problem_and_its_table_has_one_row_per_rank():
    rows = _rows()
    assert doctor.problems(rows, 4, min_free_gb=10, nodes=2) == []
    text = doctor.table(rows)
    lines = [ln for ln in text.splitlines() if re.match(r"\| \d ", ln)]
    assert len(lines) == 4
    assert lines[0] == ("| 0 | n1 | 0/2 | cpu | 10.0.0.11 | ok (2.5 ms) | ok | 8 files, 8.0 KB | 120.0 GB | shared | "
                        "NCCL_SOCKET_IFNAME=ib0 |")
    assert lines[3].startswith("| 3 | n2 | 1/2 | cpu | 10.0.0.12 |") and lines[3].endswith("| shared | - |")


def _broken(change) -> list[str]:
    rows = copy.deepcopy(_rows())
    change(rows)
    return doctor.problems(rows, 4, min_free_gb=10, nodes=2)


@pytest.mark.parametrize("change,expected", [
    (lambda rows: (rows.pop(), rows[2].update(local_world_size=1)), "ranks [0, 1, 2] met, expected 0..3"),
    (lambda rows: [r.update(host="same", local_rank=r["rank"], local_world_size=4) for r in rows],
     "1 host name(s) (same) for 2 node(s)"),
    (lambda rows: rows[3].update(local_rank=0), "host n2: local ranks [0, 0]"),
    (lambda rows: [r.update(device="cuda:0") for r in rows[:2]], "host n1: several ranks on one GPU"),
    (lambda rows: [r.update(address="127.0.1.1") for r in rows[2:]],
     "ranks 2, 3 (n2): the host name resolves to 127.0.1.1, which the other nodes cannot reach"),
    (lambda rows: rows[1]["collectives"].update(all_reduce=False), "rank 1 (n1): all_reduce of known values gave a "
                                                                   "wrong result"),
    (lambda rows: rows[2]["collectives"].update(all_gather=False), "rank 2 (n2): all_gather of known values"),
    (lambda rows: [r.update(data={"checked": True, "ok": False, "error": "no file under /d"}) for r in rows[2:]],
     "ranks 2, 3 (n2): data.root unreadable: no file under /d"),
    (lambda rows: rows[3].update(run_folder={"shared": False, "error": "FileNotFoundError: x"}),
     "rank 3 (n2): run folder: FileNotFoundError: x"),
    (lambda rows: [r["run_folder"].update(free_gb=2.0) for r in rows[:2]],
     "ranks 0, 1 (n1): 2.0 GB free in the run folder's filesystem, less than disk.min_free_gb=10"),
])
def test_each_problem_is_found_and_named_once_per_host(change, expected):
    found = _broken(change)
    assert len(found) == 1 and expected in found[0], found


def test_loopback_addresses_are_fine_on_one_host():
    rows = [_row(0, "vm", 0, address="127.0.0.1"), _row(1, "vm", 1, address="127.0.0.1")]
    assert doctor.problems(rows, 2, min_free_gb=10) == []


def test_read_data_reads_the_first_files_in_full(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.bin").write_bytes(b"x" * (10 + i))
    assert doctor.read_data(str(tmp_path), 4) == {"checked": True, "ok": True, "files": 4, "bytes": 10 + 11 + 12 + 10}
    assert doctor.read_data(None, 4) == {"checked": False}
    missing = doctor.read_data(str(tmp_path / "nope"), 4)
    assert not missing["ok"] and "is not a folder on this node" in missing["error"]
    (tmp_path / "empty").mkdir()
    assert doctor.read_data(str(tmp_path / "empty"), 4)["error"] == f"no file under {tmp_path / 'empty'}"


def test_the_config_names_a_fresh_folder_and_checks_data_root(tmp_path):
    cfg = doctor.validate_config(compose_config("doctor", []))
    assert re.fullmatch(r"doctor_\d{8}-\d{6}", cfg.name) and cfg.run_dir == f"outputs/doctor/{cfg.name}"
    assert cfg.data.root is None and cfg.disk.min_free_gb == 10
    with pytest.raises(ConfigError, match="data.root=/no/such is not a folder here"):
        doctor.validate_config(compose_config("doctor", ["data.root=/no/such"]))
    with pytest.raises(ConfigError, match="data.files must be >= 1"):
        doctor.validate_config(compose_config("doctor", ["data.files=0"]))
