"""RobustImageFolder: layout errors, skipping unreadable images, the skip counter across workers."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from common.imagefolder import (
    UNREADABLE_LIST,
    DataRootError,
    RobustImageFolder,
    dataloader_defaults,
    unreadable_files_all_ranks,
    write_unreadable_list,
)
from pretrain.augment import build_view_transform
from stage_fixtures import free_port


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
    assert ds.num_skipped == 2  # two distinct files, however often they were replaced


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
    assert ds.num_skipped == 2  # found inside the worker processes, read in the parent


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


def test_six_bad_files_over_two_epochs_and_two_workers_count_six_and_are_listed(tmp_path):
    bad = {f"{c}/{i}.jpg": b"junk" for c in "ab" for i in (1, 3, 5)}
    root = _make_folder(tmp_path / "set", n_per_class=8, bad=bad)
    ds = RobustImageFolder(root, transform=lambda im: torch.tensor(im.size))
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)  # new workers each epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            assert sum(len(y) for _, y in loader) == 16
    files = unreadable_files_all_ranks(ds)  # one process: this process's and its workers' files
    print(f"\n6 bad files, 2 epochs, 2 workers: num_skipped {ds.num_skipped}, listed {len(files)}")
    assert ds.num_skipped == 6 and sorted(files) == sorted(str(root / k) for k in bad)
    path = write_unreadable_list(tmp_path, {"train": files})
    assert path.name == UNREADABLE_LIST and path.read_text().splitlines() == [f"train\t{f}" for f in files]
    assert write_unreadable_list(tmp_path / "clean", {"train": []}) is None


def test_evaluation_set_labels_replacements_so_they_can_be_left_out(tmp_path):
    root = _make_folder(tmp_path, bad={"a/0.jpg": b"junk"})
    ds = RobustImageFolder(root, transform=lambda im: torch.tensor(im.size), bad_target=-1)
    labels = [ds[i][1] for i in range(len(ds))]
    print(f"\nlabels with one unreadable file: {labels}")
    assert labels == [-1, 0, 0, 0, 1, 1, 1, 1]  # index 0 is a/1.jpg's image, marked; the others are themselves
    training = RobustImageFolder(root, transform=lambda im: torch.tensor(im.size))
    assert training[0][1] == 0  # training keeps the neighbour's own label


def _rank_reads(rank, world, port, root, reads, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from common.distributed import barrier, cleanup, init_distributed

    torch.set_num_threads(1)
    init_distributed()
    ds = RobustImageFolder(root, transform=lambda im: torch.tensor(im.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in reads[rank]:
            ds[i]
    files = unreadable_files_all_ranks(ds)
    if rank == 0:
        torch.save((ds.num_skipped, files), out)
    barrier()
    cleanup()


def test_unreadable_files_are_gathered_over_all_ranks(tmp_path):
    bad = {"a/0.jpg": b"junk", "a/2.jpg": b"junk", "b/1.jpg": b"junk"}
    root = _make_folder(tmp_path / "set", bad=bad)
    # rank 0 meets a/0.jpg, rank 1 a/2.jpg and b/1.jpg, both meet a/0.jpg (counted once)
    reads = {0: [0], 1: [0, 2, 5]}
    out = tmp_path / "out.pt"
    mp.spawn(_rank_reads, args=(2, free_port(), str(root), reads, str(out)), nprocs=2, join=True)
    rank0_alone, files = torch.load(out)
    print(f"\n3 bad files split over 2 ranks: rank 0 alone {rank0_alone}, all ranks {len(files)}")
    assert rank0_alone == 1 and sorted(files) == sorted(str(root / k) for k in bad)
