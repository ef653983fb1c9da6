"""What tells a researcher during a pretraining whether the representation improves: an online linear
probe and a periodic k-NN monitor, both on the backbone's features.

- ``OnlineProbe``: batch norm (no affine, over the global batch) + a linear classifier, trained with its
  own SGD on the **detached** backbone features of the first online view, one step per training step
  (solo-learn's and lightly's online classifier). No gradient reaches the backbone: the features are
  detached before the probe sees them. Its train top-1 is counted between metric rows; its state (head,
  optimiser, counts) goes into the checkpoint, so a resumed run continues it exactly.
- ``evaluate``: one pass of the backbone in eval mode (batch-norm running statistics, as an evaluation
  sees it) over the validation split and a fixed subset of the training set (``common.features``,
  every process its shard, features gathered): the probe's validation top-1 and the weighted k-NN
  (k=20, T=0.07, ``common.knn``, as ``transfer.knn`` computes it offline).

The validation split is ``data.val_split`` (ImageFolder: a folder beside ``data.split``; CIFAR, STL-10: the
test set); without one the probe trains and logs its train top-1 only and the k-NN monitor is off. Both need
labels: on an unlabelled training set (a flat folder, a file list, STL-10's ``unlabeled`` images) the probe is
off, with a warning; the k-NN monitor too, except on STL-10, where it votes from the labelled ``train`` split.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from common.datasets import is_labelled, num_classes, open_image_set
from common.distributed import all_reduce_mean, all_reduce_sum
from common.features import eval_loader, eval_transform, extract_features, readable
from common.knn import knn_accuracy
from pretrain.model import convert_sync_batchnorm

log = logging.getLogger("pretrain")

MONITOR_SEED = 0  # the training-set subset of the k-NN monitor: the same images in every run and resume


class OnlineProbe(nn.Module):
    """BN (no affine, global batch) + linear on detached features, with its own SGD (momentum 0.9).

    ``step(features, labels)`` trains it on one batch (every process its part of the global batch; the
    gradient is averaged over processes, so all keep the same weights). The linear layer starts at zero:
    building a probe draws no random number, so turning it on leaves the pretraining's trajectory as it was.
    """

    def __init__(self, feature_dim: int, num_classes: int, lr: float, device: torch.device, world_size: int = 1):
        super().__init__()
        norm: nn.Module = nn.BatchNorm1d(feature_dim, affine=False)
        if world_size > 1:
            norm = convert_sync_batchnorm(norm, device)
        self.linear = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.head = nn.Sequential(norm, self.linear).to(device)
        self.num_classes = int(num_classes)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=float(lr), momentum=0.9)
        self.register_buffer("counts", torch.zeros(2, dtype=torch.float64, device=device))  # correct, seen

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.detach().float())

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.head.train()
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self(features)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.head.parameters()]
        flat = all_reduce_mean(torch.cat([g.flatten() for g in grads]))  # one collective for the whole head
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        self.optimizer.step()
        with torch.no_grad():  # counted on the device: no host sync per step
            self.counts[0] += (logits.argmax(1) == labels).sum()
            self.counts[1] += labels.numel()

    def take_train_top1(self) -> float | None:
        """Train top-1 (percent, all processes) since the last call, then the counts restart. A collective."""
        total = all_reduce_sum(self.counts.clone())
        self.counts.zero_()
        return 100.0 * float(total[0]) / float(total[1]) if total[1] > 0 else None

    @torch.no_grad()
    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 (percent) on given features (eval mode: the BN's running statistics)."""
        self.head.eval()
        pred = self(features).argmax(1)
        return 100.0 * int((pred == labels.to(pred.device)).sum()) / labels.numel() if labels.numel() else float("nan")

    def state(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "counts": self.counts.cpu()}

    def load_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.counts.copy_(state["counts"])


@dataclass
class MonitorSets:
    val: Dataset | None          # the validation split (eval transform), None when there is none
    knn_train: Dataset | None    # the fixed training subset the k-NN votes from (eval transform)
    num_classes: int


def num_classes_of(dataset: Dataset) -> int | None:
    """The number of classes of a labelled training set; None for an unlabelled one (no probe, no k-NN)."""
    return num_classes(dataset) or None


def val_split_folder(cfg_data) -> Path | None:
    """The ImageFolder of the validation split, or None (``data.val_split`` null)."""
    if cfg_data.val_split in (None, ""):
        return None
    return Path(str(cfg_data.root)).expanduser() / str(cfg_data.val_split)


def _eval_view(cfg_data):
    aug = cfg_data.augment
    return eval_transform(cfg_data.eval_resize, cfg_data.eval_crop, aug.mean, aug.std)


def build_monitor_sets(cfg, train_set: Dataset) -> MonitorSets:
    """The validation split and the k-NN's training subset of ``cfg.data`` (eval transform). A missing
    validation folder turns the validation figures off with a warning (the run itself goes on); so does a
    training set without labels (a flat folder, a file list), except STL-10, whose labelled ``train`` split
    is the k-NN's voting set and ``test`` its validation split."""
    d, t = cfg.data, cfg.train
    transform = _eval_view(d)
    n_classes = num_classes(train_set)
    val: Dataset | None = None
    knn_source: Dataset | None = None  # labelled training images with the eval transform
    if d.kind == "stl10":
        if d.val_split not in (None, ""):
            val = open_image_set("stl10", d.root, "test", transform)
            knn_source = open_image_set("stl10", d.root, "train", transform)
            n_classes = num_classes(knn_source)
    elif not is_labelled(train_set):
        log.warning("monitor: the training set has no labels (data.kind=%s); the online probe and the k-NN monitor "
                    "are off (they need labels: an ImageFolder <root>/<split>/<class>/<image>)", d.kind)
        return MonitorSets(val=None, knn_train=None, num_classes=0)
    elif d.kind == "imagefolder":
        folder = val_split_folder(d)
        if folder is not None and folder.is_dir():
            val = open_image_set("imagefolder", d.root, str(d.val_split), transform, classes=d.classes)
            if val.classes != train_set.classes:
                log.warning("monitor: %s has other classes than the training set; probe validation and k-NN off",
                            folder)
                val = None
        elif folder is not None:
            log.warning("monitor: no validation folder %s (data.val_split=%s); the probe logs its train top-1 only "
                        "and the k-NN monitor is off (fix: data.val_split=<folder beside %s>, or null)", folder,
                        d.val_split, d.split)
    elif d.val_split not in (None, ""):  # cifar10 / cifar100: the test set
        val = open_image_set(d.kind, d.root, "test", transform)
    if knn_source is None:
        # The training images as the monitor sees them: the same dataset object (files, labels, the record of
        # unreadable files) with the evaluation transform, so the training folder is not scanned a second time.
        knn_source = copy.copy(train_set)
        knn_source.transform = transform
    knn_train = None
    if val is not None and int(t.knn_every) > 0:
        n = min(int(t.knn_train_images), len(knn_source))
        order = torch.randperm(len(knn_source), generator=torch.Generator().manual_seed(MONITOR_SEED))
        knn_train = Subset(knn_source, sorted(order[:n].tolist()))
    return MonitorSets(val=val, knn_train=knn_train, num_classes=n_classes)


def evaluate(backbone: nn.Module, sets: MonitorSets, probe: OnlineProbe | None, knn: bool, cfg_train,
             workers: int, device: torch.device) -> dict:
    """The monitor's figures now (a collective: every process calls it): ``probe_val_top1`` and, with
    ``knn``, ``knn_top1`` / ``knn_top5`` of the weighted vote. Backbone in eval mode, put back after."""
    row: dict = {}
    if sets.val is None:
        return row
    batch = int(cfg_train.monitor_batch_size)
    val_f, val_y = readable(*extract_features(backbone, eval_loader(sets.val, batch, workers, persistent=False),
                                              device))
    if probe is not None:
        row["probe_val_top1"] = probe.top1(val_f, val_y)
    if knn and sets.knn_train is not None:
        tr_f, tr_y = readable(*extract_features(
            backbone, eval_loader(sets.knn_train, batch, workers, persistent=False), device))
        res = knn_accuracy(tr_f, tr_y, val_f, val_y, k=int(cfg_train.knn_k), weighted=True,
                           temperature=float(cfg_train.knn_temperature), num_classes=sets.num_classes or None)
        row.update({"knn_top1": res["top1"], "knn_top5": res["top5"], "knn_k": res["k"],
                    "knn_train_images": res["n_train"]})
    return row
