"""Method registry: config validation, forward contract, and distributed semantics with 2 gloo processes."""

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from omegaconf import OmegaConf

from common.distributed import cleanup
from pretrain import losses
from pretrain.methods import METHODS, build_method
from stage_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
METHOD_DIR = ROOT / "configs" / "method"


pytestmark = pytest.mark.usefixtures("one_thread")


def _views(n, m=16, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, d, generator=g, dtype=dtype) * torch.linspace(0.5, 2, d, dtype=dtype) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------
# registry and config files
# ------------------------------------------------------------------------------------------------------
def test_every_method_has_a_config_file_with_exactly_its_keys_and_defaults():
    files = {p.stem: p for p in METHOD_DIR.glob("*.yaml")}
    assert set(files) == set(METHODS), "one configs/method/<name>.yaml per registered method"
    for name, path in files.items():
        cfg = OmegaConf.load(path)
        assert cfg.name == name
        assert OmegaConf.to_container(cfg) == {"name": name, **METHODS[name].defaults}
        obj = build_method(cfg, global_batch=32, world_size=2)
        assert obj.uses_ema is False and obj.name == name


def test_unknown_name_and_key_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'intll'.*'intl'.*method=<name>"):
        build_method({"name": "intll"}, 32, 1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['iter'\] for method=intl; valid keys: .*'iters'"):
        build_method({"name": "intl", "iter": 4}, 32, 1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['beta'\] for method=iternorm_only"):
        build_method({"name": "iternorm_only", "beta": 0.1}, 32, 1)


@pytest.mark.parametrize("cfg,key", [
    ({"name": "intl", "iters": 0}, "iters"),
    ({"name": "intl", "iters": 2.5}, "iters"),
    ({"name": "intl", "axis": "features"}, "axis"),
    ({"name": "intl", "beta": -0.1}, "beta"),
    ({"name": "intl", "ema": "yes"}, "ema"),
    ({"name": "st_power", "eps": 0}, "eps"),
    ({"name": "st_power", "power": "half"}, "power"),
    ({"name": "vicreg", "trace": 1}, "trace"),
    ({"name": "vicreg", "std_coeff": -1}, "std_coeff"),
    ({"name": "barlow_twins", "trace_axis": "rows"}, "trace_axis"),
])
def test_bad_values_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key):
        build_method(cfg, 32, 1)


def test_batch_and_world_size_checks():
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        build_method({"name": "intl"}, 32, 3)
    # the paper's beta rule is negative below 8 samples: refuse instead of rewarding collapse
    obj = build_method({"name": "intl"}, 4, 1)
    with pytest.raises(ValueError, match="negative.*set method.beta"):
        obj(_views(2, m=4))
    assert build_method({"name": "intl", "beta": 0.0}, 4, 1)(_views(2, m=4))["beta"] == 0.0


def test_beta_null_uses_the_global_batch_not_the_local_one():
    obj = build_method(OmegaConf.create({"name": "intl"}), global_batch=512, world_size=32)
    out = obj(_views(2, m=16))
    assert out["beta"] == pytest.approx(losses.intl_beta(512, 12))
    obj = build_method({"name": "intl", "axis": "batch"}, global_batch=512, world_size=32)
    assert obj(_views(2, m=16, d=64))["beta"] == pytest.approx(0.01 * (6 - 3))


# ------------------------------------------------------------------------------------------------------
# forward contract
# ------------------------------------------------------------------------------------------------------
def test_forward_equals_pure_loss_for_two_views_multicrop_and_ema():
    views = _views(6)
    obj = build_method({"name": "intl"}, 16, 1)
    for n in (2, 6):
        expected = losses.intl_loss(views[:n], beta=losses.intl_beta(16, 12))
        out = obj(views[:n])
        assert out["loss"].item() == pytest.approx(expected["loss"].item(), abs=1e-12)
        assert out["align"].item() + out["trace"].item() == pytest.approx(out["loss"].item(), abs=1e-12)
    ema = build_method({"name": "intl", "ema": True}, 16, 1)
    assert ema.uses_ema
    expected = losses.intl_loss(views[1:], views[0], beta=losses.intl_beta(16, 12))
    assert ema(views[1:], target=views[0])["loss"].item() == pytest.approx(expected["loss"].item(), abs=1e-12)


def test_forward_rejects_wrong_calls_with_the_fix():
    obj = build_method({"name": "intl"}, 16, 1)
    ema = build_method({"name": "intl", "ema": True}, 16, 1)
    v = _views(3)
    with pytest.raises(ValueError, match="ema=false but a target"):
        obj(v[1:], target=v[0])
    with pytest.raises(ValueError, match="pass target="):
        ema(v)
    with pytest.raises(ValueError, match="at least 2 online"):
        obj(v[:1])
    with pytest.raises(TypeError, match="list"):
        obj(v[0])
    with pytest.raises(ValueError, match="same dim"):
        obj([v[0], v[1][:, :5]])


def test_ema_target_gets_no_gradient_and_online_views_do():
    v = [t.requires_grad_() for t in _views(3)]
    out = build_method({"name": "intl", "ema": True}, 16, 1)(v[1:], target=v[0])
    out["loss"].backward()
    assert v[0].grad is None and v[1].grad is not None and v[2].grad is not None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_in_float32_under_autocast(name):
    lin = nn.Linear(12, 12)
    views = [x.float() for x in _views(2)]
    obj = build_method({"name": name}, 16, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj([lin(x) for x in views])
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(lin.weight.grad).all()


# ------------------------------------------------------------------------------------------------------
# 2 gloo processes: same loss on every rank as one process on the concatenated batch, and DDP's averaged
# gradient equal to the one-process gradient
# ------------------------------------------------------------------------------------------------------
DIST_CASES = [({"name": "intl"}, 2), ({"name": "intl"}, 4), ({"name": "intl", "axis": "batch", "beta": 0.03}, 2),
              ({"name": "intl", "ema": True}, 3), ({"name": "st_power"}, 2), ({"name": "frossl"}, 2),
              ({"name": "barlow_twins", "trace": True}, 2), ({"name": "vicreg"}, 2)]
GLOBAL_BATCH, DIM, IN_DIM = 16, 10, 6


def _inputs(n_views):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=torch.float64) for _ in range(n_views)]


def _linear():
    torch.manual_seed(3)
    return nn.Linear(IN_DIM, DIM).double()


def _case_outputs(lin, cfg, inputs, world):
    """loss, per-view input gradients and parameter gradients for one case (rank slice in ``inputs``)."""
    obj = build_method(cfg, GLOBAL_BATCH, world)
    xs = [x.clone().requires_grad_() for x in inputs]
    proj = [lin(x) for x in xs]
    out = obj(proj[1:], target=proj[0].detach()) if obj.uses_ema else obj(proj)
    lin.zero_grad()
    out["loss"].backward()
    return {"loss": out["loss"].item(), "x_grad": [x.grad for x in xs],
            "w_grad": lin.module.weight.grad.clone() if hasattr(lin, "module") else lin.weight.grad.clone()}


def _dist_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        local = GLOBAL_BATCH // world
        results = []
        for cfg, n_views in DIST_CASES:
            ddp = nn.parallel.DistributedDataParallel(_linear())
            inputs = [x[rank * local:(rank + 1) * local] for x in _inputs(n_views)]
            results.append(_case_outputs(ddp, cfg, inputs, world))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup()  # barrier, then destroy (common.distributed: gloo's destroy can deadlock otherwise)



def test_two_gloo_processes_match_one_process_loss_and_ddp_gradient(tmp_path):
    world = 2
    mp.start_processes(_dist_worker, args=(world, free_port(), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    local = GLOBAL_BATCH // world
    for i, (cfg, n_views) in enumerate(DIST_CASES):
        single = _case_outputs(_linear(), cfg, _inputs(n_views), 1)
        for r in range(world):
            got = ranks[r][i]
            # identical loss on every rank, equal to the one-process loss on the concatenated batch
            assert got["loss"] == pytest.approx(single["loss"], abs=1e-12), cfg
            # gather_with_grad sums the W identical rank losses' gradients: W x the one-process slice
            for gx, sx in zip(got["x_grad"], single["x_grad"]):
                if sx is None:  # the EMA target
                    assert gx is None
                    continue
                torch.testing.assert_close(gx / world, sx[r * local:(r + 1) * local], rtol=1e-9, atol=1e-12)
            # ... so DDP's 1/W average gives exactly the one-process parameter gradient
            torch.testing.assert_close(got["w_grad"], single["w_grad"], rtol=1e-9, atol=1e-12)
