"""intl-convert on a checkpoint the engine really wrote (ResNet-18 with EMA), to both formats with --check."""

from __future__ import annotations

import pickle

import numpy as np
import torch
import torchvision

from transfer.convert import DEFAULT_TOLERANCE, convert, main


def test_real_pretraining_checkpoint_converts_to_both_formats(tmp_path, tiny_synthetic, capsys):
    """A few steps of the real engine (ResNet-18, EMA variant, 32-px views), then both conversions."""
    from common.config import compose_config
    from pretrain.train import run

    run_dir = tmp_path / "run"
    cfg = compose_config("pretrain", [
        "pretrain/model=resnet18", "model.projector=[64,64]", "model.sync_bn=false",
        f"data.root={tiny_synthetic / 'classification'}", "data.workers=0",
        "optim.batch_size=8", "optim.epochs=1", "train.max_steps=2", "train.amp=off", "train.log_every=1",
        "train.spectrum_every=0", "method.ema=true", f"run_dir={run_dir}", "name=convert_e2e"])
    summary = run(cfg)
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["ema_model"], "the EMA variant must store the momentum encoder"

    d2 = convert(summary["checkpoint"], tmp_path / "online.pkl", check=True)
    assert d2.weights.kind == "intl-pretrain" and d2.weights.arch == "resnet18" and not d2.weights.small_stem
    assert d2.converted == 100 and d2.check.numerics_ok and not d2.check.trivial_bn
    assert max(d.max_rel for d in d2.check.diffs) <= DEFAULT_TOLERANCE
    with open(tmp_path / "online.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    np.testing.assert_array_equal(model["res5.1.conv2.norm.running_var"],
                                  ckpt["model"]["backbone.layer4.1.bn2.running_var"].numpy())

    assert main([str(summary["checkpoint"]), str(tmp_path / "ema.pth"), "--encoder", "momentum"]) == 0
    sd = torch.load(tmp_path / "ema.pth", weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    ema = {k[len("backbone."):]: v for k, v in ckpt["ema_model"].items() if k.startswith("backbone.")}
    assert set(sd) == set(ema) and all(torch.equal(sd[k], ema[k]) for k in ema)
    assert "skipped input keys" in capsys.readouterr().out
