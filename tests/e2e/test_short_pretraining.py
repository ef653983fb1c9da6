"""What a short INTL pretraining learns (slow): one pretraining by the engine (the synthetic preset on the embedded
set) shared by the tests of this module, which pytest-xdist runs on one worker (`make test`: --dist loadfile).
A randomly initialised backbone of the same seed is the baseline: k-NN, linear evaluation, the online probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import compose_config
from common.runlog import read_metrics
from transfer import linear

# The shared pretraining's length. Measured 2026-12-03 at 90 steps: k-NN 14.4 vs 10.8, linear 15.2 vs 11.2, probe
# 12.8: below every margin asked here; at 150 all three pass (the numbers in the tests).
STEPS = 150


@pytest.fixture(scope="module")
def synthetic_pretraining(synthetic_root, tmp_path_factory):
    """A short INTL pretraining by the engine, shared by the tests of this module: the synthetic preset
    (ResNet-18, 32-px views of the embedded set, batch 64) cut at STEPS steps. Returns (config, the run's summary)."""
    from pretrain.train import run

    run_dir = tmp_path_factory.mktemp("pretrain") / "intl_synthetic"
    cfg = compose_config("pretrain", ["pretrain/preset=synthetic", f"data.root={synthetic_root / 'classification'}",
                                      f"run_dir={run_dir}", f"train.max_steps={STEPS}", "train.spectrum_every=0",
                                      "train.eval_every=2"])
    summary = run(cfg)
    assert summary["steps"] == STEPS and (run_dir / "last.pth").is_file()
    return cfg, summary


def _knn_top1(backbone, root: Path, size: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from transfer.knn import extract_features, knn_accuracy

    tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def feats(split):
        loader = torch.utils.data.DataLoader(ImageFolder(str(root / split), tf), batch_size=125)
        return extract_features(backbone, loader, "cpu")

    return knn_accuracy(*feats("train"), *feats("val"), k=20)["top1"]


def test_short_pretraining_beats_random_init_on_knn(synthetic_root, synthetic_pretraining):
    from common.resnet import build_resnet

    cfg, summary = synthetic_pretraining  # 150 steps of the synthetic preset (the fixture above)
    size = cfg.data.augment.views[0].size
    torch.manual_seed(cfg.seed)  # the same initial weights as the pretraining started from
    random_init = build_resnet(cfg.model.arch)
    trained = build_resnet(cfg.model.arch)
    state = load_checkpoint(summary["checkpoint"])["model"]
    trained.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    cls = synthetic_root / "classification"
    acc_random, acc_trained = _knn_top1(random_init, cls, size), _knn_top1(trained, cls, size)
    print(f"k-NN top-1 on the synthetic val set: random init {acc_random:.1f}%, after {summary['steps']} steps "
          f"{acc_trained:.1f}% (effective rank {summary['effective_rank']:.1f})")
    # measured 2026-11-29 (1 thread): 17.6% after 150 steps vs 10.8% random init (chance 10%)
    assert acc_trained >= acc_random + 4.0


def test_online_probe_learns_during_a_short_pretraining(synthetic_pretraining):
    """The probe on the detached features rises above chance (10 classes: 10%) on the validation split
    within the 150 steps of the shared pretraining, and its running train top-1 rises too."""
    cfg, summary = synthetic_pretraining
    rows = read_metrics(Path(summary["run_dir"]))
    train = [r["probe_train_top1"] for r in rows if "probe_train_top1" in r]
    val = [(r["step"], r["probe_val_top1"]) for r in rows if "probe_val_top1" in r]
    first, last = sum(train[:3]) / 3, sum(train[-3:]) / 3
    print(f"online probe: running train top-1 {first:.1f} (first 3 rows) -> {last:.1f} (last 3); "
          f"validation top-1 {val}; k-NN monitor {summary.get('knn_top1')}")
    assert val and val[-1][0] == STEPS and summary["probe_val_top1"] == val[-1][1]
    assert val[-1][1] >= 14.0 and last > first


def test_linear_pretrained_beats_random_init(synthetic_root, synthetic_pretraining, tmp_path):
    # The synthetic preset on the embedded set (1000 train / 250 val), a short schedule: 4 epochs x 15 steps,
    # on the 150-step pretraining above. Measured 2026-11-29 (1 thread): pretrained 20.8 vs
    # random init 11.2 top-1 (top-5 74.8 vs 56.0); chance is 10. "Clearly higher" here: at least 6 points.
    pretrained_checkpoint = Path(synthetic_pretraining[1]["checkpoint"])
    short = ("eval/linear=synthetic", f"data.root={synthetic_root / 'classification'}", "optim.epochs=4",
             "optim.milestones=[3]", "train.eval_every=4", "train.log_every=15")
    pre = linear.run(compose_config("linear", [*short, f"run_dir={tmp_path / 'pre'}",
                                               f"weights={pretrained_checkpoint}"]))
    rnd = linear.run(compose_config("linear", [*short, f"run_dir={tmp_path / 'rnd'}", "model.arch=resnet18"]))
    print(f"\nlinear eval top-1 on the synthetic val set: pretrained {pre['top1']:.1f} "
          f"vs random init {rnd['top1']:.1f} (top-5 {pre['top5']:.1f} vs {rnd['top5']:.1f})")
    assert pre["frozen_backbone_check"] == "passed" and pre["feature_dim"] == 512
    assert pre["source_checkpoint"] == str(pretrained_checkpoint) and pre["weights_kind"] == "intl-pretrain"
    for res, d in ((pre, tmp_path / "pre"), (rnd, tmp_path / "rnd")):
        on_disk = json.loads((d / "results.json").read_text())
        assert on_disk["top1"] == res["top1"] and on_disk["epochs"] == 4 and on_disk["subset"] is None
        assert {"top1", "top5", "epochs", "subset", "source_checkpoint", "config"} <= set(on_disk)
        assert (d / "COMPLETE").exists() and (d / "config.yaml").exists() and any((d / "tb").iterdir())
        assert (d / "accuracy.png").exists() and (d / "results.md").exists()
    assert pre["top1"] >= rnd["top1"] + 6.0, (pre["top1"], rnd["top1"])


