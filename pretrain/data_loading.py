"""How the engine feeds the pretraining: datasets of views, a resumable sampler, the DataLoader.

Determinism (what makes a resumed run continue the same trajectory):
- ``EpochShardSampler`` draws epoch ``e``'s order from ``(seed, e)`` alone, gives rank ``r`` every
  ``world``-th index, and can start ``start_batch`` batches into the epoch (resume mid-epoch).
  It yields ``(epoch, index)`` pairs so the dataset knows the epoch even inside persistent workers.
- ``SeededViews`` seeds the random number generators from ``(seed, epoch, index)`` before it runs the
  view transform: the augmentation of an image depends on nothing else (not on the worker, the number
  of workers or processes, or where a run was resumed).

Datasets: every kind of ``common.datasets`` (``DATA_KINDS``: ImageFolder, optionally restricted to a class
list such as ImageNet-100; unlabelled flat folders and file lists; STL-10's binary release; CIFAR), built
by ``common.datasets.open_image_set``; image files skip and count corrupt files.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.datasets import image_set_size, open_image_set
from common.errors import ConfigError
from common.imagefolder import dataloader_defaults


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint32)[0])


class SeededViews(Dataset):
    """``dataset[(epoch, i)] -> (views, label)`` with the transform's randomness seeded per sample."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = derived_seed(self.seed, epoch, index)
        # Keep the caller's generator states intact (matters when loading in the main process).
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochShardSampler(Sampler):
    """Per-epoch permutation from ``(seed, epoch)``, sharded over ranks, resumable inside an epoch.

    Like ``DistributedSampler(drop_last=True)``: each rank gets ``len(dataset) // world`` indices
    (rank r takes positions r, r + world, ...), so all ranks run the same number of steps.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world, self.seed = int(rank), int(world_size), int(seed)
        self.per_rank = self.n // self.world
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return max(self.per_rank - self.start_batch * self.batch_size, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        mine = perm[self.rank::self.world].tolist()
        for i in mine[self.start_batch * self.batch_size:]:
            yield (self.epoch, i)


def steps_per_epoch(num_images: int, global_batch: int, world_size: int) -> int:
    """Steps per epoch of the EpochShardSampler (drop_last); ConfigError when not even one global batch fits."""
    steps = (num_images // world_size) // (global_batch // world_size)
    if steps < 1:
        raise ConfigError(f"the training set has {num_images} images, fewer than one global batch of "
                          f"{global_batch}; fix: a smaller optim.batch_size or a larger data set")
    return steps


def build_dataset(cfg_data, transform) -> Dataset:
    """The training set of ``cfg_data`` with ``transform`` (images -> list of views): ``common.datasets``."""
    return open_image_set(cfg_data.kind, cfg_data.root, cfg_data.split or "", transform,
                          classes=cfg_data.classes, file_list=cfg_data.file_list)


def dataset_size(cfg_data) -> int:
    """The number of training images of ``cfg_data`` (the launcher's check; STL-10's pixels are not read)."""
    return image_set_size(cfg_data.kind, cfg_data.root, cfg_data.split or "", classes=cfg_data.classes,
                          file_list=cfg_data.file_list)


def build_loader(dataset: Dataset, sampler: EpochShardSampler, batch_size: int, workers: int,
                 pin_memory: bool) -> DataLoader:
    """Keys ``(epoch, index)`` come from the sampler in the main process, so persistent workers stay correct
    across epochs; worker settings are ``common.imagefolder.dataloader_defaults`` (the ones the benchmark measures)."""
    return DataLoader(SeededViews(dataset, sampler.seed), batch_size=batch_size, sampler=sampler, drop_last=True,
                      **dataloader_defaults(workers, pin_memory))


def num_skipped(dataset: Dataset) -> int:
    """Distinct unreadable images found so far by this process and its workers (RobustImageFolder)."""
    return int(getattr(dataset, "num_skipped", 0))
