"""Two gloo processes give the same loss and the same parameter update as one process on the
concatenated batch: DDP + batch norm over the global batch + the objective's all-gather + beta of the
global batch, through the engine's own ``train_step``. Checked for INTL (2 views) and for the EMA
multi-crop variant (crop 0 through the momentum encoder, 3 crops of different sizes).

The runs are in float64, so that "the same" can be checked tightly (relative 1e-9): in float32 the
whitening amplifies the different summation orders of the two set-ups to ~1e-3 relative after two steps,
which would hide a real mistake of that size."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from stage_fixtures import free_port

GLOBAL_BATCH = 16
STEPS = 2



def _run_steps(world: int, rank: int, ema: bool) -> dict:
    """STEPS optimisation steps on a fixed global batch; this rank feeds its slice of it."""
    from pretrain.engine import train_step
    from pretrain.methods import build_method
    from pretrain.model import SSLNetwork, convert_sync_batchnorm, ema_update, make_momentum_copy
    from pretrain.optim import build_optimizer

    torch.manual_seed(0)
    net = SSLNetwork("resnet18", [64, 64, 32])
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if world > 1:
        net = convert_sync_batchnorm(net, torch.device("cpu"))
        model = torch.nn.parallel.DistributedDataParallel(net)
    else:
        model = net
    target = make_momentum_copy(net) if ema else None
    objective = build_method({"name": "intl", "ema": ema}, global_batch=GLOBAL_BATCH, world_size=world)
    optimizer = build_optimizer(net, lr=0.2, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    sizes = [32, 32, 24] if ema else [32, 32]
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    losses, parts, beta = [], [], None
    for _ in range(STEPS):
        views = [torch.randn(GLOBAL_BATCH, 3, s, s, generator=g)[lo:hi] for s in sizes]
        res = train_step(model, objective, optimizer, views, target_model=target)
        assert res.finite
        if target is not None:
            ema_update(target, net, 0.99)
        losses.append(float(res.out["loss"]))
        parts.append(float(res.out["trace"]))
        beta = float(res.out["beta"])
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if target is not None:
        state.update({f"ema.{k}": v.detach().clone() for k, v in target.state_dict().items()})
        init.update({f"ema.{k}": v for k, v in list(init.items())})
    return {"losses": losses, "trace": parts, "beta": beta, "state": state, "init": init}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from common.distributed import cleanup, init_distributed

    init_distributed()
    try:
        result = {ema: _run_steps(world, rank, ema) for ema in (False, True)}
        torch.save(result, f"{out}.rank{rank}")
    finally:
        cleanup()


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        single = {ema: _run_steps(1, 0, ema) for ema in (False, True)}
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "dist")), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path / 'dist'}.rank{r}") for r in range(2)]
    for ema in (False, True):
        one, two = single[ema], ranks[0][ema]
        assert two["beta"] == one["beta"] == pytest.approx(0.01 * (4 - 3))  # log2(16) - 3: the GLOBAL batch
        assert ranks[1][ema]["losses"] == two["losses"]  # the same loss on every rank
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-10, atol=0)
        torch.testing.assert_close(torch.tensor(two["trace"]), torch.tensor(one["trace"]), rtol=1e-9, atol=1e-12)
        init = one["init"]
        worst = 0.0
        for key, v1 in one["state"].items():
            v2 = two["state"][key]
            torch.testing.assert_close(ranks[1][ema]["state"][key], v2, rtol=0, atol=0)  # ranks in sync
            if not v1.is_floating_point():
                assert torch.equal(v1, v2), key
                continue
            d1, d2 = v1 - init[key], v2 - init[key]  # the update (parameters) or statistics change (buffers)
            scale = d1.abs().max().item()
            err = (d1 - d2).abs().max().item()
            assert err <= 1e-9 * scale + 1e-14, (key, err, scale)
            worst = max(worst, err / (scale + 1e-12))
        moved = sum((one["state"][k] - init[k]).abs().sum().item() for k in one["state"] if "weight" in k)
        assert moved > 0  # the steps did change the weights, so the comparison above means something
        print(f"ema={ema}: losses 1 proc {one['losses']} / 2 procs {two['losses']}; "
              f"worst relative update error {worst:.2e}")

