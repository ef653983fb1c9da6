"""k-NN evaluation on frozen backbone features (no training).

Two variants, as in the paper's tables and the usual SSL protocol:
- plain k-NN (k=5): majority vote of the k nearest training images (cosine similarity on
  L2-normalised features); ties are broken by the summed similarity of the tied classes.
- weighted k-NN (k=20): the InstDisc / DINO vote, each neighbour weighing exp(sim / T), T=0.07.

Library functions (also used by the pretraining engine for its periodic k-NN monitor):
``extract_features(backbone, loader, device)`` and ``knn_accuracy(...)``. The stage
``run(cfg)`` / ``python -m transfer.knn key=value ...`` evaluates a checkpoint on an ImageFolder set.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F

from common.distributed import gather_rows, get_world_size, is_dist
from common.runlog import MetricsLogger, save_config
from common.stage import begin, hydra_main
from transfer import classification as C

UNVISITED = -2  # a label no sample has (C.EXCLUDED = -1 marks unreadable images)


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


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 5, weighted: bool = False, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> dict:
    """Top-1 / top-5 accuracy (percent) of a k-NN classifier on cosine similarity.

    weighted=False: each of the k neighbours votes 1 for its class (ties between classes broken by
    their summed similarity). weighted=True: votes exp(sim / temperature) (InstDisc / DINO).
    Top-5 counts a hit when the true class is among the 5 classes with most votes.
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_accuracy needs at least one training and one test feature")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_feats.shape[0])
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.to(train.device).long()
    test_labels = test_labels.to(train.device).long()
    n_top = min(5, num_classes)
    correct1 = correct5 = 0
    for s in range(0, test.shape[0], chunk_size):
        q, y = test[s: s + chunk_size], test_labels[s: s + chunk_size]
        sim, nn_idx = (q @ train.T).topk(k, dim=1)
        nn_labels = train_labels[nn_idx]
        if weighted:
            votes = (sim / temperature).exp()
        else:
            # One vote each; the summed similarity (|sum| <= k) scaled below 1 only breaks ties.
            votes = 1.0 + sim / (4.0 * k)
        scores = torch.zeros(q.shape[0], num_classes, device=train.device).scatter_add_(1, nn_labels, votes)
        pred = scores.topk(n_top, dim=1).indices
        hits = pred == y[:, None]
        correct1 += int(hits[:, 0].sum().item())
        correct5 += int(hits.any(dim=1).sum().item())
    n = test.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "k": k, "weighted": weighted,
            "n_train": int(train.shape[0]), "n_test": int(n)}


def _readable(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of readable images (unreadable ones are labelled ``C.EXCLUDED``)."""
    keep = labels != C.EXCLUDED
    return feats[keep], labels[keep]


# ------------------------------------------------------------------------------------------ the stage
STAGE = "knn"


def validate_config(cfg, world_size: int = 1, check_paths: bool = True):
    return C.validate_eval_config(cfg, STAGE, world_size=world_size, check_paths=check_paths)


def run(cfg) -> dict | None:
    """k-NN evaluation of ``cfg.weights`` (or random init) on ``cfg.data``: features of the training and
    validation images (evaluation transform), then k=``knn.k`` plain and k=``knn.weighted_k`` weighted votes.
    top1/top5 in results.json are the plain k-NN's (the paper's tables); the weighted ones are under
    ``weighted``."""
    start = begin(cfg, validate_config, C.log, check_done=C.check_previous)
    if start.done is not None:
        return start.finished_result()
    cfg, info, run_dir = start.cfg, start.info, start.run_dir
    if info.is_main:
        save_config(run_dir, cfg)
    transform = C.eval_transform(cfg.data)
    train_ds, val_ds = C.labelled_sets(cfg.data, transform, transform, exclude_bad_train=True)
    loaded = C.build_model(cfg, num_classes=None)
    backbone = loaded.model.to(info.device)
    C.log.info("k-NN evaluation of %s (%s, %s, feature dim %d): %d train / %d val images, %d classes",
               loaded.source, loaded.arch, loaded.kind, loaded.feature_dim, len(train_ds), len(val_ds),
               len(train_ds.classes))
    t0 = time.time()
    tr_f, tr_y = extract_features(backbone, C.eval_loader(train_ds, cfg.knn.batch_size, cfg.data.workers), info.device,
                                  progress=info.is_main)
    va_f, va_y = extract_features(backbone, C.eval_loader(val_ds, cfg.knn.batch_size, cfg.data.workers), info.device,
                                  progress=info.is_main)
    unreadable = C.unreadable_images(run_dir, info, train=train_ds, val=val_ds)
    (tr_f, tr_y), (va_f, va_y) = (_readable(tr_f, tr_y), _readable(va_f, va_y))
    if tr_f.shape[1] != loaded.feature_dim:
        raise RuntimeError(f"the backbone gave {tr_f.shape[1]} features, "
                           f"expected {loaded.feature_dim} for {loaded.arch}")
    results = None
    if info.is_main:
        n_cls = len(train_ds.classes)
        plain = knn_accuracy(tr_f, tr_y, va_f, va_y, k=cfg.knn.k, weighted=False, num_classes=n_cls)
        weighted = (knn_accuracy(tr_f, tr_y, va_f, va_y, k=cfg.knn.weighted_k, weighted=True,
                                 temperature=cfg.knn.temperature, num_classes=n_cls) if cfg.knn.weighted_k else None)
        logger = MetricsLogger(run_dir, enabled=True)
        logger.log(0, prefix=f"knn{plain['k']}/", top1=plain["top1"], top5=plain["top5"])
        if weighted:
            logger.log(0, prefix=f"knn{weighted['k']}_weighted/", top1=weighted["top1"], top5=weighted["top5"])
        logger.close()
        C.log.info("k-NN (k=%d): top-1 %.2f top-5 %.2f%s  [%.0fs]", plain["k"], plain["top1"], plain["top5"],
                   f"; weighted k-NN (k={weighted['k']}, T={cfg.knn.temperature}): top-1 {weighted['top1']:.2f} "
                   f"top-5 {weighted['top5']:.2f}" if weighted else "", time.time() - t0)
        results = C.results_record(
            STAGE, cfg, loaded, info, top1=plain["top1"], top5=plain["top5"], k=plain["k"], weighted=weighted,
            epochs=0, subset=None, num_classes=n_cls, n_train=int(tr_f.shape[0]), n_val=int(va_f.shape[0]),
            unreadable_images=unreadable)
    return C.finish(run_dir, info, results or {})


if __name__ == "__main__":
    hydra_main(STAGE, run)
