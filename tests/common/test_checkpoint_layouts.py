"""Every checkpoint layout common.backbone_weights recognises, each built the way its project saves it.

Each builder below reproduces the project's model (its attribute names, so its state_dict keys) and the
structure of its save call, read from the project's public code:
- INTL (winci-ai/INTL main.py: ``{'epoch', 'arch', 'state_dict': model.state_dict(), 'optimizer'}`` of the
  DDP-wrapped methods/intl_m.py: ``backbone``, ``projection``, ``momentum_backbone``, ``momentum_projection``);
- solo-learn (solo/utils/checkpointer.py ``trainer.save_checkpoint``; Lightning's ``dump_checkpoint``:
  ``{'epoch', 'global_step', 'pytorch-lightning_version', 'state_dict', 'loops', 'callbacks',
  'optimizer_states', 'lr_schedulers', 'hparams_name', 'hyper_parameters'}``; solo/methods/base.py:
  ``backbone`` (fc = Identity), ``classifier``, ``momentum_backbone``; byol.py: ``projector``,
  ``momentum_projector``, ``predictor``);
- Barlow Twins (barlowtwins main.py: ``dict(epoch, model=model.state_dict(), optimizer)`` of DDP(BarlowTwins:
  ``backbone``, ``projector``, ``bn``) as checkpoint.pth, and ``model.module.backbone.state_dict()`` as
  resnet50.pth);
- DINO (dino main_dino.py ``save_dict``: ``student``, ``teacher`` (both DDP for a ResNet: it has batch norms),
  ``optimizer``, ``epoch``, ``args``, ``dino_loss``; utils.MultiCropWrapper ``backbone`` + ``head``;
  vision_transformer.DINOHead ``mlp`` + weight-normed ``last_layer``);
- MoCo v3 (moco-v3 main_moco.py ``save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'})``;
  moco/builder.py MoCo_ResNet: ``base_encoder`` / ``momentum_encoder`` whose ``fc`` is the projector MLP,
  ``predictor``);
- SimSiam (simsiam main_simsiam.py ``save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'})``;
  simsiam/builder.py: ``encoder`` whose ``fc`` is the projector, ``predictor``);
- VISSL (vissl/hooks/log_hooks.py ``checkpoint_content``: ``phase_idx``, ``iteration``, ``loss``,
  ``iteration_num``, ``train_phase_idx``, ``classy_state_dict`` = the task's get_classy_state: ``base_model``
  = ``{'model': {'trunk', 'heads'}, 'meta'}`` (models/base_ssl_model.py), trunk = models/trunks/resnext.py
  ``_feature_blocks`` ModuleDict, heads = heads/mlp.py ``clf``; ``ema_model`` beside it when EMA is on);
- timm (timm/utils/checkpoint_saver.py ``_save``: ``{'epoch', 'arch', 'optimizer', 'version': 2, 'args',
  'state_dict', 'state_dict_ema', 'metric'}``; timm.models.resnet's plain ResNet names its modules conv1,
  bn1, layer1-4 (blocks conv1/bn1/conv2/bn2[/conv3/bn3], downsample = Sequential(conv, norm)), fc: the
  torchvision names; its deep-stem variants (resnet50d: ``conv1`` = Sequential of 3 convs, avg-pool
  downsample ``downsample.1`` conv / ``downsample.2`` norm) are another architecture).
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from common.backbone_weights import read_backbone_weights
from common.checkpoint import CheckpointError
from stage_fixtures import randomised


def _resnet18(seed: int, **kw) -> nn.Module:
    return randomised(torchvision.models.resnet18(**kw), seed)


def _backbone(seed: int) -> nn.Module:
    m = _resnet18(seed)
    m.fc = nn.Identity()
    return m


class DDP(nn.Module):
    """What DistributedDataParallel adds to a state_dict: the wrapped model under ``module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))


def _expect(w, model: nn.Module) -> None:
    """``w`` holds exactly ``model``'s backbone tensors (without fc), values included."""
    ref = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert list(w.state_dict) == list(ref)
    for k, v in ref.items():
        assert torch.equal(w.state_dict[k], v.float() if v.is_floating_point() else v), k


def _save(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _optimizer(model: nn.Module) -> dict:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()


# ------------------------------------------------------------------------------------------ the layouts
def test_official_intl_main_py(tmp_path):
    class INTL_M(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.projection = _backbone(1), _mlp(512, 32, 16)
            self.momentum_backbone, self.momentum_projection = _backbone(2), _mlp(512, 32, 16)

    model = DDP(INTL_M())
    path = _save(tmp_path, "ckpt_in100.pth.tar", {"epoch": 400, "arch": "resnet18", "state_dict": model.state_dict(),
                                                   "optimizer": _optimizer(model)})
    w = read_backbone_weights(path)
    assert (w.kind, w.where, w.prefix, w.arch) == ("official-intl", "state_dict", "backbone.", "resnet18")
    _expect(w, model.module.backbone)
    assert any(k.startswith("module.projection.") for k in w.skipped)
    _expect(read_backbone_weights(path, encoder="momentum"), model.module.momentum_backbone)


def test_solo_learn_lightning_checkpoint(tmp_path):
    class BYOL(nn.Module):  # solo/methods/base.py + byol.py attribute names
        def __init__(self):
            super().__init__()
            self.backbone, self.classifier = _backbone(3), nn.Linear(512, 10)
            self.projector, self.predictor = _mlp(512, 32, 16), _mlp(16, 32, 16)
            self.momentum_backbone, self.momentum_projector = _backbone(4), _mlp(512, 32, 16)

    method = BYOL()
    ckpt = {"epoch": 399, "global_step": 1000, "pytorch-lightning_version": "2.0.0",
            "state_dict": method.state_dict(), "loops": {"fit_loop": {}}, "callbacks": {},
            "optimizer_states": [_optimizer(method)], "lr_schedulers": [{"last_epoch": 3}],
            "hparams_name": "cfg", "hyper_parameters": {"cfg": {"method": "byol"}}}
    path = _save(tmp_path, "byol-imagenet100-ep=399.ckpt", ckpt)
    w = read_backbone_weights(path)
    assert (w.kind, w.prefix) == ("solo-learn", "backbone.")  # not "official INTL" any more
    _expect(w, method.backbone)
    assert {"classifier.weight", "projector.0.weight"} <= set(w.skipped)
    _expect(read_backbone_weights(path, encoder="momentum"), method.momentum_backbone)


def test_barlow_twins_checkpoint_and_its_final_resnet50_pth(tmp_path):
    class BarlowTwins(nn.Module):  # barlowtwins main.py
        def __init__(self):
            super().__init__()
            self.backbone = _backbone(5)
            self.projector = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                                           nn.Linear(32, 32, bias=False))
            self.bn = nn.BatchNorm1d(32, affine=False)

    model = DDP(BarlowTwins())
    path = _save(tmp_path, "checkpoint.pth", dict(epoch=1000, model=model.state_dict(), optimizer=_optimizer(model)))
    w = read_backbone_weights(path)
    assert (w.kind, w.where, w.prefix) == ("barlow-twins", "model", "backbone.")
    _expect(w, model.module.backbone)
    assert "module.bn.running_mean" in w.skipped
    with pytest.raises(CheckpointError, match=r"Barlow Twins .* has no momentum encoder; fix: use --encoder online"):
        read_backbone_weights(path, encoder="momentum")
    final = read_backbone_weights(_save(tmp_path, "resnet50.pth", model.module.backbone.state_dict()))
    assert final.kind == "torchvision" and not final.skipped
    _expect(final, model.module.backbone)


def test_dino_student_and_teacher(tmp_path):
    class DINOHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(512, 32), nn.GELU(), nn.Linear(32, 16))
            self.last_layer = nn.utils.weight_norm(nn.Linear(16, 64, bias=False))

    class MultiCropWrapper(nn.Module):
        def __init__(self, backbone, head):
            super().__init__()
            backbone.fc, backbone.head = nn.Identity(), nn.Identity()
            self.backbone, self.head = backbone, head

    student = DDP(MultiCropWrapper(_resnet18(6), DINOHead()))
    teacher = DDP(MultiCropWrapper(_resnet18(7), DINOHead()))  # a ResNet has BN: the teacher is DDP too
    save_dict = {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": _optimizer(student),
                 "epoch": 100, "args": argparse.Namespace(arch="resnet18", out_dim=64),
                 "dino_loss": {"center": torch.zeros(1, 64)}}
    path = _save(tmp_path, "checkpoint.pth", save_dict)
    w = read_backbone_weights(path)
    assert (w.kind, w.where) == ("dino", "student")
    _expect(w, student.module.backbone)
    assert any("teacher" in n for n in w.notes) and any(k.startswith("teacher.") for k in w.skipped)
    t = read_backbone_weights(path, encoder="momentum")
    assert t.where == "teacher"
    _expect(t, teacher.module.backbone)
    # DINO's own eval scripts: --checkpoint_key teacher (the prefix is found: module.backbone.)
    c = read_backbone_weights(path, checkpoint_key="teacher")
    assert c.kind == "custom"
    _expect(c, teacher.module.backbone)


def test_moco_v3_base_and_momentum_encoders(tmp_path):
    def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):  # moco/builder.py _build_mlp
        mlp = []
        for i in range(num_layers):
            dim1 = input_dim if i == 0 else mlp_dim
            dim2 = output_dim if i == num_layers - 1 else mlp_dim
            mlp.append(nn.Linear(dim1, dim2, bias=False))
            if i < num_layers - 1:
                mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
            elif last_bn:
                mlp.append(nn.BatchNorm1d(dim2, affine=False))
        return nn.Sequential(*mlp)

    class MoCo_ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_encoder = _resnet18(8, num_classes=32, zero_init_residual=True)
            self.momentum_encoder = _resnet18(9, num_classes=32, zero_init_residual=True)
            hidden_dim = self.base_encoder.fc.weight.shape[1]
            del self.base_encoder.fc, self.momentum_encoder.fc
            self.base_encoder.fc = build_mlp(2, hidden_dim, 32, 16)
            self.momentum_encoder.fc = build_mlp(2, hidden_dim, 32, 16)
            self.predictor = build_mlp(2, 16, 32, 16, False)

    model = DDP(MoCo_ResNet())
    path = _save(tmp_path, "checkpoint_0299.pth.tar", {"epoch": 300, "arch": "resnet18",
                                                       "state_dict": model.state_dict(),
                                                       "optimizer": _optimizer(model), "scaler": {"scale": 1.0}})
    w = read_backbone_weights(path)
    assert (w.kind, w.prefix) == ("moco-v3", "base_encoder.")
    _expect(w, model.module.base_encoder)
    assert "module.base_encoder.fc.0.weight" in w.skipped and "module.predictor.0.weight" in w.skipped
    _expect(read_backbone_weights(path, encoder="momentum"), model.module.momentum_encoder)


def test_simsiam_encoder(tmp_path):
    class SimSiam(nn.Module):  # simsiam/builder.py
        def __init__(self, dim=16, pred_dim=8):
            super().__init__()
            self.encoder = _resnet18(10, num_classes=dim, zero_init_residual=True)
            prev_dim = self.encoder.fc.weight.shape[1]
            self.encoder.fc = nn.Sequential(nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim),
                                            nn.ReLU(inplace=True), nn.Linear(prev_dim, prev_dim, bias=False),
                                            nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True), self.encoder.fc,
                                            nn.BatchNorm1d(dim, affine=False))
            self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                           nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    model = DDP(SimSiam())
    path = _save(tmp_path, "checkpoint_0099.pth.tar", {"epoch": 100, "arch": "resnet18",
                                                       "state_dict": model.state_dict(),
                                                       "optimizer": _optimizer(model)})
    w = read_backbone_weights(path)
    assert (w.kind, w.prefix) == ("simsiam", "encoder.")
    _expect(w, model.module.encoder)
    with pytest.raises(CheckpointError, match="SimSiam .* has no momentum encoder"):
        read_backbone_weights(path, encoder="momentum")


def _vissl_trunk(seed: int) -> nn.Module:
    tv = _resnet18(seed)

    class ResNeXt(nn.Module):  # vissl/models/trunks/resnext.py: the torchvision modules in _feature_blocks
        def __init__(self):
            super().__init__()
            self._feature_blocks = nn.ModuleDict([
                ("conv1", tv.conv1), ("bn1", tv.bn1), ("conv1_relu", tv.relu), ("maxpool", tv.maxpool),
                ("layer1", tv.layer1), ("layer2", tv.layer2), ("layer3", tv.layer3), ("layer4", tv.layer4),
                ("avgpool", tv.avgpool), ("flatten", nn.Flatten(1))])

    trunk = ResNeXt()
    trunk.reference = tv  # the same tensors under torchvision names
    return trunk


def test_vissl_classy_state_dict_trunk_and_ema(tmp_path):
    class MLP(nn.Module):  # vissl/models/heads/mlp.py
        def __init__(self):
            super().__init__()
            self.clf = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 16))

    trunk, heads = _vissl_trunk(11), nn.ModuleList([MLP()])
    ema_trunk = _vissl_trunk(12)
    base_model = {"model": {"trunk": {k: v for k, v in trunk.state_dict().items() if not k.startswith("reference.")},
                            "heads": heads.state_dict()}, "meta": {"trunk": {}, "heads": []}}
    ema = {"model": {"trunk": {k: v for k, v in ema_trunk.state_dict().items() if not k.startswith("reference.")},
                     "heads": heads.state_dict()}, "meta": {"trunk": {}, "heads": []}}
    classy_state_dict = {"train": True, "base_model": base_model, "meters": [], "optimizer": {}, "phase_idx": 9,
                         "train_phase_idx": 9, "num_updates": 1000, "losses": [], "hooks": {}, "loss": {},
                         "ema_model": ema, "ema_meters": []}
    path = _save(tmp_path, "model_final_checkpoint_phase99.torch",
                 {"phase_idx": 9, "iteration": 1000, "loss": {}, "iteration_num": 1000, "train_phase_idx": 9,
                  "classy_state_dict": classy_state_dict})
    w = read_backbone_weights(path)
    assert (w.kind, w.where, w.prefix) == ("vissl", "classy_state_dict.base_model.model.trunk", "_feature_blocks.")
    _expect(w, trunk.reference)
    _expect(read_backbone_weights(path, encoder="momentum"), ema_trunk.reference)


def test_timm_training_checkpoint_with_ema(tmp_path):
    model, model_ema = _resnet18(13), _resnet18(14)  # timm's resnet18 names its modules as torchvision does
    save_state = {"epoch": 99, "arch": "resnet18", "optimizer": _optimizer(model), "version": 2,
                  "args": argparse.Namespace(model="resnet18"), "state_dict": model.state_dict(),
                  "state_dict_ema": model_ema.state_dict(), "metric": 71.2}
    path = _save(tmp_path, "model_best.pth.tar", save_state)
    w = read_backbone_weights(path)
    assert (w.kind, w.where) == ("timm", "state_dict")
    assert [k for k in w.skipped if not k.startswith("state_dict_ema.")] == ["fc.weight", "fc.bias"]
    _expect(w, model)
    _expect(read_backbone_weights(path, encoder="momentum"), model_ema)


def test_timm_deep_stem_resnet_is_another_architecture(tmp_path):
    """timm resnet50d / resnet26d: conv1 is three 3x3 convs and the downsample starts with an avg-pool."""
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("conv1.")}
    sd.update({"conv1.0.weight": torch.rand(32, 3, 3, 3), "conv1.1.weight": torch.rand(32),
               "conv1.3.weight": torch.rand(32, 32, 3, 3), "conv1.4.weight": torch.rand(32),
               "conv1.6.weight": torch.rand(64, 32, 3, 3)})
    for old, new in ((".downsample.1.", ".downsample.2."), (".downsample.0.", ".downsample.1.")):  # pool first
        for k in [k for k in sd if old in k]:
            sd[k.replace(old, new)] = sd.pop(k)
    with pytest.raises(CheckpointError, match=r"deep-stem ResNet \(timm resnet\*d"):
        read_backbone_weights(_save(tmp_path, "resnet50d.pth", {"state_dict": sd, "arch": "resnet50d",
                                                                "version": 2, "epoch": 1}))


# ------------------------------------------------------------------------------------------ anything else
def test_unknown_layout_names_what_it_found_and_the_options(tmp_path):
    net = _backbone(15)
    sd = {f"encoder.trunk.{k}": v for k, v in net.state_dict().items()}
    sd["encoder.head.weight"] = torch.rand(4, 512)
    path = _save(tmp_path, "other.pth", {"net": sd, "step": 5})
    with pytest.raises(CheckpointError) as e:
        read_backbone_weights(path)
    msg = str(e.value)
    assert "'net'" in msg and "--checkpoint-key" in msg and "--prefix" in msg
    w = read_backbone_weights(path, checkpoint_key="net", prefix="encoder.trunk.")
    assert (w.kind, w.where, w.prefix) == ("custom", "net", "encoder.trunk.")
    _expect(w, net)
    _expect(read_backbone_weights(path, checkpoint_key="net"), net)  # the one ResNet in it is found
    with pytest.raises(CheckpointError, match=r"no entry 'nett' under the top level \(entries there: \['net', "):
        read_backbone_weights(path, checkpoint_key="nett")
    with pytest.raises(CheckpointError, match="no key of net starts with 'encoder.body.'"):
        read_backbone_weights(path, checkpoint_key="net", prefix="encoder.body.")
    with pytest.raises(CheckpointError, match="pick the encoder"):
        read_backbone_weights(path, checkpoint_key="net", encoder="momentum")


def test_partial_backbone_fails_with_what_is_missing(tmp_path):
    class INTL(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.projection = _backbone(16), _mlp(512, 32, 16)

    sd = DDP(INTL()).state_dict()
    for k in [k for k in sd if k.startswith("module.backbone.layer4.") or k.startswith("module.backbone.layer3.1.")]:
        del sd[k]
    path = _save(tmp_path, "partial.pth.tar", {"epoch": 1, "arch": "resnet18", "state_dict": sd, "optimizer": {}})
    with pytest.raises(CheckpointError, match=r"official-intl.* incomplete resnet18: \d+ of \d+ backbone tensors "
                                              r"missing: layer3\.1\.\* \(\d+ tensors\), layer4\.\* \(\d+ tensors\)"):
        read_backbone_weights(path)


def test_momentum_encoder_where_the_layout_has_none_is_refused_by_name():
    sd = copy.deepcopy(_backbone(17).state_dict())
    with pytest.raises(CheckpointError, match=r"plain ResNet state_dict .*\(torchvision\), which has no momentum"):
        read_backbone_weights(sd, encoder="momentum")
