"""Semi-supervised fine-tuning: paper presets, subset selection errors, and an end-to-end run on a 10% subset."""

import json
from pathlib import Path

import pytest
import torch

from common.config import compose_config
from transfer import semi
from transfer.subsets import SubsetError, read_subset_list


def semi_cfg(data_root: Path, run_dir: Path, *extra: str):
    """The synthetic preset (class-balanced 10% drawn from seed) on the tiny set: 12 labelled images."""
    return compose_config("semi", ["eval/semi=synthetic", f"data.root={data_root / 'classification'}",
                                   f"run_dir={run_dir}", "data.workers=0", "optim.batch_size=4",
                                   "train.log_every=1", "model.arch=resnet18", *extra])


def test_paper_presets_read_back():
    for preset, pct, blr in (("imagenet_10pct", 10, 0.006), ("imagenet_1pct", 1, 0.006),
                             ("imagenet_10pct_ema", 10, 0.004), ("imagenet_1pct_ema", 1, 0.004)):
        cfg = compose_config("semi", [f"eval/semi={preset}"])
        o = cfg.optim
        assert (o.epochs, o.batch_size, o.base_lr, o.backbone_base_lr, o.momentum, o.weight_decay, o.schedule) == \
            (20, 256, 0.2, blr, 0.9, 0.0, "cosine"), preset
        assert cfg.subset.list.endswith(f"{pct}percent.txt") and cfg.subset.percent is None
    assert compose_config("semi", []).subset.list.endswith("10percent.txt")  # the default preset
    syn = semi.validate_config(compose_config("semi", ["eval/semi=synthetic", "model.arch=resnet18"]),
                               check_paths=False)
    assert syn.subset.percent == 10 and syn.subset.list is None


def test_list_naming_files_not_in_the_dataset_fails_before_training(tiny_synthetic, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("circle_00000.jpg\ncircle_00999.jpg\nsquare_00001.jpg\nstar_00777.jpg\n")
    cfg = semi_cfg(tiny_synthetic, tmp_path / "run", f"subset.list={listing}", "subset.percent=null")
    with pytest.raises(SubsetError, match=r"2 of the 4 files .*circle_00999.jpg.*star_00777.jpg"):
        semi.run(cfg)
    assert not (tmp_path / "run" / "last.pth").exists()
    both = semi_cfg(tiny_synthetic, tmp_path / "run", f"subset.list={listing}")
    with pytest.raises(ValueError, match="exactly one of subset.list"):
        semi.validate_config(both)


@pytest.mark.slow
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
