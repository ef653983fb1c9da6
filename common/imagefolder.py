"""Image datasets for pretraining and evaluation: a torchvision ImageFolder that survives bad files, and
the same for unlabelled images (a flat folder, a file list).

``RobustImageFolder(root, transform)`` is ``torchvision.datasets.ImageFolder`` with three differences:

1. A missing root, or a root without class folders / images, fails at construction with a message that
   names the path and the expected layout (``root/<class>/<image>``).
2. An image that cannot be decoded (corrupt, truncated, not an image) is skipped with a warning, once per
   file and process, and another sample (the next index that decodes) is returned instead, so a run
   never dies hours in because of one bad JPEG. Files found bad are remembered and not retried.
3. ``num_skipped`` is the number of distinct unreadable files found by this process and *all* its
   DataLoader workers: a shared-memory mask with one byte per sample, written inside the workers and read
   in the parent (works with fork and spawn; a known-bad file is neither retried nor warned about twice).
   Under DDP each rank has its own dataset: ``unreadable_files_all_ranks`` (a collective) gathers the files
   of every rank, ``write_unreadable_list`` lists them in the run folder (``UNREADABLE_LIST``).
4. ``classes=[...]`` keeps only those class folders (ImageNet-100 read from a full ImageNet tree), indexed
   in sorted order (as ImageFolder indexes a copy of the subset); a listed class without a folder is named
   in the error.
5. ``RobustImageList``: unlabelled images (every target ``UNLABELLED``) with the same skipping and counting,
   from a folder searched recursively or from a text file of paths.
6. ``bad_target`` (evaluations: ``transfer.classification.EXCLUDED``) labels a replacement sample with
   that value instead of the neighbour's label, so that an evaluation can leave it out.

Transforms that set ``accepts_lazy_image = True`` (the view pipelines of ``pretrain.augment``) receive the
image *opened but not decoded*, so they can pick a reduced JPEG decode scale (PIL draft mode) before
decoding; every other transform gets a decoded RGB image exactly as with ImageFolder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from common.atomic import atomic_write_text
from common.distributed import gather_rows, is_dist
from common.errors import UserError

LAYOUT_HELP = ("expected an ImageFolder layout: <root>/<class_name>/<image>.jpg (one sub-folder per class, "
               "e.g. <imagenet>/train/n01440764/*.JPEG); for the embedded set run "
               "`python -m common.synthetic --out data/synthetic` and use data/synthetic/classification/train")

# Errors that mean "this file is not a decodable image". Anything else (TypeError, RuntimeError, ...) is a
# bug in a transform and must propagate, not be hidden as a skipped sample.
DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError, EOFError)

UNREADABLE_LIST = "unreadable_images.txt"


class DataRootError(UserError, FileNotFoundError):
    """The dataset root is missing or does not have the ImageFolder layout."""


def open_lazy_rgb(path: str) -> Image.Image:
    """Opens an image without decoding it (PIL reads only the header); decode happens on ``load()``."""
    return Image.open(path)


def load_rgb(path: str) -> Image.Image:
    """Decodes an image to RGB (what torchvision's default ImageFolder loader does)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class RobustSamples:
    """What every robust image set shares: ``samples`` (path, target), unreadable files skipped and counted.

    A mixin: the dataset class sets ``samples``, ``root``, ``transform``, ``target_transform``,
    ``max_consecutive_skips`` and ``bad_target``, then calls ``_init_bad_mask()``.
    """

    samples: list
    root: str
    transform: Callable | None
    target_transform: Callable | None

    def _init_bad_mask(self) -> None:
        # One byte per sample (1 = unreadable), in shared memory: DataLoader workers write into the same
        # memory, so the parent sees every file any worker found bad, each once.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------ unreadable files
    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files found so far by this process and all its DataLoader workers."""
        return int(self._bad.sum())

    def unreadable_files(self) -> list[str]:
        """Paths of the unreadable files found so far (this process and its workers), in dataset order."""
        return [self.samples[i][0] for i in self._bad.nonzero().flatten().tolist()]

    # ------------------------------------------------------------------ loading
    def _load(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        if getattr(self.transform, "accepts_lazy_image", False):
            sample = self.transform(open_lazy_rgb(path))
        else:
            sample = load_rgb(path)
            if self.transform is not None:
                sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        last_error: BaseException | None = None
        for attempt in range(min(self.max_consecutive_skips, n)):
            i = (index + attempt) % n
            if self._bad[i]:  # known bad (in any worker): replace without retrying or warning again
                continue
            try:
                sample, target = self._load(i)
            except DECODE_ERRORS as e:
                last_error = e
                self._bad[i] = 1
                warnings.warn(f"skipping unreadable image {self.samples[i][0]!r} ({type(e).__name__}: {e}); "
                              f"another sample is used instead", RuntimeWarning, stacklevel=2)
                continue
            return sample, (target if attempt == 0 or self.bad_target is None else self.bad_target)
        raise RuntimeError(
            f"{self.max_consecutive_skips} consecutive images starting at index {index} of {self.root!r} could not "
            f"be decoded (last error: {last_error!r}); the dataset looks broken: check the files or the disk"
        ) from last_error


class RobustImageFolder(RobustSamples, ImageFolder):
    """ImageFolder that skips unreadable images (warns once per file, counts distinct files across workers).

    ``classes``: only these class folders, indexed in sorted order as on a copy of the subset (ImageNet-100
    from a full ImageNet tree: ``common.datasets.class_list``); a listed class without a folder is a
    ``DataRootError`` naming it.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 target_transform: Callable | None = None, max_consecutive_skips: int = 64,
                 bad_target: int | None = None, classes: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataRootError(f"dataset root {str(root)!r} does not exist or is not a directory; {LAYOUT_HELP}")
        self._wanted_classes = list(classes) if classes is not None else None
        try:
            super().__init__(str(root), transform=transform, target_transform=target_transform, loader=load_rgb)
        except FileNotFoundError as e:  # torchvision: no class folder / no valid image in the class folders
            if isinstance(e, DataRootError):
                raise
            raise DataRootError(f"dataset root {str(root)!r} has no usable class folders ({e}); "
                                f"{LAYOUT_HELP}") from None
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.bad_target = bad_target
        self._init_bad_mask()

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """torchvision's class folders, or exactly the ``classes`` asked for (every one must have a folder)."""
        if self._wanted_classes is None:
            return super().find_classes(directory)
        missing = [c for c in self._wanted_classes if not (Path(directory) / c).is_dir()]
        if missing:
            raise DataRootError(f"{len(missing)} of the {len(self._wanted_classes)} listed classes have no folder in "
                                f"{directory}: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; fix: "
                                "point data.root at the full dataset the class list was made for (ImageNet: "
                                "<root>/train/<wnid>/ and <root>/val/<wnid>/, val sorted into class folders)")
        wanted = sorted(self._wanted_classes)  # class indices as ImageFolder gives them on a copy of the subset
        return wanted, {c: i for i, c in enumerate(wanted)}


UNLABELLED = -1  # the target of every image of an unlabelled set (torchvision's STL-10 uses -1 too)


class RobustImageList(RobustSamples, Dataset):
    """Images without labels, skipped and counted like ``RobustImageFolder``: every image under a folder
    (recursively, ``from_folder``) or the files a text list names (``from_file_list``: one path per line,
    relative to a root). Every target is ``UNLABELLED``; ``classes`` is empty."""

    classes: list[str] = []

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], transform: Callable | None = None,
                 max_consecutive_skips: int = 64):
        self.root = str(root)
        self.samples = [(str(p), UNLABELLED) for p in paths]
        self.targets = [UNLABELLED] * len(self.samples)
        self.transform, self.target_transform = transform, None
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.bad_target = None
        self._init_bad_mask()

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: Callable | None = None) -> "RobustImageList":
        """Every image file (torchvision's ``IMG_EXTENSIONS``) under ``root``, recursively, in sorted order."""
        root = Path(root)
        if not root.is_dir():
            raise DataRootError(f"image folder {str(root)!r} does not exist or is not a directory; fix: set data.root "
                                "(and data.split) to the folder holding the images (any depth of sub-folders)")
        paths = []
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs.sort()
            paths += [os.path.join(folder, f) for f in sorted(files) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
        if not paths:
            raise DataRootError(f"image folder {str(root)!r} holds no image file (extensions "
                                f"{', '.join(IMG_EXTENSIONS)}, searched recursively); fix: point data.root/data.split "
                                "at the images")
        return cls(root, paths, transform)

    @classmethod
    def from_file_list(cls, list_file: str | os.PathLike, root: str | os.PathLike,
                       transform: Callable | None = None) -> "RobustImageList":
        """The files ``list_file`` names, one per line (blank lines and ``#`` comments skipped), relative to
        ``root`` (absolute paths are kept); a listed file that does not exist is an error naming a few."""
        list_file, root = Path(list_file), Path(root)
        if not list_file.is_file():
            raise DataRootError(f"file list {str(list_file)!r} does not exist; fix: set data.file_list to a text file "
                                "with one image path per line, relative to data.root")
        lines = [ln.strip() for ln in list_file.read_text().splitlines()]
        names = [ln for ln in lines if ln and not ln.startswith("#")]
        if not names:
            raise DataRootError(f"file list {list_file} names no file; fix: one image path per line")
        paths = [str(root / n) for n in names]
        missing = [n for n, p in zip(names, paths) if not os.path.isfile(p)]
        if missing:
            raise DataRootError(f"{len(missing)} of the {len(names)} files of {list_file} are not under {root} (e.g. "
                                f"{missing[:5]}); fix: set data.root to the folder the list's paths are relative to")
        return cls(root, paths, transform)


def unreadable_files_all_ranks(dataset: Any, device: torch.device | str | None = None) -> list[str]:
    """The distinct unreadable files every rank found in ``dataset`` (a RobustImageFolder or RobustImageList,
    possibly inside a torch ``Subset``; [] for other datasets), in dataset order. A collective: every rank must
    call it.
    ``device``: where the gather runs (the process group's device; CPU for gloo)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, RobustSamples):
        return []
    bad = dataset._bad.clone()
    if is_dist():
        rows = gather_rows(bad.nonzero().flatten().to(device or "cpu"))
        bad[rows.cpu()] = 1
    return [dataset.samples[i][0] for i in bad.nonzero().flatten().tolist()]


def write_unreadable_list(run_dir: str | os.PathLike, files: dict[str, list[str]]) -> Path | None:
    """``run_dir/UNREADABLE_LIST``: one ``<split>\t<path>`` line per unreadable file (atomic); None and no
    file when there is none."""
    lines = [f"{split}\t{f}" for split, paths in files.items() for f in paths]
    if not lines:
        return None
    return atomic_write_text(Path(run_dir) / UNREADABLE_LIST, "\n".join(lines) + "\n")


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one compute thread per worker (torch, OpenCV).

    Workers are separate processes; letting each also start a thread pool oversubscribes the cores that
    the workers (and the training process) already share.
    """
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def dataloader_defaults(num_workers: int, pin_memory: bool | None = None) -> dict:
    """DataLoader keyword defaults for the pretraining pipeline (besides batch size, sampler, drop_last).

    - ``pin_memory``: on when CUDA is available (page-locked host memory for async copies);
    - ``persistent_workers``: keep workers between epochs (no re-fork, no re-import each epoch);
    - ``prefetch_factor`` 4: with 2-6 views per image, a batch takes long to build; keep more in flight;
    - ``worker_init_fn``: one thread per worker (see ``worker_init``).
    Rule of thumb for ``num_workers``: the CPU cores of the node divided by the GPUs on it, minus one.
    """
    kw: dict = dict(num_workers=int(num_workers),
                    pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
                    persistent_workers=num_workers > 0,
                    worker_init_fn=worker_init if num_workers > 0 else None)
    if num_workers > 0:
        kw["prefetch_factor"] = 4
    return kw
