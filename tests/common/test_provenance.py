"""common.provenance: the git state of the code's checkout (clean, dirty, not a checkout, no git), the
package versions, the command line, and provenance.json kept over attempts and copied into COMPLETE and
results.json."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import provenance
from common.runlog import mark_complete, write_results

ROOT = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_collect_in_this_checkout_gives_the_head_commit():
    record = provenance.collect(world_size=3)
    assert record["git"]["commit"] == _git(ROOT, "rev-parse", "HEAD")
    assert record["git"]["dirty"] is bool(_git(ROOT, "status", "--porcelain"))
    assert record["world_size"] == 3 and record["hardware"]["cpu_count"] == os.cpu_count()
    assert record["hardware"]["gpu_count"] == len(record["hardware"]["gpus"])
    json.dumps(record)  # plain JSON


def _collect_in(code_root: Path) -> dict:
    """collect(1) in a fresh interpreter that imports common from ``code_root`` (so code_root() is that folder)."""
    out = subprocess.run([sys.executable, "-c", "import json; from common.provenance import collect; "
                          "print(json.dumps(collect(1)))"], cwd=code_root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(code_root)}, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_dirty_follows_changes_to_tracked_files_in_a_checkout_of_the_code(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "common", repo / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    _git(tmp_path, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "code")
    (repo / "outputs" / "pretrain").mkdir(parents=True)  # run outputs and data are gitignored: still clean
    (repo / "outputs" / "pretrain" / "COMPLETE").write_text("{}\n")
    (repo / "data").mkdir()
    (repo / "data" / "x.jpg").write_bytes(b"x")
    clean = _collect_in(repo)
    assert clean["git"] == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False, "changed": []}
    with open(repo / "common" / "errors.py", "a") as f:
        f.write("# an uncommitted change\n")
    dirty = _collect_in(repo)
    assert dirty["git"]["dirty"] is True and dirty["git"]["changed"] == ["common/errors.py"]
    assert dirty["git"]["commit"] == clean["git"]["commit"]
    _git(repo, "checkout", "--", "common/errors.py")
    assert provenance.git_state(repo)["dirty"] is False


def test_a_folder_that_is_not_a_checkout_or_no_git_gives_a_reason(tmp_path, monkeypatch):
    state = provenance.git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None and "not a git checkout" in state["reason"]
    inside = ROOT / "common"  # inside a checkout but not its top: not the code's own repository
    assert "not the top of a git checkout" in provenance.git_state(inside)["reason"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    record = provenance.collect(1, root=ROOT)
    assert record["git"]["commit"] is None and "git is not installed" in record["git"]["reason"]


def test_package_versions_are_the_installed_distributions():
    packages = provenance.collect(1)["packages"]
    for name in ("torch", "torchvision", "submitit", "hydra-core", "omegaconf", "fvcore", "numpy"):
        assert packages[name] == importlib.metadata.version(name), name
    dist = packages["detectron2_distribution"]
    assert dist in ("detectron2", "sal-detectron2") and packages["detectron2"] == importlib.metadata.version(dist)
    assert packages["python"] == ".".join(map(str, sys.version_info[:3]))


def test_command_line_round_trips_through_shlex(monkeypatch):
    argv = ["/opt/py 3/bin/python", "-m", "pretrain.train", "name=it's", "data.root=/a b/c", "x=$HOME;rm"]
    monkeypatch.setattr(sys, "orig_argv", argv)
    monkeypatch.delenv(provenance.COMMAND_LINE_ENV, raising=False)
    assert shlex.split(provenance.collect(1)["command_line"]) == argv
    monkeypatch.setenv(provenance.COMMAND_LINE_ENV, "submit pretrain --gpus 2 'name=a b'")
    assert provenance.command_line() == "submit pretrain --gpus 2 'name=a b'"  # the launcher's wins


def test_attempts_are_kept_and_complete_and_results_carry_the_latest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert provenance.run_summary(run) is None
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    first = provenance.record_attempt(run, world_size=2)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    second = provenance.record_attempt(run, world_size=4)  # a resume on other resources
    stored = json.loads((run / "provenance.json").read_text())["attempts"]
    assert stored == [first, second] and [a["slurm_job_id"] for a in stored] == ["41", "42"]
    summary = provenance.run_summary(run)
    assert summary["world_size"] == 4 and summary["attempts"] == 2
    assert "world_size" in summary["differs_across_attempts"] and "git" not in summary["differs_across_attempts"]
    written = mark_complete(run, {"steps": 5})
    assert json.loads((run / "COMPLETE").read_text()) == written and written["provenance"] == summary
    results = write_results(run, {"top1": 1.0})
    assert json.loads((run / "results.json").read_text()) == results and results["provenance"] == summary
    (run / "provenance.json").write_text("{not json")
    record = provenance.record_attempt(run, world_size=1)
    assert "unreadable" in record["note"] and provenance.run_summary(run)["attempts"] == 1


@pytest.mark.parametrize("given", [None, {"per_seed": {"seed0": None}}])
def test_a_run_without_provenance_json_says_none_unless_given(tmp_path, given):
    assert write_results(tmp_path, {"a": 1}, provenance=given)["provenance"] == given
