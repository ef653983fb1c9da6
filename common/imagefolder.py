"""Image datasets for pretraining and evaluation: a torchvision ImageFolder that survives bad files.

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
4. ``bad_target`` (evaluations: ``transfer.classification.EXCLUDED``) labels a replacement sample with
   that value instead of the neighbour's label, so that an evaluation can leave it out.

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
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

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


class RobustImageFolder(ImageFolder):
    """ImageFolder that skips unreadable images (warns once per file, counts distinct files across workers)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 target_transform: Callable | None = None, max_consecutive_skips: int = 64,
                 bad_target: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataRootError(f"dataset root {str(root)!r} does not exist or is not a directory; {LAYOUT_HELP}")
        try:
            super().__init__(str(root), transform=transform, target_transform=target_transform, loader=load_rgb)
        except FileNotFoundError as e:  # torchvision: no class folder / no valid image in the class folders
            raise DataRootError(f"dataset root {str(root)!r} has no usable class folders ({e}); "
                                f"{LAYOUT_HELP}") from None
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.bad_target = bad_target
        # One byte per sample (1 = unreadable), in shared memory: DataLoader workers write into the same
        # memory, so the parent sees every file any worker found bad, each once.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

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


def unreadable_files_all_ranks(dataset: Any, device: torch.device | str | None = None) -> list[str]:
    """The distinct unreadable files every rank found in ``dataset`` (a RobustImageFolder, possibly inside a
    torch ``Subset``; [] for other datasets), in dataset order. A collective: every rank must call it.
    ``device``: where the gather runs (the process group's device; CPU for gloo)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, RobustImageFolder):
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
