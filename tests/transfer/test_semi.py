"""Semi-supervised fine-tuning: paper presets, subset selection errors, and an end-to-end run on a 10% subset."""


import pytest

from common.config import compose_config
from stage_fixtures import semi_cfg
from transfer import semi
from transfer.subsets import SubsetError, resolve_subset_list


def test_paper_presets_read_back():
    for preset, pct, blr in (("imagenet_10pct", 10, 0.006), ("imagenet_1pct", 1, 0.006),
                             ("imagenet_10pct_ema", 10, 0.004), ("imagenet_1pct_ema", 1, 0.004)):
        cfg = compose_config("semi", [f"eval/semi={preset}"])
        o = cfg.optim
        assert (o.epochs, o.batch_size, o.base_lr, o.backbone_base_lr, o.momentum, o.weight_decay, o.schedule) == \
            (20, 256, 0.2, blr, 0.9, 0.0, "cosine"), preset
        assert cfg.subset.list == f"{pct}percent" and cfg.subset.percent is None  # the shipped list, by name
        assert resolve_subset_list(cfg.subset.list).is_file()
    assert compose_config("semi", []).subset.list == "10percent"  # the default preset
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


