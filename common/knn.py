"""The k-NN classifier on frozen features: plain (majority vote, k=5) and weighted (InstDisc / DINO, k=20,
T=0.07) votes on cosine similarity. Used by ``transfer.knn`` (the evaluation) and the pretraining monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 5, weighted: bool = False, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> dict:
    """Top-1 / top-5 accuracy (percent) of a k-NN classifier on cosine similarity.

    weighted=False: each of the k neighbours votes 1 for its class (ties between classes broken by
    their summed similarity). weighted=True: votes exp(sim / temperature) (InstDisc / DINO).
    Top-5 counts a hit when the true class is among the 5 classes with most votes.
    """
    return knn_accuracies(train_feats, train_labels, test_feats, test_labels, [k], weighted, temperature,
                          num_classes, chunk_size)[0]


@torch.no_grad()
def knn_accuracies(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                   test_labels: torch.Tensor, ks, weighted: bool = False, temperature: float = 0.07,
                   num_classes: int | None = None, chunk_size: int = 1024) -> list[dict]:
    """``knn_accuracy`` for every k of ``ks`` in one pass (DINO's eval_knn reports k = 10, 20, 100, 200): the
    similarities and the max(ks) nearest neighbours are computed once, each k votes with its first k."""
    ks = [int(k) for k in ks]
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_accuracy needs at least one training and one test feature")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    ks = [min(k, train_feats.shape[0]) for k in ks]
    k_max = max(ks)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.to(train.device).long()
    test_labels = test_labels.to(train.device).long()
    n_top = min(5, num_classes)
    correct = torch.zeros(len(ks), 2, dtype=torch.long)
    for s in range(0, test.shape[0], chunk_size):
        q, y = test[s: s + chunk_size], test_labels[s: s + chunk_size]
        sim_all, idx_all = (q @ train.T).topk(k_max, dim=1)  # sorted: the first k are the k nearest
        for j, k in enumerate(ks):
            sim, nn_labels = sim_all[:, :k], train_labels[idx_all[:, :k]]
            if weighted:
                votes = (sim / temperature).exp()
            else:
                # One vote each; the summed similarity (|sum| <= k) scaled below 1 only breaks ties.
                votes = 1.0 + sim / (4.0 * k)
            scores = torch.zeros(q.shape[0], num_classes, device=train.device).scatter_add_(1, nn_labels, votes)
            hits = scores.topk(n_top, dim=1).indices == y[:, None]
            correct[j, 0] += int(hits[:, 0].sum().item())
            correct[j, 1] += int(hits.any(dim=1).sum().item())
    n = test.shape[0]
    return [{"top1": 100.0 * int(correct[j, 0]) / n, "top5": 100.0 * int(correct[j, 1]) / n, "k": k,
             "weighted": weighted, "n_train": int(train.shape[0]), "n_test": int(n)} for j, k in enumerate(ks)]
