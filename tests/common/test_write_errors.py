"""Issue 21 item 6: a full disk or an unwritable folder is a user error (WriteError, exit 2) naming the path and
the fix, never torch's "unexpected pos" / a PermissionError traceback; the previous file stays and no temp file is
left. Tests run as root here, where chmod does not stop writes, so the OS errors are raised by monkeypatching the
writer (the one place each error comes from) and a truly unwritable run folder is a file in the way."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common.atomic as atomic
from common.atomic import atomic_torch_save, atomic_write_text
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _torch_save_that_fills_the_disk(exc):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real({"half": torch.zeros(1000)}, f)  # bytes reach the temp file, then the disk is full
        raise exc

    return save


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4160 vs 4054"),
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
], ids=["ENOSPC", "unexpected-pos", "stream-writer"])
def test_full_disk_during_a_checkpoint_write_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch, exc):
    target = tmp_path / "last.pth"
    atomic_torch_save({"step": 1}, target)
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", _torch_save_that_fills_the_disk(exc))
    with pytest.raises(UserError) as info:
        atomic_torch_save({"step": 2}, target)
    msg = str(info.value)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "last.pth")
    print(f"{type(exc).__name__} -> {msg}; leftover files: {len(leftovers)}")
    assert str(target) in msg and "free space" in msg
    assert "the disk mounted at /" in msg and " bytes free (" in msg  # which disk, and how full it is
    assert target.read_bytes() == before and leftovers == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_folder_names_the_path_and_the_fix(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match="choose a writable folder") as info:
        atomic_write_text(tmp_path / "results.json", "{}")
    print(info.value)
    assert str(tmp_path / "results.json") in str(info.value) and not list(tmp_path.iterdir())


def test_an_unrelated_runtime_error_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_save_that_fills_the_disk(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug") as info:
        atomic_torch_save({}, tmp_path / "x.pth")
    assert not isinstance(info.value, UserError) and not list(tmp_path.iterdir())


def test_pretrain_cli_with_an_unwritable_run_folder_exits_2_before_hydra_writes(tmp_path):
    (tmp_path / "file").write_text("in the way")
    run_dir = tmp_path / "file" / "run"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "pretrain/preset=synthetic", f"run_dir={run_dir}",
                           "train.max_steps=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(f"exit {proc.returncode}: {proc.stderr.strip()}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot write {run_dir}" in proc.stderr and "fix:" in proc.stderr


def test_stage_checks_a_read_only_run_folder_at_start(tiny_synthetic, tmp_path, monkeypatch):
    from pretrain import engine, train
    from tests.stage_fixtures import compose_pretrain, tiny_overrides

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run"))

    monkeypatch.setattr(atomic.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    built = []
    monkeypatch.setattr(engine.PretrainEngine, "fit", lambda self: built.append(self) or {})
    with pytest.raises(UserError, match="read-only") as info:
        train.run(compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.max_steps=1")))
    print(info.value, f"; engines that ran: {len(built)}")
    assert built == []
