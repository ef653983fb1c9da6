"""Image datasets for pretraining and evaluation: a torchvision ImageFolder that survives bad files.

``RobustImageFolder(root, transform)`` is ``torchvision.datasets.ImageFolder`` with three differences:

1. A missing root, or a root without class folders / images, fails at construction with a message that
   names the path and the expected layout (``root/<class>/<image>``).
2. An image that cannot be decoded (corrupt, truncated, not an image) is skipped with a warning, once per
   file and process, and another sample (the next index that decodes) is returned instead, so a run
   never dies hours in because of one bad JPEG. Files found bad are remembered and not retried.
3. ``num_skipped`` counts the skips of *all* DataLoader workers of this dataset: the counter lives in a
   small shared-memory tensor with one slot per worker (no lost updates, works with fork and spawn).
   Under DDP each rank has its own dataset, hence its own count; sum it over ranks if needed.

Transforms that set ``accepts_lazy_image = True`` (the view pipelines of ``pretrain.augment``) receive the
image *opened but not decoded*, so they can pick a reduced JPEG decode scale (PIL draft mode) before
decoding; every other transform gets a decoded RGB image exactly as with ImageFolder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.datasets import ImageFolder

from common.errors import UserError

LAYOUT_HELP = ("expected an ImageFolder layout: <root>/<class_name>/<image>.jpg (one sub-folder per class, "
               "e.g. <imagenet>/train/n01440764/*.JPEG); for the embedded set run "
               "`python -m common.synthetic --out data/synthetic` and use data/synthetic/classification/train")

# Errors that mean "this file is not a decodable image". Anything else (TypeError, RuntimeError, ...) is a
# bug in a transform and must propagate, not be hidden as a skipped sample.
DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError, EOFError)

_MAX_WORKER_SLOTS = 256


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


class RobustImageFolder(ImageFolder):
    """ImageFolder that skips unreadable images (warns once per file, counts across workers)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 target_transform: Callable | None = None, max_consecutive_skips: int = 64):
        root = Path(root)
        if not root.is_dir():
            raise DataRootError(f"dataset root {str(root)!r} does not exist or is not a directory; {LAYOUT_HELP}")
        try:
            super().__init__(str(root), transform=transform, target_transform=target_transform, loader=load_rgb)
        except FileNotFoundError as e:  # torchvision: no class folder / no valid image in the class folders
            raise DataRootError(f"dataset root {str(root)!r} has no usable class folders ({e}); "
                                f"{LAYOUT_HELP}") from None
        self.max_consecutive_skips = int(max_consecutive_skips)
        # One int64 slot per DataLoader worker (slot 0 = the main process); shared memory so that the
        # counts written inside worker processes are visible in the parent.
        self._skip_counts = torch.zeros(_MAX_WORKER_SLOTS + 1, dtype=torch.int64).share_memory_()
        self._bad: set[int] = set()

    # ------------------------------------------------------------------ counters
    @property
    def num_skipped(self) -> int:
        """Samples skipped so far in this process and all its DataLoader workers."""
        return int(self._skip_counts.sum())

    def reset_skip_count(self) -> None:
        self._skip_counts.zero_()

    def _count_skip(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % _MAX_WORKER_SLOTS
        self._skip_counts[slot] += 1

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
            if i in self._bad:  # known bad in this process: replace without retrying or warning again
                self._count_skip()
                continue
            try:
                return self._load(i)
            except DECODE_ERRORS as e:
                last_error = e
                self._bad.add(i)
                self._count_skip()
                warnings.warn(f"skipping unreadable image {self.samples[i][0]!r} ({type(e).__name__}: {e}); "
                              f"another sample is used instead", RuntimeWarning, stacklevel=2)
        raise RuntimeError(
            f"{self.max_consecutive_skips} consecutive images starting at index {index} of {self.root!r} could not "
            f"be decoded (last error: {last_error!r}); the dataset looks broken: check the files or the disk"
        ) from last_error


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
