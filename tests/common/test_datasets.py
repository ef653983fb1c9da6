"""Every reader of common.datasets on small data in the real on-disk format: STL-10's binary release written
byte for byte as the official files are, a flat folder, a file list, ImageNet-100 built from a fake ImageNet root;
and what needs labels refusing what has none."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.datasets import (
    STL10Binary,
    UnlabelledDataError,
    class_list,
    image_set_size,
    is_labelled,
    num_classes,
    open_image_set,
    require_labels,
)
from common.imagefolder import UNLABELLED, DataRootError, unreadable_files_all_ranks
from pretrain.monitor import build_monitor_sets
from stage_fixtures import write_images, write_stl10_binary


# ------------------------------------------------------------------------------------------ STL-10
def test_stl10_binary_release_reads_back_every_image_and_label(tmp_path):
    written = write_stl10_binary(tmp_path, n_train=20, n_test=10, n_unlabeled=30)
    for split in ("train", "test", "unlabeled"):
        ds = open_image_set("stl10", tmp_path, split)
        images, labels = written[split]
        assert isinstance(ds, STL10Binary) and len(ds) == len(images) == image_set_size("stl10", tmp_path, split)
        for i in (0, 7, len(ds) - 1):
            img, y = ds[i]
            assert img.size == (96, 96)
            assert np.array_equal(np.asarray(img), images[i]), (split, i)  # the exact pixels, right orientation
            assert y == (labels[i] if labels is not None else -1)
    both = open_image_set("stl10", tmp_path, "train+unlabeled")
    assert len(both) == 50 and image_set_size("stl10", tmp_path, "train+unlabeled") == 50
    assert is_labelled(open_image_set("stl10", tmp_path, "train")) and num_classes(both) == 0
    assert not is_labelled(both) and not is_labelled(open_image_set("stl10", tmp_path, "unlabeled"))
    assert open_image_set("stl10", tmp_path, "test").classes[0] == "airplane"


def test_stl10_missing_or_torn_files_are_named(tmp_path):
    with pytest.raises(DataRootError, match=r"stl10_binary/unlabeled_X.bin, which does not exist.*nothing is "
                                            r"downloaded"):
        open_image_set("stl10", tmp_path, "unlabeled")
    write_stl10_binary(tmp_path, n_train=10, n_test=10, n_unlabeled=10)
    torn = tmp_path / "stl10_binary" / "test_X.bin"
    torn.write_bytes(torn.read_bytes()[:-5])
    with pytest.raises(DataRootError, match=r"test_X.bin has \d+ bytes, not a whole number of 96x96 RGB images"):
        open_image_set("stl10", tmp_path, "test")
    (tmp_path / "stl10_binary" / "train_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(DataRootError, match=r"train_y.bin must hold one label byte per image of train_X.bin \(10\)"):
        image_set_size("stl10", tmp_path, "train")
    with pytest.raises(DataRootError, match="split 'val' is unknown"):
        open_image_set("stl10", tmp_path, "val")


# ------------------------------------------------------------------------------------------ unlabelled sets
def test_flat_folder_reads_every_image_recursively_and_skips_unreadable_ones(tmp_path):
    root = tmp_path / "photos"
    files = [root / "a.jpg", root / "2024" / "b.png", root / "2024" / "deep" / "c.JPEG", root / "x" / "d.jpg"]
    write_images(files)
    (root / "notes.txt").write_text("not an image")  # not an image extension: not listed
    (root / "x" / "d.jpg").write_bytes(b"corrupt")   # an image name, unreadable: skipped and counted
    ds = open_image_set("folder", tmp_path, "photos", transform=lambda im: torch.tensor(im.size))
    assert len(ds) == 4 and sorted(Path(p).name for p, _ in ds.samples) == ["a.jpg", "b.png", "c.JPEG", "d.jpg"]
    with pytest.warns(RuntimeWarning, match="d.jpg"):
        got = [ds[i] for i in range(len(ds))]
    assert all(y == UNLABELLED for _, y in got) and all(x.tolist() == [16, 16] for x, _ in got)
    assert ds.num_skipped == 1 and unreadable_files_all_ranks(ds) == [str(root / "x" / "d.jpg")]
    assert not is_labelled(ds) and num_classes(ds) == 0
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataRootError, match="holds no image file"):
        open_image_set("folder", tmp_path, "empty")
    with pytest.raises(DataRootError, match="does not exist"):
        open_image_set("folder", tmp_path, "missing")


def test_file_list_reads_the_listed_paths_relative_to_the_root(tmp_path):
    write_images([tmp_path / "imgs" / "1.jpg", tmp_path / "imgs" / "sub" / "2.jpg", tmp_path / "imgs" / "3.jpg"])
    listing = tmp_path / "train.txt"
    listing.write_text("# my selection\nsub/2.jpg\n\n1.jpg\n")
    ds = open_image_set("filelist", tmp_path, "imgs", file_list=listing)
    assert [Path(p).relative_to(tmp_path / "imgs").as_posix() for p, _ in ds.samples] == ["sub/2.jpg", "1.jpg"]
    img, y = ds[0]
    assert img.size == (16, 16) and y == UNLABELLED and not is_labelled(ds)
    listing.write_text("1.jpg\ngone.jpg\n")
    with pytest.raises(DataRootError, match=r"1 of the 2 files .*gone.jpg.*fix: set data.root"):
        open_image_set("filelist", tmp_path, "imgs", file_list=listing)
    with pytest.raises(DataRootError, match="needs data.file_list"):
        open_image_set("filelist", tmp_path, "imgs")


def test_evaluations_refuse_unlabelled_sets_with_the_fix(tmp_path):
    write_images([tmp_path / "a.jpg"])
    with pytest.raises(UnlabelledDataError, match=r"linear evaluation needs class labels.*fix: an ImageFolder"):
        require_labels(open_image_set("folder", tmp_path), "linear evaluation")
    write_stl10_binary(tmp_path / "stl", n_train=10, n_test=10, n_unlabeled=10)
    with pytest.raises(UnlabelledDataError):
        require_labels(open_image_set("stl10", tmp_path / "stl", "unlabeled"), "k-NN")
    require_labels(open_image_set("stl10", tmp_path / "stl", "train"), "k-NN")  # labelled: fine
    from common.config import compose_config
    from transfer.classification import EvalConfigError, validate_eval_config

    for stage in ("linear", "knn", "embed"):
        cfg = compose_config(stage, ["data.kind=folder", "model.arch=resnet18"])
        with pytest.raises(EvalConfigError, match=r"data.kind='folder': the evaluations need labelled images; choose "
                                                  r"one of \['imagefolder', 'stl10'\] \(flat folders and file lists"):
            validate_eval_config(cfg, stage, check_paths=False)


# ------------------------------------------------------------------------------------------ ImageNet-100
def test_shipped_imagenet100_list_is_the_cmc_solo_learn_subset():
    classes = class_list("imagenet100")
    assert len(classes) == len(set(classes)) == 100
    assert all(c.startswith("n") and len(c) == 9 for c in classes)
    assert classes[:3] == ["n02869837", "n01749939", "n02488291"] and classes[-1] == "n02090622"


def _fake_imagenet(root: Path, wnids, extra=("n99999991", "n99999992")) -> None:
    """<root>/{train,val}/<wnid>/<wnid>_<i>.JPEG, one tiny JPEG per class and split, plus classes not in the list."""
    files = [root / split / w / f"{w}_{i}.JPEG" for split, i in (("train", 1), ("val", 2)) for w in (*wnids, *extra)]
    write_images(files, size=8)


def test_imagenet100_is_read_from_a_full_imagenet_root_without_a_copy(tmp_path):
    wnids = class_list("imagenet100")
    _fake_imagenet(tmp_path, wnids)
    ds = open_image_set("imagefolder", tmp_path, "train", classes="imagenet100")
    assert ds.classes == sorted(wnids) and len(ds) == 100  # the two extra classes are not read
    assert all(Path(p).parent.name == ds.classes[y] for p, y in ds.samples)
    # class indices as ImageFolder gives them on a copy of the subset (sorted folder names)
    import shutil
    copy = tmp_path / "copy"
    for w in wnids:
        shutil.copytree(tmp_path / "train" / w, copy / w)
    from torchvision.datasets import ImageFolder
    assert ImageFolder(str(copy)).class_to_idx == ds.class_to_idx

    # the config path: pretrain/data=imagenet100 and eval/data=imagenet100 build the same set from data.root
    from common.config import compose_config
    from pretrain.data_loading import build_dataset
    from transfer.classification import labelled_sets, validate_eval_config

    cfg = compose_config("pretrain", ["pretrain/data=imagenet100", f"data.root={tmp_path}"])
    assert build_dataset(cfg.data, None).classes == ds.classes
    ev = validate_eval_config(compose_config("knn", ["eval/knn=imagenet100", f"data.root={tmp_path}",
                                                     "model.arch=resnet18"]), "knn")
    tr, va = labelled_sets(ev.data, None, None)
    assert tr.classes == va.classes == ds.classes and len(va) == 100


def test_imagenet100_names_the_missing_classes(tmp_path):
    wnids = class_list("imagenet100")
    _fake_imagenet(tmp_path, [w for w in wnids if w not in ("n02869837", "n04589890")])
    with pytest.raises(DataRootError, match=r"2 of the 100 listed classes have no folder in .*train: "
                                            r"n02869837, n04589890; fix"):
        open_image_set("imagefolder", tmp_path, "train", classes="imagenet100")
    own = tmp_path / "mine.txt"
    own.write_text("n99999991\n")
    assert open_image_set("imagefolder", tmp_path, "train", classes=str(own)).classes == ["n99999991"]
    with pytest.raises(DataRootError, match="neither a shipped list"):
        class_list("imagenet1k_missing")


# ------------------------------------------------------------------------------------------ the monitor
def _monitor_cfg(kind, root, split, val_split):
    return OmegaConf.create({
        "data": {"kind": kind, "root": str(root), "split": split, "val_split": val_split, "classes": None,
                 "eval_resize": 16, "eval_crop": 16, "augment": {"mean": [0.5] * 3, "std": [0.25] * 3}},
        "train": {"knn_every": 1, "knn_train_images": 100}})


def test_monitor_turns_itself_off_on_unlabelled_data(tmp_path, caplog):
    write_images([tmp_path / "imgs" / f"{i}.jpg" for i in range(4)])
    train = open_image_set("folder", tmp_path, "imgs")
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        sets = build_monitor_sets(_monitor_cfg("folder", tmp_path, "imgs", "val"), train)
    assert sets.val is None and sets.knn_train is None and sets.num_classes == 0
    assert "no labels" in caplog.text and "off" in caplog.text


def test_stl10_monitor_votes_from_the_labelled_train_split(tmp_path):
    write_stl10_binary(tmp_path, n_train=20, n_test=10, n_unlabeled=30)
    train = open_image_set("stl10", tmp_path, "unlabeled")
    sets = build_monitor_sets(_monitor_cfg("stl10", tmp_path, "unlabeled", "test"), train)
    assert len(sets.val) == 10 and len(sets.knn_train) == 20 and sets.num_classes == 10
    x, y = sets.knn_train[3]
    assert tuple(x.shape) == (3, 16, 16) and 0 <= y < 10
