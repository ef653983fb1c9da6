"""Faults of the shared run-folder helpers (issue 21): a torn metrics line, stale temporaries, a
non-finite checkpoint."""

from __future__ import annotations

import pytest
import torch

from common.atomic import atomic_path
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.runlog import MetricsLogger, read_metrics


def test_read_metrics_drops_a_torn_last_line_and_names_a_bad_middle_one(tmp_path):
    from common.runlog import MetricsFileError

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2):
        logger.log(step, loss=0.5 / step)
    logger.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a kill during the write of row 3
    rows = read_metrics(tmp_path)
    print(f"torn last line: {len(rows)} rows read, steps {[r['step'] for r in rows]}")
    assert [r["step"] for r in rows] == [1, 2]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")  # not what a crash leaves
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl line 2 is not JSON.*fix: delete that line"):
        read_metrics(tmp_path)


def test_remove_stale_temporaries_removes_only_that_files_leftovers(tmp_path):
    from common.atomic import remove_stale_temporaries

    target = tmp_path / "last.pth"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        raise KeyboardInterrupt  # the normal path cleans up after itself ...
    assert not tmp.exists()
    stale = [tmp_path / f".last.{k}.tmp.pth" for k in ("a1b2", "zz_9")]  # ... a SIGKILL does not
    keep = [tmp_path / n for n in (".config.x1.tmp.yaml", "last.pth.bak", ".last.x.tmp.pkl", "last.pth")]
    for p in stale + keep:
        p.write_bytes(b"0")
    assert tmp.name.startswith(".last.") and tmp.name.endswith(".tmp.pth")  # the names atomic_path gives
    removed = remove_stale_temporaries(target)
    print(f"removed {len(removed)} of {len(stale) + len(keep)} files")
    assert removed == sorted(stale) and all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_save_checkpoint_refuses_nonfinite_tensors_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pth"
    good = {"model": {"w": torch.ones(3), "bn.running_var": torch.ones(2)}, "ema_model": None, "epoch": 0,
            "step": 4, "config": {}}
    save_checkpoint(good, path)
    before = path.read_bytes()
    bad = {**good, "step": 5, "ema_model": {"bn.running_var": torch.tensor([1.0, float("nan")]),
                                            "num_batches_tracked": torch.tensor(3)}}
    with pytest.raises(CheckpointError, match=r"not writing .*last\.pth at step 5: 1 tensor\(s\) hold NaN/inf "
                                              r"\(ema_model\.bn\.running_var\).*previous checkpoint"):
        save_checkpoint(bad, path)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
