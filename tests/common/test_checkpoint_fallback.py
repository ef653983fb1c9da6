"""The previous good checkpoint (``last.prev.pth``) and the resume fallback (issue 19): which file a run
resumes from when ``last.pth`` is cut, garbage or missing, and what it says; the same decision for the
evaluations' classifier checkpoint reader."""

from __future__ import annotations

import os

import pytest
import torch

from common.atomic import atomic_torch_save
from common.checkpoint import (
    CheckpointError,
    find_resume_point,
    keep_previous_file,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)


def _state(step: int, **extra) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "ema_model": None, "epoch": step // 3, "step": step,
            "config": {}, **extra}


def _cut(path, fraction: float = 0.5) -> None:
    """What a full disk or a partial copy leaves: the first part of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_each_save_keeps_the_file_it_replaces_as_last_prev(tmp_path):
    last = tmp_path / "last.pth"
    for step in (2, 4, 6):
        save_checkpoint(_state(step), last, keep_previous=True)
    prev = previous_path(last)
    print(f"after saves at steps 2, 4, 6: last.pth step {load_checkpoint(last)['step']}, "
          f"{prev.name} step {load_checkpoint(prev)['step']}; files {sorted(p.name for p in tmp_path.iterdir())}")
    assert prev.name == "last.prev.pth"
    assert load_checkpoint(last)["step"] == 6 and load_checkpoint(prev)["step"] == 4
    assert os.stat(last).st_ino != os.stat(prev).st_ino  # two files once the write is done (a hard link during it)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pth", "last.prev.pth"}  # no temporary left


def test_an_unreadable_last_never_replaces_a_good_previous_file(tmp_path):
    last = tmp_path / "last.pth"
    save_checkpoint(_state(2), last, keep_previous=True)
    save_checkpoint(_state(4), last, keep_previous=True)
    _cut(last)
    assert keep_previous_file(last) is None  # the cut file is not kept ...
    save_checkpoint(_state(6), last, keep_previous=True)
    assert load_checkpoint(previous_path(last))["step"] == 2  # ... the good one stays
    assert load_checkpoint(last)["step"] == 6


@pytest.mark.parametrize("damage", ["cut to half", "cut to 1 byte", "garbage", "empty", "missing"])
def test_resume_falls_back_to_last_prev_when_last_cannot_be_read(tmp_path, damage):
    last = tmp_path / "last.pth"
    save_checkpoint(_state(4), last, keep_previous=True)
    save_checkpoint(_state(6), last, keep_previous=True)
    if damage == "missing":
        last.unlink()
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        _cut(last, 0.5 if damage == "cut to half" else 1 / last.stat().st_size)
    point = find_resume_point(last)
    print(f"last.pth {damage}: {point.describe()}")
    assert point.path == previous_path(last) and point.step == 4 and point.is_fallback
    assert [p.name for p, _ in point.passed_over] == ["last.pth"]
    why = point.passed_over[0][1]
    assert ("last.pth does not exist" if damage == "missing" else "last.pth could not be read as a torch checkpoint") \
        in why
    assert point.record() == {"resumed_from": "last.prev.pth", "step": 4, "passed_over": {"last.pth": why}}


def test_the_newest_readable_of_previous_and_snapshots_wins(tmp_path):
    last = tmp_path / "last.pth"
    for step in (3, 4, 6):  # 3 steps per epoch: snapshots epoch_1 (step 3) and epoch_2 (step 6)
        save_checkpoint(_state(step), last, keep_previous=True)
        if step % 3 == 0:
            save_checkpoint(_state(step, snapshot=True), tmp_path / f"epoch_{step // 3}.pth")
    _cut(last)
    chosen = [find_resume_point(last)]  # epoch_2 (step 6) is newer than last.prev.pth (step 4)
    _cut(tmp_path / "epoch_2.pth")
    chosen.append(find_resume_point(last))
    _cut(previous_path(last))
    chosen.append(find_resume_point(last))
    print("fallbacks as files are cut: " + "; ".join(f"{p.path.name} (step {p.step})" for p in chosen))
    assert [(p.path.name, p.step) for p in chosen] == [("epoch_2.pth", 6), ("last.prev.pth", 4), ("epoch_1.pth", 3)]
    assert [p.name for p, _ in chosen[-1].passed_over] == ["last.pth", "last.prev.pth", "epoch_2.pth"]


def test_no_usable_checkpoint_is_refused_naming_every_file(tmp_path):
    last = tmp_path / "last.pth"
    assert find_resume_point(last) is None  # a new run
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read as a torch checkpoint.*fix: pass a .pth"):
        find_resume_point(last)  # nothing to fall back to: the reader's own message
    previous_path(last).write_bytes(b"\x80\x04truncated")
    (tmp_path / "epoch_1.pth").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        find_resume_point(last)
    msg = str(err.value)
    print(msg)
    assert msg.count("could not be read") == 3
    assert "fix: move last.pth, last.prev.pth, epoch_1.pth away to restart the run from step 0" in msg


def test_classifier_checkpoints_fall_back_the_same_way(tmp_path):
    from transfer.classification import CLASSIFIER_FORMAT, load_classifier_checkpoint

    last = tmp_path / "last.pth"
    for epoch in (1, 2):  # as fit_classifier writes it
        keep_previous_file(last)
        atomic_torch_save({"format": CLASSIFIER_FORMAT, "model": {}, "optimizer": {}, "epoch": epoch, "step": 3 * epoch,
                    "best_top1": 0.0, "history": []}, last)
    (tmp_path / "epoch_1.pth").write_bytes(b"")  # not the classifier's: snapshots=False never looks at it
    _cut(last)
    point = find_resume_point(last, load=load_classifier_checkpoint, snapshots=False)
    assert point.path.name == "last.prev.pth" and point.state["epoch"] == 1 and point.step == 3
    assert "the resume checkpoint" in point.passed_over[0][1]  # the classifier reader's words
