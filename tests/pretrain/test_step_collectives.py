"""Collectives and host reads of one training step, in 2 gloo processes.

- ``GlobalBatchNorm`` (the CPU SyncBN): one collective per layer and view in the forward (an all-gather of
  count, mean and M2) and one in the backward, and the variance of float32 inputs far from zero equals the
  two-pass variance of the concatenated batch (the one-pass E[x^2] - E[x]^2 would not);
- ``train_step``: every Python-level collective of a step counted (DDP's own gradient buckets run in its C++
  reducer and are not), and the step reads the device once, after the backward (the finiteness / stop vote).
"""

from __future__ import annotations

import datetime
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from common.distributed import cleanup
from pretrain.model import build_projector
from stage_fixtures import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "all_to_all",
               "barrier", "gather", "scatter", "reduce")
GLOBAL, C = 32, 6


class Recorder:
    """Wraps torch.distributed's collectives and the tensor reads that make the host wait for the device."""

    def __init__(self):
        self.events: list[str] = []
        self._saved = []

    def __enter__(self):
        def wrap(owner, name, label):
            original = getattr(owner, name)

            def recorded(*a, **kw):
                self.events.append(label)
                return original(*a, **kw)
            self._saved.append((owner, name, original))
            setattr(owner, name, recorded)

        for name in COLLECTIVES:
            wrap(dist, name, name)
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            wrap(torch.Tensor, name, "read")
        wrap(torch.Tensor, "backward", "backward")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def counts(self) -> Counter:
        return Counter(e for e in self.events if e not in ("read", "backward"))


def _batchnorm_numerics(rank: int, world: int) -> dict:
    from pretrain.model import GlobalBatchNorm

    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(GLOBAL, C, generator=g) * torch.linspace(0.5, 2, C)).float()  # |mean| >> std
    up = torch.randn(GLOBAL, C, generator=g)
    lo, hi = rank * GLOBAL // world, (rank + 1) * GLOBAL // world
    bn = GlobalBatchNorm(C, momentum=1.0).train()  # momentum 1: running_var = this batch's unbiased variance
    xr = x[lo:hi].clone().requires_grad_()
    with Recorder() as rec:
        out = bn(xr)
        forward = rec.counts()
        (out * up[lo:hi]).sum().backward()
    backward = rec.counts() - forward
    return {"out": out.detach(), "grad": xr.grad, "running_var": bn.running_var.clone(),
            "running_mean": bn.running_mean.clone(), "forward": dict(forward), "backward": dict(backward),
            "x": x, "up": up}


class _Projections(nn.Module):
    """A small stand-in for SSLNetwork (the same contract: a list of views in, one projection per view out), with
    the paper's projector: 2 batch-norm layers."""

    def __init__(self):
        super().__init__()
        self.projector = build_projector(12, [16, 16, 8])

    def forward(self, views):
        return [self.projector(v) for v in views]


def _step_events(rank: int, world: int) -> dict:
    from pretrain.engine import train_step
    from pretrain.methods import build_method
    from pretrain.model import GlobalBatchNorm, convert_sync_batchnorm
    from pretrain.optim import build_optimizer

    torch.manual_seed(0)
    net = convert_sync_batchnorm(_Projections(), torch.device("cpu"))
    model = nn.parallel.DistributedDataParallel(net)
    objective = build_method({"name": "intl"}, global_batch=16, world_size=world)
    optimizer = build_optimizer(net, lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(8, 12, generator=g) for _ in range(2)]
    train_step(model, objective, optimizer, views)  # warm-up: DDP's first-iteration bookkeeping
    with Recorder() as rec:
        res = train_step(model, objective, optimizer, views)
    return {"events": rec.events, "counts": dict(rec.counts()), "finite": res.finite,
            "bn_layers": sum(isinstance(m, GlobalBatchNorm) for m in net.modules())}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save({"bn": _batchnorm_numerics(rank, world), "step": _step_events(rank, world)}, f"{out}.{rank}")
    finally:
        cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("collectives") / "rank")
    mp.start_processes(_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}.{r}") for r in range(2)]


def test_global_batchnorm_one_collective_per_direction_and_the_two_pass_variance(two_ranks):
    for r in two_ranks:
        assert r["bn"]["forward"] == {"all_gather": 1} and r["bn"]["backward"] == {"all_reduce": 1}
    x, up = two_ranks[0]["bn"]["x"], two_ranks[0]["bn"]["up"]
    # the two-pass result on the concatenated batch, in float64
    x64 = x.double().requires_grad_()
    ref = nn.BatchNorm1d(C, momentum=1.0).double().train()
    out = ref(x64)
    (out * up.double()).sum().backward()
    got_out = torch.cat([r["bn"]["out"] for r in two_ranks]).double()
    got_grad = torch.cat([r["bn"]["grad"] for r in two_ranks]).double()
    var = two_ranks[0]["bn"]["running_var"].double()
    rel_var = ((var - ref.running_var) / ref.running_var).abs().max().item()
    # what the one-pass formula gives in float32 on the same numbers
    naive = (x.pow(2).mean(0) - x.mean(0).pow(2)) * GLOBAL / (GLOBAL - 1)
    rel_naive = ((naive.double() - ref.running_var) / ref.running_var).abs().max().item()
    torch_bn = nn.BatchNorm1d(C, momentum=1.0).train()  # torch's own float32 batch norm, one process
    torch_bn(x)
    rel_torch = ((torch_bn.running_var.double() - ref.running_var) / ref.running_var).abs().max().item()
    print(f"variance relative error in float32, mean 1e4, std 0.5-2: ours {rel_var:.1e}, torch's BatchNorm1d on the "
          f"concatenated batch {rel_torch:.1e}, one-pass E[x^2]-E[x]^2 {rel_naive:.1e}")
    # float32 holds each process's mean (~1e4) to ulp 1e-3, which the spread of the means (~0.2) carries into the
    # variance: ~1e-3 at most; the one-pass formula is off by more than the variance itself
    assert rel_var < 2e-3 and rel_naive > 1.0
    torch.testing.assert_close(two_ranks[1]["bn"]["running_var"], two_ranks[0]["bn"]["running_var"], rtol=0, atol=0)
    torch.testing.assert_close(got_out, out.detach(), rtol=0, atol=2e-3)  # float32 holds 1e4 to ~1e-3
    torch.testing.assert_close(got_grad, x64.grad, rtol=0, atol=2e-3 * x64.grad.abs().max().item())


def test_a_training_step_has_one_collective_per_batchnorm_layer_and_view_each_way_and_one_host_read(two_ranks):
    for r in two_ranks:
        s = r["step"]
        views, bn = 2, s["bn_layers"]
        assert s["finite"] and bn == 2
        expected = {
            "all_gather": bn * views + views,     # forward: each BN layer per view; the objective's gather per view
            "all_reduce": bn * views + views + 1,  # backward: the same, as all-reduces; + the finiteness/stop vote
        }
        print(f"rank step collectives: {s['counts']} (expected {expected}); host reads in order: "
              f"{[e for e in s['events'] if e in ('read', 'backward')]}")
        assert s["counts"] == expected
        reads = [i for i, e in enumerate(s["events"]) if e == "read"]
        assert len(reads) == 1 and reads[0] > s["events"].index("backward")
