"""Semi-supervised fine-tuning end to end on a class-balanced 10% subset of the tiny embedded set."""

import json
from pathlib import Path

import pytest
import torch

from stage_fixtures import semi_cfg
from transfer import semi
from transfer.subsets import read_subset_list


def test_semi_on_a_ten_percent_subset_end_to_end(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "semi10"
    res = semi.run(semi_cfg(tiny_synthetic, run_dir, "optim.epochs=2"))
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["top1"] == res["top1"] and 0.0 <= res["top1"] <= 100.0 and res["top5"] >= res["top1"]
    assert on_disk["epochs"] == 2 and on_disk["n_train"] == 20 and on_disk["n_val"] == 40
    sub = on_disk["subset"]
    assert sub["percent"] == 10.0 and sub["n_images"] == 20 and sub["n_classes"] == 10
    assert on_disk["steps"] == 2 * 5  # 20 labelled images / batch 4, two epochs
    assert on_disk["backbone_lr"] == pytest.approx(0.006 * 4 / 256) and \
        on_disk["classifier_lr"] == pytest.approx(0.2 * 4 / 256)
    names = read_subset_list(sub["saved_list"])  # the drawn subset is saved as a reusable SimCLR list
    assert len(names) == 20 and Path(sub["saved_list"]).parent == run_dir
    assert (run_dir / "COMPLETE").exists() and (run_dir / "config.yaml").exists() and any((run_dir / "tb").iterdir())
    # Fine-tuning trains the backbone too: its checkpoint holds every tensor, not just the classifier.
    saved = torch.load(run_dir / "last.pth", weights_only=False)
    assert "layer1.0.conv1.weight" in saved["model"] and "fc.weight" in saved["model"]
    # The saved list reproduces the run's subset (what subset.list=<saved> would train on).
    from common.imagefolder import RobustImageFolder
    from transfer.subsets import balanced_subset, subset_indices

    ds = RobustImageFolder(tiny_synthetic / "classification" / "train")
    assert subset_indices(ds.samples, names) == subset_indices(ds.samples, balanced_subset(ds.samples, 10, seed=0))
