import hashlib
import json

import numpy as np
import pytest

from common.synthetic import CLASS_NAMES, DETECTION_CATEGORIES, SyntheticSpec, generate, main


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


SMALL = dict(cls_size=32, cls_train_per_class=3, cls_val_per_class=2, det_size=96, det_train_images=6, det_val_images=3)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    generate(a, SyntheticSpec(seed=3, **SMALL))
    generate(b, SyntheticSpec(seed=3, **SMALL))
    generate(c, SyntheticSpec(seed=4, **SMALL))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_image_does_not_depend_on_other_sizes(tmp_path):
    """Each image has its own seed: more images per class does not change the first ones."""
    generate(tmp_path / "a", SyntheticSpec(seed=1, **SMALL))
    generate(tmp_path / "b", SyntheticSpec(seed=1, **{**SMALL, "cls_train_per_class": 5}))
    f = "classification/train/star/star_00002.jpg"
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_imagefolder_classes_and_counts(synthetic_root):
    from torchvision.datasets import ImageFolder

    spec = SyntheticSpec()
    for split, per_class in (("train", spec.cls_train_per_class), ("val", spec.cls_val_per_class)):
        ds = ImageFolder(synthetic_root / "classification" / split)
        assert sorted(ds.classes) == sorted(CLASS_NAMES)
        assert len(ds) == per_class * len(CLASS_NAMES)
        counts = np.bincount(ds.targets, minlength=len(CLASS_NAMES))
        assert (counts == per_class).all()
        img, _ = ds[0]
        assert img.size == (spec.cls_size, spec.cls_size) and img.mode == "RGB"


def test_classes_are_learnable_by_a_cnn(synthetic_root):
    """A tiny CNN trained for a few seconds beats chance clearly: the classes differ in shape content."""
    import torch
    import torch.nn as nn
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    torch.manual_seed(0)
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(32, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    root = synthetic_root / "classification"

    def load(split):
        ds = ImageFolder(root / split, transform=tf)
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys)

    def standardise(x):  # per image: removes the colour/brightness shifts, keeps the shape
        return (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-3)

    (xtr, ytr), (xva, yva) = load("train"), load("val")
    xtr, xva = standardise(xtr), standardise(xva)
    epochs, batch = 15, 64
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, len(CLASS_NAMES)),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(xtr) // batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xva).argmax(1) == yva).float().mean().item()
    print(f"tiny CNN val accuracy on the embedded set: {acc:.3f} (chance {1 / len(CLASS_NAMES):.3f})")
    assert acc > 0.4  # measured 0.54


def test_coco_loads_and_masks_match_boxes(synthetic_root):
    from pycocotools.coco import COCO

    spec = SyntheticSpec()
    for split, n in (("train", spec.det_train_images), ("val", spec.det_val_images)):
        coco = COCO(str(synthetic_root / "coco" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(DETECTION_CATEGORIES)
        anns = coco.loadAnns(coco.getAnnIds())
        per_image = np.bincount([a["image_id"] for a in anns])
        assert per_image.max() >= 2, "several objects per image"
        for a in anns:
            assert len(a["segmentation"]) == 1 and len(a["segmentation"][0]) >= 6
            m = coco.annToMask(a)
            assert a["area"] == m.sum() > 50
            ys, xs = np.nonzero(m)
            x, y, w, h = a["bbox"]
            # the rasterised mask lies inside the polygon's box (a pixel of slack) and fills it up to
            # sharp vertices that cover no pixel centre (at most 2 px)
            assert x - 1 <= xs.min() <= x + 2 and y - 1 <= ys.min() <= y + 2
            assert x + w - 2 <= xs.max() + 1 <= x + w + 1 and y + h - 2 <= ys.max() + 1 <= y + h + 1
        for img in coco.loadImgs(coco.getImgIds()):
            assert (synthetic_root / "coco" / img["file_name"]).is_file()


def test_detectron2_registers_the_coco_set(synthetic_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    name = "intl_test_synthetic_val"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(synthetic_root / "coco" / "instances_val.json"),
                                str(synthetic_root / "coco"))
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == SyntheticSpec().det_val_images
    assert all(len(d["annotations"]) >= 1 for d in dicts)
    assert MetadataCatalog.get(name).thing_classes == list(DETECTION_CATEGORIES)


def test_rerun_is_a_no_op_and_bad_sizes_fail(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--out", str(out), "--cls-train-per-class", "2", "--cls-val-per-class", "1", "--det-train-images", "2",
            "--det-val-images", "1"]
    assert main(args) == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "t"), "--det-size", "0"])
    assert e.value.code == 2
    assert "--det-size must be >= 1" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["counts"]["classification"]["train"] == 20
