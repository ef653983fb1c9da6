"""Frozen-backbone features of an image set: the evaluation transform, an exact shard sampler and loader,
and ``extract_features`` (every rank gets the whole set's features in dataset order).

Shared by the evaluations (``transfer.knn``, ``transfer.classification``) and the pretraining engine's
monitor (``pretrain.monitor``: online probe validation and the periodic k-NN), so both compute features
the same way.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from common.distributed import gather_rows, get_rank, get_world_size, is_dist
from common.imagefolder import dataloader_defaults

# The label of an unreadable image's replacement in an evaluated set: the evaluations and the k-NN leave it out.
EXCLUDED = -1
UNVISITED = -2  # a label no sample has


def eval_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]):
    """Resize the shorter side to ``resize`` and centre-crop ``crop`` (ImageNet: 256 / 224), then normalise."""
    return v2.Compose([v2.ToImage(), v2.Resize(int(resize), antialias=True), v2.CenterCrop(int(crop)),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices r, r+w, r+2w, ... in order: an exact split, no padding (evaluation)."""

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None):
        self.n = int(n)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def loader_kw(workers: int) -> dict:
    """DataLoader settings of the evaluations (``dataloader_defaults``, torch's default prefetch)."""
    kw = dataloader_defaults(workers)
    kw.pop("prefetch_factor", None)  # one decoded view per image: torch's default prefetch is enough
    return kw


def eval_loader(dataset: Dataset, global_batch: int, workers: int, persistent: bool = True) -> DataLoader:
    """Rank r's exact shard of ``dataset`` (``ShardSampler``), ``global_batch / world`` images per batch.
    ``persistent=False`` for a loader used once now and again much later (the pretraining monitor): its
    workers end with each pass instead of holding memory between passes."""
    per_proc = max(1, global_batch // get_world_size())
    kw = loader_kw(workers)
    if not persistent and kw.get("persistent_workers"):
        kw["persistent_workers"] = False
    return DataLoader(dataset, batch_size=per_proc, sampler=ShardSampler(len(dataset)), **kw)


def _sampler_indices(loader) -> list[int] | None:
    """The dataset indices this rank's loader visits, in order (None for a plain sequential loader)."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None or isinstance(sampler, torch.utils.data.SequentialSampler):
        return None
    return [int(i) for i in iter(sampler)]


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader: Iterable, device: torch.device | str,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (float32, not normalised) and labels of every image of ``loader``'s dataset.

    The backbone runs in eval mode (BN running statistics) and is put back in its previous mode.
    In a distributed run each rank passes its own shard (a ``DistributedSampler`` without shuffling)
    and every rank gets the features of the whole dataset in dataset order; the padding samples a
    ``DistributedSampler`` adds to even out the shards are dropped. In one process the loader order is
    kept.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    start, n_batches = time.time(), len(loader) if hasattr(loader, "__len__") else None
    for i, (images, targets) in enumerate(loader):
        out = backbone(images.to(device, non_blocking=True))
        feats.append(out.float().flatten(1))
        labels.append(targets.to(device))
        if progress and n_batches and (i + 1) % max(1, n_batches // 10) == 0:
            el = time.time() - start
            print(f"  features: batch {i + 1}/{n_batches}, {el:.0f}s elapsed, "
                  f"ETA {el / (i + 1) * (n_batches - i - 1):.0f}s", flush=True)
    backbone.train(was_training)
    feats = torch.cat(feats) if feats else torch.zeros(0, getattr(backbone, "feature_dim", 0), device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if not is_dist() or get_world_size() == 1:
        return feats, labels

    indices = _sampler_indices(loader)
    if indices is None:
        raise ValueError("extract_features in a distributed run needs a DistributedSampler (shuffle=False) on "
                         "the loader, so that each rank extracts its own shard")
    idx = torch.tensor(indices[: feats.shape[0]], device=feats.device, dtype=torch.long)
    all_idx, all_feats, all_labels = gather_rows(idx), gather_rows(feats), gather_rows(labels)
    n = int(all_idx.max().item()) + 1 if all_idx.numel() else 0
    out_feats = all_feats.new_zeros((n, all_feats.shape[1]))
    out_labels = all_labels.new_full((n,), UNVISITED)
    # Padding duplicates carry identical features, so writing them twice is harmless.
    out_feats[all_idx] = all_feats
    out_labels[all_idx] = all_labels
    if (out_labels == UNVISITED).any():
        raise RuntimeError("extract_features: some dataset indices were not visited by any rank")
    return out_feats, out_labels


def readable(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of readable images (unreadable ones are labelled ``EXCLUDED``)."""
    keep = labels != EXCLUDED
    return feats[keep], labels[keep]
