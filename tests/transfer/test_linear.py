"""Linear evaluation: presets, config checks, the load check, the frozen-backbone check, and end-to-end runs
(pretrained beats random init, resume, 2 gloo processes) on the tiny embedded set."""


import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from common.backbone_weights import file_sha256, load_backbone_into
from common.checkpoint import CheckpointError
from common.config import compose_config, to_plain
from common.resnet import build_resnet
from stage_fixtures import linear_cfg, random_backbone_file
from transfer import classification as C
from transfer import linear


# ------------------------------------------------------------------------------------------ fast
def test_paper_presets_read_back():
    cfg = compose_config("linear", [])  # the default preset: the paper's ImageNet protocol
    o, d = cfg.optim, cfg.data
    assert (o.epochs, o.batch_size, o.base_lr, o.momentum, o.weight_decay) == (100, 256, 0.2, 0.9, 0.0)
    assert (o.schedule, list(o.milestones), o.gamma) == ("step", [60, 80], 0.1)
    assert (d.train_crop, d.min_scale, d.val_resize, d.val_crop) == (224, 0.08, 256, 224)
    assert cfg.run_dir == "outputs/linear/linear" and cfg.weights is None
    multi = compose_config("linear", ["eval/linear=imagenet_multicrop"])
    assert multi.optim.base_lr == 0.4 and list(multi.optim.milestones) == [60, 80] and multi.optim.epochs == 100
    syn = compose_config("linear", ["eval/linear=synthetic", "model.arch=resnet18"])
    assert syn.data.root == "data/synthetic/classification" and syn.data.val_crop == 32
    assert linear.validate_config(syn, check_paths=False, world_size=2).optim.batch_size == 64


def test_bad_configs_name_the_key_and_the_fix(tmp_path, synthetic_root):
    cfg = compose_config("linear", ["eval/linear=synthetic", "model.arch=resnet18"])
    OmegaConf.set_struct(cfg, False)  # compose returns a struct config; a user could still add keys with +key=
    bad = OmegaConf.merge(cfg, {"optim": {"lr": 0.1}})
    with pytest.raises(C.EvalConfigError, match=r"optim.lr.*valid keys of optim"):
        linear.validate_config(bad, check_paths=False)
    with pytest.raises(C.EvalConfigError, match="not a positive multiple of the 3 processes"):
        linear.validate_config(cfg, world_size=3, check_paths=False)
    with pytest.raises(C.EvalConfigError, match="needs model.arch"):
        linear.validate_config(OmegaConf.merge(cfg, {"model": {"arch": None}}), check_paths=False)
    with pytest.raises(C.EvalConfigError, match="is not a folder; fix"):
        linear.validate_config(OmegaConf.merge(cfg, {"data": {"root": str(tmp_path / "nope")}}))
    with pytest.raises(C.EvalConfigError, match="is not a file"):
        linear.validate_config(OmegaConf.merge(cfg, {"weights": str(tmp_path / "x.pth"),
                                                     "data": {"root": str(synthetic_root / "classification")}}))


def test_load_check_missing_keys_must_be_exactly_the_classifier(tmp_path):
    src = build_resnet("resnet18", small_stem=True)
    torch.manual_seed(1)
    for p in src.parameters():
        nn.init.normal_(p, std=0.05)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    cfg = compose_config("linear", [f"weights={path}", "eval/linear=synthetic"])
    loaded = C.build_model(linear.validate_config(cfg, check_paths=False), num_classes=7)
    assert (loaded.arch, loaded.small_stem, loaded.feature_dim, loaded.kind) == ("resnet18", True, 512, "torchvision")
    assert loaded.model.fc.weight.shape == (7, 512)
    assert torch.equal(loaded.model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(C.EvalConfigError, match="holds a resnet18"):
        C.build_model(linear.validate_config(OmegaConf.merge(cfg, {"model": {"arch": "resnet50"}}),
                                             check_paths=False), 7)

    def model():
        m = build_resnet("resnet18", small_stem=True)
        m.fc = nn.Linear(512, 7)
        return m

    state = dict(src.state_dict())
    load_backbone_into(model(), state)  # the good case passes; the new classifier stays as initialised
    del state["layer3.0.bn1.weight"]
    with pytest.raises(CheckpointError, match=r"missing in the weights: layer3.0.bn1.weight"):
        load_backbone_into(model(), state)
    extra = {**src.state_dict(), "projector.0.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"does not have .*: projector.0.weight"):
        load_backbone_into(model(), extra)
    with_fc = {**src.state_dict(), "fc.weight": torch.zeros(7, 512), "fc.bias": torch.zeros(7)}
    with pytest.raises(CheckpointError, match=r"a classifier's fc.\* included\): fc.weight, fc.bias"):
        load_backbone_into(model(), with_fc)


def test_check_frozen_sees_weights_and_bn_statistics():
    m = build_resnet("resnet18", small_stem=True)
    m.fc = nn.Linear(512, 3)
    snap = C.backbone_snapshot(m)
    assert "fc.weight" not in snap
    with torch.no_grad():
        m.fc.weight.add_(1.0)  # the classifier may change
    C.check_frozen(m, snap)
    m.train()
    m(torch.randn(4, 3, 16, 16))  # a forward in train mode updates the BN running statistics
    with pytest.raises(C.FrozenBackboneError, match="running_mean"):
        C.check_frozen(m, snap)


# ------------------------------------------------------------------------------------------ end to end












@pytest.mark.parametrize("content", [b"\x00garbage, not a zip", b""], ids=["garbage", "empty"])
def test_resume_from_a_corrupt_checkpoint_names_it_and_the_fix(tiny_synthetic, tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pth").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        linear.run(linear_cfg(tiny_synthetic, run_dir, "weights=null", "model.arch=resnet18"))
    print(info.value)
    assert str(run_dir / "last.pth") in str(info.value) and "delete it" in str(info.value)
    assert (run_dir / "last.pth").read_bytes() == content  # the file is reported, not removed


def test_resume_from_a_checkpoint_of_another_classifier_names_it_and_the_fix(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = linear_cfg(tiny_synthetic, run_dir, "weights=null", "model.arch=resnet18")
    # same source (random init) and config, so the resume gets past open_run's check to the tensors
    torch.save({"format": C.CLASSIFIER_FORMAT, "model": {"weight": torch.zeros(3, 3)}, "optimizer": {},
                "epoch": 1, "best_top1": 0.0, "history": [], "source": {"sha256": None},
                "config": to_plain(linear.validate_config(cfg.copy()))}, run_dir / "last.pth")
    with pytest.raises(CheckpointError, match="does not fit this run's classifier") as info:
        linear.run(cfg)
    print(info.value)
    assert str(run_dir / "last.pth") in str(info.value) and "delete it" in str(info.value)


def test_unfinished_pretraining_checkpoint_is_refused_unless_allowed(tmp_path, caplog):
    path = random_backbone_file(tmp_path / "last.pth", seed=0, finished=False, step=7)
    cfg = linear.validate_config(compose_config("linear", [f"weights={path}", "eval/linear=synthetic"]),
                                 check_paths=False)
    with pytest.raises(C.EvalConfigError, match=r"step 7 .*not marked finished.*allow_unfinished=true"):
        C.build_model(cfg, num_classes=3)
    allowed = C.build_model(OmegaConf.merge(cfg, {"allow_unfinished": True}), num_classes=3)
    s = allowed.identity
    print(f"\nunfinished checkpoint recorded as: step {s['step']}, finished {s['finished']}, sha256 {s['sha256'][:12]}")
    assert (s["step"], s["finished"], s["kind"], s["path"]) == (7, False, "intl-pretrain", str(path.resolve()))
    assert s["sha256"] == file_sha256(path) and "WARNING" in caplog.text and "allow_unfinished=true" in caplog.text
    done = random_backbone_file(tmp_path / "done.pth", seed=0, finished=True)
    assert C.build_model(OmegaConf.merge(cfg, {"weights": str(done)}), num_classes=3).identity["finished"] is True


def test_evaluate_leaves_out_unreadable_images():
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    model = nn.Linear(4, 3)
    marked = y.clone()
    marked[[2, 7]] = C.EXCLUDED  # two unreadable images, replaced by their neighbours' pixels
    loader = lambda labels: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=4)  # noqa: E731
    keep = marked != C.EXCLUDED
    got = C.evaluate(model, loader(marked), torch.device("cpu"))
    want = C.evaluate(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[keep], y[keep]),
                                                         batch_size=4), torch.device("cpu"))
    print(f"\n10 images, 2 unreadable: n {got['n']}, top-1 {got['top1']:.1f} (without them {want['top1']:.1f})")
    assert (got["n"], got["top1"], got["top5"]) == (8, want["top1"], want["top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)  # batches split differently: float sums differ
