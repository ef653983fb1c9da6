"""LARS (pretrain.optim.LARS) against its definition, the optimiser keys of the config, and the native
Barlow Twins / VICReg presets (facebookresearch/barlowtwins main.py, facebookresearch/vicreg main_vicreg.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import ConfigError
from pretrain.optim import LARS, build_optimizer, param_groups, set_lr
from stage_fixtures import build_engine, compose_pretrain, tiny_overrides


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 3)).double()


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    return (model(x) - 0.5).pow(2).mean()


# ------------------------------------------------------------------------------------ the definition
@pytest.mark.parametrize("exclude", [True, False])
def test_lars_follows_its_definition_for_a_few_steps(exclude):
    """The reference below is LARS written out from its definition: u = g + wd w (not for excluded 1-D
    parameters), u *= eta ||w|| / ||u|| (not for them either; 1 when a norm is 0), m = momentum m + u,
    w -= lr m; the 1-D parameters' lr is scaled by bias_lr_scale."""
    lr0, momentum, wd, eta, bias_scale = 0.8, 0.9, 0.05, 0.02, 0.25
    model = _tiny_model()
    opt = build_optimizer(model, lr0, momentum, wd, name="lars", eta=eta, exclude_bias_and_norm=exclude,
                          bias_lr_scale=bias_scale)
    assert isinstance(opt, LARS)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in ref.items()}
    ratios_seen = {}
    for step, lr in enumerate([lr0, 0.5, 0.3, 0.1]):  # a changing lr, as the schedule sets it
        set_lr(opt, lr)
        opt.zero_grad()
        _loss(model, step).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        for n, w in ref.items():
            skip = exclude and w.ndim == 1
            u = grads[n] if skip else grads[n] + wd * w
            w_norm, u_norm = float(w.norm()), float(u.norm())
            ratio = 1.0 if skip or w_norm == 0 or u_norm == 0 else eta * w_norm / u_norm  # (BN biases start at 0)
            ratios_seen[n] = ratio
            mom[n] = momentum * mom[n] + ratio * u
            ref[n] = w - (lr * bias_scale if w.ndim == 1 else lr) * mom[n]
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-12, atol=1e-14, msg=f"{n} at step {step}")
    print({n: round(r, 5) for n, r in ratios_seen.items()})
    assert ratios_seen["0.weight"] != 1.0 and ratios_seen["3.weight"] != 1.0  # adapted
    assert (ratios_seen["1.weight"] == 1.0) == exclude and (ratios_seen["3.bias"] == 1.0) == exclude


def test_excluded_parameters_get_neither_decay_nor_adaptation():
    """A 1-D parameter's first LARS step is -lr * scale * grad exactly; a 2-D one's is
    -lr * trust ratio * (g + wd w)."""
    model = _tiny_model()
    opt = build_optimizer(model, 0.1, 0.9, 0.5, name="lars", eta=0.001, bias_lr_scale=0.024)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], decay["lars_exclude"], decay["lr_scale"]) == (0.5, False, 1.0)
    assert (no_decay["weight_decay"], no_decay["lars_exclude"], no_decay["lr_scale"]) == (0.0, True, 0.024)
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, 0).backward()
    opt.step()
    for n, p in model.named_parameters():
        g, w = p.grad, before[n]
        if w.ndim == 1:
            want = w - 0.1 * 0.024 * g
        else:
            u = g + 0.5 * w
            want = w - 0.1 * (0.001 * w.norm() / u.norm()) * u
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-15, msg=n)


def test_zero_norms_give_a_trust_ratio_of_one():
    w0 = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))  # ||w|| = 0: plain momentum SGD step
    w1 = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))  # ||g + wd w|| = 0: no step, no NaN
    opt = LARS([{"params": [w0, w1]}], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
    w0.grad = torch.full_like(w0, 2.0)
    w1.grad = torch.zeros_like(w1)
    opt.step()
    torch.testing.assert_close(w0.detach(), torch.full_like(w0, -0.2))
    torch.testing.assert_close(w1.detach(), torch.ones_like(w1))
    with pytest.raises(ValueError, match="eta > 0"):
        LARS([w0], lr=0.1, eta=0.0)


def test_sgd_groups_keep_their_meaning():
    """SGD keeps the split (1-D parameters without decay) and takes the same lr scale."""
    model = _tiny_model()
    opt = build_optimizer(model, 0.4, 0.9, 1e-4, bias_lr_scale=0.5)
    assert isinstance(opt, torch.optim.SGD)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    groups = param_groups(model, 1e-4, exclude_bias_and_norm=False)
    assert [g["weight_decay"] for g in groups] == [1e-4, 1e-4] and not groups[1]["lars_exclude"]
    with pytest.raises(ConfigError, match=r"optim.name='adam'.*\['sgd', 'lars'\]"):
        build_optimizer(model, 0.4, 0.9, 1e-4, name="adam")


# ------------------------------------------------------------------------------------ config and engine
def test_bad_optimiser_keys_fail_at_start_naming_the_choices():
    from pretrain.train import validate_config

    cfg = OmegaConf.create(OmegaConf.to_container(compose_pretrain(["pretrain/preset=synthetic"])))
    with pytest.raises(ConfigError, match=r"optim.name='adam' is unknown; choose one of \['sgd', 'lars'\]"):
        validate_config(OmegaConf.merge(cfg, {"optim": {"name": "adam"}}), check_paths=False)
    with pytest.raises(ConfigError, match=r"optim.exclude='bias'; choose one of \['bias_and_norm', 'none'\]"):
        validate_config(OmegaConf.merge(cfg, {"optim": {"exclude": "bias"}}), check_paths=False)
    with pytest.raises(ConfigError, match="optim.lars_eta"):
        validate_config(OmegaConf.merge(cfg, {"optim": {"lars_eta": 0}}), check_paths=False)
    with pytest.raises(ConfigError, match="optim.bias_base_lr"):
        validate_config(OmegaConf.merge(cfg, {"optim": {"bias_base_lr": -1}}), check_paths=False)


def test_engine_builds_lars_from_config_and_trains_two_steps(tiny_synthetic, tmp_path):
    from pretrain.engine import PretrainEngine, ResumeError

    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "optim.name=lars", "optim.base_lr=0.2",
                                          "optim.bias_base_lr=0.0048", "train.max_steps=2"))
    engine = build_engine(cfg)
    assert isinstance(engine.optimizer, LARS)
    weights, biases = engine.optimizer.param_groups
    assert not weights["lars_exclude"] and biases["lars_exclude"] and biases["weight_decay"] == 0.0
    assert biases["lr_scale"] == pytest.approx(0.0048 / 0.2)
    before = [p.detach().clone() for p in engine.net.parameters()]
    summary = engine.fit()
    assert summary["steps"] == 2
    after = list(engine.net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(before) // 2
    assert biases["lr"] == pytest.approx(weights["lr"] * 0.0048 / 0.2)
    assert all("momentum_buffer" in engine.optimizer.state[p] for p in weights["params"])

    # A checkpoint written before optim.name existed ran plain SGD: a LARS config may not resume it, an SGD may.
    saved = OmegaConf.to_container(engine.cfg, resolve=True)
    for key in ("name", "exclude", "bias_base_lr", "lars_eta"):
        del saved["optim"][key]
    with pytest.raises(ResumeError, match="optim"):
        PretrainEngine._check_resumable(SimpleNamespace(cfg=engine.cfg, run_dir=tmp_path / "run"), saved)
    sgd = OmegaConf.merge(engine.cfg, {"optim": {"name": "sgd", "bias_base_lr": None}})
    PretrainEngine._check_resumable(SimpleNamespace(cfg=sgd, run_dir=tmp_path / "run"), saved)


# ------------------------------------------------------------------------------------ native presets
NATIVE_PRESETS = {
    # preset: (method and its published keys, base lr, bias base lr)
    "barlow_twins_imagenet_1000ep": ({"name": "barlow_twins", "lambd": 0.0051}, 0.2, 0.0048),
    "vicreg_imagenet_1000ep": ({"name": "vicreg", "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}, 0.2, None),
}


@pytest.mark.parametrize("preset", sorted(NATIVE_PRESETS))
def test_native_presets_are_the_published_recipes(preset):
    from pretrain.train import validate_config

    method, base_lr, bias_base_lr = NATIVE_PRESETS[preset]
    cfg = validate_config(compose_pretrain([f"pretrain/preset={preset}"]), world_size=16, check_paths=False)
    assert cfg.name == preset and cfg.run_dir == f"outputs/pretrain/{preset}"
    assert {k: cfg.method[k] for k in method} == method and cfg.method.trace is False and not cfg.method.ema
    assert cfg.model.arch == "resnet50" and list(cfg.model.projector) == [8192] * 3 and cfg.model.sync_bn
    o = cfg.optim
    assert (o.name, o.lars_eta, o.momentum, o.exclude) == ("lars", 0.001, 0.9, "bias_and_norm")
    assert (o.epochs, o.batch_size, o.base_lr, o.bias_base_lr, o.weight_decay) == (1000, 2048, base_lr,
                                                                                    bias_base_lr, 1e-6)
    assert (o.warmup_epochs, o.final_lr_ratio) == (10, 0.001)
    assert cfg.data.kind == "imagefolder" and [v.size for v in cfg.data.augment.views] == [224, 224]
    assert [v.blur_prob for v in cfg.data.augment.views] == [1.0, 0.1]
    assert [v.solarize_prob for v in cfg.data.augment.views] == [0.0, 0.2]
    # Table 13: the same recipe with the trace loss.
    traced = validate_config(compose_pretrain([f"pretrain/preset={preset}", "method.trace=true"]), world_size=16,
                             check_paths=False)
    assert traced.method.trace is True and traced.optim == cfg.optim
