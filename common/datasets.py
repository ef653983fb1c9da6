"""Every image set the stages read, built in one place: ``open_image_set(kind, root, split, transform, ...)``.

==============  =====================================================================  ========
kind            on disk                                                                labels
==============  =====================================================================  ========
``imagefolder`` ``<root>/<split>/<class>/<image>`` (ImageNet, the embedded set); ``classes`` yes
                keeps only the classes of a list (``imagenet100``: ImageNet-100 read
                straight from a full ImageNet tree, no copy)
``folder``      every image under ``<root>/<split>``, at any depth                      no
``filelist``    the images a text file names, one path per line, relative to           no
                ``<root>/<split>``
``stl10``       STL-10's official binary release ``<root>/stl10_binary/*.bin``,        ``train``,
                read by torchvision's ``STL10`` (never downloaded); splits ``train``,   ``test``
                ``test``, ``unlabeled``, ``train+unlabeled``
``cifar10``,    torchvision's python release under ``<root>`` (never downloaded);      yes
``cifar100``    split ``test`` is the test set, anything else the training set
==============  =====================================================================  ========

Image files are read by ``common.imagefolder`` (unreadable files skipped, counted over workers and ranks).
Pretraining takes every kind; the evaluations and the pretraining monitor need labels: ``is_labelled``
tells, ``require_labels`` refuses an unlabelled set with the fix.

STL-10: torchvision's reader checks the md5 of all five files (2.6 GB) at every construction; here a size
check (whole 96x96 RGB images, one label per image) takes its place, naming a missing or torn file. Each
process holds the split it reads in memory (``unlabeled``: 2.8 GB), as torchvision's reader does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100, STL10

from common.imagefolder import DataRootError, RobustImageFolder, RobustImageList

DATA_KINDS = ("imagefolder", "folder", "filelist", "stl10", "cifar10", "cifar100")
UNLABELLED_KINDS = ("folder", "filelist")
LISTS_DIR = Path(__file__).resolve().parent / "lists"  # class lists shipped with the package

STL10_SPLITS = STL10.splits  # train, train+unlabeled, unlabeled, test
STL10_IMAGE_BYTES = 3 * 96 * 96
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_STL10_FILES = {"train": [("train_X.bin", "train_y.bin")], "test": [("test_X.bin", "test_y.bin")],
                "unlabeled": [("unlabeled_X.bin", None)],
                "train+unlabeled": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)]}


class UnlabelledDataError(DataRootError):
    """A stage that needs labels was given an unlabelled image set."""


# ------------------------------------------------------------------------------------------ class lists
def class_list(name_or_path: str) -> list[str]:
    """The classes of a list: a name shipped in ``common/lists/`` (``imagenet100``) or a text file with one class
    folder name per line (``#`` comments and blank lines skipped)."""
    shipped = LISTS_DIR / f"{name_or_path}.txt"
    path = shipped if shipped.is_file() and os.sep not in str(name_or_path) else Path(name_or_path).expanduser()
    if not path.is_file():
        names = sorted(p.stem for p in LISTS_DIR.glob("*.txt"))
        raise DataRootError(f"class list {name_or_path!r} is neither a shipped list ({', '.join(names)}) nor a file; "
                            "fix: data.classes=imagenet100, a file with one class folder name per line, or null")
    classes = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    dups = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or dups:
        raise DataRootError(f"class list {path} is empty or names classes twice ({dups[:5]}); fix: one class folder "
                            "name per line, each once")
    return classes


# ------------------------------------------------------------------------------------------ STL-10
class STL10Binary(STL10):
    """torchvision's STL-10 reader with a size check in place of its md5 check (see the module docstring);
    ``classes`` always set (the release's ``class_names.txt``, else the official names)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_stl10_files(root, split)
        super().__init__(str(root), split=split, transform=transform, download=False)
        if not getattr(self, "classes", None):
            self.classes = list(STL10_CLASSES)

    def _check_integrity(self) -> bool:  # checked by check_stl10_files (sizes), not by md5 of 2.6 GB
        return True


def check_stl10_files(root: str | os.PathLike, split: str) -> int:
    """The number of images of ``split`` in ``<root>/stl10_binary``; DataRootError naming a missing or torn file."""
    if split not in STL10_SPLITS:
        raise DataRootError(f"STL-10 split {split!r} is unknown; choose one of {list(STL10_SPLITS)}")
    folder = Path(root).expanduser() / STL10.base_folder
    fix = ("fix: set data.root to the folder holding stl10_binary/ (the official binary release "
           "stl10_binary.tar.gz unpacked; nothing is downloaded here)")
    total = 0
    for images, labels in _STL10_FILES[split]:
        path = folder / images
        if not path.is_file():
            raise DataRootError(f"STL-10 split {split!r} needs {path}, which does not exist; {fix}")
        size = path.stat().st_size
        if size == 0 or size % STL10_IMAGE_BYTES:
            raise DataRootError(f"{path} has {size} bytes, not a whole number of 96x96 RGB images "
                                f"({STL10_IMAGE_BYTES} bytes each): torn or not STL-10; {fix}")
        n = size // STL10_IMAGE_BYTES
        if labels is not None:
            lpath = folder / labels
            if not lpath.is_file() or lpath.stat().st_size != n:
                have = lpath.stat().st_size if lpath.is_file() else "no file"
                raise DataRootError(f"{lpath} must hold one label byte per image of {images} ({n}), found {have}; "
                                    f"{fix}")
        total += n
    return total


# ------------------------------------------------------------------------------------------ the one builder
def open_image_set(kind: str, root: str | os.PathLike, split: str = "", transform: Callable | None = None, *,
                   classes: str | Sequence[str] | None = None, file_list: str | os.PathLike | None = None,
                   bad_target: int | None = None) -> Dataset:
    """The image set of ``kind`` (see the module docstring). ``classes``: a class list (name, file or list of
    names) for ``imagefolder``; ``file_list`` for ``filelist``; ``bad_target`` labels the stand-in of an
    unreadable image (evaluations leave it out)."""
    root = Path(str(root)).expanduser()
    where = root / split if split and kind in ("imagefolder", "folder", "filelist") else root
    if kind == "imagefolder":
        wanted = class_list(classes) if isinstance(classes, str) else classes
        return RobustImageFolder(where, transform=transform, bad_target=bad_target, classes=wanted)
    if classes is not None:
        raise DataRootError(f"data.classes={classes!r} applies to data.kind=imagefolder only (got {kind}); fix: "
                            "data.classes=null")
    if kind == "folder":
        return RobustImageList.from_folder(where, transform=transform)
    if kind == "filelist":
        if not file_list:
            raise DataRootError("data.kind=filelist needs data.file_list, a text file with one image path per line "
                                "relative to data.root; fix: pass data.file_list=<file>")
        return RobustImageList.from_file_list(Path(str(file_list)).expanduser(), where, transform=transform)
    if kind == "stl10":
        return STL10Binary(root, split=split or "unlabeled", transform=transform)
    if kind in ("cifar10", "cifar100"):
        cls = CIFAR10 if kind == "cifar10" else CIFAR100
        try:
            return cls(str(root), train=split != "test", transform=transform, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataRootError(
                f"data.kind={kind}: no CIFAR data under {str(root)!r} ({e}); fix: put the python release "
                f"({'cifar-10-batches-py' if kind == 'cifar10' else 'cifar-100-python'}/) there and set data.root, "
                "nothing is downloaded") from None
    raise DataRootError(f"data.kind={kind!r} is unknown; choose one of {list(DATA_KINDS)}")


def image_set_size(kind: str, root: str | os.PathLike, split: str = "", **kw) -> int:
    """The number of images ``open_image_set`` would give, without reading STL-10's pixels (the launcher's check)."""
    if kind == "stl10":
        return check_stl10_files(Path(str(root)).expanduser(), split or "unlabeled")
    return len(open_image_set(kind, root, split, None, **kw))


# ------------------------------------------------------------------------------------------ labels
def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def is_labelled(dataset: Dataset) -> bool:
    """Whether every image of ``dataset`` has a class label (STL-10's ``unlabeled`` images have none)."""
    ds = _base(dataset)
    if isinstance(ds, RobustImageList):
        return False
    if isinstance(ds, STL10):
        return "unlabeled" not in ds.split
    return bool(getattr(ds, "classes", None))


def num_classes(dataset: Dataset) -> int:
    """The number of classes of a labelled set; 0 for an unlabelled one."""
    return len(_base(dataset).classes) if is_labelled(dataset) else 0


def require_labels(dataset: Dataset, what: str) -> None:
    """UnlabelledDataError when ``dataset`` has no labels: ``what`` (e.g. 'linear evaluation') needs them."""
    if not is_labelled(dataset):
        raise UnlabelledDataError(
            f"{what} needs class labels, but {getattr(_base(dataset), 'root', 'the data')} is an unlabelled image set "
            f"({type(_base(dataset)).__name__}); fix: an ImageFolder layout <root>/<split>/<class>/<image> "
            "(data.kind=imagefolder), or STL-10's train/test splits; flat folders and file lists serve pretraining "
            "only")
