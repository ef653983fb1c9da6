"""The shared checkpoint reader: every supported layout, encoder selection, and each broken input's message."""

from __future__ import annotations

import pytest
import torch
import torchvision

from common.backbone_weights import build_backbone_from, load_backbone_into, read_backbone_weights
from common.checkpoint import CheckpointError, save_checkpoint
from common.resnet import build_resnet
from stage_fixtures import randomised


def _projector_state() -> dict:
    return {"projector.0.weight": torch.randn(16, 512), "projector.1.weight": torch.ones(16),
            "projector.1.running_mean": torch.zeros(16), "projector.3.weight": torch.randn(8, 16)}


def _assert_same(sd: dict, model: torch.nn.Module) -> None:
    ref = model.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


@pytest.fixture(scope="module")
def r18_online():
    return randomised(build_resnet("resnet18"), 1)


@pytest.fixture(scope="module")
def r18_ema():
    return randomised(build_resnet("resnet18"), 2)


def test_intl_pretrain_online_and_ema(tmp_path, r18_online, r18_ema):
    model = {**{f"backbone.{k}": v for k, v in r18_online.state_dict().items()}, **_projector_state()}
    ema = {**{f"backbone.{k}": v for k, v in r18_ema.state_dict().items()}, **_projector_state()}
    path = save_checkpoint({"model": model, "ema_model": ema, "epoch": 1, "step": 10,
                            "config": {"model": {"arch": "resnet18", "small_stem": False}}}, tmp_path / "last.pth")

    online = read_backbone_weights(path)
    assert (online.kind, online.arch, online.small_stem, online.encoder) == \
        ("intl-pretrain", "resnet18", False, "online")
    _assert_same(online.state_dict, r18_online)
    assert not any(k.startswith("fc.") for k in online.state_dict)
    # every input key is either converted or listed as skipped
    assert set(online.skipped) == {k for k in model if k.startswith("projector.")} | {f"ema_model.{k}" for k in ema}

    momentum = read_backbone_weights(path, encoder="momentum")
    assert momentum.encoder == "momentum"
    _assert_same(momentum.state_dict, r18_ema)

    loaded = build_backbone_from(momentum)
    _assert_same(loaded.state_dict(), r18_ema)


def test_intl_pretrain_config_must_match_the_tensors(tmp_path, r18_online):
    model = {f"backbone.{k}": v for k, v in r18_online.state_dict().items()}
    path = save_checkpoint({"model": model, "epoch": 1, "step": 1, "config": {"model": {"arch": "resnet50"}}},
                           tmp_path / "a.pth")
    with pytest.raises(CheckpointError,
                       match="config says model.arch=resnet50 but the backbone tensors are a resnet18"):
        read_backbone_weights(path)


def test_intl_pretrain_without_ema_refuses_momentum(tmp_path, r18_online):
    model = {f"backbone.{k}": v for k, v in r18_online.state_dict().items()}
    path = save_checkpoint({"model": model, "ema_model": None, "epoch": 1, "step": 1, "config": {}}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="without a momentum"):
        read_backbone_weights(path, encoder="momentum")


def test_official_intl_layout(tmp_path, r18_online, r18_ema):
    sd = {f"module.backbone.{k}": v for k, v in r18_online.state_dict().items()}
    sd.update({f"module.momentum_backbone.{k}": v for k, v in r18_ema.state_dict().items()})
    sd.update({f"module.{k.replace('projector', 'projection')}": v for k, v in _projector_state().items()})
    # INTL main.py's save: {'epoch', 'arch', 'state_dict' (DDP model: backbone, projection, momentum_*), 'optimizer'}
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, tmp_path / "official.pth")

    w = read_backbone_weights(tmp_path / "official.pth")
    assert w.kind == "official-intl" and w.prefix == "backbone."
    _assert_same(w.state_dict, r18_online)
    assert len(w.skipped) + w.num_tensors == len(sd)

    m = read_backbone_weights(tmp_path / "official.pth", encoder="momentum")
    _assert_same(m.state_dict, r18_ema)


def test_moco_layout_skips_head_and_selects_key_encoder(r18_online, r18_ema):
    sd = {f"module.encoder_q.{k}": v for k, v in r18_online.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in r18_ema.state_dict().items()})
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(4, 512), "module.encoder_k.fc.0.weight": torch.randn(4, 512),
               "module.queue": torch.randn(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    w = read_backbone_weights({"arch": "resnet18", "state_dict": sd})
    assert w.kind == "moco"
    _assert_same(w.state_dict, r18_online)
    assert "module.encoder_q.fc.0.weight" in w.skipped and "module.queue" in w.skipped
    _assert_same(read_backbone_weights({"state_dict": sd}, encoder="momentum").state_dict, r18_ema)


def test_plain_torchvision_resnet50_and_missing_num_batches_tracked():
    tv = torchvision.models.resnet50()
    w = read_backbone_weights(tv.state_dict())
    assert (w.kind, w.arch) == ("torchvision", "resnet50")
    assert w.skipped == ["fc.weight", "fc.bias"]
    assert w.num_tensors == len(tv.state_dict()) - 2

    sd = {k: v for k, v in build_resnet("resnet18", small_stem=True).state_dict().items() if "num_batches" not in k}
    w = read_backbone_weights(sd)
    assert w.small_stem and w.arch == "resnet18" and len(w.filled) == 20
    load_backbone_into(build_resnet("resnet18", small_stem=True), w)
    with pytest.raises(CheckpointError, match="momentum encoder"):
        read_backbone_weights(sd, encoder="momentum")


def test_load_into_wrong_model_names_the_keys(r18_online):
    w = read_backbone_weights(r18_online.state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatch: conv1.weight .*small_stem=False"):
        load_backbone_into(build_resnet("resnet18", small_stem=True), w)
    with pytest.raises(CheckpointError, match=r"missing in the weights: .*layer1.0.conv3.weight"):
        load_backbone_into(build_resnet("resnet50"), w)


# ---- broken inputs: each has its own message -------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint: torch.load failed"):
        read_backbone_weights(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_backbone_weights(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint dict"):
        read_backbone_weights(tmp_path / "list.pth")


def test_empty_state_dict():
    with pytest.raises(CheckpointError, match="empty state_dict"):
        read_backbone_weights({"state_dict": {}})
    with pytest.raises(CheckpointError, match="empty state_dict"):
        read_backbone_weights({})


def test_wrong_prefix_lists_found_prefixes(r18_online):
    sd = {f"module.net.{k}": v for k, v in r18_online.state_dict().items()}
    sd["module.head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"no recognisable ResNet backbone; top-level entries: 'state_dict'; key "
                                              r"prefixes found: 'module.net.' \(120 keys\), 'module.head.' \(1 keys\)"
                                              r".*fix: .*--checkpoint-key <entry> --prefix <prefix>"):
        read_backbone_weights({"state_dict": sd})


def test_missing_layer_named(r18_online):
    sd = {k: v for k, v in r18_online.state_dict().items() if not k.startswith("layer4.")}
    with pytest.raises(CheckpointError, match=r"incomplete resnet18: 25 of 100 backbone tensors missing: layer4\.\*"):
        read_backbone_weights(sd)
    sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("layer3.5.")}
    with pytest.raises(CheckpointError, match=r"incomplete resnet50: .*layer3\.5\.\* \(15 tensors\)"):
        read_backbone_weights(sd)
    sd = dict(r18_online.state_dict())
    del sd["layer2.0.downsample.1.running_var"]
    with pytest.raises(CheckpointError, match=r"1 of 100 backbone tensors missing: layer2.0.downsample.1.running_var"):
        read_backbone_weights(sd)


def test_non_finite_weights_refused(r18_online):
    sd = {k: v.clone() for k, v in r18_online.state_dict().items()}
    sd["layer3.1.bn2.weight"][0] = float("nan")
    sd["fc.weight"] = torch.full((2, 512), float("inf"))  # a skipped key does not matter
    with pytest.raises(CheckpointError,
                       match=r"non-finite \(NaN/Inf\) values in 1 backbone tensors: layer3.1.bn2.weight"):
        read_backbone_weights(sd)


def test_wrong_widths_refused(r18_online):
    sd = dict(r18_online.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # e.g. a half-width ResNet
    with pytest.raises(CheckpointError, match=r"tensor shapes do not match a torchvision resnet18: "
                                              r"layer1.0.conv1.weight \(32, 64, 3, 3\) \(expected \(64, 64, 3, 3\)\)"):
        read_backbone_weights(sd)
