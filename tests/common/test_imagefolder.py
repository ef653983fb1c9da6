"""RobustImageFolder: layout errors, skipping unreadable images, the skip counter across workers."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.imagefolder import DataRootError, RobustImageFolder, dataloader_defaults
from pretrain.augment import build_view_transform


def _make_folder(root: Path, n_per_class: int = 4, size: int = 24, bad: dict | None = None) -> Path:
    """Two classes of small JPEGs; ``bad`` maps file name -> raw bytes written instead of an image."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.jpg", quality=90)
    for name, data in (bad or {}).items():
        (root / name).write_bytes(data)
    return root


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DataRootError) as e:
        RobustImageFolder(tmp_path / "nope")
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "<root>/<class_name>/<image>" in msg


def test_root_without_class_folders(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(b"x")
    with pytest.raises(DataRootError) as e:
        RobustImageFolder(tmp_path)
    assert "no usable class folders" in str(e.value) and str(tmp_path) in str(e.value)


def test_good_dataset_behaves_like_imagefolder(tmp_path):
    root = _make_folder(tmp_path)
    ds = RobustImageFolder(root, transform=lambda im: torch.tensor(im.size))
    assert len(ds) == 8 and ds.classes == ["a", "b"]
    x, y = ds[5]
    assert x.tolist() == [24, 24] and y == 1
    assert ds.num_skipped == 0


def test_corrupt_and_truncated_images_are_skipped_with_one_warning(tmp_path):
    good = (tmp_path / "src.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    truncated = good.read_bytes()[: 200]
    root = _make_folder(tmp_path / "set", bad={"a/0.jpg": b"not an image at all", "a/1.jpg": truncated})
    ds = RobustImageFolder(root, transform=lambda im: np.asarray(im).shape)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x0, y0 = ds[0]       # a/0.jpg bad, a/1.jpg truncated -> a/2.jpg
        x0b, _ = ds[0]       # same bad files again: known bad, no new warning
    assert x0 == (24, 24, 3) and y0 == 0
    msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
    assert len(msgs) == 2 and any("a/0.jpg" in m for m in msgs) and any("a/1.jpg" in m for m in msgs)
    assert ds.num_skipped == 4  # two replacements per call, two calls


def test_transform_bugs_are_not_hidden_as_bad_images(tmp_path):
    root = _make_folder(tmp_path)

    def broken(im):
        raise TypeError("bug in transform")

    ds = RobustImageFolder(root, transform=broken)
    with pytest.raises(TypeError, match="bug in transform"):
        ds[0]
    assert ds.num_skipped == 0


def test_all_bad_raises_clear_error(tmp_path):
    root = tmp_path / "allbad"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.jpg").write_bytes(b"garbage")
    ds = RobustImageFolder(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="could not be decoded"):
            ds[0]


def test_skip_counter_is_shared_across_dataloader_workers(tmp_path):
    root = _make_folder(tmp_path, n_per_class=6, bad={"a/1.jpg": b"junk", "b/3.jpg": b"junk"})
    ds = RobustImageFolder(root, transform=build_view_transform({"preset": "synthetic", "views": [
        {"size": 16}, {"size": 16}]}))
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b[1].numel() for b in batches) == 12
    assert all(len(b[0]) == 2 and b[0][0].shape[1:] == (3, 16, 16) for b in batches)
    assert ds.num_skipped == 2  # counted inside the worker processes, read in the parent


def test_lazy_decode_gets_rgb_from_grayscale_palette_and_cmyk_files(tmp_path):
    root = tmp_path / "modes"
    (root / "c").mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 77, np.uint8), "L").save(root / "c" / "gray.jpg")
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).convert("P").save(root / "c" / "pal.png")
    # ImageNet has some CMYK JPEGs
    Image.fromarray(np.full((400, 400, 3), 90, np.uint8)).convert("CMYK").save(root / "c" / "cmyk.jpg")
    ds = RobustImageFolder(root, transform=build_view_transform({"preset": "synthetic"}))
    assert len(ds) == 3
    for i in range(3):
        views, _ = ds[i]
        assert [v.shape for v in views] == [(3, 32, 32), (3, 32, 32)]
        assert all(torch.isfinite(v).all() for v in views)


def test_dataloader_defaults():
    kw = dataloader_defaults(num_workers=3)
    assert kw["num_workers"] == 3 and kw["persistent_workers"] is True and kw["prefetch_factor"] >= 2
    assert kw["pin_memory"] == torch.cuda.is_available()
    kw0 = dataloader_defaults(num_workers=0)
    assert "prefetch_factor" not in kw0 and kw0["persistent_workers"] is False
