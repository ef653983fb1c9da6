"""k-NN evaluation: the vote, feature extraction (1 and 2 gloo processes), and the stage end to end."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from stage_fixtures import free_port
from transfer.knn import extract_features, knn_accuracy


def _clusters(n_per_class, n_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_knn_separable_clusters_are_classified():
    tr_x, tr_y = _clusters(20, 10, 32, 0.3, seed=0)
    te_x, te_y = _clusters(5, 10, 32, 0.3, seed=0)  # same centres (same seed), fresh noise below
    te_x = te_x + 0.3 * torch.randn(te_x.shape, generator=torch.Generator().manual_seed(1))
    for weighted, k in ((False, 5), (True, 20)):
        res = knn_accuracy(tr_x, tr_y, te_x, te_y, k=k, weighted=weighted)
        assert res["top1"] == 100.0 and res["top5"] == 100.0, res


def test_knn_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(0)
    tr_x, te_x = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    tr_y, te_y = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    res = knn_accuracy(tr_x, tr_y, te_x, te_y, k=20, weighted=True)
    assert 4.0 < res["top1"] < 18.0, res
    assert 35.0 < res["top5"] < 65.0, res


def test_knn_vote_by_hand():
    # Query along +x. Neighbours by cosine: two of class 1 (sim 0.9, 0.8), three of class 0 (sim 0.7, 0.6, 0.1).
    def unit(c):
        return torch.tensor([c, (1 - c * c) ** 0.5])

    train = torch.stack([unit(0.9), unit(0.8), unit(0.7), unit(0.6), unit(0.1)])
    labels = torch.tensor([1, 1, 0, 0, 0])
    query, qlabel = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    plain = knn_accuracy(train, labels, query, qlabel, k=5, weighted=False)
    assert plain["top1"] == 100.0  # 3 votes for class 0 beat 2 for class 1
    # Weighted: exp(.9/.07)+exp(.8/.07) >> exp(.7/.07)+..., so class 1 wins.
    weighted = knn_accuracy(train, labels, query, qlabel, k=5, weighted=True)
    assert weighted["top1"] == 0.0 and weighted["top5"] == 100.0
    # k=4: a 2-2 tie, broken by summed similarity (1.7 for class 1 vs 1.3 for class 0).
    tie = knn_accuracy(train, labels, query, qlabel, k=4, weighted=False)
    assert tie["top1"] == 0.0


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        knn_accuracy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                     torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


class _Tiny(nn.Module):
    feature_dim = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def _dataset():
    g = torch.Generator().manual_seed(3)
    return torch.utils.data.TensorDataset(torch.randn(11, 3, 8, 8, generator=g), torch.arange(11) % 3)


def _extract_worker(rank, world, port, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from common.distributed import cleanup, init_distributed

    torch.set_num_threads(1)
    info = init_distributed()
    ds = _dataset()
    sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler)
    feats, labels = extract_features(_Tiny(), loader, info.device)
    if rank == 0:
        torch.save((feats, labels), out_path)
    cleanup()




def test_extract_features_single_and_two_processes_agree(tmp_path):
    model = _Tiny()
    model.train()
    ds = _dataset()
    feats, labels = extract_features(model, torch.utils.data.DataLoader(ds, batch_size=4), "cpu")
    assert model.training, "extract_features must restore the backbone's mode"
    assert feats.shape == (11, 6) and labels.tolist() == (torch.arange(11) % 3).tolist()
    # 11 images over 2 ranks: the DistributedSampler pads one duplicate, which must be dropped.
    out = tmp_path / "feats.pt"
    mp.spawn(_extract_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    dfeats, dlabels = torch.load(out)
    assert dfeats.shape == (11, 6)
    assert torch.equal(dlabels, labels)
    assert torch.allclose(dfeats, feats, atol=1e-5)


# ------------------------------------------------------------------------------------------ the stage


def test_knn_presets_read_back():
    from common.config import compose_config

    cfg = compose_config("knn", [])
    assert (cfg.knn.k, cfg.knn.weighted_k, cfg.knn.temperature) == (5, 20, 0.07)
    assert (cfg.data.val_resize, cfg.data.val_crop) == (256, 224)






def test_several_k_in_one_pass_equal_one_k_at_a_time():
    from common.knn import knn_accuracies, knn_accuracy

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    ty, vy = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (50,), generator=g)
    for weighted in (False, True):
        many = knn_accuracies(train, ty, test, vy, [10, 20, 100, 200], weighted=weighted, num_classes=7)
        assert [m["k"] for m in many] == [10, 20, 100, 200]
        for m in many:
            one = knn_accuracy(train, ty, test, vy, k=m["k"], weighted=weighted, num_classes=7)
            assert (m["top1"], m["top5"]) == (one["top1"], one["top5"])
    assert len({m["top1"] for m in knn_accuracies(train, ty, test, vy, [1, 50, 300], weighted=True)}) > 1
