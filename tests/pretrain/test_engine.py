"""Unit tests of the pretraining engine's pieces: network, optimiser and schedules, data order,
configs and presets, non-finite handling, atomic checkpoints. Fast (tiny models, a few steps)."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from common.checkpoint import LAST_NAME, load_checkpoint
from common.errors import ConfigError
from pretrain.augment import AUG_KEYS
from pretrain.data_loading import EpochShardSampler, SeededViews
from pretrain.model import GlobalBatchNorm, SSLNetwork, build_projector, convert_sync_batchnorm, ema_update
from pretrain.optim import ema_momentum_scheduler, lr_scheduler, param_groups, scaled_lr
from stage_fixtures import build_engine, compose_pretrain, nan_loss_at, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"




# ------------------------------------------------------------------------------------------ network
def test_network_keys_are_torchvision_keys_under_backbone_and_projector():
    net = SSLNetwork("resnet18", [32, 32, 16])
    keys = set(net.state_dict())
    tv = {f"backbone.{k}" for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert {k for k in keys if k.startswith("backbone.")} == tv
    proj = net.projector
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                                                "Linear"]
    assert proj[0].bias is None and proj[3].bias is None and proj[6].bias is not None
    assert (proj[0].in_features, proj[6].out_features) == (512, 16)
    out = net([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 24, 24)])  # multi-crop sizes
    assert [tuple(o.shape) for o in out] == [(4, 16), (4, 16)]
    with pytest.raises(ValueError, match="model.projector"):
        build_projector(512, [])


def test_global_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    gbn = convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(gbn, GlobalBatchNorm) and set(gbn.state_dict()) == set(bn.state_dict())
    x = torch.randn(6, 5, 3, 3)
    torch.testing.assert_close(gbn(x), torch.nn.BatchNorm2d(5)(x))


def test_ema_update_moves_target_towards_online():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = target.weight.detach().clone()
    ema_update(target, online, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * t0 + 0.1 * online.weight.detach())


# ------------------------------------------------------------------------------------------ optimiser
def test_no_weight_decay_on_biases_and_norm_parameters():
    net = SSLNetwork("resnet18", [32, 32, 16])
    decay, no_decay = param_groups(net, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.bn1.weight" in no_decay_names and "backbone.bn1.bias" in no_decay_names
    assert "projector.6.bias" in no_decay_names and "projector.1.weight" in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_lr_schedule_is_the_paper_codes_formula():
    base, total, warm = scaled_lr(0.3, 512), 50, 10
    assert base == pytest.approx(0.6)
    sched = lr_scheduler(base, total, warm, 0.001)
    for step in range(total):  # official main.py adjust_learning_rate
        if step < warm:
            want = base * (step + 1) / warm
        else:
            q = 0.5 * (1 + math.cos(math.pi * (step + 1 - warm) / (total - warm)))
            want = base * q + base * 0.001 * (1 - q)
        assert sched(step) == pytest.approx(want, rel=1e-9, abs=1e-12), step


def test_ema_momentum_goes_from_base_to_one_on_a_cosine():
    sched = ema_momentum_scheduler(0.996, 100)
    for k in (0, 25, 50, 99):
        assert sched(k) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * k / 100)) * (1 - 0.996))
    assert sched(0) == pytest.approx(0.996) and sched(99) > 0.99999


# ------------------------------------------------------------------------------------------ data order
def test_sampler_shards_and_resumes_mid_epoch():
    n, b = 50, 4
    shards = []
    for rank in range(2):
        s = EpochShardSampler(n, b, rank=rank, world_size=2, seed=3)
        s.set_epoch(5)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 25
    assert not set(shards[0]) & set(shards[1])
    assert all(e == 5 for e, _ in shards[0])
    s = EpochShardSampler(n, b, rank=1, world_size=2, seed=3)
    s.set_epoch(5, start_batch=2)
    assert list(s) == shards[1][8:] and len(s) == 17
    s.set_epoch(6)
    assert [i for _, i in s] != [i for _, i in shards[1]]  # a new order every epoch


class _RandomTransformDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3).tolist() + [random.random(), float(np.random.rand())], i


def test_seeded_views_depend_only_on_seed_epoch_index():
    ds = SeededViews(_RandomTransformDataset(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds[(2, 4)]
    torch.testing.assert_close(torch.get_rng_state(), before)  # the caller's generator is untouched
    torch.manual_seed(999), random.seed(1), np.random.seed(2)
    assert ds[(2, 4)] == a
    assert ds[(3, 4)] != a and ds[(2, 5)] != a


# ------------------------------------------------------------------------------------------ configs
PAPER_PRESETS = {
    # name: (data, arch, projector, epochs, batch, base_lr, wd, ema, number of views)
    "imagenet_100ep": ("imagenet", "resnet50", [8192] * 3, 100, 512, 0.5, 1e-5, False, 2),
    "imagenet_200ep": ("imagenet", "resnet50", [8192] * 3, 200, 512, 0.4, 1e-5, False, 2),
    "imagenet_400ep": ("imagenet", "resnet50", [8192] * 3, 400, 512, 0.4, 1e-5, False, 2),
    "imagenet_800ep": ("imagenet", "resnet50", [8192] * 3, 800, 512, 0.3, 1e-5, False, 2),
    "imagenet_800ep_multicrop_ema": ("imagenet", "resnet50", [8192] * 3, 800, 256, 0.3, 1e-5, True, 6),
    "imagenet100": ("imagenet100", "resnet18", [4096] * 3, 400, 128, 0.5, 2.5e-5, False, 2),
    "cifar10": ("cifar", "resnet18", [2048] * 3, 1000, 256, 0.3, 1e-4, False, 2),
    "cifar100": ("cifar", "resnet18", [2048] * 3, 1000, 256, 0.3, 1e-4, False, 2),
}


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_paper_presets_are_the_papers_recipe(preset):
    from pretrain.train import validate_config

    data, arch, projector, epochs, batch, lr, wd, ema, views = PAPER_PRESETS[preset]
    cfg = validate_config(compose_pretrain([f"pretrain/preset={preset}"]), world_size=8, check_paths=False)
    assert cfg.name == f"intl_{preset}" and cfg.run_dir == f"outputs/pretrain/intl_{preset}"
    assert cfg.model.arch == arch and list(cfg.model.projector) == projector and cfg.model.sync_bn
    assert cfg.model.small_stem == preset.startswith("cifar")
    o = cfg.optim
    assert (o.epochs, o.batch_size, o.base_lr, o.weight_decay) == (epochs, batch, lr, wd)
    assert (o.momentum, o.warmup_epochs, o.final_lr_ratio, o.ema_momentum) == (0.9, 2, 0.001, 0.996)
    assert dict(cfg.method) == {"name": "intl", "iters": 4, "axis": "channel", "beta": None, "ema": ema, "fused": False}
    assert cfg.data.kind == ("imagefolder" if data.startswith("imagenet") else preset)
    assert len(cfg.data.augment.views) == views
    sizes = [v.size for v in cfg.data.augment.views]
    assert sizes == ([224, 224, 192, 160, 128, 96] if views == 6 else [32, 32] if data == "cifar" else [224, 224])
    assert cfg.train.amp == "auto"
    assert set(cfg.data.augment) == set(AUG_KEYS) and cfg.data.augment.hue == 0.1  # written out in full


def test_every_method_config_composes_and_builds():
    from pretrain.methods import build_method

    names = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))
    assert "intl" in names
    for name in names:
        cfg = compose_pretrain([f"method={name}"])
        assert cfg.method.name == name
        build_method(cfg.method, global_batch=64, world_size=2)


def test_unknown_key_or_bad_value_fails_at_start_with_the_fix(tmp_path):
    from pretrain.train import ConfigError, validate_config

    cfg = OmegaConf.create(OmegaConf.to_container(compose_pretrain(["pretrain/preset=synthetic"])))

    def bad(patch):
        return OmegaConf.merge(cfg, patch)

    with pytest.raises(ConfigError, match=r"optim\.batchsize.*valid keys of optim.*batch_size"):
        validate_config(bad({"optim": {"batchsize": 3}}), check_paths=False)
    with pytest.raises(ConfigError, match="valid top-level keys"):
        validate_config(bad({"trian": {"amp": "off"}}), check_paths=False)
    with pytest.raises(ConfigError, match="train.amp='fast'"):
        validate_config(bad({"train": {"amp": "fast"}}), check_paths=False)
    with pytest.raises(ConfigError, match="optim.epochs"):
        validate_config(bad({"optim": {"epochs": "many"}}), check_paths=False)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        validate_config(cfg, world_size=3, check_paths=False)
    with pytest.raises(ConfigError, match="is not a folder.*make data"):
        validate_config(bad({"data": {"root": str(tmp_path / "nope")}}))
    with pytest.raises(ConfigError, match="train.spectrum_topk must be >= 1, got 0"):
        validate_config(bad({"train": {"spectrum_topk": 0}}), check_paths=False)
    with pytest.raises(ConfigError, match="model.arch='resnet5'"):
        validate_config(bad({"model": {"arch": "resnet5"}}), check_paths=False)
    with pytest.raises(ConfigError, match="train.dtype='float16'; choose one of"):
        validate_config(bad({"train": {"dtype": "float16"}}), check_paths=False)
    with pytest.raises(ConfigError, match="train.dtype=float64 runs without autocast, but train.amp=bf16; fix: train"):
        validate_config(bad({"train": {"dtype": "float64", "amp": "bf16"}}), check_paths=False)
    # The method's own keys and values too, before anything is queued.
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['iter'\] for method=intl"):
        validate_config(bad({"method": {"iter": 4}}), check_paths=False)
    with pytest.raises(ConfigError, match="iters"):
        validate_config(bad({"method": {"iters": 0}}), check_paths=False)
    # A typo on the command line already fails when Hydra composes the config.
    with pytest.raises(ConfigError, match="does not compose.*batchsize"):
        compose_pretrain(["optim.batchsize=3"])


def test_unknown_preset_fails():
    with pytest.raises(ConfigError, match="does not compose.*imagenet_900ep"):
        compose_pretrain(["pretrain/preset=imagenet_900ep"])


# ------------------------------------------------------------------------------------------ engine

def test_nonfinite_loss_stops_cleanly_and_keeps_the_last_checkpoint(tiny_synthetic, tmp_path):
    from pretrain.engine import NonFiniteLossError

    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.ckpt_every_steps=1",
                                          "train.max_steps=4"))
    engine = build_engine(cfg)
    nan_loss_at(engine, bad_step=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 3.*last checkpoint .*\(step 2\) is intact"):
        engine.fit()
    ckpt = load_checkpoint(tmp_path / "run" / LAST_NAME)
    assert ckpt["step"] == 2 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    report = (tmp_path / "run" / "nonfinite_step3.json").read_text()
    assert '"step": 3' in report and "spectrum_now" in report and "align" in report


def test_nonfinite_loss_skip_mode_leaves_weights_unchanged(tiny_synthetic, tmp_path):
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.on_nonfinite=skip",
                                          "train.max_steps=3"))
    engine = build_engine(cfg)
    nan_loss_at(engine, bad_step=1)
    seen = {}
    step_fn = engine.optimizer.step

    def spy(*a, **k):
        seen[engine.step] = True
        return step_fn(*a, **k)

    engine.optimizer.step = spy
    summary = engine.fit()
    assert summary["nonfinite_skips"] == 1 and summary["steps"] == 3
    assert sorted(seen) == [0, 2]  # no optimiser step with the NaN loss
    assert all(torch.isfinite(p).all() for p in engine.net.parameters())


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one(tiny_synthetic, tmp_path, monkeypatch):
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.max_steps=1"))
    engine = build_engine(cfg)
    engine.fit()
    path = tmp_path / "run" / LAST_NAME
    before = path.read_bytes()

    real_save = torch.save

    def crash_mid_write(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if hasattr(f, "truncate"):  # a file object
            f.truncate(max(f.tell() // 2, 1))
        else:  # a path
            os.truncate(f, max(os.path.getsize(f) // 2, 1))
        raise KeyboardInterrupt("killed while writing")  # a torn file, then the process "dies"

    monkeypatch.setattr(torch, "save", crash_mid_write)
    engine.step = 5
    with pytest.raises(KeyboardInterrupt):
        engine.save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_completed_run_returns_at_once(tiny_synthetic, tmp_path):
    from pretrain.train import run

    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.max_steps=2"))
    first = run(cfg)
    assert first["steps"] == 2 and not first.get("already_complete")
    for name in ("config.yaml", "metrics.jsonl", "spectrum.png", "spectrum_topk.png", "loss.png", "COMPLETE",
                 LAST_NAME):
        assert (tmp_path / "run" / name).exists(), name
    # one spectrum row (train.spectrum_every=0: at the end); batch 16 gives 15 eigenvalues, the top 14 logged
    assert first["spectrum_topk"] == 14 and first["condition_topk"] >= 1.0 and 0 < first["entropy_topk"] <= math.log(14)
    assert first["eigenvalue_saturation_step"] is None  # one row cannot say when lambda_14 settled
    assert any((tmp_path / "run" / "tb").iterdir())
    ckpt = load_checkpoint(tmp_path / "run" / LAST_NAME)
    assert ckpt["finished"] and ckpt["step"] == 2 and ckpt["ema_model"] is None
    assert set(ckpt["rng"]) == {"torch", "numpy", "python", "cuda"}
    again = run(cfg)
    assert again["already_complete"] and again["steps"] == 2


def test_cli_reports_bad_input_without_traceback(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pretrain.train", f"data.root={tmp_path / 'missing'}",
                          f"run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "pretrain: error: data.root/data.split" in res.stderr and "is not a folder" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / LAST_NAME).exists()


def test_channels_last_trains_the_same_steps_in_nhwc(tiny_synthetic, tmp_path, monkeypatch):
    from common.runlog import read_metrics
    from pretrain import engine as E
    from pretrain.train import run

    seen = []
    step = E.train_step

    def spy(model, objective, optimizer, views, *a, **kw):
        seen.append(views[0].is_contiguous(memory_format=torch.channels_last) and views[0].shape[1] == 3)
        return step(model, objective, optimizer, views, *a, **kw)

    monkeypatch.setattr(E, "train_step", spy)
    losses = {}
    for fmt in ("false", "true"):
        run(compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / fmt, "train.max_steps=2",
                                            f"train.channels_last={fmt}")))
        losses[fmt] = [r["loss"] for r in read_metrics(tmp_path / fmt) if "loss" in r]
    assert seen == [False, False, True, True]  # the views reach the step in NHWC only with channels_last
    ckpt = load_checkpoint(tmp_path / "true" / LAST_NAME)
    assert ckpt["model"]["backbone.conv1.weight"].dim() == 4
    # the same maths in another memory layout: equal up to float32 summation order
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_float64_trains_in_double_precision_with_the_monitor_on(tiny_synthetic, tmp_path, monkeypatch):
    """train.dtype=float64 (the exactness checks of the multi-process tests): weights, views and projections in
    float64, the monitor's evaluation images too; a checkpoint in float64 that resumes."""
    from pretrain import engine as E
    from pretrain.train import run

    seen = []
    step = E.train_step

    def spy(model, objective, optimizer, views, *a, **kw):
        out = step(model, objective, optimizer, views, *a, **kw)
        seen.append((next(model.parameters()).dtype, out.online[0].dtype))
        return out

    monkeypatch.setattr(E, "train_step", spy)
    summary = run(compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "f64", "train.max_steps=2",
                                                  "train.dtype=float64")))
    assert seen == [(torch.float64, torch.float64)] * 2
    assert summary["steps"] == 2 and "probe_val_top1" in summary and "knn_top1" in summary
    assert load_checkpoint(tmp_path / "f64" / LAST_NAME)["model"]["backbone.conv1.weight"].dtype == torch.float64


@pytest.mark.parametrize("steps", [(8, 8), (8, 7), (0, 8)])
def test_ranks_that_would_resume_from_different_steps_all_stop(monkeypatch, steps):
    """Each rank finds its checkpoint itself; a shared file system that shows one node another file than the
    other (a cut last.pth seen on one node only) must stop every rank, not train them from different steps."""
    from types import SimpleNamespace

    from pretrain import engine as E

    mean = torch.tensor([float(np.mean(steps)), float(np.mean(np.square(steps)))], dtype=torch.float64)
    monkeypatch.setattr(E, "all_reduce_mean", lambda x: mean.clone())  # what two ranks' all-reduce gives
    outcomes = []
    for rank, step in enumerate(steps):
        me = SimpleNamespace(info=SimpleNamespace(world_size=2, rank=rank), device=torch.device("cpu"),
                             run_dir=Path("/runs/x"))
        try:
            E.PretrainEngine._check_same_resume_step(me, step)
            outcomes.append("resumes")
        except E.ResumeError as e:
            outcomes.append(str(e))
    print(f"resume steps {steps}: {outcomes}")
    if steps[0] == steps[1]:
        assert outcomes == ["resumes", "resumes"]
    else:
        assert all("resume from different steps" in o and "fix: run_dir must be on a file system" in o
                   for o in outcomes)
