"""intl-convert: detectron2 / torchvision conversion, --check, every supported layout, and broken inputs."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from common.checkpoint import save_checkpoint
from common.resnet import build_resnet
from transfer.convert import DEFAULT_TOLERANCE, ConversionError, convert, detectron2_name, detectron2_settings, main


def _non_trivial(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN affine parameters and running statistics (so the norm mapping is really exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.dim() != 1:
                continue
            if name.endswith("weight") or name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:  # bias, running_mean
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
        model.conv1.weight.mul_(1 + 0.1 * seed)  # online and EMA differ in conv weights too
    return model


def _pretrain_state(model, ema) -> dict:
    projector = {"projector.0.weight": torch.randn(32, model.feature_dim), "projector.1.running_mean": torch.zeros(32)}
    return {"model": {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, **projector},
            "ema_model": {**{f"backbone.{k}": v for k, v in ema.state_dict().items()}, **projector},
            "epoch": 3, "step": 30, "config": {"model": {"arch": "resnet50", "small_stem": False}}}


@pytest.fixture(scope="module")
def r50_pair():
    return _non_trivial(build_resnet("resnet50"), 1), _non_trivial(build_resnet("resnet50"), 2)


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory, r50_pair) -> Path:
    path = tmp_path_factory.mktemp("r50") / "last.pth"
    return save_checkpoint(_pretrain_state(*r50_pair), path)


def _no_leftovers(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected


# ---- the renaming --------------------------------------------------------------------------------------


def test_names_match_detectron2_resnet_exactly():
    """Converted names == detectron2's ResNet-50 state_dict keys (FrozenBN), one to one."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    cfg = get_cfg()
    cfg.merge_from_list(detectron2_settings("resnet50") + ["MODEL.RESNETS.OUT_FEATURES", "['res5']"])
    d2_keys = set(build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict())
    tv_keys = [k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")]
    names = [detectron2_name(k) for k in tv_keys]
    converted = [n for n in names if n is not None]
    assert len(converted) == len(set(converted)) == 265 == len(d2_keys)
    assert set(converted) == d2_keys
    assert detectron2_name("layer1.0.downsample.1.running_var") == "res2.0.shortcut.norm.running_var"
    assert detectron2_name("bn1.bias") == "stem.conv1.norm.bias"
    assert detectron2_name("layer3.5.bn2.num_batches_tracked") is None
    with pytest.raises(ConversionError, match="not a torchvision ResNet key"):
        detectron2_name("layer2.0.se.fc1.weight")


def test_printed_settings_agree_with_the_transfer_stage_config():
    """What intl-convert tells users to set is what configs/detection already sets (RGB, mean/std, stride)."""
    from transfer.convert import transfer_detection_config

    cfg, _ = transfer_detection_config("resnet50")
    ours = cfg.clone()
    ours.merge_from_list(detectron2_settings("resnet50"))
    for key in detectron2_settings("resnet50")[0::2]:
        node_a, node_b = cfg, ours
        for part in key.split("."):
            node_a, node_b = node_a[part], node_b[part]
        assert node_a == node_b, key


# ---- ResNet-50 pretraining checkpoint -> detectron2 with --check ------------------------------------------


def test_detectron2_check_passes_and_reports_expected_new_keys(tmp_path, r50_checkpoint, r50_pair, capsys):
    out = tmp_path / "r50.pkl"
    result = convert(r50_checkpoint, out, check=True)
    printed = capsys.readouterr().out
    assert "detected kind: intl-pretrain" in printed and "265 tensors converted" in printed
    assert "MODEL.RESNETS.STRIDE_IN_1X1 False" in printed and "INPUT.FORMAT RGB" in printed

    report = result.check
    worst = max(d.max_rel for d in report.diffs)
    print(f"measured max relative difference {worst:.3e}")  # about 1e-6 in float32
    assert [d.stage for d in report.diffs] == ["res2", "res3", "res4", "res5"]
    assert worst <= DEFAULT_TOLERANCE and report.ok and not report.trivial_bn
    keys = report.keys
    assert keys.ok and not keys.backbone_missing and not keys.unexplained and not keys.unused
    assert keys.loaded == 265
    assert set(keys.expected_new) == {"RPN head", "box predictor", "mask head (predictor + deconv)", "extra res5 norm"}
    assert all(k.startswith("roi_heads.res5.norm.") for k in keys.expected_new["extra res5 norm"])

    with open(out, "rb") as f:
        ckpt = pickle.load(f)
    assert ckpt["matching_heuristics"] is True and "intl-pretrain" in ckpt["__author__"]
    model = ckpt["model"]
    assert len(model) == 265 and all(isinstance(v, np.ndarray) for v in model.values())
    online = r50_pair[0].state_dict()
    np.testing.assert_array_equal(model["res5.2.conv3.norm.running_var"], online["layer4.2.bn3.running_var"].numpy())
    np.testing.assert_array_equal(model["res3.0.shortcut.weight"], online["layer2.0.downsample.0.weight"].numpy())
    np.testing.assert_array_equal(model["stem.conv1.weight"], online["conv1.weight"].numpy())
    _no_leftovers(tmp_path, {"r50.pkl"})


def test_wrong_detectron2_setting_fails_the_check_and_writes_nothing(tmp_path, r50_checkpoint, capsys):
    out = tmp_path / "wrong.pkl"
    code = main([str(r50_checkpoint), str(out), "--check", "--check-opts", "MODEL.RESNETS.STRIDE_IN_1X1", "True"])
    captured = capsys.readouterr()
    assert code == 1
    assert "numerics: max relative difference" in captured.out and "FAILED" in captured.out
    assert "check failed" in captured.err and "STRIDE_IN_1X1 False" in captured.err
    _no_leftovers(tmp_path, set())


def test_key_report_flags_missing_backbone_and_unused_keys(tmp_path, r50_checkpoint):
    """The Mask R-CNN C4 report must call a missing backbone key an error, not an expected new key."""
    from common.backbone_weights import read_backbone_weights
    from transfer.convert import mask_rcnn_c4_key_report

    weights = read_backbone_weights(r50_checkpoint)
    out = tmp_path / "w.pkl"
    convert(r50_checkpoint, out, log=lambda s: None)
    good = mask_rcnn_c4_key_report(out, weights)
    assert good.ok and good.loaded == 265

    with open(out, "rb") as f:
        ckpt = pickle.load(f)
    del ckpt["model"]["res5.1.conv2.weight"], ckpt["model"]["res3.0.shortcut.norm.running_var"]
    ckpt["model"]["res6.0.conv1.weight"] = np.zeros((4, 4, 1, 1), dtype=np.float32)
    with open(out, "wb") as f:
        pickle.dump(ckpt, f)
    bad = mask_rcnn_c4_key_report(out, weights)
    assert not bad.ok and bad.loaded == 263
    assert sorted(bad.backbone_missing) == ["backbone.res3.0.shortcut.norm.running_var",
                                            "roi_heads.res5.1.conv2.weight"]
    assert bad.unused == ["res6.0.conv1.weight"]
    assert "ERROR backbone keys missing: 2" in "\n".join(bad.lines())
    assert set(bad.expected_new) == set(good.expected_new)


def test_momentum_encoder_to_torchvision(tmp_path, r50_checkpoint, r50_pair, capsys):
    out = tmp_path / "ema.pth"
    assert main([str(r50_checkpoint), str(out), "--encoder", "momentum"]) == 0
    assert "encoder: momentum" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)
    model = torchvision.models.resnet50()
    result = model.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    ema, online = r50_pair[1].state_dict(), r50_pair[0].state_dict()
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    assert not torch.equal(sd["conv1.weight"], online["conv1.weight"])


# ---- other layouts (ResNet-18) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_pair():
    return _non_trivial(build_resnet("resnet18"), 3), _non_trivial(build_resnet("resnet18"), 4)


def _official(online, ema) -> dict:
    sd = {f"module.backbone.{k}": v for k, v in online.state_dict().items()}
    sd.update({f"module.momentum_backbone.{k}": v for k, v in ema.state_dict().items()})
    sd.update({"module.projector.0.weight": torch.randn(8, 512),
               "module.momentum_projector.0.weight": torch.randn(8, 512)})
    return {"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def _moco(online, ema) -> dict:
    sd = {f"module.encoder_q.{k}": v for k, v in online.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in ema.state_dict().items()})
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(8, 512), "module.encoder_k.fc.0.weight": torch.randn(8, 512),
               "module.queue": torch.randn(8, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 200, "arch": "resnet18", "state_dict": sd}


@pytest.mark.parametrize("layout,kind", [(_official, "official-intl"), (_moco, "moco")])
def test_official_and_moco_layouts(tmp_path, r18_pair, layout, kind, capsys):
    src = tmp_path / "in.pth.tar"
    torch.save(layout(*r18_pair), src)
    online, ema = (m.state_dict() for m in r18_pair)

    tv = convert(src, tmp_path / "online.pth")
    assert tv.weights.kind == kind and tv.weights.arch == "resnet18"
    sd = torch.load(tmp_path / "online.pth", weights_only=True)
    assert all(torch.equal(sd[k], online[k]) for k in online)
    # every input key is converted or listed as skipped
    assert tv.weights.num_tensors + len(tv.weights.skipped) == len(layout(*r18_pair)["state_dict"])

    d2 = convert(src, tmp_path / "momentum.pkl", encoder="momentum", check=True)
    assert f"detected kind: {kind}" in capsys.readouterr().out
    assert d2.converted == 100 and d2.check.numerics_ok and d2.check.keys.skipped_reason
    with open(tmp_path / "momentum.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    np.testing.assert_array_equal(model["stem.conv1.weight"], ema["conv1.weight"].numpy())
    np.testing.assert_array_equal(model["res4.1.conv2.norm.running_mean"], ema["layer3.1.bn2.running_mean"].numpy())
    _no_leftovers(tmp_path, {"in.pth.tar", "online.pth", "momentum.pkl"})


# ---- broken inputs: specific message, exit non-zero, nothing written ---------------------------------------


def _r18_sd() -> dict:
    return {k: v.clone() for k, v in build_resnet("resnet18").state_dict().items()}


def _nan_sd() -> dict:
    sd = _r18_sd()
    sd["layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    return sd


BROKEN = {  # case: (input, expected message, output suffix)
    "empty": (lambda: {"state_dict": {}}, "empty state_dict", ".pkl"),
    "wrong_prefix": (lambda: {"state_dict": {f"module.net.{k}": v for k, v in _r18_sd().items()}},
                     r"no recognisable ResNet backbone; top-level entries: 'state_dict'; key prefixes found: "
                     r"'module.net.' \(120 keys\).*--checkpoint-key <entry> --prefix <prefix>", ".pth"),
    "missing_layer": (lambda: {k: v for k, v in _r18_sd().items() if not k.startswith("layer3.")},
                      r"incomplete resnet18: 25 of 100 backbone tensors missing: layer3\.\*", ".pkl"),
    "nan": (_nan_sd, r"non-finite \(NaN/Inf\) values in 1 backbone tensors: layer2.1.conv1.weight", ".pth"),
    "no_momentum": (lambda: _r18_sd(), "has no momentum encoder", ".pkl"),
}


def test_unrecognised_layout_converts_with_checkpoint_key_and_prefix(tmp_path, capsys):
    """The CLI options for a layout not recognised, as DINO's eval scripts take --checkpoint_key."""
    sd = _r18_sd()
    src = tmp_path / "in.pth"
    torch.save({"ema": {f"net.trunk.{k}": v for k, v in sd.items()}, "epoch": 3}, src)
    assert main([str(src), str(tmp_path / "out.pth")]) == 2
    assert "--checkpoint-key" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()
    assert main([str(src), str(tmp_path / "out.pth"), "--checkpoint-key", "ema", "--prefix", "net.trunk."]) == 0
    out = capsys.readouterr().out
    assert "detected kind: custom" in out and "'net.trunk.' in 'ema'" in out
    got = torch.load(tmp_path / "out.pth", weights_only=True)
    assert all(torch.equal(got[k], sd[k]) for k in got) and len(got) == len(sd)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_inputs(tmp_path, case, capsys):
    make, message, suffix = BROKEN[case]
    src = tmp_path / "in.pth"
    torch.save(make(), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [str(src), str(out_dir / f"w{suffix}")] + (["--encoder", "momentum"] if case == "no_momentum" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("intl-convert: error: ") and "no output was written" in err and "Traceback" not in err
    assert re.search(message, err), err
    _no_leftovers(out_dir, set())


def test_not_a_checkpoint_and_bad_arguments(tmp_path, capsys):
    junk = tmp_path / "notes.pth"
    junk.write_text("hello\n")
    assert main([str(junk), str(tmp_path / "w.pkl")]) == 2
    assert "is not a checkpoint: torch.load failed" in capsys.readouterr().err

    src = tmp_path / "r18.pth"
    torch.save(_r18_sd(), src)
    assert main([str(src), str(tmp_path / "w.txt")]) == 2
    assert "cannot tell the output format" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "w.pth"), "--to", "detectron2"]) == 2
    assert "must be named *.pkl" in capsys.readouterr().err
    assert main([str(src), str(src)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "w.pkl"), "--check", "--check-opts", "MODEL.RESNET.DEPTH", "50"]) == 2
    assert "Non-existent key: MODEL.RESNET.DEPTH" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "r18.pkl")]) == 0  # an already converted file as input:
    assert main([str(tmp_path / "r18.pkl"), str(tmp_path / "again.pth")]) == 2
    assert "is a detectron2 / Caffe2 weights pickle (already converted)" in capsys.readouterr().err

    torch.save(build_resnet("resnet18", small_stem=True).state_dict(), tmp_path / "cifar.pth")
    assert main([str(tmp_path / "cifar.pth"), str(tmp_path / "cifar.pkl")]) == 2
    assert "small-stem" in capsys.readouterr().err
    assert main([str(tmp_path / "cifar.pth"), str(tmp_path / "cifar_tv.pth")]) == 0  # torchvision format is fine
    _no_leftovers(tmp_path, {"notes.pth", "r18.pth", "r18.pkl", "cifar.pth", "cifar_tv.pth"})


# ---- a real pretraining checkpoint from the engine ---------------------------------------------------------




# ---- the output path: existing files, folders, unwritable folders (issue 21 items 6-7) -----------------------


def test_existing_output_is_replaced_only_with_force_and_never_a_training_checkpoint(tmp_path, capsys):
    src = tmp_path / "r18.pth"
    torch.save(_r18_sd(), src)
    out = tmp_path / "w.pkl"
    assert main([str(src), str(out)]) == 0
    first = out.read_bytes()
    capsys.readouterr()

    assert main([str(src), str(out)]) == 2  # an existing output: refused without --force
    err = capsys.readouterr().err
    assert f"the output {out} exists" in err and "--force" in err and out.read_bytes() == first

    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in _r18_sd().items()}, src)
    assert main([str(src), str(out), "--force"]) == 0  # a converter output is replaced with --force
    assert out.read_bytes() != first
    capsys.readouterr()

    model = build_resnet("resnet18")
    pretrain = save_checkpoint({"model": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                                "epoch": 1, "step": 10, "config": {}}, tmp_path / "last.pth")
    kept = pretrain.read_bytes()
    refused = 0
    for args in ([str(src), str(pretrain)], [str(src), str(pretrain), "--force"]):
        refused += main(args) == 2
        err = capsys.readouterr().err
        assert str(pretrain) in err and "fix: choose another output path" in err, err
    print(f"pretraining checkpoint as the output: refused {refused} of 2 runs (with and without --force); "
          f"its bytes unchanged: {pretrain.read_bytes() == kept}")
    assert refused == 2 and pretrain.read_bytes() == kept and "never replaces one, even with --force" in err
    _no_leftovers(tmp_path, {"r18.pth", "w.pkl", "last.pth"})


def test_output_that_is_a_folder_or_in_an_unwritable_folder_exits_2(tmp_path, capsys, monkeypatch):
    import errno

    import common.atomic as atomic

    src = tmp_path / "r18.pth"
    torch.save(_r18_sd(), src)
    folder = tmp_path / "weights.pkl"
    folder.mkdir()
    assert main([str(src), str(folder)]) == 2
    err = capsys.readouterr().err
    print(err.strip())
    assert f"the output {folder} is a folder" in err and "fix: name a file in it" in err and not list(folder.iterdir())

    def read_only(*args, **kwargs):  # as root chmod does not stop writes: the OS error is raised here instead
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(atomic.tempfile, "TemporaryFile", read_only)
    assert main([str(src), str(tmp_path / "ro" / "w.pkl")]) == 2
    err = capsys.readouterr().err
    print(err.strip())
    assert "read-only file system" in err and "fix: choose a writable folder" in err and "Traceback" not in err


# ---- what the weights say about the pretraining ----------------------------------------------------------------


def test_residual_branches_still_at_zero_init_are_reported(tmp_path):
    """A ResNet-50 whose residual branches are still at torchvision's zero_init_residual start (the state of the
    demo's barely trained ResNet-50, issue 16) gets a warning; the default init and a trained-looking one do not."""
    from transfer.convert import residual_branch_gains

    archs = {"zero_init": "resnet50", "default_init": "resnet50", "non_trivial": "resnet50", "resnet18": "resnet18"}
    cases = {"zero_init": build_resnet("resnet50", zero_init_residual=True),
             "default_init": build_resnet("resnet50", zero_init_residual=False),
             "non_trivial": _non_trivial(build_resnet("resnet50", zero_init_residual=True), 3),
             "resnet18": build_resnet("resnet18")}
    warned = {}
    for name, model in cases.items():
        src = tmp_path / f"{name}.pth"
        torch.save(model.state_dict(), src)
        lines = []
        convert(src, tmp_path / f"{name}.pkl", log=lines.append)
        gains_line = next(line for line in lines if "residual branches, mean |gamma|" in line)
        gains = residual_branch_gains(model.state_dict(), archs[name])
        assert list(gains) == ["layer1", "layer2", "layer3", "layer4"]
        assert gains_line.endswith(" / ".join(f"{g:.3f}" for g in gains.values()))
        warned[name] = any("WARNING: every stage's residual branches are nearly off" in line for line in lines)
    assert warned == {"zero_init": True, "default_init": False, "non_trivial": False, "resnet18": False}
    for name, gain in (("zero_init", 0.0), ("default_init", 1.0)):
        assert residual_branch_gains(cases[name].state_dict(), "resnet50") == {f"layer{i}": gain for i in range(1, 5)}
